"""Launching real training runs from tests: the tiny model, the launchers, reading metrics back."""
import glob
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough for seconds-long runs; the rest of the recipe is the real one.
SHARED = [
    "model=toy", "model.hidden=64", "model.layers=2", "model.heads=2", "model.ffn=128",
    "train.micro_batch_size=4", "train.lr=1e-3", "train.eval_samples=16",
    "logger.progress=false", "logger.wandb.mode=disabled",
]  # fmt: skip
TINY = SHARED + ["stage.seq_len=64"]  # stage one (a stage's own settings are under stage.*)


# Stage two on the tiny model, and a short schedule with evaluation and checkpoints (test_palm_train, conftest).
PALM = SHARED + ["stage=palm", "stage.src_len=[8,40]", "stage.tgt_len=[8,24]", "stage.group_steps=4"]
STEPS = ["train.max_steps=20", "train.log_every=1", "train.eval_every=10", "train.save_every=5"]
# The same model for pretrain.finetune (whose config has no stage.seq_len or train.eval_samples).
FINETUNE_TINY = [a for a in SHARED if not a.startswith("train.eval_samples=")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], args: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run to completion and check the exit status. Each multi-rank launch gets its own master port: DeepSpeed's
    CPU shared-memory all-reduce names its buffers after the master address and port, so two jobs on one port
    would share them (and the rendezvous)."""
    # The suite's runs are CPU runs (deepspeed=zero3_cpu) wherever it runs: on a GPU machine (bench/gpu_check.py)
    # two ranks would otherwise both be given the one GPU.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    port = None
    for i, program in enumerate(launcher):
        if program in ("deepspeed", "torch.distributed.run"):
            port = free_port()
            launcher = launcher[: i + 1] + [f"--master_port={port}"] + launcher[i + 1 :]
            break
    proc = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != expect_rc:
        raise AssertionError(f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    if port is not None and proc.returncode == 0:  # DeepSpeed's CPU all-reduce segments: RAM, unless unlinked
        left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        assert not left, f"the run left its shared-memory segments behind: {left}"
    return proc


DEEPSPEED = ["deepspeed", "--num_gpus", "2", "--module", "pretrain.train"]
DEEPSPEED_FINETUNE = ["deepspeed", "--num_gpus", "2", "--module", "pretrain.finetune"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pretrain.train"]
PYTHON = [sys.executable, "-m", "pretrain.train"]


def rows(run_dir: str, split: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def trainer_refusal(args: list[str], world_size: int = 1) -> str:
    """The error pretrain.train stops a command line with before its ranks join, met in this process (seconds
    faster than a launch): the command line's check, then pretrain.train.check on the composed config. Each test
    that uses it also sends one case through the command, for the one line and the exit status."""
    from hydra import compose, initialize_config_dir

    from pretrain.errors import UserError
    from pretrain.overrides import check_command_line
    from pretrain.train import check

    try:
        check_command_line(args, "config", "pretrain.train")
        with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
            cfg = compose("config", overrides=args)
        check(cfg, world_size)
    except UserError as e:
        return str(e)
    raise AssertionError(f"pretrain.train accepted {args}")
