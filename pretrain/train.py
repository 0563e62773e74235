"""Pre-training entry point, the same under `deepspeed`, `torchrun`, `srun` and plain `python`:

    deepspeed --num_gpus 2 --module pretrain.train stage=structbert model=toy data.dir=D run.dir=R

The recipe: read and check the whole config (`setup`, which writes nothing), join the ranks, build the
ZeRO-3-partitioned model (from stage one's weights for stage two), resume the newest checkpoint, then train,
log, evaluate and save at step boundaries until the last step or a stop request.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pretrain.data.sources import describe
from pretrain.errors import UserError, exit_on_user_error
from pretrain.training import distributed, init_from, safe_load
from pretrain.training.checkpoint import Checkpoints, seed_rng, write_run_files
from pretrain.training.config import (
    BatchGeometry, RunSettings, batch_geometry, deepspeed_config, run_settings,
)  # fmt: skip
from pretrain.training.engine import build_model, initialize, to_device
from pretrain.training.flops import peak_tflops
from pretrain.training.metrics import MetricsLog, Window, engine_columns, metrics_row, throughput_columns
from pretrain.training.stages import PalmStage, StructBertStage, build_stage
from pretrain.training.stopping import StopRequest

# torch 2.13 deprecates the collectives DeepSpeed calls, once per step: not ours to fix, only noise.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)


@dataclass
class Setup:
    """Everything a run needs from its config, read and checked before any rank writes a byte."""

    settings: RunSettings
    geometry: BatchGeometry
    stage: StructBertStage | PalmStage
    init: init_from.InitSource | None  # stage two: the stage-one checkpoint and its parameter mapping
    ds_config: dict


def setup(cfg: DictConfig, world_size: int) -> Setup:
    """Read every setting of the config (the test of conf/ checks that each key is read here) and check it."""
    settings = run_settings(cfg)
    safe_load.trust(settings.trust_checkpoint)  # before the stage reads init_from's checkpoint
    geometry = batch_geometry(cfg.train, world_size)
    stage = build_stage(cfg)
    return Setup(settings, geometry, stage, stage.init_source(), deepspeed_config(cfg, geometry))


def train(cfg: DictConfig, info: distributed.DistInfo) -> None:
    # 1. Check everything before any rank writes a byte.
    run = setup(cfg, info.world_size)
    s, geometry, stage = run.settings, run.geometry, run.stage
    if s.precision == "fp16" and not torch.cuda.is_available():
        raise UserError(f"deepspeed={s.hardware}: fp16 needs a GPU; on CPU use deepspeed=zero3_cpu (fp32 or bf16)")
    checkpoints = Checkpoints(s.run_dir, info.rank, info.world_size, s.keep_last)
    resume_from = checkpoints.resolve(s.resume, stage.name, geometry.global_batch, s.elastic)

    # 2. Join the ranks, build the partitioned model, restore the newest checkpoint.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    stop = StopRequest(os.path.join(s.run_dir, s.stop_file))
    stop.clear_stale(info.rank)
    distributed.init(info, s.timeout_s)
    os.makedirs(s.run_dir, exist_ok=True)
    checkpoints.discard_uncommitted()
    if checkpoints.resharded_from:  # another world size: DeepSpeed re-splits a universal copy on load
        resume_from = checkpoints.to_universal(resume_from)
        run.ds_config["checkpoint"] = {"load_universal": True}
    if info.local_rank == 0:  # the data's derived arrays, once per node; the other ranks memory-map them
        stage.index(geometry)
    distributed.barrier()
    model = build_model(stage.make_model, run.ds_config, s.seed)
    if run.init is not None and resume_from is None:  # before initialize: the optimizer copies the weights it sees
        init_from.load_into(model, run.init, rank=info.rank)
        if info.rank == 0:
            print(f"pretrain.train: {run.init.describe()}", file=sys.stderr)
    engine = initialize(model, run.ds_config, s.weight_decay)
    if resume_from is None:
        step = 0
        seed_rng(s.seed * 1000 + info.rank)  # dropout differs across ranks, reproducibly
    else:
        step = checkpoints.load(engine, resume_from, s.seed)
        if checkpoints.resharded_from and info.rank == 0:
            print(f"pretrain.train: resumed step {step} of {resume_from}: re-sharded from {checkpoints.resharded_from}"
                  f" to {info.world_size} ranks", file=sys.stderr)
    # Every sample is a pure function of (seed, epoch, index), so the loader restarts at `step`.
    loader = stage.train_loader(geometry, info.rank, start_step=step)
    data_stats = loader.dataset.stats() if info.rank == 0 else {}
    write_run_files(cfg, info, model, geometry, step, run.init, run.ds_config, stage.name, stage.model_cfg,
                    stage.tokenizer.vocab_path, data_sources=describe(stage.sources), train_data=data_stats)
    log = MetricsLog(s.run_dir, info.rank, s.wandb, OmegaConf.to_container(cfg, resolve=True), step)

    # 3. Train.
    batches = iter(loader)
    window = Window(stage.objectives)
    peak = peak_tflops(s.peak_tflops)  # None: no mfu column value (CPU, or a GPU the table lacks)
    bar = tqdm(total=s.max_steps, initial=step, disable=info.rank != 0 or not s.progress, desc="train")
    engine.train()
    while step < s.stop_at:
        lr = engine.get_lr()[0]  # the rate this step applies
        for _ in range(geometry.accum):
            host_batch = next(batches)
            counts = stage.token_counts(host_batch)  # counted on the host: no device sync
            flops = stage.train_flops(host_batch)  # from the host batch's shapes and labels, likewise
            loss, stats = engine(to_device(host_batch, engine.device), stage.weights)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            window.add(stats, *counts, flops=flops)
        step += 1
        window.mark_step()
        bar.update(1)
        stopping = step < s.stop_at and stop.requested()  # collective: every rank agrees on the step
        if step % s.log_every == 0 or step == s.stop_at or stopping:  # every rank: the columns are collectives
            reduced = window.reduce()
            row = metrics_row(step, "train", reduced, stage.weights, stage.phase_columns(step),
                              {**engine_columns(engine, lr), **throughput_columns(reduced, peak)})  # fmt: skip
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if step % s.eval_every == 0 or step == s.max_steps:
            for row in evaluate(engine, stage, stage.valid_loaders(geometry, info.rank, step), step):
                log.write(row)
        if step % s.save_every == 0 or step == s.stop_at or stopping:
            checkpoints.save(engine, step, stage.name, geometry.global_batch)
        if stopping:
            if info.rank == 0:
                print(f"pretrain.train: stop requested: checkpoint of step {step} saved, exiting", file=sys.stderr)
            break
    bar.close()
    log.close()
    distributed.barrier()


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


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    info = distributed.read_env()
    with exit_on_user_error("pretrain.train", quiet=info.rank != 0):
        train(cfg, info)


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    main()
