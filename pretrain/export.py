"""Export a run's checkpoint to a Hugging Face `transformers` directory (needs `pip install -e .[hf]`):

    python -m pretrain.export run.dir=<run> out=<dir> [step=<N>] [overwrite=false] [check=true]

The newest checkpoint (or `step=N`'s), written by any number of ranks, is consolidated once (DeepSpeed's
zero_to_fp32) and its tensors are renamed, not copied, into transformers' layout: the stage's own exporter
(pretrain/hf/export.py) says how; stage one as MegatronBERT (pre-LN) or BERT, stage two as a small PALM class the
export carries. Also written: config.json, the tokenizer (save_pretrained, with split_special_tokens so that
literal "[MASK]" text tokenizes as ours does), and a model card (README.md). The directory is built beside `out` and renamed
into place at the end: an error leaves nothing half-written.

format=plug [tp=8] [dtype=fp16]: PLUG's own released layout instead (AliceMind's tensor-parallel shards
mp_rank_XX_model_states.pt, config.json, vocab.txt; see pretrain/plug/), its check a read-back.

check=true (the default) then loads the export with transformers' Auto classes, runs it and our model on one
fixed padded batch in fp32, prints the largest differences (hidden states, MLM and sentence logits; stage two:
decoder logits, and whether greedy and beam generate() give our tokens) and fails above 1e-4 or on other tokens.
A fine-tuned run exports only where its model is its stage's (generation); a classifier's is not.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from pretrain import run_record
from pretrain.cli import parse
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError, exit_on_user_error
from pretrain.hf.export import save_tokenizer, write_safetensors
from pretrain.models.config import ModelConfig
from pretrain.plug import write as plug_write
from pretrain.training import checkpoint, partitions, safe_load
from pretrain.training import run_dir as run_files

DEFAULTS = {"run": {"dir": None}, "out": None, "step": None, "overwrite": False, "check": True, "trust_checkpoint": False,
            "format": "hf", "tp": None, "dtype": None}  # tp, dtype: format=plug's (pretrain/plug/)
CHECK_TOLERANCE = 1e-4  # max |difference| between transformers' outputs and ours that `check` accepts


def model_card(run_dir: str, tag_dir: str, exporter, cfg: ModelConfig, model_type: str) -> str:
    """A short README.md: what the model is, the run's config, steps, data and final metrics."""
    info, rows = {}, []
    if os.path.isfile(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            info = json.load(f)
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    last = {split: next((r for r in reversed(rows) if r["split"] == split), None) for split in ("train", "valid")}
    data = info.get("train_data", {})
    lines = [
        f"# {os.path.basename(os.path.normpath(run_dir))}: {exporter.title}",
        "", f"Exported by `python -m pretrain.export` from `{tag_dir}` (model_type `{model_type}`).", "",
        "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in (
            ("hidden x layers x heads", f"{cfg.hidden} x {cfg.layers} x {cfg.heads}"), ("ffn", cfg.ffn),
            ("decoder layers", cfg.decoder_layers), ("vocab (padded)", cfg.vocab_size), ("positions", cfg.max_positions),
            ("pre-LN", cfg.pre_ln), ("parameters", info.get("parameters")), ("global batch", info.get("global_batch")),
            ("steps", (last["train"] or {}).get("step")), ("documents", data.get("num_docs")),
        )),
    ]  # fmt: skip
    for split, row in last.items():
        if row:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith(("_loss", "_acc", "_ppl")) and v is not None)
            lines += ["", f"Last {split} row (step {row['step']}): {metrics}."]
    lines += exporter.card_lines
    return "\n".join(lines) + "\n"


def export(run_dir: str, out: str, step: int | None = None, overwrite: bool = False) -> str:
    """Write the export of run_dir's newest (or step's) checkpoint to out; returns the checkpoint exported."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("the export needs transformers and safetensors: pip install -e '.[hf]'") from None

    record = run_record.stage_model_record(run_dir, "pretrain.export")
    cfg, exporter = record.cfg, record.stage_class.hf_export()
    if os.path.exists(out) and not overwrite and os.listdir(out):
        raise UserError(f"out={out}: exists and is not empty (overwrite=true replaces it)")
    exporter.refuse(cfg, run_dir)
    where = os.path.join(run_dir, "checkpoints", f"step{step}") if step is not None else run_dir
    tag_dir = checkpoint.find(where, "step" if step is not None else "run.dir", option="step={step}")
    # lazily: the ranks' fp32 partitions stay as they are, and one full tensor at a time is assembled and written
    state = partitions.consolidate(tag_dir, lazy=True)
    plan = exporter.plan(state, cfg)
    tok = Tokenizer(os.path.join(run_dir, "vocab.txt"))
    with run_files.built_beside(out) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), plan, state, tag_dir)  # refuses NaN or inf
        del state
        hf_cfg = exporter.config(cfg, tok)
        hf_cfg.save_pretrained(tmp)
        exporter.write_extra(tmp, tok, cfg)
        save_tokenizer(os.path.join(run_dir, "vocab.txt"), tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(run_dir, tag_dir, exporter, cfg, hf_cfg.model_type))
    return tag_dir


def check(run_dir: str, out: str, tag_dir: str) -> dict[str, float]:
    """Largest |transformers - ours| of each output on one fixed padded batch (fp32, eval mode); for stage two
    also whether greedy and beam generate() give our tokens (0 when they do)."""
    import transformers  # transformers: the `hf` extra; only for check

    transformers.logging.set_verbosity_error()  # its load report lists the other heads' keys as unexpected
    transformers.logging.disable_progress_bar()
    record = run_record.stage_model_record(run_dir, "pretrain.export")
    cfg = record.cfg
    ours = run_record.load_stage_model(record, tag_dir)  # in eval mode: no dropout
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (3, min(24, cfg.max_positions)), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, ids.shape[1] * 2 // 3 :], mask[2, ids.shape[1] // 3 :] = False, False
    with torch.no_grad():
        return record.stage_class.hf_export().check(ours, out, ids, mask, g)


def main(argv: list[str]) -> None:
    cfg, _ = parse(argv, DEFAULTS, command="pretrain.export", doc=__doc__, verbatim=("run.dir", "out"))
    if cfg.run.dir is None or cfg.out is None:
        raise UserError("run.dir and out are required (python -m pretrain.export run.dir=<run> out=<dir>)")
    safe_load.trust(safe_load.trust_setting(cfg.trust_checkpoint))
    if cfg.step is not None and (not isinstance(cfg.step, int) or isinstance(cfg.step, bool) or cfg.step < 0):
        raise UserError(f"step={cfg.step}: must be an integer >= 0 (a checkpoint's step)")
    if cfg.format == "plug":
        return plug_write.main(cfg, run_record.stage_model_record(cfg.run.dir, "pretrain.export format=plug"))
    if cfg.format != "hf":
        raise UserError(f"format={cfg.format}: must be hf or plug")
    for key in ("tp", "dtype"):
        if cfg[key] is not None:
            raise UserError(f"{key}={cfg[key]}: only with format=plug (PLUG's tensor-parallel files)")
    tag_dir = export(cfg.run.dir, cfg.out, None if cfg.step is None else int(cfg.step), bool(cfg.overwrite))
    print(f"pretrain.export: {tag_dir} -> {cfg.out}")
    if cfg.check:
        diffs = check(cfg.run.dir, cfg.out, tag_dir)
        print("pretrain.export: check, max |transformers - ours| in fp32: "
              + ", ".join(f"{k} {v:.2e}" if "tokens" not in k else f"{k} {bool(v)}" for k, v in diffs.items()))  # fmt: skip
        worst = max(v for k, v in diffs.items() if "tokens" not in k)
        if worst > CHECK_TOLERANCE or any(v for k, v in diffs.items() if "tokens" in k):
            raise UserError(f"out={cfg.out}: transformers' model differs from ours (max |difference| {worst:.2e}, "
                            f"tokens differ: {[k for k, v in diffs.items() if 'tokens' in k and v] or 'none'})")


if __name__ == "__main__":
    with exit_on_user_error("pretrain.export"):
        main(sys.argv[1:])
