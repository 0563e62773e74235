"""The one training loop, shared by pre-training (pretrain/train.py) and fine-tuning (pretrain/finetune.py).

`start` joins the ranks and builds what a run trains: the ZeRO-3-partitioned model (from init_from's weights when
the run starts afresh), its engine, the newest checkpoint restored or the generators seeded. `train` then steps to
the last step or a stop request: accumulation, the metrics window and its rows, evaluation, checkpoints.

What differs between a pre-training stage and a fine-tuning task is what a `Job` says (the stage or the task
adapted to it by its entry point): its checkpoint kind, objectives and loss weights, one forward,
the token counts and FLOPs of a host batch, the phase columns, its evaluation, and whether an evaluation also
saves a checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from tqdm import tqdm

from pretrain.errors import UserError
from pretrain.training import distributed, init_from, peers, run_lock, watchdog
from pretrain.training.checkpoint import Checkpoints
from pretrain.training.config import BatchGeometry, RunSettings
from pretrain.training.engine import build_model, initialize, to_device
from pretrain.training.flops import peak_tflops
from pretrain.training.health import (DataSkips, Event, HealthMonitor, StepLoss, diverged, injected_loss_factor,
                                      stop_line, weights_finite)  # fmt: skip
from pretrain.training.metrics import (MetricsLog, Window, engine_columns, fp16_columns, metrics_row,
                                       throughput_columns)  # fmt: skip
from pretrain.training.rng import seed_rng
from pretrain.training.stopping import StopRequest


class Job(Protocol):
    kind: str  # what checkpoints record as their stage: a resume with another kind is refused
    objectives: tuple[str, ...]
    weights: dict[str, float]
    counts_flops: bool  # train rows carry tflops, mfu and peak memory
    saves_at_eval: bool  # every evaluation step also writes a checkpoint (fine-tuning picks its best one)

    def forward(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]: ...

    def token_counts(self, host_batch: dict) -> tuple[int, int]: ...

    def train_flops(self, host_batch: dict) -> float: ...

    def phase_columns(self, step: int) -> dict: ...

    def evaluate(self, engine, step: int) -> list[dict]: ...


def check_precision(s: RunSettings) -> None:
    if s.precision == "fp16" and not torch.cuda.is_available():
        raise UserError(f"deepspeed={s.hardware}: fp16 needs a GPU; on CPU use deepspeed=zero3_cpu (fp32 or bf16)")


@dataclass
class Started:
    engine: object
    model: torch.nn.Module
    step: int  # the step the run goes on from (0 when it starts afresh)
    stop: StopRequest


def start(s: RunSettings, info: distributed.DistInfo, checkpoints: Checkpoints, resume_from: str | None,
          make_model: Callable[[], torch.nn.Module], ds_config: dict, init: init_from.InitSource | None, command: str,
          before_model: Callable[[], None] = lambda: None, elastic: bool = False) -> Started:  # fmt: skip
    """Join the ranks, build the partitioned model, restore the newest checkpoint (resume_from) or seed afresh.
    before_model: what the run does once the ranks are joined and before the model is built (a stage indexes its
    data there). elastic: a resume_from of another world size is re-sharded through a universal copy."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    stop = StopRequest(os.path.join(s.run_dir, s.stop_file))
    peers.watch_launcher(command, info.rank)  # a rank outlives no launcher (training/peers.py)
    refusal = run_lock.take(s.run_dir, command, s.lock_lease_s, info.rank)  # one writer per run.dir: rank 0 locks
    run_lock.join_agreeing(refusal, info.world_size, lambda: distributed.init(info, s.timeout_s))  # all stop if refused
    stop.clear_stale(info.rank)
    os.makedirs(s.run_dir, exist_ok=True)
    checkpoints.discard_uncommitted()
    if elastic and checkpoints.resharded_from:  # another world size: DeepSpeed re-splits a universal copy on load
        resume_from = checkpoints.to_universal(resume_from)
        ds_config["checkpoint"] = {"load_universal": True}
    before_model()
    model = build_model(make_model, ds_config, s.seed)
    if init is not None and resume_from is None:  # before initialize: the optimizer copies the weights it sees
        init_from.load_into(model, init, rank=info.rank)
        if info.rank == 0:
            print(f"{command}: {init.describe()}", file=sys.stderr)
    engine = initialize(model, ds_config, s.weight_decay)
    if resume_from is None:
        step = 0
        seed_rng(s.seed * 1000 + info.rank)  # dropout differs across ranks, reproducibly
    else:
        step = checkpoints.load(engine, resume_from, s.seed)
        if checkpoints.resharded_from and info.rank == 0:
            print(f"{command}: resumed step {step} of {resume_from}: re-sharded from {checkpoints.resharded_from}"
                  f" to {info.world_size} ranks", file=sys.stderr)  # fmt: skip
    watchdog.arm(s.run_dir, info.rank, command, s.watchdog_s, s.timeout_s)  # the first step is timed from here
    return Started(engine, model, step, stop)


def train(job: Job, run: Started, make_loader: Callable[[int, int], Iterable], s: RunSettings, geometry: BatchGeometry,
          rank: int, log: MetricsLog, checkpoints: Checkpoints, command: str, desc: str,
          after_eval: Callable[[], None] = lambda: None) -> int:  # fmt: skip
    """Step from run.step to s.stop_at (or a stop request) over the job's train batches; returns the last step
    trained. make_loader(data_step, end): the batches from data step `data_step` on, ending before `end` (data steps
    run ahead of training steps by the batches rollbacks skipped, training/health.py). after_eval: what the run does
    after each evaluation, before its checkpoint (fine-tuning protects its best one from pruning)."""
    engine, step, skips = run.engine, run.step, DataSkips(s.run_dir)
    batches = iter(make_loader(step + skips.offset(step), s.max_steps + skips.offset(s.max_steps)))
    window = Window(job.objectives)
    monitor = HealthMonitor(s.health, s.precision, s.min_loss_scale, checkpoints.loaded_state.get("health"))
    losses = StepLoss(geometry.accum, engine.device)
    peak = peak_tflops(s.peak_tflops) if job.counts_flops else None  # None: no mfu (CPU, or a GPU the table lacks)
    bar = tqdm(total=s.max_steps, initial=step, disable=rank != 0 or not s.progress, desc=desc)
    engine.train()
    while step < s.stop_at:
        lr = engine.get_lr()[0]  # the rate this step applies
        poison = injected_loss_factor(step + skips.offset(step))
        for micro in range(geometry.accum):
            host_batch = next(batches)
            counts = job.token_counts(host_batch)  # counted on the host: no device sync
            flops = job.train_flops(host_batch)  # from the host batch's shapes and labels, likewise
            loss, stats = job.forward(engine, to_device(host_batch, engine.device))
            loss = loss * poison if poison != 1.0 else loss  # a fault injected by the tests (training/health.py)
            losses.record(micro, loss)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            window.add(stats, *counts, flops=flops)
        step += 1
        window.mark_step()
        bar.update(1)
        # One collective, as before the checks: the stop request, and the step's loss summed over the ranks.
        stop_asked, (loss_sum,) = run.stop.requested([losses.total() / geometry.accum])
        stopping = step < s.stop_at and stop_asked  # every rank agrees on the step
        event = monitor.observe(step, loss_sum / geometry.world, overflowed(engine), loss_scale(engine))
        if event is not None:
            if event.action == "rollback" and len(skips.records) < s.health.max_rollbacks:
                step, batches = _roll_back(event, engine, checkpoints, skips, monitor, make_loader, s, rank, log, command)
                window.reset()
                bar.n = step
                continue
            _warn_or_stop(event, checkpoints, log, rank, command)
        if step % s.log_every == 0 or step == s.stop_at or stopping:  # every rank: the columns are collectives
            row = _train_row(engine, step, lr, window, job, peak)
            log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        evaluated = step % s.eval_every == 0 or step == s.max_steps
        if evaluated:
            for row in job.evaluate(engine, step):
                log.write(row)
            after_eval()
        if (evaluated and job.saves_at_eval) or step % s.save_every == 0 or step == s.stop_at or stopping:
            _save(engine, step, job, geometry, checkpoints, monitor, log, rank, command)
        if stopping:
            if rank == 0:
                print(f"{command}: stop requested: checkpoint of step {step} saved, exiting", file=sys.stderr)
            break
        watchdog.beat(step)  # the hang watchdog (training/watchdog.py): this step is over
    bar.close()
    return step


def _warn_or_stop(event, checkpoints: Checkpoints, log: MetricsLog, rank: int, command: str) -> None:
    """A health event that is not rolled back: its row, then a warning on rank 0, or the run stops (diverged)."""
    log.write(event.row(action="warn" if event.action == "warn" else "stop"))
    healthy = checkpoints.newest_healthy()
    if event.action != "warn":
        raise diverged(event, healthy)
    if rank == 0:
        print(f"{command}: warning: {stop_line(event, healthy)}", file=sys.stderr)


def _train_row(engine, step: int, lr: float, window: Window, job: Job, peak: float | None) -> dict:
    """The train row of the steps since the last one (the window's columns are collectives: every rank calls it)."""
    reduced = window.reduce()
    columns = engine_columns(engine, lr)
    if job.counts_flops:
        columns.update(throughput_columns(reduced, peak))
    return metrics_row(step, "train", reduced, job.weights, job.phase_columns(step), columns)


def overflowed(engine) -> bool:
    """DeepSpeed skipped this step's update: ZeRO-3 sets the flag (on the host, after its own check) when the
    gradient norm is not finite, in any precision, and on fp16's overflows."""
    return bool(getattr(engine.optimizer, "overflow", False))


def loss_scale(engine) -> float | None:
    scale = fp16_columns(engine).get("loss_scale")
    return None if scale is None else float(scale)


def _save(engine, step: int, job: Job, geometry: BatchGeometry, checkpoints: Checkpoints, monitor: HealthMonitor,
          log: MetricsLog, rank: int, command: str) -> None:  # fmt: skip
    """A checkpoint, never of non-finite weights (checked on every rank's partition: a pass over memory, small
    beside the write)."""
    if monitor.enabled and not all(distributed.gather_objects(weights_finite(engine))):
        event = Event(step, "nonfinite_weights", "weights not finite at a save", None, "stop")
        log.write(event.row())
        raise diverged(event, checkpoints.newest_healthy())
    checkpoints.save(engine, step, job.kind, geometry.global_batch, healthy=monitor.events_since_save == 0,
                     health=monitor.state())  # fmt: skip
    monitor.saved()


def _roll_back(event: Event, engine, checkpoints: Checkpoints, skips: DataSkips, monitor: HealthMonitor, make_loader,
               s: RunSettings, rank: int, log: MetricsLog, command: str):  # fmt: skip
    """Reload the newest healthy checkpoint and skip the data steps that led from it to the event; returns the
    step it goes on from and the batches from there."""
    target = checkpoints.newest_healthy()
    if target is None:
        raise diverged(event, None)
    step = checkpoints.load(engine, target, s.seed)
    skips.add(step, event.step - step, event, rank)
    monitor.after_rollback(checkpoints.loaded_state.get("health") or {})
    log.truncate_after(step)  # the rows of the steps trained again; event rows stay
    log.write(event.row(to_step=step, skipped_data_steps=event.step - step, rollbacks=len(skips.records)))
    if rank == 0:
        print(f"{command}: step {event.step}: {event.what}: rolled back to {target}, skipping the {event.step - step}"
              f" steps of data that led here (rollback {len(skips.records)} of {s.health.max_rollbacks})",
              file=sys.stderr)  # fmt: skip
    offset = skips.offset(step)
    return step, iter(make_loader(step + offset, s.max_steps + skips.offset(s.max_steps)))
