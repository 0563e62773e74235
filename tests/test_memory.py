"""Memory before the model (training/memory.py): ZeRO-3's auto buffer sizes, the planner counting the buffers,
the estimate of the tests' and the demo's tiny runs, and the trainer refusing a run that cannot fit before it
builds anything (train.memory_check)."""
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_finetune import tasks  # noqa: F401 (a fixture: tiny task directories)

from pretrain import plan as P
from pretrain.errors import UserError
from pretrain.models.structbert import StructBert
from pretrain.train import setup
from pretrain.training import memory
from runs import FINETUNE_TINY, PYTHON, REPO, TINY, launch, trainer_refusal

GiB = 2**30


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose("config", overrides=overrides)


def test_auto_sizes_follow_the_hidden_size():
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1.0e9}  # fmt: skip
    out = memory.zero_sizes(zero, 8192)
    assert out["reduce_bucket_size"] == 8192 * 8192 == 67_108_864
    assert out["stage3_prefetch_bucket_size"] == int(0.9 * 8192 * 8192) == 60_397_977
    assert out["stage3_param_persistence_threshold"] == 81_920
    assert out["stage3_max_live_parameters"] == 1.0e9 and zero["reduce_bucket_size"] == "auto"  # not a size; a copy
    explicit = memory.zero_sizes({"reduce_bucket_size": 5.0e7, "stage3_param_persistence_threshold": 0}, 8192)
    assert explicit == {"reduce_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 0}
    assert all(type(v) is int for v in explicit.values())  # DeepSpeed counts elements
    for bad in ("big", -1, True):
        with pytest.raises(UserError, match=r"^deepspeed.zero.reduce_bucket_size=.*: must be a number of elements"):
            memory.zero_sizes({"reduce_bucket_size": bad}, 64)


@pytest.mark.parametrize("hardware", ["zero3_v100", "zero3_bf16"])
def test_the_gpu_profiles_scale_their_buffers_with_the_model(prepared, tmp_path, hardware):
    """The generated DeepSpeed config carries numbers, filled from model.hidden; the CPU profile keeps its own
    (its persistence threshold 0 partitions every parameter, which the partitioning tests rely on)."""
    for hidden, heads in ((64, 2), (256, 4)):
        cfg = compose_config([f"deepspeed={hardware}", "model=toy", f"model.hidden={hidden}", f"model.heads={heads}",
                              f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}"])  # fmt: skip
        zero = setup(cfg, world_size=2).ds_config["zero_optimization"]
        assert zero["reduce_bucket_size"] == hidden * hidden
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
        assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    cpu = setup(compose_config([f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}"]), world_size=2)
    zero = cpu.ds_config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (50_000_000, 50_000_000)
    assert zero["stage3_param_persistence_threshold"] == 0
    numbers = compose_config([f"deepspeed={hardware}", "deepspeed.zero.reduce_bucket_size=2e6",
                              f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert setup(numbers, world_size=2).ds_config["zero_optimization"]["reduce_bucket_size"] == 2_000_000
    assert not (tmp_path / "run").exists()


def test_plan_counts_the_zero3_buffers():
    """On 8 GPUs: the 16-bit reduce bucket, the prefetched parameters, and the parameters of at most 10h elements
    kept whole (less their own partition), counted on a real model; on one GPU only the bucket. The total is the
    model states + activations + buffers, and pretrain.plan's need equals the trainer's (memory.need_bytes)."""
    argv = ["model=toy", "vocab_size=1001", "gpus_per_node=8", "gpu_mem_gb=16", "seq_len=128"]
    p = P.plan(argv)
    cfg = P.parse(argv)[1]
    h = cfg.hidden
    torch.manual_seed(0)
    persistent = sum(t.numel() - -(-t.numel() // 8) for t in StructBert(cfg).parameters() if t.numel() <= 10 * h)
    assert persistent > 0
    assert p["zero_buffer_bytes"] == 2 * (h * h + int(0.9 * h * h) + persistent)
    assert p["need_bytes"] == p["model_states_bytes"] + p["activation_bytes"] + p["zero_buffer_bytes"]
    one = P.plan([*argv[:2], "gpus_per_node=1", *argv[3:]])
    assert one["zero_buffer_bytes"] == 2 * h * h
    # deepspeed=zero3_cpu: its explicit 5e7-element bucket in fp32, a prefetch of at most the whole (1M-parameter)
    # model, nothing persistent (threshold 0).
    cpu = P.plan([*argv, "deepspeed=zero3_cpu"])
    assert cpu["precision"] == "fp32" and cpu["zero_buffer_bytes"] == 4 * (50_000_000 + p["total_params"])
    # PLUG: the buffers at its width are about a quarter GiB, where the fixed 5e8 took about 2 GB.
    plug = P.plan(["model=plug", "gpus_per_node=8"])
    assert 0.2 * GiB < plug["zero_buffer_bytes"] < 0.3 * GiB
    assert P.render(plug).splitlines()[5].startswith("ZeRO buffers/GPU  0.24 GiB (deepspeed=zero3_v100: reduce bucket 67,108,864")


@pytest.mark.parametrize("settings, ranks", [
    (TINY, 2), (TINY, 1),  # tests/runs.py: every e2e run of the suite
    (["model=toy", "stage.seq_len=64"], 2),  # the Makefile's demo (stage one; micro_batch_size 16 by default)
    (["model=toy", "stage=palm", "stage.src_len=[32,96]", "stage.tgt_len=[32,64]"], 2),  # the demo's stage two
])  # fmt: skip
def test_the_tiny_runs_are_never_refused(prepared, tmp_path, settings, ranks, monkeypatch):
    """Their estimate per rank stays under 0.5 GiB (most of it the CPU profile's fp32 buckets): a 2-rank run fits
    any machine with 1 GiB free (the check runs on every e2e launch of the suite as well)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    cfg = compose_config([*(a for a in settings if not a.startswith("logger.")), f"data.dir={prepared}",
                          f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    run = setup(cfg, world_size=ranks)
    stage = run.stage
    shape = memory.run_shape(stage.model_cfg, stage.generates, stage.vocab_projections, stage.seq_len,
                             run.geometry.micro, run.ds_config, run.settings.precision, ranks)  # fmt: skip
    need = memory.need_bytes(shape, memory.count_model(stage.make_model))
    assert need["total"] < 0.5 * GiB, need
    monkeypatch.setenv("PRETRAIN_MEMORY_AVAILABLE", str(GiB))  # a machine with 1 GiB free per rank
    assert memory.check(True, shape, stage.make_model, 0, ranks, stage.name, run.settings.hardware) == need


def test_the_host_figure_and_the_ranks_sharing_it(monkeypatch):
    available, where = memory.host_available_bytes()
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert 0 < available <= meminfo["MemAvailable"] * 1.1 and where  # the cgroup's limit only lowers it
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert memory.ranks_on_this_node(1) == 1
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's
    assert memory.ranks_on_this_node(16) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's
    assert memory.ranks_on_this_node(16) == 8 and memory.ranks_on_this_node(4) == 4


@pytest.mark.e2e
def test_plug_on_one_cpu_process_is_refused_before_any_allocation(prepared, tmp_path):
    """model=plug, one python process: one line with both figures and the plan command, exit 2, within seconds,
    the process's peak RSS that of an idle trainer (PLUG's first layer alone would take 1 GiB), run.dir unwritten.
    Before the check the process climbed until the kernel killed it (23.6 GB peak on a 24 GB machine)."""
    run = tmp_path / "run"
    args = ["model=plug", f"data.dir={prepared}", f"run.dir={run}", "logger.progress=false", "logger.wandb.mode=disabled"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("PRETRAIN_MEMORY_AVAILABLE", None)
    with open(tmp_path / "stderr", "w") as err:
        child = subprocess.Popen([*PYTHON, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        except BaseException:
            child.kill()
            raise
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = (tmp_path / "stderr").read_text()
    lines = [line for line in stderr.splitlines() if "[WARNING]" not in line]  # DeepSpeed's accelerator notice
    assert child.returncode == 2 and len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("pretrain.train: error: this run needs about ") and "train.memory_check=false" in line
    peak_gib = usage.ru_maxrss * 1024 / GiB
    assert peak_gib < 1.0, f"peak RSS {peak_gib:.2f} GiB before the refusal"
    assert not run.exists()
    need, have = (float(x) for x in re.search(r"needs about ([\d.]+) GiB .* but has ([\d.]+) GiB", line).groups())
    assert need > 300 and need > have  # fp32 AdamW states of 19.7B parameters
    # The command it names prints the same figure.
    command = re.search(r"`python -m pretrain\.plan ([^`]*)`", line).group(1).split()
    assert command[:2] == ["model=plug", "stage=structbert"] and "deepspeed=zero3_cpu" in command
    assert f"{P.plan(command)['need_bytes'] / GiB:.2f}" == f"{need:.2f}"


@pytest.mark.e2e
def test_memory_check_false_overrides_the_refusal(prepared, tmp_path):
    """A machine with too little memory (PRETRAIN_MEMORY_AVAILABLE, the check's fault point, says 1 MB per rank):
    the tiny run is refused; with train.memory_check=false it trains."""
    run = tmp_path / "run"
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2", "train.eval_samples=4"]
    os.environ["PRETRAIN_MEMORY_AVAILABLE"] = str(2**20)
    try:
        refused = launch(PYTHON, args, expect_rc=2)
        assert "but has 0.00 GiB (PRETRAIN_MEMORY_AVAILABLE)" in refused.stderr and not run.exists()
        launch(PYTHON, args + ["train.memory_check=false"])
    finally:
        del os.environ["PRETRAIN_MEMORY_AVAILABLE"]
    assert (run / "checkpoints" / "step2").is_dir()
    bad = trainer_refusal(args + [f"run.dir={tmp_path / 'bad'}", "train.memory_check=maybe"])
    assert "train.memory_check=maybe: must be true or false" in bad and not (tmp_path / "bad").exists()


@pytest.mark.e2e
def test_finetune_is_checked_too(prepared, tasks, tmp_path):  # noqa: F811
    """pretrain.finetune runs the same check before its model: a generation task (a decoder) on a machine with
    1 MB per rank is refused in one line naming the plan command, run.dir unwritten."""
    run = tmp_path / "run"
    args = FINETUNE_TINY + ["task=generation", f"data.dir={tasks['gen']}", f"run.dir={run}", f"vocab={prepared}/vocab.txt"]
    os.environ["PRETRAIN_MEMORY_AVAILABLE"] = str(2**20)
    try:
        refused = launch([sys.executable, "-m", "pretrain.finetune"], args, expect_rc=2)
    finally:
        del os.environ["PRETRAIN_MEMORY_AVAILABLE"]
    line = [x for x in refused.stderr.splitlines() if "[WARNING]" not in x]
    assert len(line) == 1 and line[0].startswith("pretrain.finetune: error: this run needs about "), refused.stderr
    assert "python -m pretrain.plan model=toy model.hidden=64" in line[0] and "stage=palm" in line[0]
    assert not run.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
