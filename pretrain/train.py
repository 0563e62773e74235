"""Pre-training entry point, the same under `deepspeed`, `torchrun`, `srun` and plain `python`:

    deepspeed --num_gpus 2 --module pretrain.train stage=structbert model=toy data.dir=D run.dir=R
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pretrain import distributed, init_from
from pretrain import engine as ds
from pretrain.errors import UserError, exit_on_user_error
from pretrain.metrics import MetricsLog, Window
from pretrain.model import count_parameters
from pretrain.run_config import batch_geometry, check_train, deepspeed_config, load_data_meta
from pretrain.stages import build_stage
from pretrain.stopping import StopRequest

# torch 2.13 deprecates the collectives DeepSpeed calls, once per step: not ours to fix, only noise.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*_single", category=FutureWarning)


def train(cfg: DictConfig, info: distributed.DistInfo) -> None:
    # 1. Check everything before any rank writes a byte.
    check_train(cfg)
    geometry = batch_geometry(cfg.train, info.world_size)
    stage = build_stage(cfg, load_data_meta(cfg.data.dir))
    init = stage.init_plan()  # stage two: the stage-one checkpoint and its parameter mapping, checked
    ds_config = deepspeed_config(cfg, geometry)
    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise UserError(f"deepspeed={cfg.deepspeed.name}: fp16 needs a GPU; on CPU use deepspeed=zero3_cpu (fp32 or bf16)")

    # 2. Join the ranks, build the partitioned model, restore the newest checkpoint.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    run_dir = cfg.run.dir
    checkpoints = ds.Checkpoints(run_dir, info.rank, info.world_size, int(cfg.train.keep_last))
    resume_from = checkpoints.resolve(str(cfg.train.resume))
    stop = StopRequest(os.path.join(run_dir, str(cfg.train.stop_file)))
    stop.clear_stale(info.rank)
    distributed.init(info, float(cfg.dist.timeout_s))
    os.makedirs(run_dir, exist_ok=True)
    checkpoints.discard_uncommitted()
    model = ds.build_model(stage.make_model, ds_config, int(cfg.seed))
    if init is not None and resume_from is None:  # before initialize: the optimizer copies the weights it sees
        init_from.load_into(model, *init, rank=info.rank)
    engine = ds.initialize(model, ds_config, float(cfg.train.weight_decay))
    client = checkpoints.load(engine, resume_from) if resume_from else None
    if client is None:
        step = 0
        ds.seed_rng(int(cfg.seed) * 1000 + info.rank)  # dropout differs across ranks, reproducibly
    else:
        step = int(client["step"])
        if client["global_batch"] != geometry.global_batch:
            raise UserError(f"train.global_batch_size={geometry.global_batch} differs from the checkpoint's {client['global_batch']}")
    # Every sample is a pure function of (seed, epoch, index), so the loader restarts at `step`.
    loader = stage.train_loader(geometry, info.rank, start_step=step)
    data_stats = loader.dataset.stats() if info.rank == 0 else {}
    _write_run_info(cfg, info, model, ds_config, geometry, step, stage, init, data_stats)
    log = MetricsLog(run_dir, info.rank, cfg.logger.wandb, OmegaConf.to_container(cfg, resolve=True), step)

    # 3. Train.
    max_steps, t = int(cfg.train.max_steps), cfg.train
    stop_at = int(t.exit_at_step) if t.exit_at_step is not None else max_steps
    batches = iter(loader)
    window = Window(stage.objectives)
    bar = tqdm(total=max_steps, initial=step, disable=info.rank != 0 or not cfg.logger.progress, desc="train")
    engine.train()
    while step < stop_at:
        lr = engine.get_lr()[0]  # the rate this step applies
        for _ in range(geometry.accum):
            batch = {k: v.to(engine.device) for k, v in next(batches).items()}
            loss, stats = engine(batch, stage.weights)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            window.add(stats, *stage.token_counts(batch))
        step += 1
        window.mark_step()
        bar.update(1)
        stopping = step < stop_at and stop.requested()  # collective: every rank agrees on the step
        if step % t.log_every == 0 or step == stop_at or stopping:
            row = stage.summarize(window.reduce(), step, "train")
            log.write({"step": step, "split": "train", **row, "lr": lr, "grad_norm": _grad_norm(engine),
                       **fp16_columns(engine)})  # fmt: skip
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if step % t.eval_every == 0 or step == max_steps:
            valid = stage.valid_loader(geometry, info.rank, step)
            if valid is not None:
                log.write({"step": step, "split": "valid", **evaluate(engine, stage, valid, step)})
        if step % t.save_every == 0 or step == stop_at or stopping:
            checkpoints.save(engine, step, {"step": step, "stage": cfg.stage.name, "global_batch": geometry.global_batch,
                                            "consumed_samples": step * geometry.global_batch})  # fmt: skip
        if stopping:
            if info.rank == 0:
                print(f"pretrain.train: stop requested: checkpoint of step {step} saved, exiting", file=sys.stderr)
            break
    bar.close()
    log.close()
    distributed.barrier()


@torch.no_grad()
def evaluate(engine, stage, loader, step: int) -> dict:
    engine.eval()
    window = Window(stage.objectives)
    for batch in loader:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        _, stats = engine(batch, stage.weights)
        window.add(stats, *stage.token_counts(batch))
    engine.train()
    return stage.summarize(window.reduce(), step, "valid")


def fp16_columns(engine) -> dict:
    """fp16 only: `skipped_steps`, the optimizer steps skipped on gradient overflow so far (cumulative, kept in
    checkpoints), and `loss_scale`, the current dynamic loss scale. Absent under bf16 and fp32."""
    if not engine.fp16_enabled():
        return {}
    opt = engine.optimizer  # ZeRO-3: DeepSpeedZeroOptimizer_Stage3.loss_scale; other fp16 wrappers: cur_scale
    scale = getattr(opt, "loss_scale", None)
    if scale is None:
        scale = getattr(opt, "cur_scale", None)
    return {"skipped_steps": int(engine.skipped_steps), "loss_scale": None if scale is None else float(scale)}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _write_run_info(cfg, info, model, ds_config, geometry, step, stage, init, data_stats: dict) -> None:
    """config.yaml (resolved), run.json (world size, parameter counts, each rank's partition size), and what
    reading the checkpoints back needs without the data: model.json (the model's shapes) and vocab.txt."""
    import dataclasses
    import json
    import shutil

    import torch.distributed as dist

    local = ds.local_partition_numel(model)
    per_rank = [None] * info.world_size
    dist.all_gather_object(per_rank, local)
    if info.rank != 0:
        return
    OmegaConf.save(cfg, os.path.join(cfg.run.dir, "config.yaml"), resolve=True)
    run_info = {
        "world_size": info.world_size, "parameters": count_parameters(model), "partition_numel_per_rank": per_rank,
        "micro_batch": geometry.micro, "grad_accum": geometry.accum, "global_batch": geometry.global_batch,
        "resumed_from_step": step, "initialized_from": None if init is None else init[0], "train_data": data_stats,
        "deepspeed_config": ds_config,
    }  # fmt: skip
    with open(os.path.join(cfg.run.dir, "run.json"), "w") as f:
        json.dump(run_info, f, indent=2)
    with open(os.path.join(cfg.run.dir, "model.json"), "w") as f:
        json.dump({"stage": cfg.stage.name, **dataclasses.asdict(stage.model_cfg)}, f, indent=2)
    shutil.copyfile(os.path.join(cfg.data.dir, "vocab.txt"), os.path.join(cfg.run.dir, "vocab.txt"))


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    info = distributed.read_env()
    with exit_on_user_error("pretrain.train", quiet=info.rank != 0):
        train(cfg, info)


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    main()
