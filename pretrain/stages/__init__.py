"""The pre-training stages, by name: each stage's own module (structbert.py, palm.py) registers its class, and is
the only place that knows its name. Everything else asks the registry: `build_stage(cfg)` for a run's stage,
`stage_class(name)` for what a finished run's model.json or a command line names."""
from __future__ import annotations

from pretrain.errors import UserError

STAGES: dict[str, type] = {}  # name -> Stage subclass, in the order of training (stage one first)


def register(cls: type) -> type:
    STAGES[cls.name] = cls
    return cls


def stage_class(name: str, key: str = "stage") -> type:
    """The stage class `name` (the value of setting `key`) names; a one-line error for any other."""
    if name not in STAGES:
        raise UserError(f"{key}={name}: unknown stage (known: {', '.join(STAGES)})")
    return STAGES[name]


def build_stage(cfg):
    """The stage `cfg.stage.name` names, built from the whole config (which it reads and checks)."""
    return stage_class(str(cfg.stage.name))(cfg)


# Registered in the order of training; imported last, since each module registers itself through `register`.
from pretrain.stages import structbert, palm  # noqa: E402,F401  (isort: skip)
