"""The table `make finetune-demo` ends with: each task's test metric from each initialisation, read from the runs'
results.json (pretrain.finetune writes them).

    python experiments/finetune_table.py --root runs/demo/finetune

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
    width = [max(10, len(i) + 2) for i in inits]
    print("task".ljust(10) + "metric".ljust(16) + "".join(i.rjust(w) for i, w in zip(inits, width))
          + "   test examples; seconds (train+test) per run")  # fmt: skip
    for task, by_init in results.items():
        first = next(iter(by_init.values()))
        headline = HEADLINE[first["type"]]
        # test figures, then (generation: its test set is small) the valid perplexity that picked the checkpoint
        lines = [(f"test {m}", ("test", m)) for m in [headline] + [m for m in first["test"] if m != headline]]
        if "lm_ppl" in first["valid"]:
            lines.append(("valid lm_ppl", ("valid", "lm_ppl")))
        for n, (label, (part, m)) in enumerate(lines):
            cells = [f"{by_init[i][part][m]:.2f}" if i in by_init else "-" for i in inits]
            secs = "/".join(f"{sum(by_init[i]['seconds'].values()):.0f}" for i in inits if i in by_init)
            note = f"   {first['test_examples']}; {secs}" if n == 0 else ""
            print(task.ljust(10) + label.ljust(16) + "".join(c.rjust(w) for c, w in zip(cells, width)) + note)

if __name__ == "__main__":
    main()
