"""Every training objective, declared once: the loss-weight key and metric columns its name gives, the batch key
its labels arrive in, where its corruption and its head live, and the FLOPs of its head.

The places that used to spell the names out read these declarations: the models' losses (models/structbert.py,
models/palm.py) are keyed by `name` and read `labels`; a stage or task lists its objectives as these objects
(stages/, tasks/task.py), which gives `stage.loss_weights`' keys; training/metrics.py makes the `<name>_loss`,
`<name>_acc` (and `<name>_ppl`) columns from them; training/flops.py sums `head_flops`; pretrain.summary shows
`summary_columns`. An objective added from outside the package declares its own (docs/extending.md,
tests/toy_objective.py).

`head_flops(cfg, labels)` is the forward FLOPs of the head on one micro-batch (2 per multiply-add, the convention
of training/flops.py): `cfg` a models.config.ModelConfig, `labels` the batch's tensor under `labels`. The models
project the vocabulary only where a label is, so most heads cost per label."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pretrain.labels import IGNORE


def _labelled(labels) -> int:
    return int((labels != IGNORE).sum())


@dataclass(frozen=True)
class Objective:
    name: str  # the stage.loss_weights key; metric columns <name>_loss, <name>_acc
    labels: str  # the batch key of its labels (IGNORE where nothing is predicted)
    corruption: str  # what makes its input and labels (for the reader; docs/concepts.md)
    head: str  # the module that predicts it
    head_flops: Callable[[object, object], int]
    perplexity: bool = False  # valid rows also carry <name>_ppl = exp(<name>_loss)
    summary_columns: tuple[str, ...] = ()  # what pretrain.summary shows of it (default: <name>_acc)

    @property
    def columns(self) -> tuple[str, ...]:
        return (f"{self.name}_loss", f"{self.name}_acc")

    @property
    def shown(self) -> tuple[str, ...]:
        return self.summary_columns or (f"{self.name}_acc",)


def _vocab_head_flops(cfg, labels) -> int:
    """The MLM head at each label: its dense h² and the vocabulary projection h·V (tied to the embedding)."""
    return 2 * _labelled(labels) * (cfg.hidden * cfg.hidden + cfg.hidden * cfg.vocab_size)


MLM = Objective("mlm", "mlm_labels", "data/masking.py: whole_word_mask (jieba words, 80/10/10)",
                "models/layers.py: MLMHead on the encoder", _vocab_head_flops)
WSO = Objective("wso", "wso_labels", "data/masking.py: word_structure (shuffled trigrams, original order predicted)",
                "the MLM head, shared", _vocab_head_flops)
SSO = Objective("sso", "sso_labels", "data/structbert.py: next / previous / other-document segment pairs",
                "models/layers.py: SentenceHead (pooler on [CLS], 3 classes)",
                lambda cfg, labels: 2 * labels.shape[0] * (cfg.hidden * cfg.hidden + cfg.hidden * cfg.sso_classes))
LM = Objective("lm", "dec_labels", "data/palm.py: the target span, teacher-forced",
               "the decoder, projected on the tied embedding (models/palm.py)",
               lambda cfg, labels: 2 * _labelled(labels) * cfg.hidden * cfg.vocab_size,
               perplexity=True, summary_columns=("lm_loss", "lm_acc", "lm_ppl"))
# Fine-tuning's (tasks/task.py); their heads are the task's, not counted in FLOPs.
CLS = Objective("cls", "labels", "none", "tasks/task.py: a linear layer on the pooled [CLS]", lambda cfg, labels: 0)
TAG = Objective("tag", "labels", "none", "tasks/task.py: a linear layer on each token", lambda cfg, labels: 0)

OBJECTIVES: tuple[Objective, ...] = (MLM, WSO, SSO, LM, CLS, TAG)


def head_flops(objectives: tuple[Objective, ...], cfg, batch: dict) -> int:
    """The forward FLOPs of the objectives' heads on a micro-batch."""
    return sum(o.head_flops(cfg, batch[o.labels]) for o in objectives)
