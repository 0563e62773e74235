"""DeepSpeed ZeRO-3: the partitioned model and the engine that trains it (checkpoints: checkpoint.py)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from pretrain.models.fast_paths import with_pack_indices
from pretrain.training import optim


def build_model(make: Callable[[], nn.Module], ds_config: dict, seed: int) -> nn.Module:
    """Construct under zero.Init so that no rank ever holds the full model: each keeps its partition."""
    import deepspeed  # here, not at module level: DeepSpeed logs on import, and config errors come first

    torch.manual_seed(seed)  # rank 0 initialises, the others receive its values
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return make()


def to_device(host_batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A host batch on the engine's device, with its packing indices found on the host (fast_paths.with_pack_indices).
    non_blocking: a blocking copy to a GPU (torch's default) waits for everything queued on it, at every
    micro-batch; the loaders pin their batches on a GPU machine, so the copy overlaps the device's work."""
    return {k: v.to(device, non_blocking=True) for k, v in with_pack_indices(host_batch).items()}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (every 1-d parameter). Frozen parameters
    (stage two's carried sentence head) are in no group: the optimizer never touches them."""
    decay, no_decay = [], []
    for p in filter(lambda p: p.requires_grad, model.parameters()):
        (no_decay if len(getattr(p, "ds_shape", p.shape)) <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: nn.Module, ds_config: dict, weight_decay: float):
    """The DeepSpeed engine; its optimizer and LR scheduler come from ds_config and live inside it.

    A "client_optimizer" entry (config.optimizer_config: LAMB) is taken out of the config and built here on the
    same parameter groups, then handed to DeepSpeed, which wraps it in ZeRO-3 and drives it with the config's
    scheduler as it would its own; it is then told how ZeRO laid the parameters out in its flat partitions."""
    import deepspeed  # deepspeed: ~2 s to import; engine's helpers serve plan and tests without it

    zero_partition_padding(model)
    groups = param_groups(model, weight_decay)
    config, optimizer = dict(ds_config), None
    client = config.pop("client_optimizer", None)
    if client is not None:
        optimizer = getattr(optim, client["type"].rsplit(".", 1)[-1])(groups, **client["params"])
    with _no_compile_on_import():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=config)
    if hasattr(optimizer, "lay_out"):
        _lay_out_partitions(engine.optimizer, optimizer)
    return engine


def _lay_out_partitions(zero, optimizer) -> None:
    """Tell a layout-aware optimizer (optim.Lamb) which parameter slices each of ZeRO-3's flat fp32 partitions
    holds: the partitions (ds_tensor) of its sub-group's parameters, one after another."""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is None:
        raise RuntimeError(f"{type(zero).__name__}: not ZeRO-3's optimizer, whose partitions LAMB's trust ratios "
                           "are laid out by (deepspeed.zero_optimization.stage must be 3)")  # fmt: skip
    for flat, params in zip(flats, zero.fp16_groups):
        optimizer.lay_out(flat, [p.ds_tensor.numel() for p in params], zero.dp_process_group)


@contextlib.contextmanager
def _no_compile_on_import():
    """DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose @torch.compile decorators import
    inductor: 2.5 s of CPU on every rank of every start, for kernels this framework never compiles. With
    TORCHDYNAMO_DISABLE set, those decorators return the plain functions. Only for the call, and only where the
    user set nothing: torch.compile in the user's own code afterwards is untouched."""
    if "TORCHDYNAMO_DISABLE" in os.environ:
        yield
        return
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        del os.environ["TORCHDYNAMO_DISABLE"]


def zero_partition_padding(model: nn.Module) -> None:
    """ZeRO-3 pads every parameter to a multiple of the world size, and the padding at the end of the last
    rank's partition is uninitialised memory (DeepSpeed allocates it with torch.empty and copies only the real
    elements). The optimizer's flat fp32 partitions are copied from these, padding included. Elementwise
    optimizers (Adam) never mix it into real elements, but LAMB's trust ratio is a norm over the whole flat
    partition: garbage there made it, and the run, differ from one launch to the next (or go NaN). Zeroed here,
    the padding stays zero (its gradient is zero-padded, so its update is weight_decay * 0)."""
    with torch.no_grad():
        for p in model.parameters():
            part = getattr(p, "ds_tensor", None)
            if part is None or part.numel() == 0:
                continue
            group = getattr(p, "ds_process_group", None)
            start = (dist.get_rank(group) if dist.is_initialized() else 0) * part.numel()
            valid = max(0, min(part.numel(), p.ds_numel - start))
            if valid < part.numel():
                part.view(-1)[valid:].zero_()


def local_partition_numel(model: nn.Module) -> int:
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
