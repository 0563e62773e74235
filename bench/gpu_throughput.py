"""The GPU check's throughput parts (tokens/s, TFLOP/s, MFU and peak memory at each micro-batch, packing, host
syncs) and the peer comparison with transformers' BertForPreTraining, on the same batches."""
from __future__ import annotations

import json
import os
import statistics
import time

from gpu_parts import ONE_B, TINY, TORCH_ADAM_ENV, _median, _stage, _sync


def throughput_dims(a, size: str) -> list[str]:
    return (ONE_B if size == "1b" else ["model=base"]) if not a.dry_run else TINY


def part_throughput(a, size: str) -> dict:
    """One ZeRO-3 engine (one GPU, bf16, the trainer's own build_model/initialize) over stage one's real batches;
    activation checkpointing toggled on the built model, the micro-batch grown by powers of two while the peak
    memory, extrapolated from the last two sizes, stays under 90% of the GPU's (an out-of-memory error ends the
    ascent too)."""
    import torch

    from pretrain.training import distributed
    from pretrain.training.engine import build_model, initialize

    dims = throughput_dims(a, size)
    seq = 64 if a.dry_run else 512
    st, cfg = _stage(a, "structbert", *dims, f"stage.seq_len={seq}", "deepspeed=zero3_bf16",
                     *(["deepspeed.precision=fp32"] if a.dry_run else []),
                     *(["deepspeed.torch_adam=true"] if a.dry_run or os.environ.get(TORCH_ADAM_ENV) else []))  # fmt: skip
    from pretrain.training.config import batch_geometry, deepspeed_config

    geometry = batch_geometry(cfg.train, 1)
    ds_config = deepspeed_config(cfg, geometry)
    distributed.init(distributed.DistInfo(0, 0, 1), 600)
    engine = initialize(build_model(st.make_model, ds_config, 0), ds_config, 0.01)
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    sizes = [2, 4] if a.dry_run else [8, 16, 32, 64, 128]
    rows = []
    for ckpt in (False, True):
        engine.module.encoder.checkpointing = ckpt
        measured = []
        for micro in sizes:
            if total and len(measured) >= 2:
                (m1, p1), (m2, p2) = measured[-2:]
                if p2 + (p2 - p1) / (m2 - m1) * (micro - m2) > 0.9 * total:
                    break
            try:
                row = _timed_steps(a, st, engine, micro, ckpt)
            except torch.cuda.OutOfMemoryError:
                rows.append({"activation_checkpointing": ckpt, "micro_batch": micro, "oom": True})
                torch.cuda.empty_cache()
                break
            measured.append((micro, row.pop("peak_bytes")))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"model": dims, "seq_len": seq, "params": sum(p.ds_numel for p in engine.module.parameters()), "rows": rows}
    for ckpt in (False, True):
        ok = [r for r in rows if r["activation_checkpointing"] == ckpt and not r.get("oom")]
        if ok:
            out[f"best_{'checkpointed' if ckpt else 'plain'}"] = max(ok, key=lambda r: r["tokens_per_s"])
    if size == "base":
        out["packing"] = _packing_rows(a, st, engine)
        out["host_syncs_per_step"] = _count_syncs(a, st, engine)
    return out


def _batches(a, st, micro: int, count: int, start: int = 0) -> list[dict]:
    from pretrain.training.config import BatchGeometry

    geometry = BatchGeometry(micro, 1, 1)
    st.index(geometry)
    it = iter(st.train_loader(geometry, 0, start))
    return [next(it) for _ in range(count)]


def _timed_steps(a, st, engine, micro: int, ckpt: bool, warmup: int = 2, timed: int = 6) -> dict:
    """Training steps (forward, backward, the ZeRO-3 optimizer step) at one micro-batch size, timed after warm-up."""
    from dataclasses import replace

    import torch

    from pretrain.training import flops
    from pretrain.training.engine import to_device

    if a.dry_run:
        warmup, timed = 1, 2
    batches = _batches(a, st, micro, warmup + timed)
    model_cfg = replace(st.model_cfg, activation_checkpointing=ckpt)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i, b in enumerate(batches):
        if i == warmup:
            _sync()
            start = time.perf_counter()
        loss, _ = engine(to_device(b, engine.device), st.weights)
        engine.backward(loss)
        engine.step()
    _sync()
    seconds = time.perf_counter() - start
    measured = batches[warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in measured)
    model_flops = sum(flops.structbert_train_flops(model_cfg, b) for b in measured)
    peak = flops.peak_tflops(None)
    tflops = model_flops / seconds / 1e12
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"activation_checkpointing": ckpt, "micro_batch": micro, "tokens_per_s": round(tokens / seconds),
            "step_s": round(seconds / timed, 4), "tflops": float(f"{tflops:.4g}"), "mfu": round(tflops / peak, 3) if peak else None,
            "peak_mem_gb": round(peak_bytes / 2**30, 2), "padding": round(1 - tokens / sum(b["attention_mask"].numel()
            for b in measured), 3), "peak_bytes": peak_bytes}  # fmt: skip


def _packing_rows(a, st, engine) -> list[dict]:
    """The same steps with the position-wise work on real tokens only (model.unpad=true) and on every slot (false)."""
    micro = 4 if a.dry_run else 32
    engine.module.encoder.checkpointing = False
    rows = []
    for unpad in (True, False, True):  # on, off, on again: a drift of the device's clocks shows as on != on
        engine.module.encoder.unpad = unpad
        row = _timed_steps(a, st, engine, micro, False)
        row.pop("peak_bytes")
        rows.append({"unpad": unpad, **row})
    engine.module.encoder.unpad = None
    return rows


def _count_syncs(a, st, engine) -> int | None:
    """Host syncs of one training step (ours and DeepSpeed's), counted by torch's CUDA sync debug mode."""
    import warnings

    import torch

    from pretrain.training.engine import to_device

    if not torch.cuda.is_available():
        return None
    b = _batches(a, st, 8, 1)[0]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss, _ = engine(to_device(b, engine.device), st.weights)
            engine.backward(loss)
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def part_peer(a) -> dict:
    """bench/speed.py's stage-one comparison on the GPU: the same batches, each side's forward, backward and fused
    AdamW step under bf16 autocast, in interleaved rounds; the ratio is the median of the per-round ratios."""
    from dataclasses import replace

    import torch
    from transformers import BertConfig, BertForPreTraining

    from bench.speed import ab_rounds, bert_pretraining_inputs
    from pretrain.models.structbert import StructBert

    dims = TINY if a.dry_run else ["model=base"]
    st, _ = _stage(a, "structbert", *dims, f"stage.seq_len={64 if a.dry_run else 512}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    micro, count = (4, 2) if a.dry_run else (16, 4)
    inputs = _batches(a, st, micro, count)
    c = st.model_cfg
    torch.manual_seed(0)
    ours = StructBert(replace(c, dropout=0.1, attn_dropout=0.1)).to(device)
    peer = BertForPreTraining(BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        intermediate_size=c.ffn, max_position_embeddings=c.max_positions, type_vocab_size=c.type_vocab,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa")).to(device)  # fmt: skip
    from pretrain.training.engine import to_device

    ours_in = [to_device(b, device) for b in inputs]
    peer_in = [{k: v.to(device) for k, v in bert_pretraining_inputs(b).items()} for b in inputs]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def steps(model, loss_of, xs):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        model.train()

        def run():
            for x in xs:
                with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                    loss = loss_of(model, x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            _sync()

        return run

    timing = ab_rounds(steps(ours, lambda m, x: m(x, st.weights)[0], ours_in), steps(peer, lambda m, x: m(**x).loss, peer_in),
                       2 if a.dry_run else 5)  # fmt: skip
    tokens = sum(int(b["attention_mask"].sum()) for b in inputs)
    return {"model": dims, "micro_batch": micro, "batches_per_round": count, "dtype": str(dtype),
            "tokens_per_s_ours": round(tokens / timing["s_ours"]), "tokens_per_s_peer": round(tokens / timing["s_peer"]),
            "ratio": round(timing["ratio"], 3),
            "padding": round(1 - tokens / sum(b["attention_mask"].numel() for b in inputs), 3)}  # fmt: skip
