"""`pretrain.export format=plug`: a run's checkpoint written as PLUG's tensor-parallel shards, config.json and
vocab.txt, then read back and compared."""
from __future__ import annotations

import json
import os
import shutil

import torch

from pretrain.data.tokenizer import read_vocab
from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.plug.layout import DTYPES, FP16_MAX, SHARD, TIED, VOCAB, WORD, Entry, layout, piece, plug_vocab_size
from pretrain.plug.read import ShardSet
from pretrain.training import checkpoint, partitions
from pretrain.training import run_dir as run_dir_files


def check_export(cfg: ModelConfig, stage, tp: int, dtype: str, where: str) -> None:
    """Everything that can make an export in PLUG's layout impossible, before anything is read or written."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UserError(f"tp={tp}: must be an integer >= 1 (PLUG's released shards: 8)")
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: must be {' or '.join(DTYPES)}")
    if stage.generates and cfg.copy:
        raise UserError(f"{where}: model.copy=true; PLUG has no copy mechanism (export a run with model.copy=false)")
    if stage.generates and not cfg.pre_ln:
        raise UserError(f"{where}: model.pre_ln=false; PLUG's decoder is pre-LN, a post-LN stage two has no place in"
                        " its layout")  # fmt: skip
    for key, n in (("heads", cfg.heads), ("hidden", cfg.hidden), ("ffn", cfg.ffn)):
        if n % tp:
            raise UserError(f"tp={tp} does not divide model.{key}={n} (each rank holds 1/tp of the heads and of the FFN)")


def _full(state, e: Entry, cfg: ModelConfig, rows: int) -> torch.Tensor:
    """Our full tensor for entry e, as PLUG holds it: fp32, the vocab padded (or cut) to `rows`, the identity
    LayerNorm where we have none."""
    if e.ours is None:
        return torch.ones(cfg.hidden) if e.plug.endswith(".weight") else torch.zeros(cfg.hidden)
    t = state[e.ours].contiguous().detach().float()
    if e.split == VOCAB and t.shape[0] != rows:
        if t.shape[0] > rows:  # rows past PLUG's padded vocab: padding rows of ours, never a real token's
            return t[:rows]
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


def write_shards(state, cfg: ModelConfig, stage, tokens: int, out_dir: str, tp: int, dtype: str = "fp16") -> list[str]:
    """Write `state` (our names: tensors, or DeepSpeed's lazy consolidated ones) as PLUG's tp shards into out_dir.

    One shard at a time, one parameter at a time: each full tensor is assembled, its rank's piece copied out, and
    only that shard's pieces are held (1/tp of the model). The price is reading: every full tensor is assembled
    once per shard, tp times in all (at tp 8, PLUG-27B's 104 GB of fp32 partitions read 8 times), for a peak of
    one shard (7 GB in fp16) where writing every shard in one pass would hold the whole model. dtype fp16: the LayerNorms stay fp32, as in PLUG's
    model under fp32_layernorm; everything else fp16 (what PLUG's loader casts to anyway; half the disk)."""
    check_export(cfg, stage, tp, dtype, "the model")
    entries = layout(cfg, stage.generates)
    known = {e.ours for e in entries}
    missing = [e.ours for e in entries if e.ours is not None and e.ours not in state]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of PLUG's layout")
    unknown = [name for name in state if name not in known]
    if unknown:  # refuse rather than drop a parameter silently
        raise UserError(f"the checkpoint has {unknown[0]}, which PLUG's layout has no place for")
    rows = plug_vocab_size(tokens, tp)
    paths = []
    for rank in range(tp):
        module: dict[str, torch.Tensor] = {}
        for e in entries:
            if e.plug == TIED:  # the same parameter as the word embedding: stored once, under both names
                module[e.plug] = module[WORD]
                continue
            full = _full(state, e, cfg, rows)
            out = torch.float32 if e.is_norm else DTYPES[dtype]
            if rank == 0 and out == torch.float16 and full.numel() and float(full.abs().max()) > FP16_MAX:
                raise UserError(f"{e.ours} holds values beyond fp16's range ({float(full.abs().max()):.3g}): export"
                                " with dtype=fp32")  # fmt: skip
            part = piece(full, e, tp, rank)
            module[e.plug] = torch.empty(part.shape, dtype=out).copy_(part)  # its own storage: a view would save all
        path = os.path.join(out_dir, SHARD.format(rank))
        torch.save({"module": module, "mp_world_size": tp}, path)
        paths.append(path)
        del module
    return paths


def plug_config(cfg: ModelConfig, stage, tokens: int, tp: int, dtype: str, tag_dir: str) -> dict:
    """config.json in the keys of PLUG's BertConfig (model/modeling.py), and what the export adds."""
    return {
        "vocab_size": plug_vocab_size(tokens, tp), "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.ffn, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab,
        "initializer_range": cfg.init_std, "deep_init": False, "pre_ln": cfg.pre_ln,
        "fp32_layernorm": dtype == "fp16", "fp32_embedding": False, "fp32_tokentypes": False,
        "layernorm_epsilon": cfg.ln_eps, "dec_hidden_layers": cfg.decoder_layers if stage.generates else 0,
        "model_type": "plugNLG" if stage.generates else "plugNLU",
        "pretrain_export": {
            "stage": stage.name, "tensor_parallel": tp, "dtype": dtype, "vocab_tokens": tokens, "checkpoint": tag_dir,
            "embedding_layernorm": "ours" if cfg.normed_embeddings else
            "identity: the model has none, and PLUG's forward normalises the embeddings (it differs from ours)",
        },
    }  # fmt: skip


def export_plug(run_dir: str, record, out: str, step: int | None = None, overwrite: bool = False, tp: int = 8,
                dtype: str = "fp16", check: bool = True) -> tuple[str, dict]:  # fmt: skip
    """Write run_dir's newest (or step's) checkpoint in PLUG's layout to out: the shards, config.json, vocab.txt.
    record: the run's model record (pretrain/run_record.py: the stage's class and the model's config).
    Built beside out and renamed into place at the end. check: the shards are read back (ShardSet) and every
    tensor compared with the checkpoint's (cast to what was written) before that. Returns the checkpoint and the
    largest difference per kind of split (all 0.0)."""
    stage, cfg = record.stage_class, record.cfg
    check_export(cfg, stage, tp, dtype, f"run.dir={run_dir}")
    if os.path.exists(out) and not overwrite and os.listdir(out):
        raise UserError(f"out={out}: exists and is not empty (overwrite=true replaces it)")
    where = os.path.join(run_dir, "checkpoints", f"step{step}") if step is not None else run_dir
    tag_dir = checkpoint.find(where, "step" if step is not None else "run.dir", option="step={step}")
    tokens = len(read_vocab(os.path.join(run_dir, "vocab.txt")))
    state = partitions.consolidate(tag_dir, lazy=True)
    diffs: dict[str, float] = {}
    with run_dir_files.built_beside(out) as tmp:
        write_shards(state, cfg, stage, tokens, tmp, tp, dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plug_config(cfg, stage, tokens, tp, dtype, tag_dir), f, indent=2)
        shutil.copyfile(os.path.join(run_dir, "vocab.txt"), os.path.join(tmp, "vocab.txt"))
        if check:
            diffs = compare(tmp, state, cfg, stage, tokens, dtype)
            if any(v != 0.0 for v in diffs.values()):
                raise UserError(f"out={out}: the shards read back differ from the checkpoint ({diffs})")
    return tag_dir, diffs


def compare(shard_dir: str, state, cfg: ModelConfig, stage, tokens: int, dtype: str) -> dict[str, float]:
    """The largest |read back - written| per kind of split, over every tensor of the shards in shard_dir."""
    shards = ShardSet(shard_dir, f"out={shard_dir}")
    rows = plug_vocab_size(tokens, shards.tp)
    diffs: dict[str, float] = {}
    for e in layout(cfg, stage.generates):
        want = _full(state, e, cfg, rows).to(torch.float32 if e.is_norm else DTYPES[dtype]).float()
        got = shards.tensor(e).float()
        d = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        diffs[e.split] = max(diffs.get(e.split, 0.0), d)
    return diffs


def main(cfg, record) -> None:
    """pretrain.export format=plug (export.py hands its parsed settings and the run's model record over)."""
    tp = 8 if cfg.tp is None else cfg.tp
    dtype = "fp16" if cfg.dtype is None else str(cfg.dtype)
    tag_dir, diffs = export_plug(cfg.run.dir, record, cfg.out, None if cfg.step is None else int(cfg.step),
                                 bool(cfg.overwrite), tp, dtype, bool(cfg.check))  # fmt: skip
    print(f"pretrain.export: {tag_dir} -> {cfg.out} (PLUG's layout, {tp} tensor-parallel shards, {dtype})")
    if diffs:
        print("pretrain.export: check, shards read back vs the checkpoint, max |difference|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip
