"""Resuming on another number of ranks (`train.elastic=true`) through DeepSpeed's universal checkpoint: rank 0
converts `step<N>/` once into `step<N>.universal/` beside it (one file per parameter and state: fp32 weights,
Adam's moments), which any number of ranks re-splits on load; what DeepSpeed 0.19.8 leaves out of that under
ZeRO-3 is filled in here. checkpoint.Checkpoints decides when (resolve, to_universal, load).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shutil

import numpy as np
import torch

from pretrain.errors import UserError
from pretrain.training import safe_load

UNIVERSAL = ".universal"  # suffix of a step directory's universal copy


def elastic_seed(seed: int, step: int, rank: int) -> int:
    """The generators' seed of `rank` after a resume on another world size. The saved generators cannot carry
    over: rank r now trains other samples than the rank r that saved them, and new ranks have none. A fresh
    stream per (seed, step, rank), distinct from a fresh run's (seed * 1000 + rank), keeps such a resume
    reproducible; its dropout differs from the uninterrupted run's."""
    return int(np.random.SeedSequence([seed, step, rank, 0xE1A5]).generate_state(1)[0])


def convert_universal(tag_dir: str, out: str) -> None:
    """DeepSpeed's ds_to_universal on checkpoint tag_dir, made whole into `out` (built in `out`.tmp, renamed),
    plus what it leaves out under ZeRO-3: the frozen parameters (stage two's sentence head), which it only
    records per rank. Its common optimizer file is rank 0's whole optimizer partition, read by every rank on
    load for a step count and the hyperparameters: it keeps only those."""
    from deepspeed.checkpoint import ds_to_universal  # deepspeed: ~2 s to import; only when converting

    safe_load.check_dir(tag_dir)  # DeepSpeed's converter unpickles with weights_only=False: vetted files only
    work = out + ".tmp"
    shutil.rmtree(work, ignore_errors=True)  # a conversion that died half-way
    target = os.path.join(work, os.path.basename(out))  # its `latest_universal` file lands in work/, not beside
    args = argparse.Namespace(input_folder=tag_dir, output_folder=target, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)  # fmt: skip
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its progress bars
        ds_to_universal.main(args)
    frozen = _frozen_params(tag_dir)
    for name, tensor in frozen.items():
        os.makedirs(os.path.join(target, "zero", name), exist_ok=True)
        torch.save({"param": tensor}, os.path.join(target, "zero", name, "fp32.pt"))
    common = os.path.join(target, "zero", "optimizer_state.pt")
    state = safe_load.load(common, map_location="cpu")
    inner = state["optimizer_state_dict"]
    inner["state"] = {k: {"step": v["step"]} for k, v in inner["state"].items()}
    state.pop("fp32_flat_groups", None)
    torch.save(state, common)
    os.replace(target, out)
    shutil.rmtree(work, ignore_errors=True)


def _frozen_params(tag_dir: str) -> dict[str, torch.Tensor]:
    """The whole frozen parameters of a ZeRO-3 checkpoint, from each rank's fragment in its model-states file."""
    files = sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))  # fmt: skip
    states = [safe_load.load(f, map_location="cpu") for f in files]
    shapes = states[0].get("frozen_param_shapes") or {}
    return {name: torch.cat([s["frozen_param_fragments"][name].reshape(-1) for s in states])[: torch.Size(shape).numel()]
            .reshape(shape).clone() for name, shape in shapes.items()}  # fmt: skip


def complete_universal_load(engine, tag_dir: str, rank: int, world_size: int) -> None:
    """What DeepSpeed 0.19.8's ZeRO-3 universal load leaves to do (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3):
    - it gives every parameter group the hyperparameters of the first: the no-decay group (biases, LayerNorm)
      would get weight decay. Each group gets its saved ones back.
    - it gives every sub-group's Adam state one and the same `step` tensor, which torch's Adam increments in place
      once per sub-group: the bias correction would count several steps per step. Each gets its own copy.
    - it restores only the optimizer's parameters: frozen ones (stage two's sentence head) would keep their
      fresh init. convert_universal saved them whole; each rank takes its partition."""
    common = safe_load.load(os.path.join(tag_dir, "zero", "optimizer_state.pt"), map_location="cpu")
    saved_groups = common["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise UserError(f"{tag_dir}: {len(saved_groups)} optimizer parameter groups, this model has {len(groups)}")
    for group, saved in zip(groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for name, param in engine.module.named_parameters():
        if param.requires_grad or not hasattr(param, "ds_tensor"):
            continue
        full = safe_load.load(os.path.join(tag_dir, "zero", name, "fp32.pt"), map_location="cpu")["param"]
        part = param.ds_tensor.numel()
        flat = torch.zeros(part * world_size, dtype=param.ds_tensor.dtype)
        flat[: full.numel()] = full.reshape(-1)
        param.ds_tensor.data.copy_(flat[rank * part : (rank + 1) * part])
