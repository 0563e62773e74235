"""AliceMind PLUG's own modules (PLUG/model/modeling.py, PLUG/mpu) load the shards pretrain.plug.write writes
from a random Palm, on CPU over 2 tensor-parallel ranks (gloo), with load_state_dict(strict=True), and compute
MLM and decoder logits; prints their largest differences from ours as JSON.

    python tests/plug_reference.py <AliceMind>/PLUG <work dir> [embedding_norm]

embedding_norm: our model is built with model.embedding_norm=true (a trained-like, random embedding LayerNorm),
and PLUG's forward is run as it is, its embedding LayerNorm included.

Shims, for a machine without apex or CUDA: apex's FusedLayerNorm -> torch's LayerNorm, torch._six,
data_utils.file_utils (downloads), DeepSpeed's timers, the CUDA RNG tracker (dropout is 0). Two deliberate
departures from PLUG's forward, both where PLUG's model and ours differ (see pretrain/plug/__init__.py): without
embedding_norm, PLUG's embedding LayerNorm is replaced by the identity (our pre-LN encoder then has none;
KEEP_EMB_LN=1 keeps it, to see the difference), and the encoder's final LayerNorm is applied once
(PalmForPreTraining.forward without activation checkpointing applies it twice; the checkpointed path, once).
"""
import contextlib
import json
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

TP = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shims(plug_src: str) -> None:
    sys.path.insert(0, plug_src)
    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.FusedLayerNorm = torch.nn.LayerNorm
    six = types.ModuleType("torch._six")
    six.inf = float("inf")
    file_utils = types.ModuleType("data_utils.file_utils")
    file_utils.cached_path = lambda *a, **k: None
    data_utils = types.ModuleType("data_utils")
    data_utils.__path__ = []
    sys.modules.update({"apex": types.ModuleType("apex"), "apex.normalization": types.ModuleType("apex.normalization"),
                        "apex.normalization.fused_layer_norm": fused, "torch._six": six, "data_utils": data_utils,
                        "data_utils.file_utils": file_utils})  # fmt: skip
    import deepspeed.utils.timer as timer

    class Timers:
        def __call__(self, name):
            return types.SimpleNamespace(start=lambda: None, stop=lambda: None)

        def log(self, *args, **kwargs):
            pass

    timer.SynchronizedWallClockTimer = Timers


def worker(rank, plug_src, port, shard_dir, out_path, inputs, keep_embedding_norm):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    shims(plug_src)
    import mpu
    import mpu.transformer
    from model.modeling import BertConfig, PalmForPreTraining

    mpu.initialize_model_parallel(TP)
    mpu.transformer.get_cuda_rng_tracker = lambda: types.SimpleNamespace(fork=contextlib.nullcontext)
    cfg = BertConfig(256, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=24,
                     type_vocab_size=3, pre_ln=True, layernorm_epsilon=1e-12, dec_hidden_layers=2)  # fmt: skip
    torch.manual_seed(5)
    model = PalmForPreTraining(cfg).eval()
    state = torch.load(os.path.join(shard_dir, f"mp_rank_{rank:02d}_model_states.pt"), weights_only=True)["module"]
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key, or shape
    ids, types_, mask, dec = inputs
    with torch.no_grad():
        # PLUG's embeddings always end in a LayerNorm; our pre-LN model without embedding_norm has none: replaced,
        # to compare the rest
        if not keep_embedding_norm:
            model.bert.embeddings.LayerNorm = torch.nn.Identity()
        # PalmForPreTraining.forward calls bert with output_all_encoded_layers=False, and without activation
        # checkpointing BertEncoder then applies its final LayerNorm twice; with True it applies it once (as the
        # checkpointed training path does): the same modules, orchestrated by hand
        layers, pooled = model.bert(ids, types_, mask, output_all_encoded_layers=True)
        mlm, _ = model.cls(layers[-1], pooled)
        dec_mask = torch.ones(1, 1, dec.shape[1], dec.shape[1]).tril()
        h = model.decoder(model.bert.embeddings, layers[-1], dec, None, mask, dec_mask)
        logits = F.linear(h, model.bert.embeddings.word_embeddings.weight)
        mlm, logits = mpu.gather_from_model_parallel_region(mlm), mpu.gather_from_model_parallel_region(logits)
    if rank == 0:
        torch.save({"mlm": mlm, "logits": logits, "keys": len(state)}, out_path)
    dist.barrier()


def main(plug_src: str, work: str, embedding_norm: bool = False) -> None:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pretrain.models.config import ModelConfig
    from pretrain.models.palm import Palm
    from pretrain.plug.write import write_shards
    from pretrain.stages import STAGES
    from runs import free_port

    cfg = ModelConfig(vocab_size=48, hidden=16, layers=2, heads=4, ffn=32, max_positions=24, decoder_layers=2,
                      dropout=0.0, attn_dropout=0.0, embedding_norm=embedding_norm)  # fmt: skip
    torch.manual_seed(1)
    ours = Palm(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.3)
    shard_dir = os.path.join(work, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    write_shards(ours.state_dict(), cfg, STAGES["palm"], 45, shard_dir, TP, "fp32")  # 45 tokens -> 256 rows
    g = torch.Generator().manual_seed(0)
    ids, types_ = torch.randint(5, 45, (2, 9), generator=g), torch.randint(0, 2, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    dec = torch.randint(5, 45, (2, 6), generator=g)
    out_path = os.path.join(work, "plug_logits.pt")
    inputs = (ids, types_, mask, dec)
    keep = embedding_norm or bool(os.environ.get("KEEP_EMB_LN"))
    torch.multiprocessing.spawn(worker, args=(plug_src, free_port(), shard_dir, out_path, inputs, keep), nprocs=TP)
    got = torch.load(out_path)
    with torch.no_grad():
        h = ours.encoder(ids, types_, mask.bool(), unpad=False)
        mlm = ours.mlm_head(h, ours.encoder.embeddings.word.weight)
        hd, _ = ours.decoder(dec, ours.encoder.embeddings, h, mask.bool())
        logits = F.linear(hd, ours.encoder.embeddings.word.weight)
    print(json.dumps({
        "keys_per_rank": got["keys"],
        "mlm_max_diff": float((got["mlm"][..., :48] - mlm)[mask.bool()].abs().max()),
        "mlm_padding_rows_max": float(got["mlm"][..., 48:].abs().max()),
        "decoder_max_diff": float((got["logits"][..., :48] - logits).abs().max()),
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["embedding_norm"])
