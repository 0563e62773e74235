"""What a run directory holds besides its checkpoints, and reading a run's model back from it.

config.yaml (the resolved config), run.json (world size, parameter counts, partition sizes, batch geometry,
where the weights came from, the data), model.json (the stage, the fine-tuning task if any, and the model's
shapes) and vocab.txt: what reading the checkpoints back needs without the data or the config.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from pretrain.errors import UserError
from pretrain.training import distributed, partitions


def run_model_config(run_dir: str):
    """(stage, ModelConfig) that a run directory records in model.json (vocab.txt must be there too: it is what
    reading the run's checkpoints back needs besides the weights)."""
    from pretrain.models.config import ModelConfig

    for name in ("model.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UserError(f"run.dir={run_dir}: no {name} (not a training run directory)")
    with open(os.path.join(run_dir, "model.json")) as f:
        saved = json.load(f)
    return saved.pop("stage"), ModelConfig(**saved)


def write_run_files(cfg, info, model, geometry, step: int, init, ds_config: dict, stage: str, model_cfg,
                    vocab_path: str, **extra) -> None:
    """What a run directory holds besides its checkpoints, written by rank 0 (every rank calls it: the partition
    sizes are gathered): config.yaml (resolved), run.json (world size, parameter counts, each rank's partition
    size, batch geometry, where the weights came from, `extra`, the DeepSpeed config), and what reading the
    checkpoints back needs without the data: model.json (stage and shapes, read by run_model_config) and vocab.txt.
    The JSON files appear whole (written beside and renamed)."""
    from omegaconf import OmegaConf

    from pretrain.models.layers import count_parameters
    from pretrain.training.engine import local_partition_numel

    per_rank = distributed.gather_objects(local_partition_numel(model))
    if info.rank != 0:
        return
    run_dir = str(cfg.run.dir)
    OmegaConf.save(cfg, os.path.join(run_dir, "config.yaml"), resolve=True)
    run_info = {
        "world_size": info.world_size, "parameters": count_parameters(model), "partition_numel_per_rank": per_rank,
        "micro_batch": geometry.micro, "grad_accum": geometry.accum, "global_batch": geometry.global_batch,
        "resumed_from_step": step, "initialized_from": None if init is None else init.tag_dir,
        "init_tensors": None if init is None else init.report(), **extra, "deepspeed_config": ds_config,
    }  # fmt: skip
    write_atomic(os.path.join(run_dir, "run.json"), json.dumps(run_info, indent=2, ensure_ascii=False))
    write_atomic(os.path.join(run_dir, "model.json"), json.dumps({"stage": stage, **dataclasses.asdict(model_cfg)}, indent=2))
    if os.path.abspath(vocab_path) != os.path.abspath(os.path.join(run_dir, "vocab.txt")):
        shutil.copyfile(vocab_path, os.path.join(run_dir, "vocab.txt"))


def write_atomic(path: str, text: str) -> None:
    """`text` at `path`, all at once: written beside it and renamed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_run_model(run_dir: str, tag_dir: str):
    """The run's model (stage one or two, in eval mode) with the weights of checkpoint tag_dir: built on the meta
    device, so the consolidated tensors are taken as they are and no second copy is made."""
    from pretrain.models.palm import Palm
    from pretrain.models.structbert import StructBert

    stage, cfg = run_model_config(run_dir)
    with torch.device("meta"):
        model = (Palm if stage == "palm" else StructBert)(cfg)
    return load_weights(model, tag_dir)


def load_weights(model: torch.nn.Module, tag_dir: str) -> torch.nn.Module:
    """`model`, built on the meta device, with the consolidated weights of checkpoint tag_dir, in eval mode."""
    state = partitions.consolidate(tag_dir)
    missing = sorted(set(n for n, _ in model.named_parameters()) - set(state))
    if missing:
        raise UserError(f"{tag_dir}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of this model")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


