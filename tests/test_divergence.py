"""Divergence in real runs (the tiny model, real ZeRO-3 checkpoints): a NaN or a spike injected into the loss of a
known batch (PRETRAIN_INJECT_LOSS=<data step>:<factor>, pretrain/training/health.py), and a learning rate that
really diverges. The verdicts on loss sequences are unit-tested in test_health.py."""
import json
import os

import pytest
import torch

from pretrain.training.checkpoint import saved_state
from runs import DEEPSPEED, PYTHON, TINY, launch, rows

pytestmark = pytest.mark.e2e

SHORT = ["train.max_steps=12", "train.log_every=1", "train.eval_every=6", "train.save_every=3"]


def run_with(args: list[str], launcher=PYTHON, expect_rc=0, inject: str | None = None):
    if inject is None:
        return launch(launcher, args, expect_rc=expect_rc)
    os.environ["PRETRAIN_INJECT_LOSS"] = inject
    try:
        return launch(launcher, args, expect_rc=expect_rc)
    finally:
        del os.environ["PRETRAIN_INJECT_LOSS"]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def committed(run: str) -> list[str]:
    return sorted((d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("step")),
                  key=lambda d: int(d[4:]))  # fmt: skip


def events(run: str) -> list[dict]:
    return rows(run, "event")


def test_a_nan_stops_the_run_at_its_step_with_one_line(prepared, tmp_path):
    run = str(tmp_path / "run")
    proc = run_with(TINY + SHORT + [f"data.dir={prepared}", f"run.dir={run}"], expect_rc=3, inject="7:nan")
    step6 = os.path.join(run, "checkpoints", "step6")
    assert last_line(proc) == (
        f"pretrain.train: error: step 8: loss nan; newest healthy checkpoint: {step6}; try train.on_divergence=rollback"
        " (reload it and skip the batches that led here), a lower train.lr or a longer train.warmup_fraction")
    assert committed(run) == ["step3", "step6"] and open(os.path.join(run, "checkpoints", "latest")).read() == "step6"
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 8))  # nothing trained on after the event
    assert [(e["step"], e["event"], e["action"]) for e in events(run)] == [(8, "nonfinite_loss", "stop")]


def test_a_learning_rate_that_diverges_stops_before_saving_its_damage(prepared, tmp_path):
    """train.lr=1e3: the loss explodes within a few steps and goes non-finite (the issue saw NaN from step 9)."""
    run = str(tmp_path / "run")
    proc = run_with(TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.lr=1e3", "train.max_steps=40",
                            "train.save_every=2", "train.log_every=1", "train.warmup_fraction=0"], expect_rc=3)  # fmt: skip
    line = last_line(proc)
    event = events(run)[-1]
    assert line.startswith(f"pretrain.train: error: step {event['step']}: ") and "try train.on_divergence" in line
    assert event["event"] in ("nonfinite_loss", "nonfinite_grad") and event["step"] <= 20
    saved = committed(run)
    assert all(int(d[4:]) < event["step"] for d in saved)
    for name in saved:  # every checkpoint written holds finite weights
        assert saved_state(os.path.join(run, "checkpoints", name))["healthy"] is True


def test_a_spike_is_seen_and_stops_the_run(prepared, tmp_path):
    run = str(tmp_path / "run")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=30", "train.save_every=10",
                   "train.spike_window=40", "train.log_every=5"]  # fmt: skip
    proc = run_with(args, expect_rc=3, inject="24:30")
    assert last_line(proc).startswith("pretrain.train: error: step 25: loss spike ")
    assert f"newest healthy checkpoint: {os.path.join(run, 'checkpoints', 'step20')}" in last_line(proc)
    assert [e["event"] for e in events(run)] == ["spike"]


def test_rollback_skips_the_poisoned_batches_deterministically(prepared, tmp_path):
    """2 ranks: a NaN in the batch of data step 7 (step 8) rolls back to step 6 and skips data steps 6 and 7;
    an interrupted run resumed later honours the skip, and every loss equals the straight run's."""
    common = TINY + SHORT + [f"data.dir={prepared}", "train.on_divergence=rollback"]
    straight = str(tmp_path / "straight")
    proc = run_with(common + [f"run.dir={straight}"], launcher=DEEPSPEED, inject="7:nan")
    assert ("pretrain.train: step 8: loss nan: rolled back to " + os.path.join(straight, "checkpoints", "step6")
            + ", skipping the 2 steps of data that led here (rollback 1 of 3)") in proc.stderr
    assert [r["step"] for r in rows(straight, "train")] == list(range(1, 13))
    (event,) = events(straight)
    assert (event["step"], event["event"], event["action"], event["to_step"]) == (8, "nonfinite_loss", "rollback", 6)
    skips = json.load(open(os.path.join(straight, "skipped_data.json")))
    assert [(r["after_step"], r["count"]) for r in skips] == [(6, 2)]

    resumed = str(tmp_path / "resumed")
    run_with(common + [f"run.dir={resumed}", "train.exit_at_step=10"], launcher=DEEPSPEED, inject="7:nan")
    run_with(common + [f"run.dir={resumed}"], launcher=DEEPSPEED, inject="7:nan")
    losses = lambda run: {(r["step"], r["split"]): r["loss"] for r in rows(run, "train") + rows(run, "valid")}  # noqa: E731
    assert losses(resumed) == losses(straight)  # bitwise: the resume drew steps 11-12 from data steps 12-13
    assert events(resumed) == events(straight)


def test_rollbacks_are_bounded(prepared, tmp_path):
    """The batch after the skipped ones is poisoned too (data step 9: step 8 again once data steps 6-7 are
    skipped): the second event finds the rollbacks spent."""
    run = str(tmp_path / "run")
    proc = run_with(TINY + SHORT + [f"data.dir={prepared}", f"run.dir={run}", "train.on_divergence=rollback",
                                    "train.max_rollbacks=1"], expect_rc=3, inject="7:nan,9:nan")  # fmt: skip
    assert last_line(proc).startswith("pretrain.train: error: step 8: loss nan; newest healthy checkpoint: ")
    assert "rolled back train.max_rollbacks times already" in last_line(proc)
    assert [(e["step"], e["action"]) for e in events(run)] == [(8, "rollback"), (8, "stop")]


def test_warn_goes_on_and_keep_last_never_prunes_the_newest_healthy_checkpoint(prepared, tmp_path):
    """A long NaN stretch under train.on_divergence=warn: the checkpoints written in it are marked unhealthy and
    keep_last=1 keeps step 4, the last healthy one, beside the newest; no non-finite weights were ever saved."""
    run = str(tmp_path / "run")
    proc = run_with(TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=10", "train.save_every=2",
                            "train.keep_last=1", "train.on_divergence=warn", "train.eval_every=10"],
                    inject=",".join(f"{k}:nan" for k in range(4, 10)))  # fmt: skip
    assert proc.stderr.count("pretrain.train: warning: step ") == 6
    assert committed(run) == ["step4", "step10"]
    for name, healthy in (("step4", True), ("step10", False)):
        tag = os.path.join(run, "checkpoints", name)
        assert saved_state(tag)["healthy"] is healthy
        weights = torch.load(os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), weights_only=False)
        flat = weights["optimizer_state_dict"]["fp32_flat_groups"]
        assert all(torch.isfinite(t).all() for t in flat)
