"""The table `make finetune-demo` ends with: each task's test metric from each initialisation, read from the runs'
results.json (pretrain.finetune writes them).

    python launch/finetune_table.py --root runs/demo/finetune

The layout is <root>/<task>/<init>/results.json; the columns are the inits found, `random` last.
"""
import argparse
import glob
import json
import os
import sys

HEADLINE = {"token_classification": "f1", "classification": "accuracy", "generation": "bleu4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    root = parser.parse_args().root
    found = sorted(glob.glob(os.path.join(root, "*", "*", "results.json")))
    if not found:
        sys.exit(f"finetune_table: error: no {root}/<task>/<init>/results.json (run make finetune-demo)")
    results = {}
    for path in found:
        task, init = path.split(os.sep)[-3:-1]
        with open(path, encoding="utf-8") as f:
            results.setdefault(task, {})[init] = json.load(f)
    inits = sorted({i for r in results.values() for i in r}, key=lambda i: (i == "random", i))
    print("task".ljust(8) + "metric".ljust(10) + "".join(i.rjust(14) for i in inits) + "   test examples, seconds (train+test)")
    for task, by_init in results.items():
        kind = next(iter(by_init.values()))["type"]
        metric_names = [HEADLINE[kind]] + [m for m in next(iter(by_init.values()))["test"] if m != HEADLINE[kind]]
        for m in metric_names:
            cells = [f"{by_init[i]['test'][m]:.2f}" if i in by_init else "-" for i in inits]
            secs = [f"{sum(by_init[i]['seconds'].values()):.0f}" for i in inits if i in by_init]
            note = f"   {next(iter(by_init.values()))['test_examples']}, {'/'.join(secs)}" if m == metric_names[0] else ""
            print(task.ljust(8) + m.ljust(10) + "".join(c.rjust(14) for c in cells) + note)


if __name__ == "__main__":
    main()
