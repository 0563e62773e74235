"""End to end: the real `deepspeed` launcher (and torchrun, and plain python) with 2 CPU ranks and ZeRO-3."""
import json
import os
import shutil
import sys

import pytest

from runs import DEEPSPEED, PYTHON, TINY, TORCHRUN, launch, rows, trainer_refusal

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)


@pytest.fixture(scope="module")
def straight_run(prepared, tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("runs") / "straight")
    launch(DEEPSPEED, TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=40", "train.log_every=1",
                              "train.eval_every=20", "train.save_every=10", "train.keep_last=2"])  # fmt: skip
    return run


def test_deepspeed_run_writes_outputs_and_loss_falls(straight_run):
    train = rows(straight_run, "train")
    assert [r["step"] for r in train] == list(range(1, 41))
    for key in ("loss", "mlm_loss", "mlm_acc", "wso_acc", "sso_loss", "sso_acc", "lr", "grad_norm", "tokens_per_s"):
        assert all(r[key] is not None for r in train), key
    first, last = (sum(r["loss"] for r in part) / 5 for part in (train[:5], train[-5:]))
    assert last < first - 1.0, (first, last)
    assert [r["step"] for r in rows(straight_run, "valid")] == [20, 40]
    assert os.path.isfile(os.path.join(straight_run, "config.yaml"))
    assert not os.path.exists(os.path.join(straight_run, "run.lock"))  # let go of at the normal exit
    ckpt = os.path.join(straight_run, "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step40"
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step")) == ["step30", "step40"]  # keep_last=2


def test_zero3_partitions_parameters_across_ranks(straight_run):
    info = json.load(open(os.path.join(straight_run, "run.json")))
    assert info["world_size"] == 2 and info["deepspeed_config"]["zero_optimization"]["stage"] == 3
    total, parts = info["parameters"], info["partition_numel_per_rank"]
    assert len(parts) == 2 and sum(parts) >= total
    assert all(p <= total // 2 + 64 for p in parts), (total, parts)  # each rank holds about half, padding aside
    step40 = os.path.join(straight_run, "checkpoints", "step40")
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(step40))


def test_resume_is_bitwise_exact(prepared, straight_run, tmp_path):
    run = str(tmp_path / "resumed")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=40", "train.log_every=1",
                   "train.eval_every=20", "train.save_every=10", "train.keep_last=2"]  # fmt: skip
    launch(DEEPSPEED, args + ["train.exit_at_step=20"])
    assert rows(run, "train")[-1]["step"] == 20
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step20"
    launch(DEEPSPEED, args)
    expected = {(r["step"], r["split"]): r["loss"] for r in rows(straight_run, "train") + rows(straight_run, "valid")}
    got = {(r["step"], r["split"]): r["loss"] for r in rows(run, "train") + rows(run, "valid")}
    assert got == expected  # bitwise: CPU fp32, same data order, masking, dropout RNG and optimizer state


def test_torchrun_and_plain_python_entry_points(prepared, tmp_path):
    common = TINY + [f"data.dir={prepared}", "train.max_steps=3", "train.log_every=1", "train.eval_every=3"]
    # torchrun, with gradient accumulation: 16 samples a step = 4 per rank x 2 ranks x 2 forwards.
    launch(TORCHRUN, common + [f"run.dir={tmp_path / 'torchrun'}", "train.global_batch_size=16"])
    info = json.load(open(tmp_path / "torchrun" / "run.json"))
    assert info["world_size"] == 2 and info["grad_accum"] == 2
    assert [r["step"] for r in rows(str(tmp_path / "torchrun"), "train")] == [1, 2, 3]
    # Plain python: one rank, wandb in offline mode (the default) writing under run.dir, no network.
    launch(PYTHON, [a for a in common if not a.startswith("logger.wandb")] + [f"run.dir={tmp_path / 'python'}"])
    assert json.load(open(tmp_path / "python" / "run.json"))["world_size"] == 1
    assert [r["step"] for r in rows(str(tmp_path / "python"), "train")] == [1, 2, 3]
    assert any(n.startswith("offline-run") for n in os.listdir(tmp_path / "python" / "wandb"))


def test_summary_prints_final_metrics(straight_run):
    proc = launch([sys.executable, "-m", "pretrain.summary"], [f"run.dir={straight_run}"])
    assert "40 steps" in proc.stdout and "valid last @40" in proc.stdout and "sso_acc" in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dir=/nonexistent/corpus", "data.dir=/nonexistent/corpus: no such directory"),
        ("train.max_steps=0", "train.max_steps=0: must be >= 1"),
        ("stage.objectives.mask_rate=1.5", "stage.objectives.mask_rate=1.5: must be in (0, 1)"),
        ("stage.objectives.mask_rate=0", "stage.objectives.mask_rate=0"),
        ("stage.seq_len=1024", "stage.seq_len=1024 exceeds model.max_positions=512"),
        ("train.global_batch_size=6", "train.global_batch_size=6 is not a positive multiple"),
        ("deepspeed=zero3_v100", "fp16 needs a GPU"),
        ("init_from=/tmp", "init_from=/tmp: stage one starts from random weights"),
        # a value of the wrong type, a key that no setting has (pretrain/overrides.py, before Hydra composes)
        ("train.lr=abc", "train.lr=abc: must be a number"),
        ("train.max_steps=ten", "train.max_steps=ten: must be an integer"),
        ("seed=x", "seed=x: must be an integer"),
        ("+train.max_step=10", "train.max_step: no such setting; did you mean train.max_steps?"),
    ],
)
def test_bad_config_fails_with_one_line_and_writes_nothing(prepared, tmp_path, override, message):
    run = tmp_path / "run"
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", override]
    if override in THROUGH_THE_COMMAND:  # one of each kind: the command line's check, the setup's, the precision's
        proc = launch(PYTHON, args, expect_rc=2)
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    else:
        assert message in trainer_refusal(args)
    assert not run.exists()


THROUGH_THE_COMMAND = ("data.dir=/nonexistent/corpus", "deepspeed=zero3_v100", "+train.max_step=10")


def test_missing_run_dir_is_named(prepared):
    proc = launch(PYTHON, TINY + [f"data.dir={prepared}"], expect_rc=2)
    assert proc.stderr.strip() == "pretrain.train: error: run.dir is required (add run.dir=<dir>)"


def test_vocab_that_does_not_match_the_prepared_data(prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    with open(data / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("多余\n")
    proc = launch(PYTHON, TINY + [f"data.dir={data}", f"run.dir={tmp_path / 'run'}"], expect_rc=2)
    assert "vocab.txt: sha256" in proc.stderr and "does not match meta.json" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_resume_from_a_checkpoint_of_another_world_size_needs_the_opt_in(prepared, straight_run, tmp_path):
    """Refused before anything is written, with the opt-in offered (tests/test_elastic.py resumes with it), and
    named first: not the global batch, which the user did not set (and which follows the world size)."""
    step40 = os.path.join(straight_run, "checkpoints", "step40")
    run = tmp_path / "run"
    proc = launch(PYTHON, TINY + [f"data.dir={prepared}", f"run.dir={run}", f"train.resume={step40}"], expect_rc=2)
    assert proc.stderr.strip() == (
        f"pretrain.train: error: {step40}: written by 2 ranks, this run has 1;"
        " add train.elastic=true to resume it re-sharded onto 1 rank"
    )
    assert not run.exists()
