"""Memory per rank of a ZeRO-3 run, from the model's shapes alone: the planner's model (`python -m pretrain.plan`
prints it) and the trainer's check of it against the device before the model is built (`train.memory_check`).

Per rank: the model states (DeepSpeed's ZeRO-3 estimator), the activations kept for backward (activation_bytes),
and ZeRO-3's own buffers (buffer_bytes: the reduce bucket, the prefetched parameters, the persistent ones).
GiB (2**30 bytes) throughout, as DeepSpeed prints.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from hydra.core.hydra_config import HydraConfig

from pretrain.errors import UserError, number_setting
from pretrain.models.config import ModelConfig
from pretrain.models.layers import count_parameters

GiB = 2**30
# Kept free on every GPU: 10% for allocator fragmentation, and about 1 GiB that the CUDA context and kernels
# take before the first tensor.
RESERVE_FRACTION, CUDA_CONTEXT_GB = 0.10, 1.0
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# deepspeed.zero's sizes that may be "auto": filled from the hidden size h as transformers' DeepSpeed integration
# fills them (integrations/deepspeed.py, trainer_config_process): a reduce bucket of one h x h matrix, 90% of that
# prefetched, and parameters up to 10h elements (biases, LayerNorms) kept whole on every rank.
AUTO_SIZES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def _stage3():
    """deepspeed.runtime.zero.stage3, imported with stdout sent to stderr: DeepSpeed's logger, created on
    import, announces the accelerator on stdout, which would spoil pretrain.plan's json=true."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero import stage3
    return stage3


def zero_sizes(zero: dict, hidden: int, where: str = "deepspeed.zero") -> dict:
    """The `zero_optimization` block with every "auto" size filled from the model's hidden size; explicit numbers
    are kept (as integers: DeepSpeed reads them as element counts)."""
    out = dict(zero)
    for key, auto in AUTO_SIZES.items():
        if key not in out:
            continue
        value = out[key]
        if value == "auto":
            out[key] = auto(int(hidden))
            continue
        number = number_setting(value, f"{where}.{key}={value}: must be a number of elements >= 0 or auto")
        if not 0 <= number < 2**63:
            raise UserError(f"{where}.{key}={value}: must be a number of elements >= 0 or auto")
        out[key] = int(number)
    return out


@dataclass(frozen=True)
class ModelCount:
    total: int  # parameters (shared ones once)
    largest: int  # the most parameters one module owns itself: DeepSpeed's largest layer
    sizes: tuple[int, ...]  # every parameter's element count, for the persistent ones


def count_model(make_model: Callable[[], torch.nn.Module]) -> ModelCount:
    """The model make_model builds, built on the meta device (shapes, no storage: PLUG-27B costs nothing). Not under
    deepspeed.zero.Init as the trainer builds it: that needs a process group; the parameters are the same."""
    stage3 = _stage3()  # before init_weights imports deepspeed, whose import would print on stdout
    with torch.device("meta"):
        model = make_model()
    # DeepSpeed's largest layer (model_to_params, recurse=False per module): PLUG's FFN up-projection, small models'
    # word embeddings. Its total dedups by data_ptr(), 0 on meta: not used.
    sizes = tuple(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    return ModelCount(count_parameters(model), stage3.model_to_params(model)[1], sizes)


def model_states_bytes(total: int, largest: int, nodes: int, gpus_per_node: int, element: int = 2) -> int:
    """DeepSpeed's per-GPU estimate, ZeRO-3 with parameters and optimizer on the GPU, built under zero.Init:
    18 bytes/param / GPUs (16-bit params and grads, fp32 master and Adam m, v, and a margin) + 4 x largest layer
    (its 16-bit parameters and gradients gathered whole). In fp32 (element 4) the parameters and gradients take
    4 bytes each instead of 2: 2 more bytes for each of the two, on the partition and on the gathered layer."""
    _, gpu, _ = _stage3().estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True,
    )  # fmt: skip
    wider = element - 2
    return gpu + wider * (2 * total // (nodes * gpus_per_node) + 2 * largest)


def activation_bytes(cfg: ModelConfig, generates: bool, vocab_projections: int, seq_len: int, micro_batch: int,
                     checkpointing: bool) -> int:  # fmt: skip
    """16-bit activations kept for backward per GPU, after Korthikanti et al. 2022, sec. 4.1 (s tokens, b samples,
    h hidden, a heads, f FFN width; 2 bytes per 16-bit element, 1 per dropout-mask element):
      attention 11sbh + 5as^2b: QKV input 2, Q and K 4, V 2, out-projection input 2, dropout mask 1 (x sbh);
                softmax output 2, its dropout mask 1, the dropped-out probabilities 2 (x as^2b)
      FFN 3sbh + 4sbf: up-projection input 2 and dropout mask 1 (x sbh); GELU input and output 2 each (x sbf)
      LayerNorm 2sbh each
    Encoder layer 18sbh + 4sbf + 5as^2b = sbh(34 + 5as/h) at f = 4h, the paper's figure. A decoder layer adds
    cross-attention (decoder length taken = s; the encoder output its keys and values come from is one tensor
    shared by all layers) and a LayerNorm: 31sbh + 4sbf + 10as^2b. That is model.attention=math; with sdpa
    PyTorch runs the memory-efficient kernel on V100 (FlashAttention on sm80+), which keeps no s x s matrix, only
    a fp32 log-sum-exp: 4asb in place of each 5as^2b (the copy mechanism's one hand-computed layer aside).
    Checkpointing as the model does it (each layer wrapped): every layer's 16-bit input (2sbh) is kept, plus one
    layer's full activations while it is recomputed. Vocabulary projections: 16-bit logits (2) + the fp32
    log-softmax that cross-entropy keeps (4), at all s positions (an upper bound: the heads project predicted
    positions only); stage two has two (encoder masked LM, decoder). Left out, each below one layer's share:
    embeddings, final LayerNorms, head transforms, the encoder output."""
    s, b, h, f, a, v = seq_len, micro_batch, cfg.hidden, cfg.ffn, cfg.heads, cfg.vocab_size
    plain = getattr(cfg, "attention", "sdpa") == "math"  # model.attention: sdpa | math (older configs: SDPA)
    scores = 5 * a * s * s * b if plain else 4 * a * s * b
    encoder_layer = 18 * s * b * h + 4 * s * b * f + scores
    decoder_layer = 31 * s * b * h + 4 * s * b * f + 2 * scores
    n_dec = cfg.decoder_layers if generates else 0  # a model without a decoder ignores decoder_layers
    logits = 6 * s * b * v * vocab_projections
    if not checkpointing:
        return cfg.layers * encoder_layer + n_dec * decoder_layer + logits
    return 2 * s * b * h * (cfg.layers + n_dec) + (decoder_layer if n_dec else encoder_layer) + logits


def buffer_bytes(zero: dict, sizes: tuple[int, ...], ranks: int, element: int) -> int:
    """ZeRO-3's buffers per rank, which DeepSpeed's estimator leaves out, `element` bytes a number:
      reduce bucket   reduce_bucket_size elements, allocated whole when contiguous_gradients is on
      prefetch        up to stage3_prefetch_bucket_size elements of parameters gathered ahead of their module (at
                      most the whole model)
      persistent      parameters of at most stage3_param_persistence_threshold elements stay whole on every rank
                      (beyond their own partition, which the model states count)
    On one rank nothing is gathered or prefetched: the rank holds every parameter already."""
    bucket = int(zero.get("reduce_bucket_size", 0)) if zero.get("contiguous_gradients", True) else 0
    if ranks == 1:
        return element * bucket
    threshold = int(zero.get("stage3_param_persistence_threshold", 0))
    persistent = sum(n - -(-n // ranks) for n in sizes if n <= threshold)
    prefetch = min(int(zero.get("stage3_prefetch_bucket_size", 0)), sum(sizes))  # never more than the model
    return element * (bucket + prefetch + persistent)


def usable_bytes(gpu_mem_gb: float) -> int:
    """What a GPU of this many GiB leaves to the run, its reserve taken off."""
    return int(gpu_mem_gb * GiB * (1 - RESERVE_FRACTION) - CUDA_CONTEXT_GB * GiB)


@dataclass(frozen=True)
class RunShape:
    """What the memory of one rank depends on, all of it known before the model is built."""

    cfg: ModelConfig
    generates: bool  # the model has a decoder (stage two, a generation task)
    vocab_projections: int  # vocabulary-sized logits per position
    seq_len: int  # the longest sequence a batch holds
    micro_batch: int
    zero: dict  # the DeepSpeed config's zero_optimization, sizes resolved
    precision: str  # fp32 | bf16 | fp16
    nodes: int
    ranks_per_node: int


def need_bytes(shape: RunShape, count: ModelCount) -> dict[str, int]:
    """The memory per rank of a run of this shape: model states, activations, ZeRO-3 buffers, and their total."""
    element, ranks = BYTES[shape.precision], shape.nodes * shape.ranks_per_node
    act = activation_bytes(shape.cfg, shape.generates, shape.vocab_projections, shape.seq_len, shape.micro_batch,
                           shape.cfg.activation_checkpointing)  # fmt: skip
    parts = {
        "model_states": model_states_bytes(count.total, count.largest, shape.nodes, shape.ranks_per_node, element),
        "activations": act * element // 2,  # the formula's 16-bit elements, at the run's width
        "buffers": buffer_bytes(shape.zero, count.sizes, ranks, element),
    }
    return {**parts, "total": sum(parts.values())}


def ranks_on_this_node(world_size: int) -> int:
    """The ranks that share this host's memory: the launcher says (torchrun LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE,
    Slurm SLURM_NTASKS_PER_NODE); a lone process is one."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) >= 1:
            return min(int(value), world_size)
    return 1 if world_size == 1 else min(world_size, os.cpu_count() or 1)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.split()[0] == key), 0)
    except OSError:
        return 0


def host_available_bytes() -> tuple[int, str]:
    """The memory this host can still give (bytes, where the figure comes from): MemAvailable of /proc/meminfo,
    or less where this process's cgroup (v2 or v1) has a limit: the limit less what the group uses, its
    reclaimable page cache (inactive files) not counted as used."""
    available = _stat("/proc/meminfo", "MemAvailable:") * 1024
    where = "MemAvailable"
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):  # fmt: skip
        root = "/sys/fs/cgroup"
        limit, usage = _read_int(os.path.join(root, limit_file)), _read_int(os.path.join(root, usage_file))
        if limit is None or usage is None or limit >= 2**62:  # v1 writes a huge number for no limit
            continue
        left = limit - max(0, usage - _stat(os.path.join(root, stat_file), inactive))
        if left < available:
            available, where = max(0, left), f"the cgroup's limit {limit / GiB:.1f} GiB"
        break
    return available, where


def device_available_bytes(local_rank: int, world_size: int) -> tuple[int, str]:
    """(bytes this rank may use, a description) on the device it will train on: a GPU's free memory less its
    reserve; on CPU the host's available memory shared among the ranks of this node. PRETRAIN_MEMORY_AVAILABLE
    (bytes per rank) stands in for the measured figure: the tests' fault point for a small machine."""
    injected = os.environ.get("PRETRAIN_MEMORY_AVAILABLE")
    if injected:
        return int(injected), "PRETRAIN_MEMORY_AVAILABLE"
    if torch.cuda.is_available():
        device = local_rank % torch.cuda.device_count()
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_properties(device).name
        return usable_bytes(free / GiB), (f"GPU {device} ({name}) has {free / GiB:.1f} of {total / GiB:.1f} GiB free;"
                                          f" usable after the {RESERVE_FRACTION:.0%} + {CUDA_CONTEXT_GB:g} GiB reserve")
    available, where = host_available_bytes()
    ranks = ranks_on_this_node(world_size)
    return available // ranks, f"this host has {available / GiB:.1f} GiB available ({where}) for {ranks} rank(s)"


def run_shape(cfg: ModelConfig, generates: bool, vocab_projections: int, seq_len: int, micro_batch: int,
              ds_config: dict, precision: str, world_size: int) -> RunShape:  # fmt: skip
    """The shape of a run about to start on world_size ranks, its nodes counted from the ranks on this one."""
    per_node = ranks_on_this_node(world_size)
    return RunShape(cfg, generates, vocab_projections, seq_len, micro_batch, ds_config["zero_optimization"], precision,
                    max(1, world_size // per_node), per_node)  # fmt: skip


def check(enabled, shape: RunShape, make_model: Callable[[], torch.nn.Module], local_rank: int, world_size: int,
          stage: str, hardware: str) -> dict[str, int] | None:  # fmt: skip
    """train.memory_check: refuse (UserError, exit 2) a run whose estimated memory per rank exceeds what this rank's
    device has, before the model is built and before the ranks join. Returns the estimate (None when off)."""
    if not isinstance(enabled, bool):
        raise UserError(f"train.memory_check={enabled}: must be true or false")
    if not enabled:
        return None
    need = need_bytes(shape, count_model(make_model))
    have, where = device_available_bytes(local_rank, world_size)
    if need["total"] > have:
        gpu_gb = torch.cuda.get_device_properties(local_rank % torch.cuda.device_count()).total_memory / GiB \
            if torch.cuda.is_available() else None  # fmt: skip
        command = plan_command(shape, stage, hardware, gpu_gb)
        raise UserError(
            f"this run needs about {need['total'] / GiB:.2f} GiB per rank (model states"
            f" {need['model_states'] / GiB:.2f}, activations {need['activations'] / GiB:.2f}, ZeRO-3 buffers"
            f" {need['buffers'] / GiB:.2f}) but has {have / GiB:.2f} GiB ({where}); `{command}` explains the"
            " estimate: use more ranks or nodes, a smaller micro-batch, activation checkpointing, or a smaller model"
            " (train.memory_check=false runs it anyway)"
        )
    return need


def _hydra_model() -> tuple[str | None, list[str]]:
    """The model option and the model.<field>= overrides the command line gave Hydra (None, [] outside Hydra)."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None, []
    overrides = [o for o in hydra_cfg.overrides.task if o.startswith("model.")]
    return hydra_cfg.runtime.choices.get("model"), overrides


def plan_command(shape: RunShape, stage: str, hardware: str, gpu_mem_gb: float | None) -> str:
    """The pretrain.plan command line that prints this run's estimate (its need_bytes is the check's total)."""
    model, overrides = _hydra_model()
    args = [f"model={model or '<model>'}", *overrides, f"stage={stage}", f"nodes={shape.nodes}",
            f"gpus_per_node={shape.ranks_per_node}"]  # fmt: skip
    if gpu_mem_gb is not None:
        args.append(f"gpu_mem_gb={gpu_mem_gb:.0f}")
    args += [f"seq_len={shape.seq_len}", f"micro_batch={shape.micro_batch}",
             f"activation_checkpointing={str(shape.cfg.activation_checkpointing).lower()}",
             f"vocab_size={shape.cfg.vocab_size}", f"deepspeed={hardware}", f"precision={shape.precision}"]  # fmt: skip
    return "python -m pretrain.plan " + " ".join(args)
