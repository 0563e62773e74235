"""A fine-tuning task over a grid of seeds and learning rates (and epochs), as papers report fine-tuning:

    python -m pretrain.grid run.dir=runs/grid/afqmc seeds=[1,2,3] lrs=[2e-5,3e-5,5e-5] [epochs=[2,3]] \
        [launcher='deepspeed --num_gpus 2 --module'] [index=<i>] -- task=clue/afqmc data.dir=... init_from=... ...

Everything after `--` is pretrain.finetune's command line, checked as that command checks it. Each point of the
grid (lr, epochs, seed) is an independent run directory, run.dir/lr<lr>[-ep<epochs>]-seed<seed>, run by the
launcher (the command line that `pretrain.finetune` follows: 'python -m', 'torchrun --nproc_per_node 8 -m',
'deepspeed --num_gpus 8 --master_port 29600 --module'): a finished point (its results.json written) is skipped, an unfinished one resumes from its newest
checkpoint. `index=i` runs point i alone: a Slurm array task (launch/slurm/finetune_grid.sbatch) or a rank of
one's own scheduler; without it every point runs, one after the other.

Once every point has finished, the report (printed, and written to run.dir/grid.json): per setting (lr, epochs),
the valid score that picks checkpoints (the task's `select`: accuracy, F1, or the loss for generation) as mean and
standard deviation (sample, n - 1) over the seeds; the setting with the best mean; at it, the mean and standard
deviation of every valid and test figure. `report=true` only reports (nothing runs).

    python -m pretrain.grid table=[runs/grid/afqmc,runs/grid/tnews,...]

prints the grids' reports side by side, one task a line, and CLUE's classification average the way its
leaderboard computes it, the plain mean of six accuracies: AFQMC, TNEWS, IFLYTEK, OCNLI (CLUE 1.1; CMNLI in 1.0),
CLUEWSC2020, CSL. Here it is over the dev accuracies at the chosen settings (CLUE keeps the test labels: its
leaderboard computes the test average from the submission files).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys

from pretrain.cli import parse
from pretrain.errors import UserError, exit_on_user_error
from pretrain.overrides import check_command_line

CLUE_AVERAGE = {"1.1": ("afqmc", "tnews", "iflytek", "ocnli", "cluewsc2020", "csl"),
                "1.0": ("afqmc", "tnews", "iflytek", "cmnli", "cluewsc2020", "csl")}
DEFAULTS = {"run": {"dir": None}, "seeds": [1], "lrs": None, "epochs": None, "index": None, "report": False, "table": None,
            "launcher": "deepspeed --num_gpus 1 --module"}  # fmt: skip


def points(lrs: list[float], epochs: list[float] | None, seeds: list[int]) -> list[dict]:
    """The grid in its order (lr, then epochs, then seed), each point with its run directory's name."""
    out = []
    for lr, ep, seed in itertools.product(lrs, epochs or [None], seeds):
        name = f"lr{lr:g}" + ("" if ep is None else f"-ep{ep:g}") + f"-seed{seed}"
        out.append({"lr": lr, "epochs": ep, "seed": seed, "name": name})
    return out


def finetune_args(point: dict, run_dir: str, finetune: list[str]) -> list[str]:
    extra = [] if point["epochs"] is None else [f"train.epochs={point['epochs']}"]
    return finetune + [f"run.dir={os.path.join(run_dir, point['name'])}", f"seed={point['seed']}",
                       f"train.lr={point['lr']}", *extra]  # fmt: skip


def run_point(point: dict, run_dir: str, finetune: list[str], launcher: list[str]) -> None:
    if os.path.isfile(os.path.join(run_dir, point["name"], "results.json")):
        print(f"pretrain.grid: {point['name']}: finished, skipped", file=sys.stderr)
        return
    proc = subprocess.run(launcher + ["pretrain.finetune"] + finetune_args(point, run_dir, finetune))
    if proc.returncode != 0:
        raise UserError(f"pretrain.grid: {point['name']} failed (exit {proc.returncode}); rerun the grid to resume it")


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}  # fmt: skip


def report(run_dir: str, grid: list[dict]) -> dict:
    """grid.json's content from the points' results.json (every point must have finished)."""
    results = {}
    for p in grid:
        path = os.path.join(run_dir, p["name"], "results.json")
        if not os.path.isfile(path):
            raise UserError(f"{path}: not written yet (point {p['name']} has not finished): run the grid first")
        with open(path, encoding="utf-8") as f:
            results[p["name"]] = json.load(f)
    first = next(iter(results.values()))
    column, higher = first["selected_by"].split()[1], "higher" in first["selected_by"]
    settings = {}
    for p in grid:
        settings.setdefault((p["lr"], p["epochs"]), []).append(results[p["name"]])
    table = [{"lr": lr, "epochs": ep, column: _mean_sd([r["valid"][column] for r in rs])}
             for (lr, ep), rs in settings.items()]  # fmt: skip
    best = max(table, key=lambda row: row[column]["mean"] if higher else -row[column]["mean"])
    chosen = settings[(best["lr"], best["epochs"])]
    at_best = {f"valid {k}": _mean_sd([r["valid"][k] for r in chosen]) for k in chosen[0]["valid"]
               if all(r["valid"].get(k) is not None for r in chosen)}  # fmt: skip
    at_best.update({f"test {k}": _mean_sd([r["test"][k] for r in chosen]) for k in chosen[0]["test"]})
    files = {name: {k: f["sha256"] for k, f in r.get("data_files", {}).items()} for name, r in results.items()}
    if len({json.dumps(f, sort_keys=True) for f in files.values()}) > 1:
        raise UserError(f"run.dir={run_dir}: the grid's points read different data files (their sha256 differ)")
    return {"task": first["task"], "selected_by": first["selected_by"], "settings": table,
            "chosen": {"lr": best["lr"], "epochs": best["epochs"]}, "at_chosen": at_best,
            "data_files": first.get("data_files", {}), "points": [p["name"] for p in grid]}  # fmt: skip


def _sd(v: dict) -> str:
    return "n/a" if v["sd"] is None else f"{v['sd']:.2f}"  # one seed: no spread to give


def render(r: dict) -> str:
    column = next(k for k in r["settings"][0] if k not in ("lr", "epochs"))
    lines = [f"{r['task']}: {len(r['points'])} runs, picked by {r['selected_by']}"]
    for row in r["settings"]:
        mark = " <- chosen" if (row["lr"], row["epochs"]) == (r["chosen"]["lr"], r["chosen"]["epochs"]) else ""
        ep = "" if row["epochs"] is None else f" epochs {row['epochs']:g}"
        lines.append(f"  lr {row['lr']:g}{ep}: valid {column} {row[column]['mean']:.2f} ± {_sd(row[column])}"
                     f" over {row[column]['n']} seeds{mark}")  # fmt: skip
    lines += [f"  {k}: {v['mean']:.2f} ± {_sd(v)}" for k, v in r["at_chosen"].items()]
    return "\n".join(lines)


def table(dirs: list[str]) -> str:
    """The grids' reports, a task a line, and CLUE's classification average where the six tasks are there."""
    reports = {}
    for d in dirs:
        path = os.path.join(d, "grid.json")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file (run the grid, or its report=true, first)")
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        reports[r["task"]] = r
    lines, dev = [], {}
    for task, r in reports.items():
        figures = ", ".join(f"{k} {v['mean']:.2f} ± {_sd(v)}" for k, v in r["at_chosen"].items())
        lines.append(f"{task}: lr {r['chosen']['lr']:g}" + ("" if r["chosen"]["epochs"] is None else
                     f" epochs {r['chosen']['epochs']:g}") + f", {len(r['points'])} runs: {figures}")  # fmt: skip
        if "valid accuracy" in r["at_chosen"]:
            dev[task] = r["at_chosen"]["valid accuracy"]["mean"]
    for version, tasks in CLUE_AVERAGE.items():
        if all(t in dev for t in tasks):
            lines.append(f"CLUE {version} classification average (dev accuracy, {', '.join(tasks)}): "
                         f"{sum(dev[t] for t in tasks) / len(tasks):.3f}")  # fmt: skip
            break
    else:
        missing = [t for t in CLUE_AVERAGE["1.1"] if t not in dev]
        lines.append(f"CLUE classification average: not computed, no grid of {', '.join(missing)}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    own, finetune = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    cfg, _ = parse(own, DEFAULTS, command="pretrain.grid", doc=__doc__, verbatim=("run.dir", "launcher"))
    if cfg.table is not None:
        print(table([str(d) for d in cfg.table]))
        return
    if cfg.run.dir is None:
        raise UserError("run.dir is required: the grid's directory, one run directory a point under it")
    if not cfg.lrs or not cfg.seeds:
        raise UserError("lrs=[...] and seeds=[...] are required (e.g. lrs=[2e-5,3e-5] seeds=[1,2,3])")
    if any(a.lstrip("+~").startswith(("run.dir=", "seed=", "train.lr=", "train.epochs=")) for a in finetune):
        raise UserError("run.dir, seed, train.lr and train.epochs are the grid's: give them before --")
    check_command_line(finetune + ["run.dir=x"], "finetune", "pretrain.finetune")
    grid = points([float(x) for x in cfg.lrs], None if cfg.epochs is None else [float(x) for x in cfg.epochs],
                  [int(x) for x in cfg.seeds])  # fmt: skip
    run_dir, launcher = str(cfg.run.dir), shlex.split(str(cfg.launcher))
    if not cfg.report:
        if cfg.index is not None:
            if not 0 <= int(cfg.index) < len(grid):
                raise UserError(f"index={cfg.index}: the grid has {len(grid)} points (0 to {len(grid) - 1})")
            run_point(grid[int(cfg.index)], run_dir, finetune, launcher)
            return  # one array task: the report waits for the others
        for p in grid:
            run_point(p, run_dir, finetune, launcher)
    out = report(run_dir, grid)
    with open(os.path.join(run_dir, "grid.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(render(out))


if __name__ == "__main__":
    with exit_on_user_error("pretrain.grid"):
        main(sys.argv[1:])
