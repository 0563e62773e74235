"""Metrics: per-objective sums gathered over a window of steps and all ranks, made into a row (here, and only
here), written by rank 0 to `metrics.jsonl` (one JSON object per row) and, unless disabled, to wandb."""
from __future__ import annotations

import json
import math
import os
import resource
import time
import uuid

import torch

from pretrain.objectives import Objective
from pretrain.training.config import WandbSettings
from pretrain.training.distributed import all_reduce_tensor_sum, gather_objects, world_size


class Window:
    """Sums (loss, correct, count) per objective, the real tokens, the padded batch sizes and the model FLOPs
    (training/flops.py, counted on the host), until `reduce()`.

    The models hand their statistics over as tensors (on the GPU, a float() per micro-batch would wait for the
    device each time); they are read once, when the window is reduced at a log step, and summed in the order
    they came, so the figures are those of a running sum."""

    def __init__(self, objectives: tuple[Objective, ...]):
        self.objectives = objectives
        self.reset()

    def reset(self) -> None:
        self.pending: list[dict[str, tuple]] = []
        self.tokens = 0.0
        self.padded = 0.0
        self.flops = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, tuple], tokens: int, padded: int, flops: float = 0.0) -> None:
        """stats: objective -> (summed loss, correct count, count), tensors or numbers; flops: the micro-batch's
        model FLOPs (train windows; evaluation leaves them 0)."""
        self.pending.append(stats)
        self.tokens += tokens
        self.padded += padded
        self.flops += flops

    def _flat(self) -> tuple[tuple[Objective, ...], torch.Tensor]:
        """The objectives and their sums [loss, correct, count] per objective, flattened into one float64 tensor
        on the device the statistics are on. Tensors are summed there and numbers (the counts) on the host, each
        in the order they came, and the caller reads the result in one transfer: a float() per value would wait
        for the GPU each time."""
        host = [0.0] * (3 * len(self.objectives))
        device_sums: dict[int, torch.Tensor] = {}
        for stats in self.pending:
            for i, objective in enumerate(self.objectives):
                for j, v in enumerate(stats.get(objective.name, (0.0, 0.0, 0.0))):
                    if isinstance(v, torch.Tensor):
                        v = v.detach().to(torch.float64).reshape(())
                        device_sums[3 * i + j] = v if 3 * i + j not in device_sums else device_sums[3 * i + j] + v
                    else:
                        host[3 * i + j] += float(v)
        device = next(iter(device_sums.values())).device if device_sums else torch.device("cpu")
        total = torch.tensor(host, dtype=torch.float64, device=device)
        if device_sums:
            total[list(device_sums)] += torch.stack(list(device_sums.values()))
        return self.objectives, total

    def mark_step(self) -> None:
        self.steps += 1

    def reduce(self) -> dict:
        """Means over every rank: `<name>_loss`, `<name>_acc` (None where nothing was predicted), tokens_per_s,
        `padding`, the share of the batches' token slots that held padding (compute spent on nothing), and
        `tflops`, the model TFLOP/s per rank (the ranks' FLOPs summed, over the ranks and this rank's seconds;
        None when no FLOPs were added)."""
        _, values = self._flat()
        host = torch.tensor([self.tokens, self.padded, self.flops], dtype=torch.float64, device=values.device)
        flat = all_reduce_tensor_sum(torch.cat([values, host]))  # one collective, on the device the sums are on
        out = {}
        for i, objective in enumerate(self.objectives):
            loss_sum, correct, n = flat[3 * i : 3 * i + 3]
            loss, acc = objective.columns
            out[loss] = loss_sum / n if n else None
            out[acc] = correct / n if n else None
            out[f"{objective.name}_count"] = int(n)
            if objective.perplexity:
                out[f"{objective.name}_ppl"] = math.exp(min(out[loss], 50.0)) if n else None
        elapsed = time.perf_counter() - self.started
        tokens, padded, flops = flat[-3:]
        out["tokens"] = int(tokens)
        out["tokens_per_s"] = tokens / elapsed if elapsed > 0 else None
        out["padding"] = 1.0 - tokens / padded if padded else None
        out["step_time_s"] = elapsed / self.steps if self.steps else None
        out["tflops"] = flops / world_size() / elapsed / 1e12 if flops and elapsed > 0 else None
        self.reset()
        return out


def metrics_row(step: int, split: str, reduced: dict, weights: dict[str, float], phase: dict,
                engine_columns: dict | None = None) -> dict:
    """One row of metrics.jsonl: the weighted loss and each objective's loss and accuracy (over `weights`, the
    stage's objectives), the stage's phase columns, on valid rows a language model's perplexity, throughput and,
    on train rows, the engine's columns (engine_columns, throughput_columns)."""
    row = {"step": step, "split": split, "loss": sum(w * (reduced[f"{k}_loss"] or 0.0) for k, w in weights.items())}
    for k in weights:
        row[f"{k}_loss"], row[f"{k}_acc"] = reduced[f"{k}_loss"], reduced[f"{k}_acc"]
    row.update(phase)
    if split.startswith("valid"):  # a language model's perplexity (objectives.Objective.perplexity)
        row.update({f"{k}_ppl": reduced[f"{k}_ppl"] for k in weights if reduced.get(f"{k}_ppl") is not None})
    row.update(tokens_per_s=reduced["tokens_per_s"], padding=reduced["padding"])
    if reduced["step_time_s"] is not None:
        row["step_time_s"] = reduced["step_time_s"]
    return {**row, **(engine_columns or {})}


def engine_columns(engine, lr: float) -> dict:
    """A train row's optimizer columns: the rate the step applied, the gradient norm, and fp16_columns."""
    norm = engine.get_global_grad_norm()
    return {"lr": lr, "grad_norm": None if norm is None else float(norm), **fp16_columns(engine)}


def throughput_columns(reduced: dict, peak_tflops: float | None) -> dict:
    """A train row's throughput columns: `tflops` (Window.reduce), `mfu` = tflops / peak_tflops (None without a
    peak: on CPU, or a GPU missing from training/flops.py's table, unless train.peak_tflops gives it), and the
    ranks' peak memory (peak_memory_gb): `peak_mem_gb`, the largest (the rank that would run out first), and
    `peak_mem_gb_per_rank` in rank order. Collective: every rank calls it at the same log step."""
    tflops = reduced["tflops"]
    per_rank = [float(m) for m in gather_objects(peak_memory_gb())]
    return {"tflops": tflops, "mfu": tflops / peak_tflops if tflops is not None and peak_tflops else None,
            "peak_mem_gb": max(per_rank), "peak_mem_gb_per_rank": per_rank}  # fmt: skip


def peak_memory_gb(device_type: str | None = None) -> float:
    """This process's peak memory since it started, in GiB (2**30 bytes): on a GPU the most the caching allocator
    had allocated (torch.cuda.max_memory_allocated: tensors, not the allocator's reserve nor the CUDA context); on
    CPU the peak resident set size (ru_maxrss, kB on Linux), which includes the Python process itself.
    device_type: where the work ran ("cuda" or "cpu"); None: the GPU when there is one."""
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


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


class MetricsLog:
    """Rank 0 appends rows to metrics.jsonl; a resumed run first drops rows past its checkpoint."""

    def __init__(self, run_dir: str, rank: int, wandb_cfg: WandbSettings, config: dict, resumed_step: int,
                 rewritten_splits: tuple[str, ...] = ()):  # fmt: skip
        """rewritten_splits: rows that the run writes anew whatever its step (fine-tuning's test row)."""
        self.rank = rank
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if rank != 0:
            return
        self.truncate_after(resumed_step, rewritten_splits)
        if wandb_cfg.mode != "disabled":
            self.wandb = _start_wandb(run_dir, wandb_cfg, config)

    def truncate_after(self, step: int, rewritten_splits: tuple[str, ...] = ()) -> None:
        """Rank 0: drop the rows past `step` (the run trains those steps again), except event rows
        (training/health.py): what happened to the run stays in its history."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [(line, json.loads(line)) for line in f if line.strip()]
        kept = [line for line, r in rows
                if (r["step"] <= step or r["split"] == "event") and r["split"] not in rewritten_splits]  # fmt: skip
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            split = row["split"]
            self.wandb.log({f"{split}/{k}": v for k, v in row.items() if k not in ("step", "split") and v is not None},
                           step=row["step"])  # fmt: skip

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: str, wandb_cfg: WandbSettings, config: dict):
    import wandb  # wandb: ~1 s to import; only when wandb.enabled

    # One wandb run per run.dir, continued across resumes; offline mode never touches the network.
    id_path = os.path.join(run_dir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(
        project=wandb_cfg.project, name=wandb_cfg.name, id=run_id, resume="allow", dir=run_dir,
        mode=wandb_cfg.mode, config=config, settings=wandb.Settings(silent=True),
    )  # fmt: skip
