"""The pre-training stages, by name: each stage's class (structbert.py, palm.py) holds its name, and this mapping
is built from the classes, as the task registry is (pretrain/tasks/task.py). The commands ask it: `build_stage(cfg)`
for a run's stage, `stage_class(name)` for what a finished run's model.json or a command line names. A new stage is
one more class in STAGES (docs/extending.md)."""
from __future__ import annotations

from pretrain.errors import UserError
from pretrain.stages.palm import PalmStage
from pretrain.stages.structbert import StructBertStage

STAGES: dict[str, type] = {cls.name: cls for cls in (StructBertStage, PalmStage)}  # in the order of training


def stage_class(name: str, key: str = "stage") -> type:
    """The stage class `name` (the value of setting `key`) names; a one-line error for any other."""
    if name not in STAGES:
        raise UserError(f"{key}={name}: unknown stage (known: {', '.join(STAGES)})")
    return STAGES[name]


def build_stage(cfg):
    """The stage `cfg.stage.name` names, built from the whole config (which it reads and checks)."""
    return stage_class(str(cfg.stage.name))(cfg)
