"""pretrain.grid: a task over seeds x learning rates as independent, resumable run directories, and the report of
the mean and standard deviation over the seeds at the setting the valid score picks."""
import json
import statistics
import subprocess
import sys

import pytest
from test_finetune import tasks  # noqa: F401 (a fixture: tiny task directories)

from pretrain import grid
from pretrain.errors import UserError
from runs import FINETUNE_TINY, REPO

LAUNCHER = f"launcher={sys.executable} -m"  # one plain-python rank a point: the grid's logic, not the ranks'


def _grid(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.grid", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.e2e  # 4 fine-tuning runs
def test_two_seeds_by_two_rates_report_mean_and_sd(tasks, prepared, tmp_path):  # noqa: F811
    root = tmp_path / "grid"
    own = [f"run.dir={root}", "seeds=[1,2]", "lrs=[1e-3,3e-3]", LAUNCHER]
    finetune = [a for a in FINETUNE_TINY if not a.startswith("train.lr=")] + ["task=pair_classification", f"data.dir={tasks['pair']}", f"vocab={prepared}/vocab.txt",
                                "train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.log_every=2"]
    proc = _grid(own + ["--", *finetune])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["lr0.001-seed1", "lr0.001-seed2", "lr0.003-seed1", "lr0.003-seed2"]
    results = {n: json.loads((root / n / "results.json").read_text()) for n in names}
    assert all(json.loads((root / n / "run.json").read_text())["world_size"] == 1 for n in names)  # own run dirs
    report = json.loads((root / "grid.json").read_text())
    means = {}
    for row in report["settings"]:
        acc = [results[f"lr{row['lr']:g}-seed{s}"]["valid"]["accuracy"] for s in (1, 2)]
        assert row["accuracy"]["values"] == acc and row["accuracy"]["n"] == 2
        assert row["accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
        assert row["accuracy"]["sd"] == pytest.approx(statistics.stdev(acc))
        means[row["lr"]] = row["accuracy"]["mean"]
    chosen = report["chosen"]["lr"]
    assert means[chosen] == max(means.values()) and report["chosen"]["epochs"] is None
    test = [results[f"lr{chosen:g}-seed{s}"]["test"]["accuracy"] for s in (1, 2)]
    assert report["at_chosen"]["test accuracy"]["mean"] == pytest.approx(statistics.fmean(test))
    assert f"valid accuracy {means[chosen]:.2f}" in proc.stdout and "<- chosen" in proc.stdout
    assert set(report["data_files"]) == {"train", "valid", "test"}

    again = _grid(own + ["--", *finetune])  # every point finished: nothing runs again, the report is the same
    assert again.returncode == 0 and again.stderr.count("finished, skipped") == 4
    assert json.loads((root / "grid.json").read_text()) == report
    alone = _grid(own + ["index=4", "--", *finetune])
    assert alone.returncode == 2 and "index=4: the grid has 4 points (0 to 3)" in alone.stderr


def test_the_points_and_their_run_directories():
    p = grid.points([2e-5, 3e-5], [2, 3.5], [1, 2])
    assert [x["name"] for x in p[:3]] == ["lr2e-05-ep2-seed1", "lr2e-05-ep2-seed2", "lr2e-05-ep3.5-seed1"]
    assert len(p) == 8
    args = grid.finetune_args(p[2], "/g", ["task=ner"])
    assert args == ["task=ner", "run.dir=/g/lr2e-05-ep3.5-seed1", "seed=1", "train.lr=2e-05", "train.epochs=3.5"]


@pytest.mark.parametrize("argv, message", [
    (["run.dir=/g", "seeds=[1]", "--", "task=ner"], "lrs=[...] and seeds=[...] are required"),
    (["run.dir=/g", "lrs=[1e-3]", "--", "task=ner", "train.lr=1"], "run.dir, seed, train.lr and train.epochs are the grid's"),
    (["run.dir=/g", "lrs=[1e-3]", "--", "task=nerr"], "task=nerr: no such option of task"),
    (["lrs=[1e-3]", "--", "task=ner"], "run.dir is required"),
])  # fmt: skip
def test_bad_command_lines(argv, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        grid.main(argv)


def test_a_report_before_the_points_finish_names_the_missing_one(tmp_path):
    with pytest.raises(UserError, match=r"lr0.001-seed1/results.json: not written yet"):
        grid.main([f"run.dir={tmp_path}", "lrs=[1e-3]", "report=true", "--", "task=ner"])


def _grid_json(root, task: str, dev: list[float]) -> str:
    d = root / task
    d.mkdir()
    at = {"valid accuracy": {"mean": statistics.fmean(dev), "sd": statistics.stdev(dev), "n": len(dev), "values": dev}}
    (d / "grid.json").write_text(json.dumps({"task": task, "chosen": {"lr": 2e-5, "epochs": None}, "at_chosen": at,
                                             "points": [f"p{i}" for i in range(len(dev))]}))  # fmt: skip
    return str(d)


def test_the_table_gives_clues_classification_average(tmp_path, capsys):
    devs = {"afqmc": [74.0, 75.0], "tnews": [56.0, 57.0], "iflytek": [60.0, 61.0], "ocnli": [72.0, 73.0],
            "cluewsc2020": [62.0, 66.0], "csl": [80.0, 81.0], "cmnli": [79.0, 80.0]}  # fmt: skip
    dirs = [_grid_json(tmp_path, t, v) for t, v in devs.items()]
    grid.main([f"table=[{','.join(dirs)}]"])
    out = capsys.readouterr().out
    six = [statistics.fmean(devs[t]) for t in ("afqmc", "tnews", "iflytek", "ocnli", "cluewsc2020", "csl")]
    assert f"CLUE 1.1 classification average (dev accuracy, afqmc, tnews, iflytek, ocnli, cluewsc2020, csl): " \
           f"{statistics.fmean(six):.3f}" in out  # fmt: skip
    assert "afqmc: lr 2e-05, 2 runs: valid accuracy 74.50 ± 0.71" in out
    without_ocnli = [d for d in dirs if not d.endswith("ocnli")]  # CLUE 1.0's six: CMNLI in OCNLI's place
    grid.main([f"table=[{','.join(without_ocnli)}]"])
    assert "CLUE 1.0 classification average" in capsys.readouterr().out
    grid.main([f"table=[{dirs[0]}]"])
    assert "not computed, no grid of tnews, iflytek, ocnli, cluewsc2020, csl" in capsys.readouterr().out
