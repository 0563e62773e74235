"""A run that guards itself: one writer per run.dir (training/run_lock.py), no orphan ranks when the launcher
dies (training/peers.py), the hang watchdog (training/watchdog.py), and a rendezvous port in use
(training/distributed.py). Each fault is injected for real: a second run, kill -9, a stalled rank, a listener."""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from pretrain.errors import EXIT_HUNG, UserError
from pretrain.training import run_lock
from runs import DEEPSPEED, REPO, TINY, free_port, launch


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, **extra)


def _start(args: list[str], log: str, port: int | None = None) -> subprocess.Popen:
    """A 2-rank `deepspeed` run in the background, in its own session (so a test can kill it all); its output
    goes to `log` (a pipe nobody reads would fill and stall the ranks). Its port is proc.port."""
    port = port or free_port()
    cmd = DEEPSPEED[:1] + [f"--master_port={port}"] + DEEPSPEED[1:] + args
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    proc.port = port
    return proc


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended first (rc={proc.returncode}):\n{_read(log)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def _ranks_of(run_dir: str) -> list[psutil.Process]:
    """The processes whose command line names run_dir (ranks, their data workers, launchers)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(f"run.dir={run_dir}" == a for a in p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _kill_all(proc: subprocess.Popen, run_dir: str) -> None:
    for p in _ranks_of(run_dir):
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pretrain.train: error:")]


# --- the lock itself (a real lock file, real processes) ---------------------------------------------------------


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path, monkeypatch):
    lock = run_lock.acquire(str(tmp_path), "pretrain.train", 60)
    try:
        with pytest.raises(UserError, match=rf"in use by pretrain.train on host {socket.gethostname()}, "
                                            rf"pid {os.getpid()}, since \d{{4}}-"):  # fmt: skip
            run_lock.acquire(str(tmp_path), "pretrain.finetune", 60)
        with pytest.raises(UserError, match="in use by pretrain.train"):  # what a starter checks before reading
            run_lock.check_free(str(tmp_path), 60)
    finally:
        lock.release()
    # The other ranks of the holder's own launch (the same rendezvous) go on: their rank 0 took it.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    lock = run_lock.acquire(str(tmp_path), "pretrain.train", 60)
    try:
        run_lock.check_free(str(tmp_path), 60)
        monkeypatch.setenv("MASTER_PORT", "29556")  # another launch
        with pytest.raises(UserError, match="in use by pretrain.train"):
            run_lock.check_free(str(tmp_path), 60)
    finally:
        lock.release()
    assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)
    run_lock.check_free(str(tmp_path), 60)  # free again


def _foreign_lock(run_dir, host: str, heartbeat_age_s: float, job: str | None = None) -> None:
    now = time.time()
    holder = dict(host=host, pid=1, pid_started=0.0, started=now - 3600, heartbeat=now - heartbeat_age_s,
                  slurm_job_id=job, command="pretrain.train", token=f"{host}:1:0")  # fmt: skip
    (run_dir / run_lock.LOCK_NAME).write_text(json.dumps(holder))


def test_a_lock_of_another_node_is_stale_after_its_lease_or_for_its_own_requeued_job(tmp_path, monkeypatch, capsys):
    _foreign_lock(tmp_path, "node-elsewhere", heartbeat_age_s=10)
    with pytest.raises(UserError, match="in use by pretrain.train on host node-elsewhere, pid 1"):
        run_lock.acquire(str(tmp_path), "pretrain.train", 60)
    run_lock.acquire(str(tmp_path), "pretrain.train", 5).release()  # the same lock, older than a 5 s lease
    assert "its heartbeat is 10 s old (run.lock_lease_s=5)" in capsys.readouterr().err
    _foreign_lock(tmp_path, "node-elsewhere", heartbeat_age_s=1, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto this node
    run_lock.acquire(str(tmp_path), "pretrain.train", 60).release()
    assert "it is this Slurm job's (4242): a requeue" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path, capsys):
    script = (f"import os, signal; from pretrain.training import run_lock; run_lock.acquire({str(tmp_path)!r}, "
              "'pretrain.train', 60); print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert holder.wait() == -signal.SIGKILL
    assert run_lock.read_holder(str(tmp_path / run_lock.LOCK_NAME)).pid == holder.pid  # left behind
    lock = run_lock.acquire(str(tmp_path), "pretrain.train", 60)
    assert f"its process {holder.pid} on this host is gone" in capsys.readouterr().err
    assert run_lock.read_holder(lock.path).pid == os.getpid()
    lock.release()


# --- real runs ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_run_refuses_a_second_writer_and_its_port_and_stops_with_its_launcher(prepared, tmp_path):
    """One long run meets what a shared run directory and node bring, in turn: a second run into its run.dir is
    refused, naming it; a third on its port is one line and maps no shared memory; then kill -9 of its top-level
    `deepspeed` stops every rank within seconds and lets go of the lock, and a rerun resumes from its newest
    checkpoint. Nothing of the first run was touched: its config, and each step written once."""
    run = str(tmp_path / "run")
    common = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.log_every=1", "train.save_every=2",
                     "train.eval_every=100000"]  # fmt: skip
    log = str(tmp_path / "first.log")
    first = _start(common + ["seed=1", "train.max_steps=100000"], log)
    latest = os.path.join(run, "checkpoints", "latest")
    try:
        _wait_for(lambda: os.path.isfile(latest), 300, "the first run's first checkpoint", first, log)
        holder = run_lock.read_holder(os.path.join(run, run_lock.LOCK_NAME))
        second = launch(DEEPSPEED, common + ["seed=99", "train.max_steps=3"], expect_rc=2)
        lines = _error_lines(second.stderr)
        assert len(lines) == 1, second.stderr[-3000:]
        assert f"run.dir={run} is in use by pretrain.train on host {holder.host}, pid {holder.pid}, since" in lines[0]
        assert "Traceback" not in second.stderr
        # A third run, into a run.dir of its own but on the first run's port: its rank 1 finds the first run's
        # rendezvous there, and must not map a /dev/shm segment (nothing would unlink it).
        log3 = str(tmp_path / "third.log")
        third = _start(TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'third'}", "train.max_steps=2"], log3,
                       port=first.port)  # fmt: skip
        assert third.wait(timeout=300) == 2, _read(log3)[-3000:]
        lines = _error_lines(_read(log3))
        assert len(lines) == 1 and f"MASTER_PORT={first.port}: the rendezvous port is in use" in lines[0], lines
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{first.port}_*")

        everything = _ranks_of(run)  # the launchers, the ranks, their data workers
        ranks = [p for p in everything if "deepspeed.launcher.launch" in p.parent().cmdline()]
        assert len(ranks) == 2, [p.cmdline()[:4] for p in everything]
        os.kill(first.pid, signal.SIGKILL)  # the top-level `deepspeed`: before peers.py, its ranks went on training
        killed = time.monotonic()
        _wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), 10,
                  "every rank gone after the launcher's kill -9")  # fmt: skip
        stopped_after = time.monotonic() - killed
        _wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything), 15,
                  "every data worker and launcher gone too")  # fmt: skip
    finally:
        _kill_all(first, run)
    err = _read(log)
    # The rank that notices first says so; the middle launcher then stops the other, which may not get to say it.
    said = rf"rank [01]: its launcher \(pid {first.pid}, deepspeed\) is gone; stopping \(exit 5\)"
    assert re.search(said, err), err[-3000:]
    print(f"kill -9 of the top deepspeed: both ranks gone {stopped_after:.1f} s later")
    assert stopped_after < 5, stopped_after
    assert not os.path.exists(os.path.join(run, run_lock.LOCK_NAME))  # rank 0 let go of it on the way out
    with open(os.path.join(run, "config.yaml")) as f:
        assert "seed: 1\n" in f.read()  # the first run's, not the refused one's
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
    with open(latest) as f:
        newest = int(f.read().strip().removeprefix("step"))
    launch(DEEPSPEED, common + ["seed=1", f"train.max_steps={newest + 1}"])
    with open(os.path.join(run, "run.json")) as f:
        assert json.load(f)["resumed_from_step"] == newest


@pytest.mark.e2e
def test_a_stalled_rank_makes_every_rank_write_its_stacks_and_the_job_exit_4(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_STALL_AT", "3:1")  # rank 1 sleeps for ever after step 3 (training/watchdog.py)
    run = str(tmp_path / "run")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=50", "train.log_every=1",
                   "train.save_every=1000", "train.eval_every=1000", "dist.watchdog_s=3"]  # fmt: skip
    proc = launch(DEEPSPEED, args, expect_rc=EXIT_HUNG)  # the deepspeed launcher passes the rank's status on
    ended = time.time()
    for rank in (0, 1):
        path = os.path.join(run, "stacks", f"rank{rank}.txt")
        with open(path) as f:
            text = f.read()
        assert "did not finish in 3 s after step 3" in text and 'File "' in text, text
    with open(os.path.join(run, "stacks", "rank1.txt")) as f:
        assert "_stall_if_asked" in f.read()  # the stalled rank shows where it stalled
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "hung: step 4 did not finish in 3 s after step 3" in lines[0], proc.stderr[-3000:]
    last_row = os.path.getmtime(os.path.join(run, "metrics.jsonl"))  # step 3's, just before the stall
    stacks = os.path.getmtime(os.path.join(run, "stacks", "rank0.txt"))
    print(f"watchdog_s=3: stacks {stacks - last_row:.1f} s after step 3's row; launcher exited {ended - stacks:.1f} s "
          "after the stacks")  # fmt: skip
    assert 2.5 < stacks - last_row < 8, stacks - last_row
    assert ended - stacks < 15, ended - stacks  # the grace for the peers, the launcher's poll and teardown


@pytest.mark.e2e
def test_a_rendezvous_port_in_use_is_one_line_and_leaves_no_shared_memory(prepared, tmp_path):
    run = str(tmp_path / "run")
    with socket.socket() as listener:  # another program holds the port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        log = str(tmp_path / "port.log")
        proc = _start(TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2"], log, port=port)
        rc = proc.wait(timeout=300)
    err = _read(log)
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and f"MASTER_PORT={port}: the rendezvous port is in use" in lines[0], err[-3000:]
    assert "--master_port" in lines[0] and "Traceback" not in err
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not os.path.exists(os.path.join(run, run_lock.LOCK_NAME))


# --- the settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("dist.watchdog_s=600", "dist.watchdog_s=600: must be below dist.timeout_s=600"),
    ("dist.watchdog_s=0", "dist.watchdog_s=0: must be a number of seconds > 0"),
    ("run.lock_lease_s=abc", "run.lock_lease_s=abc: must be a number of seconds > 0"),
])  # fmt: skip
def test_the_guard_settings_are_checked_in_one_line(tmp_path, override, message):
    from hydra import compose, initialize_config_dir

    from pretrain.training.config import run_settings

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=[f"run.dir={tmp_path / 'run'}", override])
    with pytest.raises(UserError, match=f"^{message}$"):
        run_settings(cfg)
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        defaults = run_settings(compose("config", overrides=[f"run.dir={tmp_path / 'run'}"]))
    assert (defaults.watchdog_s, defaults.lock_lease_s, defaults.timeout_s) == (None, 60.0, 600.0)


# --- the watchdog's limits, in a process of its own (it exits the process it watches) ---------------------------

WATCHED = """
import sys, time
from pretrain.training import watchdog
dog = watchdog.arm(sys.argv[1], 0, "pretrain.train", step_limit_s=None, timeout_s=20)
print(dog.step_limit(), flush=True)                  # before any step is measured: 90 % of dist.timeout_s
time.sleep(1.0); watchdog.beat(1)                    # the first step: not measured
time.sleep(0.3); watchdog.beat(2)
print(dog.step_limit(), flush=True)                  # max(60, 10 x 0.3) capped at 18
dog.fixed = 0.5                                      # dist.watchdog_s=0.5 from here
watchdog.beat(3)
with dog.phase("a checkpoint save"):
    time.sleep(1.5)                                  # longer than a step may take: a phase is not a step
print("phase done", flush=True)
watchdog.beat(4)
time.sleep(30)                                       # step 5 hangs
"""


@pytest.mark.e2e
def test_the_watchdog_spares_the_first_step_and_phases_and_fires_on_a_hung_step(tmp_path):
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCHED, str(tmp_path)], env=_env(), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    took = time.monotonic() - began
    assert proc.returncode == EXIT_HUNG, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["18.0", "18.0", "phase done"], proc.stdout
    assert "hung: step 5 did not finish in 0.5 s after step 4" in proc.stderr
    with open(tmp_path / "stacks" / "rank0.txt") as f:
        assert 'File "<string>", line 15 in <module>' in f.read()  # the main thread's sleep(30): where it hung
    assert took < 15


@pytest.mark.e2e
def test_a_rank_whose_peer_is_killed_exits_5_with_one_line(prepared, tmp_path):
    """Two ranks started by hand, as srun starts them (no launcher to tear the survivor down): a lost node."""
    run, port = str(tmp_path / "run"), free_port()
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=100000", "train.save_every=100000",
                   "train.eval_every=100000", "train.log_every=1"]  # fmt: skip
    ranks, logs = [], []
    for rank in (0, 1):
        logs.append(str(tmp_path / f"rank{rank}.log"))
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(logs[-1], "w") as out:
            ranks.append(subprocess.Popen([sys.executable, "-m", "pretrain.train"] + args, cwd=REPO, env=env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    try:
        _wait_for(lambda: os.path.isfile(os.path.join(run, "metrics.jsonl")), 300, "a first row", ranks[0], logs[0])
        ranks[1].kill()
        assert ranks[0].wait(timeout=120) == 5, _read(logs[0])[-3000:]
    finally:
        for proc in ranks:
            proc.kill()
    err = _read(logs[0])
    lines = _error_lines(err)
    assert len(lines) == 1 and "rank 0 lost its peers (" in lines[0], err[-3000:]
    assert "Traceback" not in err
