"""What a run directory holds besides its checkpoints, written: config.yaml (the resolved config), run.json (world
size, parameter counts, partition sizes, batch geometry, where the weights came from, the data), model.json (the
stage, the fine-tuning task if any, and the model's shapes: pretrain/run_record.py's ModelRecord, which also reads
it back) and vocab.txt: what reading the checkpoints back needs without the data or the config.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch
from omegaconf import OmegaConf

from pretrain.errors import UserError
from pretrain.models.layers import count_parameters
from pretrain.training import distributed, partitions
from pretrain.training.engine import local_partition_numel


def write_run_files(run_dir: str, cfg, info, model, geometry, step: int, init, ds_config: dict,
                    record, vocab_path: str, **extra) -> None:  # fmt: skip
    """What a run directory holds besides its checkpoints, written by rank 0 (every rank calls it: the partition
    sizes are gathered): config.yaml (resolved), run.json (world size, parameter counts, each rank's partition
    size, batch geometry, where the weights came from, `extra`, the DeepSpeed config), and what reading the
    checkpoints back needs without the data: model.json (`record`, a run_record.ModelRecord, which reads it back)
    and vocab.txt.
    The JSON files appear whole (written beside and renamed)."""
    per_rank = distributed.gather_objects(local_partition_numel(model))
    if info.rank != 0:
        return
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    run_info = {
        "world_size": info.world_size, "parameters": count_parameters(model), "partition_numel_per_rank": per_rank,
        "micro_batch": geometry.micro, "grad_accum": geometry.accum, "global_batch": geometry.global_batch,
        "resumed_from_step": step, "initialized_from": None if init is None else init.tag_dir,
        "init_tensors": None if init is None else init.report(), **extra, "deepspeed_config": ds_config,
    }  # fmt: skip
    write_atomic(os.path.join(run_dir, "run.json"), json.dumps(run_info, indent=2, ensure_ascii=False))
    write_atomic(os.path.join(run_dir, "model.json"), record.to_json())
    if os.path.abspath(vocab_path) != os.path.abspath(os.path.join(run_dir, "vocab.txt")):
        shutil.copyfile(vocab_path, os.path.join(run_dir, "vocab.txt"))


@contextlib.contextmanager
def built_beside(out: str):
    """A directory to write `out`'s contents into, made beside it and renamed into place (replacing `out`) when the
    block ends without an error; on an error it is removed, and `out` is as it was: nothing half-written."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep other users out
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def write_atomic(path: str, text: str) -> None:
    """`text` at `path`, all at once: written beside it and renamed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, tag_dir: str) -> torch.nn.Module:
    """`model`, built on the meta device, with the consolidated weights of checkpoint tag_dir, in eval mode."""
    state = partitions.consolidate(tag_dir)
    missing = sorted(set(n for n, _ in model.named_parameters()) - set(state))
    if missing:
        raise UserError(f"{tag_dir}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of this model")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


