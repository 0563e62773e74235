"""pretrain.summary's loss and accuracy curves (pretrain.plots), from metrics.jsonl files written by hand."""
import json
import os
import subprocess
import sys

import pytest

from pretrain import plots, summary
from pretrain.errors import UserError

HEIGHT, WIDTH = 400, 1000  # plots.SIZE_IN at plots.DPI


def write_run(root, name: str, rows: list[dict]) -> str:
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(run)


def stage_one_rows() -> list[dict]:
    rows = []
    for step in range(10, 101, 10):
        rows.append({"step": step, "split": "train", "loss": 20 - step / 10, "mlm_loss": 9 - step / 20,
                     "mlm_acc": step / 1000, "wso_loss": 8 - step / 25, "wso_acc": step / 2000,
                     "sso_loss": 1.1 - step / 1000, "sso_acc": 0.3 + step / 1000, "step_time_s": 0.2, "lr": 1e-3})
        if step % 50 == 0:
            rows.append({"step": step, "split": "valid", "loss": 19 - step / 10, "mlm_loss": 8.5 - step / 20,
                         "mlm_acc": step / 900, "wso_loss": 7.5 - step / 25, "wso_acc": step / 1800,
                         "sso_loss": 1.0 - step / 1000, "sso_acc": 0.35 + step / 1000})
    return rows


def stage_two_rows() -> list[dict]:
    """100 steps, masked LM on through step 90 (logged every 20: last on at 80, first off at 100)."""
    rows = []
    for step in range(20, 101, 20):
        on = step <= 90
        rows.append({"step": step, "split": "train", "loss": 12 - step / 20, "lm_loss": 6 - step / 50,
                     "lm_acc": step / 500, "mlm_loss": 6 - step / 40 if on else None,
                     "mlm_acc": step / 400 if on else None, "mlm_active": on, "step_time_s": 0.3})
        if step in (40, 100):
            rows.append({"step": step, "split": "valid", "loss": 11 - step / 20, "lm_loss": 5.5 - step / 50,
                         "lm_acc": step / 450, "mlm_loss": 5.8 - step / 40 if on else None,
                         "mlm_acc": step / 380 if on else None, "mlm_active": on, "lm_ppl": 300 - step})
    return rows


def blend_rows() -> list[dict]:
    """A stage-one blend of two sources (data.dirs): valid and a valid/<source> row per source at each eval."""
    rows = []
    for step in (10, 20, 30, 40):
        rows.append({"step": step, "split": "train", "loss": 10 - step / 10, "mlm_loss": 5 - step / 20,
                     "mlm_acc": step / 100, "wso_loss": 4, "wso_acc": 0.1, "sso_loss": 1, "sso_acc": 0.3})
        if step % 20 == 0:
            for split, shift in (("valid", 0.0), ("valid/news", 0.1), ("valid/wiki", 0.2)):
                rows.append({"step": step, "split": split, "loss": 9 - shift, "mlm_loss": 4.5 - shift - step / 100,
                             "mlm_acc": 0.1 + shift + step / 1000, "wso_loss": 3.9, "wso_acc": 0.12,
                             "sso_loss": 0.9, "sso_acc": 0.31})
    return rows


def ner_rows() -> list[dict]:
    """The columns of a pretrain.finetune NER run (task=ner): tag_loss/tag_acc, valid span scores, a test row."""
    return [
        {"step": 50, "split": "train", "loss": 0.73, "tag_loss": 0.73, "tag_acc": 0.76, "tokens_per_s": 7342.3,
         "padding": 0.43, "step_time_s": 0.157, "lr": 0.00048, "grad_norm": 0.26},
        {"step": 100, "split": "train", "loss": 0.25, "tag_loss": 0.25, "tag_acc": 0.93, "tokens_per_s": 7579.2,
         "padding": 0.42, "step_time_s": 0.154, "lr": 0.00041, "grad_norm": 0.59},
        {"step": 100, "split": "valid", "loss": 0.23, "tag_loss": 0.23, "tag_acc": 0.929, "tokens_per_s": 33075.1,
         "padding": 0.43, "precision": 18.7, "recall": 8.4, "f1": 11.6},
        {"step": 100, "split": "test", "precision": 36.5, "recall": 40.3, "f1": 38.3},
    ]


def classification_rows() -> list[dict]:
    """A pretrain.finetune classification run (cls_loss/cls_acc; valid also accuracy and macro_f1, no _acc suffix)."""
    return [
        {"step": 50, "split": "train", "loss": 1.19, "cls_loss": 1.19, "cls_acc": 0.52, "step_time_s": 0.27},
        {"step": 100, "split": "train", "loss": 0.59, "cls_loss": 0.59, "cls_acc": 0.77, "step_time_s": 0.27},
        {"step": 100, "split": "valid", "loss": 0.56, "cls_loss": 0.56, "cls_acc": 0.79, "accuracy": 79.3,
         "macro_f1": 57.0},
        {"step": 100, "split": "test", "accuracy": 77.2, "macro_f1": 53.9},
    ]


def lines_by_label(fig) -> list[dict]:
    """[{label: Line2D}] for the loss and accuracy panels."""
    return [{line.get_label(): line for line in ax.lines} for ax in fig.axes]


def xy(line) -> tuple[list, list]:
    return list(line.get_xdata()), list(line.get_ydata())


def expected(rows: list[dict], split: str, column: str) -> tuple[list, list]:
    kept = [r for r in rows if r["split"] == split and r.get(column) is not None]
    return [r["step"] for r in kept], [r[column] for r in kept]


def run_summary(capsys, *dirs: str) -> str:
    summary.main([f"run.dir={d}" for d in dirs])
    return capsys.readouterr().out


def assert_pngs(run: str, names: list[str]) -> list[str]:
    """The curves folder holds exactly these PNGs (no temporary file), each a real PNG of the expected size."""
    import matplotlib.image  # here, not at collection: 0.8 s for each pytest-xdist worker

    folder = os.path.join(run, "curves")
    assert sorted(os.listdir(folder)) == sorted(f"{n}.png" for n in names)
    paths = [os.path.join(folder, f"{n}.png") for n in names]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (HEIGHT, WIDTH), path
        assert image.std() > 0.01, f"{path} is blank"
    return paths


@pytest.mark.e2e
def test_stage_one_curves(tmp_path, capsys):
    rows = stage_one_rows()
    run = write_run(tmp_path, "structbert", rows)
    out = run_summary(capsys, run)
    paths = assert_pngs(run, ["mlm", "wso", "sso"])
    assert out.splitlines()[-3:] == [f"  curves: {p}" for p in paths]
    assert out.startswith(f"{run}: 100 steps")  # the table is still printed, first

    assert plots.objectives(rows) == ["mlm", "wso", "sso"]  # not the total `loss`, not lr/step_time_s
    for objective in ("mlm", "wso", "sso"):
        fig = plots.figure(rows, objective)
        assert [ax.get_title() for ax in fig.axes] == [f"{objective} loss", f"{objective} accuracy"]
        for panel, column in zip(lines_by_label(fig), (f"{objective}_loss", f"{objective}_acc")):
            assert sorted(panel) == ["train", "valid"]  # no switch line in stage one
            for split in ("train", "valid"):
                assert xy(panel[split]) == expected(rows, split, column)
        assert len(expected(rows, "valid", f"{objective}_loss")[0]) == 2


@pytest.mark.e2e
def test_stage_two_skips_nulls_and_marks_the_mlm_switch(tmp_path, capsys):
    rows = stage_two_rows()
    run = write_run(tmp_path, "palm", rows)
    out = run_summary(capsys, run)
    paths = assert_pngs(run, ["lm", "mlm"])
    assert [f"  curves: {p}" for p in paths] == out.splitlines()[-2:]

    assert plots.mlm_switch(rows) == 80  # the last logged step with masked LM on
    switch = "masked LM off (last on: step 80)"
    for objective in ("lm", "mlm"):
        panels = lines_by_label(plots.figure(rows, objective))
        for panel, column in zip(panels, (f"{objective}_loss", f"{objective}_acc")):
            assert sorted(panel) == sorted(["train", "valid", switch])
            assert xy(panel[switch])[0] == [80, 80]  # vertical: x fixed, spanning the axes
            assert list(panel[switch].get_ydata()) == [0, 1]
            for split in ("train", "valid"):
                assert xy(panel[split]) == expected(rows, split, column)
    mlm_loss, mlm_acc = lines_by_label(plots.figure(rows, "mlm"))
    # nulls after the switch are left out, not drawn as zeros
    assert xy(mlm_loss["train"]) == ([20, 40, 60, 80], [5.5, 5.0, 4.5, 4.0])
    assert xy(mlm_loss["valid"]) == ([40], [4.8])
    assert xy(mlm_acc["train"])[0] == [20, 40, 60, 80]
    lm_loss, _ = lines_by_label(plots.figure(rows, "lm"))
    assert xy(lm_loss["train"])[0] == [20, 40, 60, 80, 100]
    assert xy(lm_loss["valid"])[0] == [40, 100]


def test_mlm_switch_edge_cases():
    assert plots.mlm_switch(stage_one_rows()) is None
    assert plots.mlm_switch([{"step": s, "split": "train", "mlm_active": True} for s in (1, 2)]) is None  # not yet
    # a run resumed after the switch logs no step with it on: the first step with it off
    assert plots.mlm_switch([{"step": s, "split": "train", "mlm_active": False} for s in (30, 40)]) == 30
    # rows with it on again after the first off one (not a real run) do not move the line past the switch
    assert plots.mlm_switch([{"step": 10, "split": "train", "mlm_active": True},
                             {"step": 20, "split": "train", "mlm_active": False},
                             {"step": 30, "split": "train", "mlm_active": True}]) == 10  # fmt: skip


@pytest.mark.e2e
def test_blend_draws_each_valid_source(tmp_path, capsys):
    rows = blend_rows()
    run = write_run(tmp_path, "blend", rows)
    run_summary(capsys, run)
    assert_pngs(run, ["mlm", "wso", "sso"])
    assert plots.splits(rows) == ["train", "valid", "valid/news", "valid/wiki"]
    fig = plots.figure(rows, "mlm")
    for ax, column in zip(fig.axes, ("mlm_loss", "mlm_acc")):
        assert [line.get_label() for line in ax.lines] == ["train", "valid", "valid/news", "valid/wiki"]
        panel = {line.get_label(): line for line in ax.lines}
        for split in panel:
            assert xy(panel[split]) == expected(rows, split, column)
        # a source keeps its colour in both panels; the sources are dashed, valid solid
        assert [panel[s].get_color() for s in plots.splits(rows)] == ["C0", "C1", "C2", "C3"]
        assert panel["valid"].get_linestyle() == "-" and panel["valid/news"].get_linestyle() == "--"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "valid", "valid/news", "valid/wiki"]


@pytest.mark.e2e
def test_fine_tuning_runs(tmp_path, capsys):
    ner = write_run(tmp_path, "ner", ner_rows())
    cls = write_run(tmp_path, "cls", classification_rows())
    out = run_summary(capsys, ner, cls)
    ner_png, = assert_pngs(ner, ["tag"])
    cls_png, = assert_pngs(cls, ["cls"])
    assert f"  curves: {ner_png}" in out and f"  curves: {cls_png}" in out
    assert out.index(ner_png) < out.index(f"{cls}:")  # each run's paths under its own table
    loss, acc = lines_by_label(plots.figure(ner_rows(), "tag"))
    assert sorted(loss) == sorted(acc) == ["train", "valid"]  # the test row has no tag_ columns
    assert xy(acc["train"]) == ([50, 100], [0.76, 0.93])
    assert plots.objectives(classification_rows()) == ["cls"]  # `accuracy`, `macro_f1`: not objectives


@pytest.mark.e2e
def test_an_objective_without_accuracy(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0 / s, "aux_loss": 1.0 / s, "aux_acc": None} for s in (1, 2, 3)]
    loss, acc = plots.figure(rows, "aux").axes
    assert xy(loss.lines[0]) == ([1, 2, 3], [1.0, 0.5, 1 / 3])
    assert not acc.lines and [t.get_text() for t in acc.texts] == ["no aux_acc logged"]
    run = write_run(tmp_path, "aux", rows)
    assert plots.write_curves(run, rows) == [os.path.join(run, "curves", "aux.png")]
    assert_pngs(run, ["aux"])
    # a run whose objective columns are all null draws nothing (and does not crash)
    assert plots.objectives([{"step": 1, "split": "train", "loss": 1.0, "mlm_loss": None}]) == []


@pytest.mark.e2e
def test_failed_write_leaves_the_old_picture_and_no_temp_file(tmp_path, capsys, monkeypatch):
    rows = stage_one_rows()
    run = write_run(tmp_path, "structbert", rows)
    run_summary(capsys, run)
    before = {name: (tmp_path / "structbert" / "curves" / name).read_bytes() for name in ("mlm.png", "wso.png")}

    from matplotlib.figure import Figure

    def broken(self, f, **kwargs):
        f.write(b"\x89PNG half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(UserError, match=f"run.dir={run}: could not write the curves: .*No space left"):
        summary.main([f"run.dir={run}"])
    assert sorted(os.listdir(os.path.join(run, "curves"))) == ["mlm.png", "sso.png", "wso.png"]
    for name, data in before.items():
        assert (tmp_path / "structbert" / "curves" / name).read_bytes() == data


@pytest.mark.e2e
def test_cli(tmp_path):
    """The command line: paths printed; a run without metrics.jsonl keeps its one-line error; the table alone
    (summarize, render) does not import matplotlib."""
    run = write_run(tmp_path, "palm", stage_two_rows())
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}  # no display, whatever the machine has
    proc = subprocess.run([sys.executable, "-m", "pretrain.summary", f"run.dir={run}"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [f"  curves: {os.path.join(run, 'curves', n)}.png" for n in ("lm", "mlm")]
    assert_pngs(run, ["lm", "mlm"])

    missing = tmp_path / "untrained"
    missing.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pretrain.summary", f"run.dir={missing}"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"pretrain.summary: error: run.dir={missing}: no metrics.jsonl (has this run trained?)\n"
    assert proc.stdout == "" and os.listdir(missing) == []

    code = ("import sys; from pretrain.summary import render, summarize; render(summarize(sys.argv[1])); "
            "print('matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False\n"
