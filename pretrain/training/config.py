"""Turns the Hydra config into checked settings: the trainer's run settings, batch geometry, model shapes,
the DeepSpeed config.

Everything here runs before any rank writes a file, so bad settings fail with one line and nothing on disk.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from pretrain.errors import UserError, number_setting
from pretrain.models.config import ATTENTION_IMPLS, ModelConfig
from pretrain.training.health import HealthSettings, health_settings
from pretrain.training.memory import zero_sizes
from pretrain.training.optim import OPTIMIZERS
from pretrain.training.safe_load import trust_setting


@dataclass(frozen=True)
class BatchGeometry:
    micro: int  # samples per rank per forward
    accum: int  # forwards per optimizer step
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def batch_geometry(train: DictConfig, world: int, resumed: str | None = None,
                   resumed_batch: int | None = None) -> BatchGeometry:
    """micro x accumulation x world. The global batch is train.global_batch_size; null: the global batch of the
    checkpoint the run resumes (`resumed`, whose global batch is `resumed_batch`), whatever number of ranks wrote
    it (train.elastic), else micro x world. A resumed run's global batch is the checkpoint's."""
    micro = int(train.micro_batch_size)
    if micro < 1:
        raise UserError(f"train.micro_batch_size={micro}: must be >= 1")
    given = train.global_batch_size
    if given is not None and resumed_batch is not None and int(given) != resumed_batch:
        raise UserError(f"train.global_batch_size={given} differs from the checkpoint's {resumed_batch} ({resumed});"
                        " leave it out to keep the checkpoint's")  # fmt: skip
    if given is None and resumed_batch is not None:
        if resumed_batch % (micro * world):
            raise UserError(f"{resumed}: its global batch of {resumed_batch} is not a multiple of train.micro_batch_size="
                            f"{micro} x {_ranks(world)}; {_fitting_micro(resumed_batch, micro, world)}")  # fmt: skip
        return BatchGeometry(micro, resumed_batch // (micro * world), world)
    glob = micro * world if given is None else int(given)
    if glob < 1 or glob % (micro * world):
        raise UserError(
            f"train.global_batch_size={glob} is not a positive multiple of train.micro_batch_size={micro} x {world} ranks"
        )
    return BatchGeometry(micro, glob // (micro * world), world)


def _ranks(world: int) -> str:
    return f"{world} rank{'s' if world > 1 else ''}"


def _fitting_micro(global_batch: int, micro: int, world: int) -> str:
    """What to set when a checkpoint's global batch does not split into micro x accumulation x world."""
    if global_batch % world:
        return f"resume on a number of ranks that divides {global_batch}"
    per_rank = global_batch // world
    fits = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return f"add train.micro_batch_size={fits} (a divisor of {per_rank}, its samples per rank and step)"


@dataclass(frozen=True)
class WandbSettings:
    mode: str  # offline | online | disabled
    project: str
    name: str | None


@dataclass(frozen=True)
class RunSettings:
    """The trainer's own settings (the stage reads its data and model settings itself), read and checked once."""

    run_dir: str
    seed: int
    max_steps: int
    stop_at: int  # train.exit_at_step, else max_steps
    log_every: int
    eval_every: int
    save_every: int
    keep_last: int
    resume: str
    elastic: bool  # train.elastic: a checkpoint of another world size may be re-sharded onto this one
    stop_file: str
    weight_decay: float
    timeout_s: float
    progress: bool
    wandb: WandbSettings
    hardware: str  # the deepspeed group's option
    precision: str
    peak_tflops: float | None  # train.peak_tflops: the device's peak for the mfu column; None = training/flops.py's table
    trust_checkpoint: bool  # load checkpoint files whatever types they name (training/safe_load.py)
    health: HealthSettings  # what a divergence does (training/health.py)
    min_loss_scale: float | None  # fp16: the dynamic loss scale's floor; None under bf16 and fp32
    memory_check: bool  # train.memory_check: refuse a run whose memory estimate exceeds the device (training/memory.py)
    lock_lease_s: float  # run.lock_lease_s: a run.lock not refreshed for this long is stale (training/run_lock.py)
    watchdog_s: float | None  # dist.watchdog_s: a step's hang limit; None = from the step time (training/watchdog.py)


def run_settings(cfg: DictConfig) -> RunSettings:
    if OmegaConf.is_missing(cfg.run, "dir"):
        raise UserError("run.dir is required (add run.dir=<dir>)")
    t = cfg.train
    if t.max_steps is None or int(t.max_steps) < 1:
        raise UserError(f"train.max_steps={t.max_steps}: must be >= 1")
    for key in ("log_every", "eval_every", "save_every", "keep_last"):
        if int(t[key]) < 1:
            raise UserError(f"train.{key}={t[key]}: must be >= 1")
    if t.exit_at_step is not None and not 1 <= int(t.exit_at_step) <= int(t.max_steps):
        raise UserError(f"train.exit_at_step={t.exit_at_step}: must be in [1, train.max_steps={t.max_steps}]")
    if not 0.0 <= float(t.warmup_fraction) < 1.0:
        raise UserError(f"train.warmup_fraction={t.warmup_fraction}: must be in [0, 1)")
    if float(t.lr) <= 0:
        raise UserError(f"train.lr={t.lr}: must be > 0")
    w = cfg.logger.wandb
    if w.mode not in ("offline", "online", "disabled"):
        raise UserError(f"logger.wandb.mode={w.mode}: must be offline, online or disabled")
    if str(t.resume) not in ("auto", "never") and not os.path.isdir(str(t.resume)):
        raise UserError(f"train.resume={t.resume}: not auto, never, or an existing checkpoint directory")
    elastic = t.get("elastic", False)  # pretrain.finetune's config has no such key: it resumes on the same ranks
    if not isinstance(elastic, bool):
        raise UserError(f"train.elastic={elastic}: must be true or false")
    peak = t.get("peak_tflops")  # pretrain.finetune's config has no such key: its rows have no throughput columns
    if peak is not None:
        peak = number_setting(peak, f"train.peak_tflops={peak}: must be a number > 0 (TFLOP/s) or null")
        if not peak > 0 or math.isinf(peak):
            raise UserError(f"train.peak_tflops={t.peak_tflops}: must be a number > 0 (TFLOP/s) or null")
    trust = trust_setting(cfg.trust_checkpoint)
    lease, timeout, watchdog = _seconds(cfg.run, "run.lock_lease_s"), _seconds(cfg.dist, "dist.timeout_s"), None
    if cfg.dist.watchdog_s is not None:
        watchdog = _seconds(cfg.dist, "dist.watchdog_s")
        if watchdog >= timeout:  # a hang must give stacks (exit 4) before a collective gives up (exit 5)
            raise UserError(f"dist.watchdog_s={watchdog:g}: must be below dist.timeout_s={timeout:g}")
    ds = cfg.deepspeed  # its precision is checked by deepspeed_config
    return RunSettings(
        run_dir=str(cfg.run.dir), seed=int(cfg.seed), max_steps=int(t.max_steps),
        stop_at=int(t.exit_at_step) if t.exit_at_step is not None else int(t.max_steps),
        log_every=int(t.log_every), eval_every=int(t.eval_every), save_every=int(t.save_every),
        keep_last=int(t.keep_last), resume=str(t.resume), elastic=elastic, stop_file=str(t.stop_file),
        weight_decay=float(t.weight_decay), timeout_s=timeout, progress=bool(cfg.logger.progress),
        wandb=WandbSettings(str(w.mode), str(w.project), w.name), hardware=str(ds.name), precision=str(ds.precision),
        peak_tflops=peak, trust_checkpoint=trust, health=health_settings(t),
        min_loss_scale=float(ds.fp16.min_loss_scale) if ds.precision == "fp16" and "fp16" in ds else None,
        memory_check=t.memory_check,  # checked by training/memory.py check
        lock_lease_s=lease, watchdog_s=watchdog,
    )  # fmt: skip


def _seconds(group: DictConfig, key: str) -> float:
    """A duration setting: a number of seconds > 0 (`key` is its full name, for the message)."""
    value = group[key.split(".")[-1]]
    seconds = number_setting(value, f"{key}={value}: must be a number of seconds > 0")
    if not 0 < seconds < math.inf:
        raise UserError(f"{key}={value}: must be a number of seconds > 0")
    return seconds


def model_config(m: DictConfig, data_vocab_size: int, seq_len: int, activation_checkpointing: bool = False,
                 seq_len_key: str = "stage.seq_len") -> ModelConfig:
    mult = int(m.pad_vocab_multiple)
    if mult < 1:
        raise UserError(f"model.pad_vocab_multiple={mult}: must be >= 1")
    if m.vocab_size is None:
        vocab = -(-data_vocab_size // mult) * mult
    else:
        vocab = int(m.vocab_size)
        if vocab < data_vocab_size:
            raise UserError(f"model.vocab_size={vocab} is smaller than the prepared vocab ({data_vocab_size} tokens)")
        if vocab % mult:
            raise UserError(f"model.vocab_size={vocab} is not a multiple of model.pad_vocab_multiple={mult}")
    if m.hidden % m.heads:
        raise UserError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if seq_len > m.max_positions:
        raise UserError(f"{seq_len_key}={seq_len} exceeds model.max_positions={m.max_positions}")
    if seq_len < 8:
        raise UserError(f"{seq_len_key}={seq_len}: must be >= 8")
    if m.decoder_init not in ("random", "encoder_top"):
        raise UserError(f"model.decoder_init={m.decoder_init}: must be random or encoder_top")
    attention = str(m.attention)
    if attention not in ATTENTION_IMPLS:
        raise UserError(f"model.attention={attention}: must be {' or '.join(ATTENTION_IMPLS)}")
    unpad = m.get("unpad")  # absent from a model.json written before the key existed: auto
    if unpad is not None and not isinstance(unpad, bool):
        raise UserError(f"model.unpad={unpad}: must be true, false or null (by device type)")
    embedding_norm = m.get("embedding_norm", False)  # absent from a model.json written before the key existed
    if not isinstance(embedding_norm, bool):
        raise UserError(f"model.embedding_norm={embedding_norm}: must be true or false (a LayerNorm on the embeddings"
                        " also when pre-LN, as PLUG's released model has)")  # fmt: skip
    return ModelConfig(
        vocab_size=vocab, hidden=m.hidden, layers=m.layers, heads=m.heads, ffn=m.ffn,
        max_positions=m.max_positions, type_vocab=m.type_vocab, dropout=m.dropout,
        attn_dropout=m.attn_dropout, ln_eps=m.ln_eps, init_std=m.init_std, pre_ln=m.pre_ln,
        embedding_norm=embedding_norm, activation_checkpointing=activation_checkpointing,
        decoder_layers=int(m.decoder_layers),
        decoder_init=str(m.decoder_init), copy=bool(m["copy"]), attention=attention, unpad=unpad,
    )  # fmt: skip


def optimizer_config(t: DictConfig, ds: DictConfig) -> dict:
    """The optimizer entries of the DeepSpeed config for `train.optimizer` (see training/optim.py).

    adamw: DeepSpeed's AdamW, fused unless `deepspeed.torch_adam`. lamb: no "optimizer" block but a
    "client_optimizer" entry, which engine.initialize removes and builds (pretrain.training.optim.Lamb, FusedLamb's
    arithmetic with per-parameter trust ratios) as a client optimizer."""
    name = str(t.optimizer)
    if name not in OPTIMIZERS:
        raise UserError(f"train.optimizer={name}: must be {' or '.join(OPTIMIZERS)}")
    hyper = {"lr": float(t.lr), "betas": list(t.betas), "eps": float(t.eps), "weight_decay": float(t.weight_decay)}
    if name == "adamw":
        # DeepSpeed's CPU Adam accumulates beta^t by multiplication, which a resumed run recomputes with pow():
        # torch's AdamW derives it from the step alone, so resume stays bitwise exact.
        return {"optimizer": {"type": "AdamW", "params": {**hyper, "torch_adam": bool(ds.torch_adam)}}}
    # LAMB: trust ratios ||w|| / ||update|| clamped to [min_coeff, max_coeff], one per parameter. DeepSpeed's Lamb
    # (FusedLamb) takes them over each rank's flat ZeRO partition (many layers, a share that changes with the number
    # of ranks), so the plain one (training/optim.py), told the partitions' layout, runs everywhere.
    hyper.update(max_coeff=10.0, min_coeff=0.01)
    return {"zero_allow_untested_optimizer": True,  # ZeRO's list of tested optimizers has no LAMB
            "client_optimizer": {"type": "pretrain.training.optim.Lamb", "params": hyper,
                                 "why": "trust ratios per parameter across ZeRO's partitions (FusedLamb: per partition)"}}  # fmt: skip


def deepspeed_config(cfg: DictConfig, geometry: BatchGeometry) -> dict:
    """The DeepSpeed config, generated from the `deepspeed` group and the `train` settings."""
    t, ds = cfg.train, cfg.deepspeed
    warmup = max(1, round(float(t.warmup_fraction) * int(t.max_steps)))
    out = {
        "train_batch_size": geometry.global_batch,
        "train_micro_batch_size_per_gpu": geometry.micro,
        "gradient_accumulation_steps": geometry.accum,
        "gradient_clipping": float(t.grad_clip),
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": float(t.min_lr),
                "warmup_max_lr": float(t.lr),
                "warmup_num_steps": warmup,
                "total_num_steps": int(t.max_steps),
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero_sizes(dict(ds.zero), int(cfg.model.hidden)),  # "auto": from h
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        **optimizer_config(t, ds),
    }
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        if "fp16" not in ds:
            raise UserError(f"deepspeed.precision=fp16: deepspeed={ds.name} has no fp16 loss-scaling settings"
                            " (fp16 is for GPUs: deepspeed=zero3_v100)")  # fmt: skip
        f = ds.fp16
        out["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": int(f.initial_scale_power),
            "loss_scale_window": int(f.loss_scale_window),
            "hysteresis": int(f.hysteresis),
            "min_loss_scale": float(f.min_loss_scale),
        }
    elif ds.precision != "fp32":
        raise UserError(f"deepspeed.precision={ds.precision}: must be fp32, bf16 or fp16")
    return out
