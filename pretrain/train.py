"""Pre-training entry point, the same under `deepspeed`, `torchrun`, `srun` and plain `python`:

    deepspeed --num_gpus 2 --module pretrain.train stage=structbert model=toy data.dir=D run.dir=R

The recipe: read and check the whole config (`setup`, which writes nothing), join the ranks, build the
ZeRO-3-partitioned model (from stage one's weights for stage two), resume the newest checkpoint, then train,
log, evaluate and save at step boundaries until the last step or a stop request.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pretrain.data.sources import describe
from pretrain.errors import exit_on_user_error
from pretrain.overrides import check_command_line
from pretrain.run_record import ModelRecord
from pretrain.stages import build_stage
from pretrain.stages.base import Stage
from pretrain.training import distributed, init_from, loop, memory, peers, run_lock, safe_load, watchdog
from pretrain.training.checkpoint import Checkpoints
from pretrain.training.config import (BatchGeometry, RunSettings, batch_geometry, deepspeed_config, run_settings)  # fmt: skip
from pretrain.training.engine import to_device
from pretrain.training.metrics import MetricsLog, Window, metrics_row
from pretrain.training.run_dir import write_run_files

# torch 2.13 deprecates the collectives DeepSpeed calls, once per step: not ours to fix, only noise.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)


@dataclass
class Setup:
    """Everything a run needs from its config, read and checked before any rank writes a byte."""

    settings: RunSettings
    geometry: BatchGeometry
    stage: Stage
    init: init_from.InitSource | None  # stage two: the stage-one checkpoint and its parameter mapping
    ds_config: dict
    checkpoints: Checkpoints
    resume_from: str | None  # the checkpoint the run resumes; None: it starts afresh


def setup(cfg: DictConfig, world_size: int, rank: int = 0) -> Setup:
    """Read every setting of the config (the test of conf/ checks that each key is read here) and check it, and
    the checkpoint the run resumes (whose global batch a resume keeps: the geometry follows it)."""
    settings = run_settings(cfg)
    safe_load.trust(settings.trust_checkpoint)  # before the stage reads init_from's checkpoint
    stage = build_stage(cfg)
    run_lock.check_free(settings.run_dir, settings.lock_lease_s)  # its checkpoints may be changing under us
    checkpoints = Checkpoints(settings.run_dir, rank, world_size, settings.keep_last)
    resume_from = checkpoints.resolve(settings.resume, stage.name, settings.elastic)
    geometry = batch_geometry(cfg.train, world_size, resume_from, checkpoints.global_batch)
    return Setup(settings, geometry, stage, stage.init_source(), deepspeed_config(cfg, geometry), checkpoints,
                 resume_from)  # fmt: skip


class StageJob:
    """A pre-training stage as the loop drives it (training/loop.py)."""

    counts_flops, saves_at_eval = True, False

    def __init__(self, stage, geometry: BatchGeometry, rank: int):
        self.stage, self.geometry, self.rank = stage, geometry, rank
        self.kind, self.objectives, self.weights = stage.name, stage.objectives, stage.weights
        self.token_counts, self.train_flops, self.phase_columns = stage.token_counts, stage.train_flops, stage.phase_columns

    def forward(self, engine, batch):
        return engine(batch, self.weights)

    def evaluate(self, engine, step: int) -> list[dict]:
        return evaluate(engine, self.stage, self.stage.valid_loaders(self.geometry, self.rank, step), step)


def check(cfg: DictConfig, world_size: int, rank: int = 0) -> Setup:
    """Every check of a composed config that needs no rank: the whole of what a bad setting meets before the
    ranks join (the memory check aside), so that a test can meet it in its own process."""
    run = setup(cfg, world_size, rank)
    loop.check_precision(run.settings)
    return run


def train(cfg: DictConfig, info: distributed.DistInfo) -> None:
    # 1. Check everything before any rank writes a byte.
    run = check(cfg, info.world_size, info.rank)
    s, geometry, stage = run.settings, run.geometry, run.stage
    checkpoints, resume_from = run.checkpoints, run.resume_from
    shape = memory.run_shape(stage.model_cfg, stage.generates, stage.vocab_projections, stage.seq_len, geometry.micro,
                             run.ds_config, s.precision, info.world_size)  # fmt: skip
    memory.check(s.memory_check, shape, stage.make_model, info.local_rank, info.world_size, stage.name, s.hardware)
    if checkpoints.resharded_from and cfg.train.global_batch_size is None and info.rank == 0:
        g = geometry
        print(f"pretrain.train: keeping the checkpoint's global batch of {g.global_batch}: micro batch {g.micro} x"
              f" accumulation {g.accum} x {g.world} rank{'s' if g.world > 1 else ''}", file=sys.stderr)  # fmt: skip

    # 2. Join the ranks, index the data (once per node), build the partitioned model, restore the newest checkpoint.
    def index() -> None:
        if info.local_rank == 0:  # the data's derived arrays, once per node; the other ranks memory-map them
            stage.index(geometry)
        distributed.barrier()

    started = loop.start(s, info, checkpoints, resume_from, stage.make_model, run.ds_config, run.init, "pretrain.train",
                         before_model=index, elastic=True)  # fmt: skip
    step = started.step
    # Every sample is a pure function of (seed, epoch, index), so the loader restarts at any data step.
    data = stage.train_dataset(geometry)
    make_loader = lambda data_step, end: stage.train_loader(geometry, info.rank, data_step, end, data)  # noqa: E731
    data_stats = data.stats() if info.rank == 0 else {}
    write_run_files(s.run_dir, cfg, info, started.model, geometry, step, run.init, run.ds_config,
                    ModelRecord(stage.name, None, stage.model_cfg), stage.tokenizer.vocab_path,
                    data_sources=describe(stage.sources), train_data=data_stats)  # fmt: skip
    log = MetricsLog(s.run_dir, info.rank, s.wandb, OmegaConf.to_container(cfg, resolve=True), step)

    # 3. Train.
    loop.train(StageJob(stage, geometry, info.rank), started, make_loader, s, geometry, info.rank, log, checkpoints,
               "pretrain.train", "train")  # fmt: skip
    watchdog.disarm()  # no more steps to time
    log.close()
    distributed.barrier()


@watchdog.long_phase("an evaluation")
@torch.no_grad()
def evaluate(engine, stage, loaders: dict, step: int) -> list[dict]:
    """One row per loader (split name -> loader); with several (one per data source), a "valid" row over them all."""
    engine.eval()
    windows = {split: Window(stage.objectives) for split in loaders}
    if len(loaders) > 1:
        windows["valid"] = Window(stage.objectives)
    for split, loader in loaders.items():
        for host_batch in loader:
            _, stats = engine(to_device(host_batch, engine.device), stage.weights)
            for window in [windows[split]] + ([windows["valid"]] if len(loaders) > 1 else []):
                window.add(stats, *stage.token_counts(host_batch))
    engine.train()
    return [metrics_row(step, split, w.reduce(), stage.weights, stage.phase_columns(step)) for split, w in windows.items()]


# An absolute path: the same conf/ also when main() is called from a user's own entry point (docs/extending.md),
# where a relative one would be read as a Python package.
@hydra.main(config_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf"), config_name="config",
            version_base=None)
def main(cfg: DictConfig) -> None:
    info = distributed.read_env()
    with (exit_on_user_error("pretrain.train", rank=info.rank),
          peers.lost_peers_as_one_line("pretrain.train", info.rank)):  # fmt: skip
        train(cfg, info)


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    with exit_on_user_error("pretrain.train", rank=distributed.read_env().rank):  # before Hydra composes
        check_command_line(sys.argv[1:], "config", "pretrain.train")
    main()
