"""The fine-tuning models of the understanding tasks: the stage-one encoder (same module, same names, so a
stage-one or stage-two checkpoint initialises it by name) with a fresh classification layer. Generation
fine-tunes PALM itself (models/palm.py).

forward(batch, weights, predict=False) -> (loss, {objective: (loss sum, correct, count)}) as the pre-training
models, plus the argmax predictions when predict=True (an evaluation step under ZeRO-3 must be a forward of the
engine: its parameters are gathered by the hooks DeepSpeed puts on forward).
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.fast_paths import Dropout
from pretrain.models.layers import Encoder, init_weights, masked_ce
from pretrain.objectives import CLS, TAG


class _EncoderClassifier(nn.Module):
    """The encoder, optionally BERT's pooler, dropout and a linear layer over the labels (built in this order: the
    order BERT's init draws its random weights in)."""

    def __init__(self, cfg: ModelConfig, num_labels: int, pooler: bool):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if pooler:
            self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.drop = Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_labels)
        init_weights(self, cfg.init_std)


class SequenceClassifier(_EncoderClassifier):
    """Pooled [CLS] (dense + tanh, BERT's pooler: taken from the stage-one sentence head when there is one)
    -> dropout -> linear over the labels."""

    objective = CLS.name

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__(cfg, num_labels, pooler=True)

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float] | None = None, predict: bool = False):
        h = self.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                         pack_index=batch.get("pack_index"))
        logits = self.classifier(self.drop(torch.tanh(self.pooler(h[:, 0]))))
        return _outputs(self.objective, logits, batch["labels"], predict)


class TokenClassifier(_EncoderClassifier):
    """Each token's final hidden state -> dropout -> linear over the tags."""

    objective = TAG.name

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__(cfg, num_labels, pooler=False)

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float] | None = None, predict: bool = False):
        h = self.encoder(batch["input_ids"], torch.zeros_like(batch["input_ids"]), batch["attention_mask"],
                         pack_index=batch.get("pack_index"))
        at = batch["labels"] != IGNORE
        logits = self.classifier(self.drop(h))
        out = _outputs(self.objective, logits[at], batch["labels"][at], False)
        return (*out, logits.argmax(-1)) if predict else out


def _outputs(objective: str, logits: torch.Tensor, labels: torch.Tensor, predict: bool):
    mean, loss_sum, correct, n = masked_ce(logits, labels)
    out = (mean, {objective: (loss_sum, correct, n)})
    return (*out, logits.argmax(-1)) if predict else out
