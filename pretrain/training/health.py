"""A run's health, step by step: non-finite losses and gradients, loss spikes, fp16's loss scale at its floor.

What the loop hands in at each optimizer step is already on the host: the step's loss (every rank's, summed through
the one all-reduce the stop request already makes; on a GPU the loss reaches the host by a non-blocking copy queued
right after the forward, which DeepSpeed's own overflow check, a host read of the gradient norm at every step, has
waited for) and DeepSpeed's overflow flag (ZeRO-3 sets it when the gradient norm is not finite, and then skips the
update: no weights are ever updated by a non-finite gradient). So the checks add no host synchronisation.

Every rank reaches the same verdict from the same reduced numbers, so every rank stops or rolls back together.

What follows an event is `train.on_divergence`:
  stop      exit 3 with one line: the step, what was seen, the newest healthy checkpoint, what to try;
  rollback  reload the newest healthy checkpoint and skip the batches that led to the event (PaLM's remedy), at most
            `train.max_rollbacks` times; the skipped ranges are kept in run.dir/skipped_data.json, which every later
            resume honours, so the run stays a pure function of its command;
  warn      a row and a line, and training goes on; checkpoints written since are marked unhealthy;
  off       no checks (DeepSpeed's own skip of a non-finite gradient stays): to measure what the checks cost.
fp16's loss scale at its floor, or `train.max_skipped_steps` optimizer steps in a row skipped for overflow, always
stops: a rollback replays the same numerics.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass

import torch

from pretrain.errors import Diverged, UserError, number_setting

ACTIONS = ("stop", "rollback", "warn", "off")
SKIPS_FILE = "skipped_data.json"


@dataclass(frozen=True)
class HealthSettings:
    on_divergence: str = "stop"
    max_rollbacks: int = 3
    spike_window: int = 100  # the recent healthy step losses a new one is compared with
    spike_sigmas: float | None = 6.0  # a spike: above the window's median by this many robust standard deviations
    # (None: no spike check, only non-finite values are events) ...
    spike_rise: float = 0.5  # ... and by at least this fraction of the median (noise in a flat window is no spike)
    max_skipped_steps: int = 20  # fp16: optimizer steps in a row skipped for overflow before the run stops

    @property
    def min_history(self) -> int:
        """Steps in the window before a spike can be called: early training falls fast and is noisy."""
        return max(8, self.spike_window // 5)


def health_settings(t) -> HealthSettings:
    """train.on_divergence and its companions (a DictConfig or a mapping), checked: one line per bad value."""
    action = str(t.on_divergence)
    if action not in ACTIONS:
        raise UserError(f"train.on_divergence={action}: must be {', '.join(ACTIONS[:-1])} or {ACTIONS[-1]}")
    ints = {"max_rollbacks": 0, "spike_window": 8, "max_skipped_steps": 1}
    for key, low in ints.items():
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < low:
            raise UserError(f"train.{key}={t[key]}: must be an integer >= {low}")
    for key in ("spike_sigmas", "spike_rise"):
        if key == "spike_sigmas" and t[key] is None:
            continue
        message = f"train.{key}={t[key]}: must be a number > 0" + (" or null (no spike check)" if key == "spike_sigmas" else "")
        if not 0 < number_setting(t[key], message) < math.inf:
            raise UserError(message)
    sigmas = None if t.spike_sigmas is None else float(t.spike_sigmas)
    return HealthSettings(action, int(t.max_rollbacks), int(t.spike_window), sigmas, float(t.spike_rise),
                          int(t.max_skipped_steps))  # fmt: skip


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # nonfinite_loss | nonfinite_grad | spike | loss_scale | nonfinite_weights
    what: str  # one phrase for the line and the row
    loss: float | None
    action: str  # what the run does: stop | rollback | warn

    def row(self, **extra) -> dict:
        loss = self.loss if self.loss is not None and math.isfinite(self.loss) else None
        return {"step": self.step, "split": "event", "event": self.kind, "what": self.what, "loss": loss,
                "action": self.action, **extra}  # fmt: skip


class SpikeWindow:
    """The last `size` healthy step losses; a spike is a loss above their median by `sigmas` robust standard
    deviations (1.4826 x the median absolute deviation, which one earlier spike does not inflate as it would a
    standard deviation) and by `rise` x the median at least."""

    def __init__(self, settings: HealthSettings, losses: list[float] = ()):
        self.settings = settings
        self.losses: deque[float] = deque(losses, maxlen=settings.spike_window)

    def threshold(self) -> float | None:
        if self.settings.spike_sigmas is None or len(self.losses) < self.settings.min_history:
            return None
        values = sorted(self.losses)
        median = _median(values)
        mad = _median(sorted(abs(v - median) for v in values))
        return max(median + self.settings.spike_sigmas * 1.4826 * mad, median + self.settings.spike_rise * abs(median))

    def add(self, loss: float) -> None:
        self.losses.append(loss)


def _median(values: list[float]) -> float:
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


class HealthMonitor:
    """The verdict on each step (`observe`), and what a checkpoint records of it (`state`, `healthy`)."""

    def __init__(self, settings: HealthSettings, precision: str, min_loss_scale: float | None, saved: dict | None = None):
        saved = saved or {}
        self.settings, self.precision, self.min_loss_scale = settings, precision, min_loss_scale
        self.window = SpikeWindow(settings, saved.get("loss_window", []))
        self.skipped_in_a_row = int(saved.get("skipped_in_a_row", 0))
        self.events_since_save = 0  # warn: a checkpoint written after an event is not healthy

    @property
    def enabled(self) -> bool:
        return self.settings.on_divergence != "off"

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges its next steps as the straight run would."""
        return {"loss_window": list(self.window.losses), "skipped_in_a_row": self.skipped_in_a_row}

    def observe(self, step: int, loss: float, overflow: bool, loss_scale: float | None) -> Event | None:
        """loss: the step's mean loss over the ranks (nan when any rank's was not finite); overflow: DeepSpeed
        skipped this step's update (the gradient norm was not finite; under fp16 also the loss scale's overflow)."""
        if not self.enabled:
            return None
        if self.precision == "fp16":  # overflow is loss scaling's normal signal: only its persistence is an event
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if overflow else 0
            at_floor = overflow and loss_scale is not None and self.min_loss_scale is not None \
                and loss_scale <= self.min_loss_scale  # fmt: skip
            if at_floor or self.skipped_in_a_row >= self.settings.max_skipped_steps:
                what = (f"fp16 loss scale at its floor ({loss_scale:g}) and still overflowing" if at_floor else
                        f"{self.skipped_in_a_row} optimizer steps in a row skipped for fp16 overflow")  # fmt: skip
                return self._event(step, "loss_scale", what, loss, action="stop")
            if overflow:
                return None
        if not math.isfinite(loss):
            return self._event(step, "nonfinite_loss", f"loss {loss}", loss)
        if overflow:
            return self._event(step, "nonfinite_grad", f"gradient norm not finite (loss {loss:.4g}; update skipped)", loss)
        limit = self.window.threshold()
        if limit is not None and loss > limit:
            return self._event(step, "spike", f"loss spike {loss:.4g} above {limit:.4g} (median of the last"
                                              f" {len(self.window.losses)} steps + {self.settings.spike_sigmas:g}"
                                              " robust sd)", loss)  # fmt: skip
        self.window.add(loss)
        return None

    def _event(self, step: int, kind: str, what: str, loss: float, action: str | None = None) -> Event:
        self.events_since_save += 1
        return Event(step, kind, what, loss, action or self.settings.on_divergence)

    def saved(self) -> None:
        self.events_since_save = 0

    def after_rollback(self, saved: dict) -> None:
        """The judged history as the checkpoint rolled back to had it."""
        self.window = SpikeWindow(self.settings, saved.get("loss_window", []))
        self.skipped_in_a_row = int(saved.get("skipped_in_a_row", 0))
        self.events_since_save = 0


class StepLoss:
    """The loss of each micro-batch of a step, on the host without waiting for the device: a non-blocking copy into
    pinned memory, read after the step (see the module's docstring)."""

    def __init__(self, accum: int, device: torch.device):
        pinned = device.type == "cuda"
        self.host = torch.zeros(accum, dtype=torch.float32, pin_memory=pinned)

    def record(self, micro: int, loss: torch.Tensor) -> None:
        self.host[micro].copy_(loss.detach().reshape(()).float(), non_blocking=True)

    def total(self) -> float:
        return float(self.host.sum())


def weights_finite(engine) -> bool:
    """Whether this rank's fp32 master partitions (what a checkpoint saves and the model is made of) are finite."""
    groups = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []
    return all(bool(torch.isfinite(g).all()) for g in groups if g is not None and g.numel())


class DataSkips:
    """The batches rollbacks skipped: [{"after_step": c, "count": n, ...}]: training steps after c draw their data
    n steps further on. Read by every rank at start; written by rank 0."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, SKIPS_FILE)
        self.records: list[dict] = []
        if os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.records = json.load(f)
                assert isinstance(self.records, list) and all(
                    isinstance(r["after_step"], int) and isinstance(r["count"], int) for r in self.records)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UserError(f"{self.path}: not the skipped-data record pretrain.train writes"
                                " (a list of {after_step, count})") from None  # fmt: skip

    def offset(self, step: int) -> int:
        """Data steps skipped before the step after `step`."""
        return sum(r["count"] for r in self.records if r["after_step"] <= step)

    def add(self, after_step: int, count: int, event: Event, rank: int) -> None:
        self.records.append({"after_step": after_step, "count": count, "event_step": event.step,
                             "event": event.kind, "what": event.what})  # fmt: skip
        if rank == 0:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.records, f, indent=1)
            os.replace(tmp, self.path)


def stop_line(event: Event, healthy: str | None) -> str:
    """The one line of a stop: the step, what was seen, the newest healthy checkpoint, what to try."""
    where = f"newest healthy checkpoint: {healthy}" if healthy else "no healthy checkpoint yet"
    if event.kind == "loss_scale":
        advice = ("try bf16 (deepspeed=zero3_bf16, GPUs sm80+), a lower train.lr or a longer train.warmup_fraction,"
                  " and resume")  # fmt: skip
    elif event.action == "rollback":
        advice = "rolled back train.max_rollbacks times already: try a lower train.lr or a longer train.warmup_fraction"
    else:
        advice = ("try train.on_divergence=rollback (reload it and skip the batches that led here), a lower"
                  " train.lr or a longer train.warmup_fraction")  # fmt: skip
    return f"step {event.step}: {event.what}; {where}; {advice}"


def diverged(event: Event, healthy: str | None) -> Diverged:
    return Diverged(stop_line(event, healthy))


def injected_loss_factor(data_step: int) -> float:
    """Fault injection for the tests: PRETRAIN_INJECT_LOSS=<data step>:<factor|nan|inf> multiplies the loss of the
    batches of that data step (0-based, the sampler's index): a poisoned batch, which a rollback skips."""
    spec = os.environ.get("PRETRAIN_INJECT_LOSS")
    if not spec:
        return 1.0
    for part in spec.split(","):
        at, _, factor = part.partition(":")
        if int(at) == data_step:
            return float(factor)
    return 1.0
