"""A run read back: model.json's stage and fine-tuning task, resolved to their classes by the registries (which
stand above training/), and the model of a finished run. training/run_dir.py writes what this reads."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.stages import STAGES, stage_class
from pretrain.tasks.task import TASK_TYPES, task_type
from pretrain.training.run_dir import load_weights


@dataclass(frozen=True)
class ModelRecord:
    """What model.json records: enough to build the run's model again without its data or config."""

    stage: str  # the pre-training stage whose model this is, or whose model a fine-tuning task's starts from
    task: str | None  # the fine-tuning task's type (pretrain/tasks/task.py); None for a pre-training run
    cfg: ModelConfig

    @property
    def stage_class(self) -> type:
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
    record = read_model_record(run_dir)
    if record.task is not None and not task_type(record.task, "model.json task").keeps_stage_model:
        raise UserError(f"run.dir={run_dir}: a fine-tuned {record.task} run; its model is the task's, not stage "
                        f"{record.stage}'s, and {command} reads only stage models (pretrain.finetune scores it)")  # fmt: skip
    return record


def load_stage_model(record: ModelRecord, tag_dir: str):
    """The stage model of `record` (stage_model_record's) in eval mode, with the weights of checkpoint tag_dir:
    built on the meta device, so the consolidated tensors are taken as they are and no second copy is made."""
    with torch.device("meta"):
        model = record.stage_class.model_class()(record.cfg)
    return load_weights(model, tag_dir)
