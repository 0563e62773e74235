"""The Slurm job scripts under a real Slurm: a throwaway cluster of two nodes on this machine (tests/slurm_cluster.py);
launch/slurm/prepare.sbatch as a job array over the shards of a corpus, and
launch/slurm/train.sbatch in both launch modes and both stages, preemption with requeue, a killed rank (requeued), a
crash mid-checkpoint (requeued up to MAX_REQUEUES), and a configuration error or a divergence stop (never requeued,
in both modes). Every training run is 2 ranks, one per node, CPU fp32, so resumed runs must match an uninterrupted
one bitwise. Skips when Slurm/munge are missing or the daemons cannot start (`make install-test` installs them)."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
from slurm_cluster import FINISHED, ClusterUnavailable, SlurmCluster, missing_programs

from runs import SHARED, TINY, rows

pytestmark = [pytest.mark.slurm, pytest.mark.e2e, pytest.mark.skipif(
    bool(missing_programs()), reason=f"Slurm/munge not installed (missing {', '.join(missing_programs())}; `make install-test` installs them as root)"
)]

SCRIPT = "launch/slurm/train.sbatch"
# --time: a bound on a hang; above the script's --signal=B:USR1@600, which would otherwise fire at once.
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--time=30"]
SRUN = {"LAUNCH_MODE": "srun", "GPUS_PER_NODE": "1"}
# One schedule for the reference and every interrupted run: the losses must agree step by step.
STEPS = ["train.max_steps=40", "train.log_every=1", "train.eval_every=20", "train.save_every=5", "dist.timeout_s=20"]
PALM = ["stage=palm", "stage.src_len=[8,40]", "stage.tgt_len=[8,24]", "stage.group_steps=4", "train.max_steps=8",
        "train.log_every=1", "train.eval_every=8", "train.save_every=4", "dist.timeout_s=20"]  # fmt: skip
JOB_TIMEOUT = 240  # seconds for one job to finish; a run here takes well under a minute


@pytest.fixture(scope="module")
def cluster():
    try:
        c = SlurmCluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"could not start a Slurm cluster: {e}")
    try:
        yield c
    finally:
        c.stop()


def stage_one(prepared: str, run: str) -> list[str]:
    return TINY + STEPS + [f"data.dir={prepared}", f"run.dir={run}"]


def losses(run: str) -> dict:
    return {(r["step"], r["split"]): r["loss"] for r in rows(run, "train") + rows(run, "valid")}


def latest(run: str) -> str:
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        return f.read().strip()


def run_info(run: str) -> dict:
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


def wait_for_step(cluster: SlurmCluster, job: int, run: str, step: int, timeout: float = JOB_TIMEOUT) -> None:
    """Until rank 0 has logged `step` (the job must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(r["step"] >= step for r in rows(run, "train")):
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not started yet, or a row half written
            pass
        assert cluster.job_state(job) in {"PENDING", "CONFIGURING", "RUNNING"}, cluster.describe(job)
        time.sleep(0.2)
    cluster.cancel(job)
    raise AssertionError(f"job {job}: step {step} not reached in {timeout} s\n{cluster.describe(job)}")


def assert_complete_checkpoint(run: str, world_size: int = 2) -> str:
    tag = latest(run)
    files = set(os.listdir(os.path.join(run, "checkpoints", tag)))
    for r in range(world_size):
        expected = {f"rng_rank{r}.pt", f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"}
        assert expected <= files, (tag, sorted(files))
    return tag


def rank_pid(run: str, rank: int) -> int:
    """The training process of `rank` in this run (not its DataLoader worker, which shares its command line)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if "pretrain.train" in argv and f"run.dir={run}" in argv and env.get("SLURM_PROCID") == str(rank):
            found[int(pid)] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(mains) == 1, f"rank {rank} of {run}: processes {found}"
    return mains[0]


# ---- a. both stages, both launch modes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(cluster, prepared, tmp_path_factory) -> str:
    """Stage one, srun mode, two nodes, uninterrupted: the run every interrupted one is compared with."""
    run = str(tmp_path_factory.mktemp("slurm") / "reference")
    job = cluster.submit(SCRIPT, stage_one(prepared, run), env=SRUN, sbatch_args=TWO_NODES)
    cluster.wait_for(job, "COMPLETED", JOB_TIMEOUT)
    info = cluster.job(job)
    assert info["NodeList"] == "n[1-2]" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert "srun mode, 1 ranks per node, master 127.0.0.1:" in cluster.output(job)
    return run


def test_srun_mode_trains_stage_one_on_two_nodes(reference):
    assert [r["step"] for r in rows(reference, "train")] == list(range(1, 41))
    assert [r["step"] for r in rows(reference, "valid")] == [20, 40]
    info = run_info(reference)
    assert info["world_size"] == 2 and len(info["partition_numel_per_rank"]) == 2
    assert assert_complete_checkpoint(reference) == "step40"
    assert not os.path.exists(os.path.join(reference, "STOP"))


def test_srun_mode_stage_two_starts_from_stage_one(cluster, prepared, reference, tmp_path):
    run = str(tmp_path / "palm")
    args = SHARED + PALM + [f"data.dir={prepared}", f"run.dir={run}", f"init_from={reference}"]
    job = cluster.submit(SCRIPT, args, env=SRUN, sbatch_args=TWO_NODES)
    cluster.wait_for(job, "COMPLETED", JOB_TIMEOUT)
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 9))
    info = run_info(run)
    assert info["world_size"] == 2
    assert info["initialized_from"] == os.path.join(reference, "checkpoints", "step40")
    assert latest(run) == "step8"


def test_deepspeed_mode_trains_stage_one_on_two_nodes(cluster, prepared, tmp_path):
    run = str(tmp_path / "deepspeed")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=6", "train.log_every=1", "dist.timeout_s=20"]
    job = cluster.submit(SCRIPT, args, env={"LAUNCH_MODE": "deepspeed", "GPUS_PER_NODE": "1"}, sbatch_args=TWO_NODES)
    cluster.wait_for(job, "COMPLETED", JOB_TIMEOUT)
    out = cluster.output(job)
    assert "deepspeed mode, 1 ranks per node" in out
    for node_rank in (0, 1):  # one launcher per node, each starting its node's rank
        assert f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in out, out[-4000:]
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 7))
    assert run_info(run)["world_size"] == 2
    assert assert_complete_checkpoint(run) == "step6"


def test_missing_run_dir_fails_before_training(cluster, prepared):
    job = cluster.submit(SCRIPT, TINY + [f"data.dir={prepared}"], env=SRUN, sbatch_args=TWO_NODES)
    cluster.wait_for(job, "FAILED", 60)
    assert cluster.job_exit_code(job) == (2, 0)
    assert "train.sbatch: error: run.dir=<dir> is required" in cluster.output(job)


# ---- b. preemption: USR1 to the batch shell -> checkpoint, requeue, resume ----------------------------------------
def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, prepared, reference, tmp_path):
    run = str(tmp_path / "preempted")
    job = cluster.submit(SCRIPT, stage_one(prepared, run), env=SRUN, sbatch_args=TWO_NODES)
    wait_for_step(cluster, job, run, 3)
    cluster.cancel(job, "--batch", "--signal=USR1")  # what --signal=B:USR1@<s> does before the time limit
    cluster.wait_for(job, "COMPLETED", JOB_TIMEOUT)
    out = cluster.output(job)
    assert cluster.restarts(job) == 1, cluster.describe(job)
    assert "train.sbatch: USR1: asking the ranks to checkpoint and stop" in out
    assert "pretrain.train: stop requested: checkpoint of step" in out
    assert f"requeueing job {job} to resume" in out
    resumed = run_info(run)["resumed_from_step"]
    print(f"USR1 after step 3: checkpoint of step {resumed}, requeued, finished")
    assert 3 <= resumed < 40, resumed
    assert latest(run) == "step40" and not os.path.exists(os.path.join(run, "STOP"))
    assert "a crash" not in out and not os.path.exists(os.path.join(run, "slurm"))
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 41))
    assert losses(run) == losses(reference)  # bitwise


# ---- c. a rank killed: the job requeues itself and resumes from the newest complete checkpoint ---------------------
def decision(out: str, job: int, attempt: int) -> str:
    """The job script's one line about how `attempt` of `job` ended."""
    lines = [line for line in out.splitlines() if line.startswith(f"train.sbatch: job {job} attempt {attempt}: ")]
    assert len(lines) == 1, out[-6000:]
    return lines[0]


def test_killed_rank_is_requeued_and_resumes_exactly(cluster, prepared, reference, tmp_path):
    run = str(tmp_path / "killed")
    job = cluster.submit(SCRIPT, stage_one(prepared, run), env=SRUN, sbatch_args=TWO_NODES)
    wait_for_step(cluster, job, run, 12)  # step 10 is saved by now
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    killed_at = time.time()
    cluster.wait_for(job, "COMPLETED", JOB_TIMEOUT)
    out = cluster.output(job)
    line = decision(out, job, 1)
    print(f"rank 1 killed: job {job} finished {time.time() - killed_at:.1f} s later; {line}")
    assert re.search(r"training failed \(srun status \d+; failed ranks:.* rank1=137\b.*\); a crash: requeue 1 of "
                     r"MAX_REQUEUES=3, to resume from the newest intact checkpoint$", line), line
    assert cluster.restarts(job) == 1 and cluster.job_exit_code(job) == (0, 0), cluster.describe(job)
    resumed = run_info(run)["resumed_from_step"]
    assert resumed >= 10 and resumed % 5 == 0, resumed
    assert latest(run) == "step40"
    assert losses(run) == losses(reference)
    assert not os.path.exists(os.path.join(run, "slurm"))  # the job's record goes with a job that ended well


# ---- d. a rank dies while saving, every time: requeued up to MAX_REQUEUES, the previous checkpoint kept ----------
def test_crash_mid_checkpoint_is_requeued_up_to_the_limit(cluster, prepared, reference, tmp_path):
    run = str(tmp_path / "crashed")
    args = stage_one(prepared, run)
    job = cluster.submit(SCRIPT, args, env=dict(SRUN, PRETRAIN_CRASH_IN_SAVE="10:1", MAX_REQUEUES="1"),
                         sbatch_args=TWO_NODES)
    cluster.wait_for(job, "FAILED", 2 * JOB_TIMEOUT)
    out = cluster.output(job)
    assert out.count("PRETRAIN_CRASH_IN_SAVE=10:1: rank 1 dies while saving step 10") == 2, out[-6000:]
    assert re.search(r"failed ranks:.* rank1=113\b.*; a crash: requeue 1 of MAX_REQUEUES=1, ", decision(out, job, 1))
    assert re.search(r"failed ranks:.* rank1=113\b.*; a crash, not requeued: all MAX_REQUEUES=1 requeues used; "
                     r"resubmit the same command to resume from the newest intact checkpoint$", decision(out, job, 2))
    assert cluster.restarts(job) == 1 and cluster.job_exit_code(job)[0] != 0, cluster.describe(job)
    assert assert_complete_checkpoint(run) == "step5"
    assert os.path.isdir(os.path.join(run, "checkpoints", "step10"))  # the unfinished one, still there
    assert not os.path.exists(os.path.join(run, "slurm"))

    again = cluster.submit(SCRIPT, args, env=SRUN, sbatch_args=TWO_NODES)
    cluster.wait_for(again, "COMPLETED", JOB_TIMEOUT)
    out = cluster.output(again)
    assert "step10: an unfinished checkpoint" in out
    assert run_info(run)["resumed_from_step"] == 5
    assert latest(run) == "step40"
    assert losses(run) == losses(reference)


# ---- e. a configuration error or a divergence stop: never requeued, whatever srun reports -----------------------
# One rank exits 2 or 3 while the other is still running: srun terminates that one and reports 143 (or a peer's own
# status), so only the statuses the ranks record tell the job script what happened. The divergence stop is real:
# a NaN injected into the loss of the first batch (PRETRAIN_INJECT_LOSS, training/health.py) stops every rank with
# status 3. The configuration error is real too (train.lr=0), in both modes (in deepspeed mode each node's launcher
# records its status); the status 3 in srun mode.
@pytest.mark.parametrize("mode, fault", [("srun", "configuration"), ("deepspeed", "configuration"),
                                         ("srun", "divergence")])
def test_configuration_error_or_divergence_stop_is_never_requeued(cluster, prepared, tmp_path, mode, fault):
    run = str(tmp_path / "run")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2", "train.save_every=1",
                   "dist.timeout_s=20"]  # fmt: skip
    env = {"LAUNCH_MODE": mode, "GPUS_PER_NODE": "1"}
    if fault == "configuration":
        args.append("train.lr=0")
    else:
        env["PRETRAIN_INJECT_LOSS"] = "0:nan"
    job = cluster.submit(SCRIPT, args, env=env, sbatch_args=TWO_NODES)
    cluster.wait_for(job, "FAILED", JOB_TIMEOUT)
    out = cluster.output(job)
    line = decision(out, job, 1)
    print(f"{mode} mode, {fault}: {line}")
    who = "rank" if mode == "srun" else "node"
    if fault == "configuration":
        assert "train.lr=0: must be > 0" in out
        expected = (2, rf"not requeued:( {who}[01]=2)+ is a configuration error: the same command would fail again")
    else:
        assert "step 1: loss nan; no healthy checkpoint yet" in out
        expected = (3, rf"not requeued:( {who}[01]=3)+ is a divergence stop: the same run would diverge again")
    assert re.search(rf"training failed \(srun status \d+; failed {who}s:.*\); {expected[1]}", line), line
    assert cluster.job_exit_code(job) == (expected[0], 0) and cluster.restarts(job) == 0, cluster.describe(job)
    assert not os.path.exists(os.path.join(run, "slurm"))


def test_max_requeues_must_be_a_whole_number(cluster, prepared, tmp_path):
    args = TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}"]
    job = cluster.submit(SCRIPT, args, env=dict(SRUN, MAX_REQUEUES="three"), sbatch_args=TWO_NODES)
    cluster.wait_for(job, "FAILED", 60)
    assert cluster.job_exit_code(job) == (2, 0)
    assert "train.sbatch: error: MAX_REQUEUES=three: must be a whole number" in cluster.output(job)


# ---- f. prepare.sbatch: a job array of shards that together are the whole corpus --------------------------------
def array_states(cluster: SlurmCluster, job: int) -> dict[str, str]:
    """{array task id: JobState} of a job array (one `scontrol -o show job` line per task once they are split)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", str(job)], env=cluster.env, capture_output=True, text=True,
                          timeout=30)
    rows = [dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines()]
    return {row.get("ArrayTaskId"): row.get("JobState") for row in rows}


def wait_for_array(cluster: SlurmCluster, job: int, tasks: list[str], timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = array_states(cluster, job)
        if sorted(states) == sorted(tasks) and set(states.values()) <= FINISHED:
            assert set(states.values()) == {"COMPLETED"}, states
            return
        time.sleep(1)
    cluster.cancel(job)
    raise AssertionError(f"job array {job}: {array_states(cluster, job)} after {timeout} s")


def test_prepare_array_shards_are_the_whole_corpus(cluster, tmp_path):
    from test_prepare import assert_shards_make_the_whole, write_parts

    from pretrain.prepare import PrepareConfig, prepare
    from pretrain.vocab import VocabConfig, build

    raw = write_parts(tmp_path / "raw", sizes=(120, 30, 60, 90, 10))
    vocab = str(tmp_path / "vocab.txt")
    build(VocabConfig(input=raw, out=vocab, vocab_size=400))
    out = tmp_path / "prepared"
    logs = f"--output={cluster.root}/prepare-%A_%a.out"
    env = {"INPUT": raw, "OUT": str(out), "VOCAB": vocab}
    job = cluster.submit("launch/slurm/prepare.sbatch", ["valid_fraction=0.05"], env=env,
                         sbatch_args=["--array=0-2", "--cpus-per-task=1", "--time=10", logs])
    wait_for_array(cluster, job, ["0", "1", "2"])
    for i in range(3):
        with open(os.path.join(cluster.root, f"prepare-{job}_{i}.out")) as f:
            log = f.read()
        assert f"shard {i} of 3, 1 workers, -> {out}/shard-{i}" in log and f"prepared {out}/shard-{i} in " in log, log
    prepare(PrepareConfig(input=raw, out=str(tmp_path / "whole"), vocab=vocab, valid_fraction=0.05))
    assert_shards_make_the_whole([out / f"shard-{i}" for i in range(3)], tmp_path / "whole")

    # Resubmitted, a task skips its finished shard; NUM_SHARDS keeps the count when not all tasks are submitted.
    again = cluster.submit("launch/slurm/prepare.sbatch", [], env=dict(env, NUM_SHARDS="3"),
                           sbatch_args=["--array=1", "--cpus-per-task=1", "--time=10", logs])
    wait_for_array(cluster, again, ["1"])
    with open(os.path.join(cluster.root, f"prepare-{again}_1.out")) as f:
        assert f"{out}/shard-1 is already prepared; skipping it" in f.read()


def test_finetune_grid_array_runs_each_point_and_a_dependent_job_reports(cluster, prepared, tmp_path):
    """launch/slurm/finetune_grid.sbatch: one array task a point of a 2-seed grid (each its own run directory),
    then the report as a job that depends on the array, as the script's header says to submit it."""
    from synthetic import NAMES
    from test_finetune import SIZES, _write

    from runs import FINETUNE_TINY

    data = _write(tmp_path, "pair", lambda split, n: [{"sentence1": f"{NAMES[i % 10]}说", "sentence2": NAMES[i % 3],
                                                       "label": str(int(i % 10 == i % 3))} for i in range(n)])  # fmt: skip
    root = tmp_path / "grid"
    args = [f"run.dir={root}", "seeds=[1,2]", "lrs=[1e-3]", "--",
            *[a for a in FINETUNE_TINY if not a.startswith("train.lr=")], "task=pair_classification",
            f"data.dir={data}", f"vocab={prepared}/vocab.txt", "train.max_steps=2", "train.eval_every=2"]  # fmt: skip
    logs = f"--output={cluster.root}/grid-%A_%a.out"
    array = cluster.submit("launch/slurm/finetune_grid.sbatch", args, env={"LAUNCHER": "python -m"},
                           sbatch_args=["--array=0-1", "--cpus-per-task=1", "--time=10", logs])
    report = cluster.submit("launch/slurm/finetune_grid.sbatch", ["report=true", *args],
                            sbatch_args=[f"--dependency=afterok:{array}", "--cpus-per-task=1", "--time=10"])
    wait_for_array(cluster, array, ["0", "1"])
    cluster.wait_for(report, "COMPLETED", JOB_TIMEOUT)
    for i, seed in enumerate((1, 2)):
        with open(os.path.join(cluster.root, f"grid-{array}_{i}.out")) as f:
            assert f"point {i}" in f.read()
        assert json.load(open(root / f"lr0.001-seed{seed}" / "results.json"))["test_examples"] == SIZES["test"]
    grid = json.load(open(root / "grid.json"))
    assert grid["points"] == ["lr0.001-seed1", "lr0.001-seed2"] and grid["settings"][0]["accuracy"]["n"] == 2
    with open(cluster.output_path(report)) as f:
        assert "valid accuracy" in f.read()
