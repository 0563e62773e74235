"""A full disk during a run, on a real small tmpfs as run.dir: a save that cannot fit stops the run before it writes
anything, one that fails anyway (the disk filled during the save) is one line, and in both the previous checkpoint
stays intact and `latest` names it."""
import contextlib
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain.training import integrity  # noqa: E402
from runs import DEEPSPEED, TINY, launch  # noqa: E402

pytestmark = pytest.mark.e2e

# The TINY model's checkpoint on 2 ranks is about 1.6 MB: 4 MiB holds the run's small files and two checkpoints,
# not a third.
TMPFS_SIZE = "4m"
RUN = ["train.max_steps=6", "train.save_every=2", "train.keep_last=3", "train.log_every=1", "train.eval_every=100"]


@contextlib.contextmanager
def small_tmpfs(path):
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"mounting a {TMPFS_SIZE} tmpfs needs root (or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "pretrain.train: error:" in line]


def assert_previous_intact(run_dir: str, previous: str, failed: str) -> None:
    checkpoints = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(checkpoints, "latest")) as f:
        assert f.read().strip() == previous
    assert not os.path.exists(os.path.join(checkpoints, failed)), "the partial checkpoint was left behind"
    assert integrity.problems(os.path.join(checkpoints, previous)) == []


def test_a_save_that_cannot_fit_stops_before_writing(prepared, tmp_path):
    with small_tmpfs(tmp_path / "full") as run_dir:
        proc = launch(DEEPSPEED, TINY + RUN + [f"data.dir={prepared}", f"run.dir={run_dir}"], expect_rc=2)
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr[-3000:]
        assert f"{run_dir}/checkpoints/step6: not saved: the checkpoint needs about " in lines[0]
        assert f"are free on its file system; {run_dir}/checkpoints/step4 is intact (free space, then resume)" in lines[0]
        need = int(lines[0].split("needs about ")[1].split()[0])
        assert need == integrity.recorded_bytes(os.path.join(run_dir, "checkpoints", "step4"))
        assert "Traceback" not in proc.stderr
        assert_previous_intact(run_dir, "step4", "step6")


def test_a_disk_that_fills_during_a_save_is_one_line(prepared, tmp_path):
    with small_tmpfs(tmp_path / "full") as run_dir:
        os.environ["PRETRAIN_FILL_DISK_IN_SAVE"] = "4"  # the launcher passes the environment on
        try:
            proc = launch(DEEPSPEED, TINY + RUN + [f"data.dir={prepared}", f"run.dir={run_dir}"], expect_rc=2)
        finally:
            del os.environ["PRETRAIN_FILL_DISK_IN_SAVE"]
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr[-3000:]
        assert f"{run_dir}/checkpoints/step4: no space left on its file system while saving: the checkpoint needs about" in lines[0]
        assert f"the partial checkpoint is removed and {run_dir}/checkpoints/step2 is intact" in lines[0]
        free = int(lines[0].split("bytes, ")[1].split()[0])
        assert free < 1_000_000  # the filler holds the rest
        assert "Traceback" not in proc.stderr and "basic_ios" not in proc.stderr
        assert_previous_intact(run_dir, "step2", "step4")
