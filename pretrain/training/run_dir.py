"""What a run directory holds besides its checkpoints, and reading a run's model back from it.

config.yaml (the resolved config), run.json (world size, parameter counts, partition sizes, batch geometry,
where the weights came from, the data), model.json (the stage, the fine-tuning task if any, and the model's
shapes) and vocab.txt: what reading the checkpoints back needs without the data or the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.training import distributed, partitions


@dataclass(frozen=True)
class ModelRecord:
    """What model.json records: enough to build the run's model again without its data or config."""

    stage: str  # the pre-training stage whose model this is, or whose model a fine-tuning task's starts from
    task: str | None  # the fine-tuning task's type (pretrain/tasks/task.py); None for a pre-training run
    cfg: ModelConfig

    @property
    def stage_class(self) -> type:
        from pretrain.stages import stage_class

        return stage_class(self.stage, "model.json stage")

    def to_json(self) -> str:
        return json.dumps({"stage": self.stage, "task": self.task, **dataclasses.asdict(self.cfg)}, indent=2)


def read_model_record(run_dir: str) -> ModelRecord:
    """The ModelRecord of a run directory's model.json (vocab.txt must be there too: it is what reading the run's
    checkpoints back needs besides the weights)."""
    for name in ("model.json", "vocab.txt"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UserError(f"run.dir={run_dir}: no {name} (not a training run directory)")
    path = os.path.join(run_dir, "model.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        stage = saved.pop("stage")
    except (ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: not a model record ({type(e).__name__}: {e})") from None
    if "task" not in saved:  # written before the record had `task`: a fine-tuning run wrote its task as the stage
        from pretrain.stages import STAGES
        from pretrain.tasks.task import TASK_TYPES

        if stage not in STAGES and stage in TASK_TYPES:
            stage, saved["task"] = TASK_TYPES[stage].stage, stage
    task = saved.pop("task", None)
    fields = set(ModelConfig.__dataclass_fields__)
    if set(saved) - fields:
        raise UserError(f"{path}: unknown model fields {sorted(set(saved) - fields)} (written by a newer version?)")
    try:
        return ModelRecord(stage, task, ModelConfig(**saved))
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def stage_model_record(run_dir: str, command: str) -> ModelRecord:
    """The record of a run whose model is its stage's: a pre-training run, or a fine-tuning run whose task keeps
    the stage's model (generation); a classifier's run is refused."""
    from pretrain.tasks.task import task_type

    record = read_model_record(run_dir)
    if record.task is not None and not task_type(record.task, "model.json task").keeps_stage_model:
        raise UserError(f"run.dir={run_dir}: a fine-tuned {record.task} run; its model is the task's, not stage "
                        f"{record.stage}'s, and {command} reads only stage models (pretrain.finetune scores it)")  # fmt: skip
    return record


def write_run_files(run_dir: str, cfg, info, model, geometry, step: int, init, ds_config: dict,
                    record: ModelRecord, vocab_path: str, **extra) -> None:  # fmt: skip
    """What a run directory holds besides its checkpoints, written by rank 0 (every rank calls it: the partition
    sizes are gathered): config.yaml (resolved), run.json (world size, parameter counts, each rank's partition
    size, batch geometry, where the weights came from, `extra`, the DeepSpeed config), and what reading the
    checkpoints back needs without the data: model.json (`record`: read_model_record reads it) and vocab.txt.
    The JSON files appear whole (written beside and renamed)."""
    from omegaconf import OmegaConf

    from pretrain.models.layers import count_parameters
    from pretrain.training.engine import local_partition_numel

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


def load_stage_model(record: ModelRecord, tag_dir: str):
    """The stage model of `record` (stage_model_record's) in eval mode, with the weights of checkpoint tag_dir:
    built on the meta device, so the consolidated tensors are taken as they are and no second copy is made."""
    with torch.device("meta"):
        model = record.stage_class.model_class()(record.cfg)
    return load_weights(model, tag_dir)


def load_weights(model: torch.nn.Module, tag_dir: str) -> torch.nn.Module:
    """`model`, built on the meta device, with the consolidated weights of checkpoint tag_dir, in eval mode."""
    state = partitions.consolidate(tag_dir)
    missing = sorted(set(n for n, _ in model.named_parameters()) - set(state))
    if missing:
        raise UserError(f"{tag_dir}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more) of this model")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


