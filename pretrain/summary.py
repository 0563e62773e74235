"""Summarise a run directory: `python -m pretrain.summary run.dir=<dir>` (several run.dir= for a table).

Also draws each run's loss and accuracy curves, one PNG per objective, to <run.dir>/curves/ (pretrain.plots)
and prints their paths."""
from __future__ import annotations

import json
import os
import sys

from pretrain import plots
from pretrain.cli import parse
from pretrain.data.palm_lengths import render_lengths
from pretrain.errors import UserError, exit_on_user_error
from pretrain.objectives import OBJECTIVES

# Columns shown when present, in this order.
COLUMNS = ("loss", *(c for o in OBJECTIVES for c in o.shown),
           "accuracy", "macro_f1", "f1")  # fine-tuning's scores (pretrain.finetune)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"run.dir={run_dir}: no metrics.jsonl (has this run trained?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(run_dir: str) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    if not train:
        raise UserError(f"run.dir={run_dir}: metrics.jsonl has no train rows")
    times = [r["step_time_s"] for r in train if r.get("step_time_s")]
    data, results = {}, None
    if os.path.isfile(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
            data = json.load(f).get("train_data", {})
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    return {
        "run": run_dir,
        "steps": train[-1]["step"],
        "first_train": train[0],
        "last_train": train[-1],
        "last_valid": valid[-1] if valid else None,
        # a blend's per-source validation (data.dirs): the last row of each "valid/<source>"
        "last_valid_sources": {r["split"]: r for r in rows if r["split"].startswith("valid/")},
        "s_per_step": sorted(times)[len(times) // 2] if times else None,  # median: robust to the first, slow steps
        "length_histogram": data.get("length_histogram"),
        "results": results,  # a fine-tuning run's test figures
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def render(s: dict) -> str:
    lines = [f"{s['run']}: {s['steps']} steps, median {_fmt(s['s_per_step'])} s/step"]
    cols = [c for c in COLUMNS if c in s["last_train"] or (s["last_valid"] and c in s["last_valid"])]
    width = max([14] + [len(split) + 11 for split in s.get("last_valid_sources", {})])
    lines.append("  " + "split".ljust(width) + "".join(c.rjust(10) for c in cols))
    shown = [("train first", s["first_train"]), ("train last", s["last_train"]), ("valid last", s["last_valid"])]
    shown += [(f"{split} last", row) for split, row in s.get("last_valid_sources", {}).items()]
    for name, row in shown:
        if row is not None:
            lines.append("  " + f"{name} @{row['step']}".ljust(width) + "".join(_fmt(row.get(c)).rjust(10) for c in cols))
    if s.get("length_histogram"):
        lines += render_lengths(s["length_histogram"])
    if s.get("results"):
        r = s["results"]
        if r["test"]:
            lines.append(f"  test ({r['test_examples']} examples, the checkpoint of step {r['best_step']}, picked by "
                         f"{r['selected_by']}): " + ", ".join(f"{k} {v:.2f}" for k, v in r["test"].items()))  # fmt: skip
        else:  # a hidden test set (CLUE's): predicted, not scored
            valid = ", ".join(f"valid {k} {v:.2f}" for k, v in r["valid"].items() if v is not None)
            lines.append(f"  test: {r['test_examples']} predictions, labels hidden; the checkpoint of step "
                         f"{r['best_step']}, picked by {r['selected_by']}: {valid}")  # fmt: skip
        if r.get("submission"):
            lines.append(f"  submission: {r['submission']}")
        for name, f in r.get("data_files", {}).items():  # which copy of the data: two results on two copies differ here
            lines.append(f"  data {name}: {f['path']} sha256 {f['sha256'][:16]} ({f['bytes']} bytes)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg, _ = parse(argv, {"run": {"dir": []}}, command="pretrain.summary", doc=__doc__, repeated=("run.dir",))
    dirs = list(cfg.run.dir)
    if not dirs:
        raise UserError("run.dir is required (python -m pretrain.summary run.dir=<dir> [run.dir=<dir> ...])")
    for d in dirs:
        print(render(summarize(d)))
        for path in curves(d):
            print(f"  curves: {path}")


def curves(run_dir: str) -> list[str]:
    """The run's loss and accuracy PNGs (pretrain.plots), written; their paths."""
    try:
        return plots.write_curves(run_dir, read_metrics(run_dir))
    except ImportError as e:
        raise UserError(f"drawing the curves needs matplotlib ({e}): pip install 'matplotlib>=3.7'") from e
    except OSError as e:
        raise UserError(f"run.dir={run_dir}: could not write the curves: {e}") from e


if __name__ == "__main__":
    with exit_on_user_error("pretrain.summary"):
        main(sys.argv[1:])
