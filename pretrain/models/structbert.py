"""Stage one's model: the encoder, the MLM head (shared by the word-structure objective) and the
sentence-structure head, with their three losses."""
from __future__ import annotations

import torch
from torch import nn

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.layers import Encoder, MLMHead, SentenceHead, init_weights, masked_ce
from pretrain.objectives import MLM, SSO, WSO


class StructBert(nn.Module):
    """Encoder + MLM head (shared by the word-structure objective) + sentence-structure head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.mlm_head = MLMHead(cfg)
        self.sentence_head = SentenceHead(cfg)
        init_weights(self, cfg.init_std)

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict]:
        h = self.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                         pack_index=batch.get("pack_index"))
        losses = self.objective_losses(h, batch)  # objective -> (mean, summed loss, correct, count)
        loss = sum(weights[name] * value[0] for name, value in losses.items())
        # tensors: a float() here would sync the GPU every micro-batch
        return loss, {name: value[1:] for name, value in losses.items()}

    def objective_losses(self, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Each objective's masked_ce on the encoder's output h: a model with another objective extends this
        (docs/extending.md; tests/toy_objective.py)."""
        # The vocabulary projection is the costliest matmul: run it only where a token is predicted.
        mlm_labels, wso_labels, sso_labels = batch[MLM.labels], batch[WSO.labels], batch[SSO.labels]
        mlm_at, wso_at = mlm_labels != IGNORE, wso_labels != IGNORE
        logits = self.mlm_head(h[mlm_at | wso_at], self.encoder.embeddings.word.weight)
        is_mlm = mlm_at[mlm_at | wso_at]
        mlm = masked_ce(logits[is_mlm], mlm_labels[mlm_at])
        wso = masked_ce(logits[~is_mlm], wso_labels[wso_at])
        sso_logits = self.sentence_head(h)
        sso = masked_ce(sso_logits[sso_labels != IGNORE], sso_labels[sso_labels != IGNORE])
        return {MLM.name: mlm, WSO.name: wso, SSO.name: sso}
