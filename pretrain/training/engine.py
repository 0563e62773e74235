"""DeepSpeed ZeRO-3: building the engine, and checkpoints that resume exactly.

A checkpoint is a DeepSpeed tag directory `checkpoints/step<N>/` (partitioned model and optimizer states,
LR scheduler, our client state) plus one `rng_rank<R>.pt` per rank. `checkpoints/latest` is written here, not
by DeepSpeed: DeepSpeed's rank 0 writes it as soon as its own part is on disk, before the other ranks are
done, so a rank dying mid-save could leave `latest` naming a checkpoint that lacks its part. Here it is
replaced atomically only after every rank has returned from the save, so it always names a complete one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from typing import Callable

import numpy as np
import torch
from torch import nn

from pretrain import distributed
from pretrain.errors import UserError

_STEP_DIR = re.compile(r"^step(\d+)$")


def build_model(make: Callable[[], nn.Module], ds_config: dict, seed: int) -> nn.Module:
    """Construct under zero.Init so that no rank ever holds the full model: each keeps its partition."""
    import deepspeed  # here, not at module level: DeepSpeed logs on import, and config errors come first

    torch.manual_seed(seed)  # rank 0 initialises, the others receive its values
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return make()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (every 1-d parameter)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if len(getattr(p, "ds_shape", p.shape)) <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: nn.Module, ds_config: dict, weight_decay: float):
    """The DeepSpeed engine; its optimizer and LR scheduler come from ds_config and live inside it.

    A "client_optimizer" entry (run_config.optimizer_config: the plain LAMB where FusedLamb cannot run) is
    taken out of the config and built here on the same parameter groups, then handed to DeepSpeed, which wraps
    it in ZeRO-3 and drives it with the config's scheduler as it would its own."""
    import deepspeed

    zero_partition_padding(model)
    groups = param_groups(model, weight_decay)
    config, optimizer = dict(ds_config), None
    client = config.pop("client_optimizer", None)
    if client is not None:
        from pretrain import optim

        optimizer = getattr(optim, client["type"].rsplit(".", 1)[-1])(groups, **client["params"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=config)
    return engine


def zero_partition_padding(model: nn.Module) -> None:
    """ZeRO-3 pads every parameter to a multiple of the world size, and the padding at the end of the last
    rank's partition is uninitialised memory (DeepSpeed allocates it with torch.empty and copies only the real
    elements). The optimizer's flat fp32 partitions are copied from these, padding included. Elementwise
    optimizers (Adam) never mix it into real elements, but LAMB's trust ratio is a norm over the whole flat
    partition: garbage there made it, and the run, differ from one launch to the next (or go NaN). Zeroed here,
    the padding stays zero (its gradient is zero-padded, so its update is weight_decay * 0)."""
    import torch.distributed as dist

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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpoints:
    def __init__(self, run_dir: str, rank: int, world_size: int, keep_last: int):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def latest_tag(self) -> str | None:
        path = os.path.join(self.dir, "latest")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read().strip() or None

    def save(self, engine, step: int, client_state: dict) -> None:
        tag = f"step{step}"
        os.makedirs(os.path.join(self.dir, tag), exist_ok=True)
        torch.save(rng_state(), os.path.join(self.dir, tag, f"rng_rank{self.rank}.pt"))
        _fault_point(step, self.rank)
        engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)  # ends in a barrier
        if self.rank == 0:
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune(keep=tag)
        distributed.barrier()

    def discard_uncommitted(self) -> None:
        """Rank 0: remove step directories newer than `latest`, left by a run that died while saving."""
        tag = self.latest_tag()
        newest = int(_STEP_DIR.match(tag).group(1)) if tag and _STEP_DIR.match(tag) else -1
        if self.rank != 0 or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            m = _STEP_DIR.match(name)
            if m and int(m.group(1)) > newest:
                print(f"pretrain.train: removing {os.path.join(self.dir, name)}: an unfinished checkpoint", file=sys.stderr)
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def _prune(self, keep: str) -> None:
        tags = sorted((int(m.group(1)), n) for n in os.listdir(self.dir) if (m := _STEP_DIR.match(n)))
        for _, name in tags[: -self.keep_last]:
            if name != keep:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)

    def resolve(self, resume: str) -> str | None:
        """The checkpoint directory `train.resume` names (auto: the newest complete one), checked against this
        run's world size before anything is loaded or written; None to start fresh."""
        if resume == "never":
            return None
        if resume == "auto":
            tag = self.latest_tag()
            if tag is None:
                return None
            tag_dir = os.path.join(self.dir, tag)
        else:
            tag_dir = os.path.abspath(resume)
        saved_ranks = sum(1 for n in os.listdir(tag_dir) if n.startswith("rng_rank")) if os.path.isdir(tag_dir) else 0
        if saved_ranks != self.world_size:
            raise UserError(
                f"{tag_dir}: written by {saved_ranks} ranks, this run has {self.world_size}"
                " (ZeRO-3 optimizer partitions cannot be re-split; resume with the same number of ranks)"
            )
        return tag_dir

    def load(self, engine, tag_dir: str) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; returns the client state."""
        path, client_state = engine.load_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))
        if path is None:
            raise UserError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        set_rng_state(torch.load(os.path.join(tag_dir, f"rng_rank{self.rank}.pt"), weights_only=False))
        return client_state


def _fault_point(step: int, rank: int) -> None:
    """Fault injection for the tests of a crash mid-save: PRETRAIN_CRASH_IN_SAVE=<step>:<rank> kills that rank
    after its RNG file is written and before its model and optimizer partitions are."""
    spec = os.environ.get("PRETRAIN_CRASH_IN_SAVE")
    if spec and spec == f"{step}:{rank}":
        print(f"pretrain.train: PRETRAIN_CRASH_IN_SAVE={spec}: rank {rank} dies while saving step {step}", file=sys.stderr)
        os._exit(113)
