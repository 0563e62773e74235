"""Does stage one help stage two? Trains stage two twice with the same data, steps and seed: once initialised
from a stage-one run, once from random weights; prints both validation decoder losses and exits 1 unless the
stage-one start comes out lower.

    python experiments/compare_init.py --stage-one runs/demo/structbert --out runs/demo/compare -- <Hydra overrides>

The overrides (model, data.dir, palm lengths, steps, lr, ...) go to both runs unchanged; `run.dir` and
`init_from` are set here. A run that already finished is reused, so the comparison can be re-printed.
"""
import argparse
import json
import os
import subprocess
import sys



def valid_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == "valid"]


def finished(run_dir: str, overrides: list[str]) -> bool:
    steps = [o.split("=", 1)[1] for o in overrides if o.startswith("train.max_steps=")]
    if not steps or not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        return False
    rows = valid_rows(run_dir)
    return bool(rows) and rows[-1]["step"] == int(steps[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage-one", required=True, help="stage-one run.dir (its newest checkpoint) or checkpoint dir")
    ap.add_argument("--out", required=True, help="directory for the two stage-two runs")
    ap.add_argument("--master-port", type=int, default=29500, help="rendezvous port of the deepspeed launcher")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = ap.parse_args()
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(args.master_port), "--module", "pretrain.train"]
    if not any(o.startswith("stage=") for o in args.overrides):
        launcher.append("stage=palm")
    runs = {"from stage one": os.path.join(args.out, "from_stage_one"), "from random": os.path.join(args.out, "from_random")}
    for name, run_dir in runs.items():
        if finished(run_dir, args.overrides):
            print(f"{name}: {run_dir} already finished, reused", flush=True)
            continue
        init = [f"init_from={args.stage_one}"] if name == "from stage one" else []
        print(f"{name}: training {run_dir}", flush=True)
        subprocess.run(launcher + args.overrides + [f"run.dir={run_dir}"] + init, check=True)

    last = {name: valid_rows(run_dir)[-1] for name, run_dir in runs.items()}
    print(f"\n{'stage two':<16}{'step':>6}{'valid lm_loss':>15}{'lm_ppl':>10}{'lm_acc':>9}")
    for name, row in last.items():
        print(f"{name:<16}{row['step']:>6}{row['lm_loss']:>15.4f}{row['lm_ppl']:>10.1f}{row['lm_acc']:>9.4f}")
    better = last["from stage one"]["lm_loss"] < last["from random"]["lm_loss"]
    print("stage one helps: " + ("yes" if better else "NO"))
    sys.exit(0 if better else 1)


if __name__ == "__main__":
    main()
