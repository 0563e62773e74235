"""A stage with an objective of its own, added from outside the package as docs/extending.md says: a user's entry
point registers it and runs the trainer.

    deepspeed --num_gpus 2 tests/toy_objective.py stage=structbert stage.name=toy +stage.loss_weights.parity=1.0 ...

The toy objective, `parity`: from [CLS]'s hidden state, whether the sample has an even number of real tokens. It is
declared once (PARITY, a pretrain.objectives.Objective: its name, labels' batch key and head FLOPs). Its labels
come from the stage's dataset (a wrapper around stage one's), its head and loss from the model (a subclass of stage
one's that extends objective_losses), its weight from the config; the loop, the metrics, the FLOPs count, the
checkpoints and the run directory take it as they take stage one's own.
"""
import sys

import torch
from torch import nn

from pretrain import train
from pretrain.models.layers import masked_ce
from pretrain.models.structbert import StructBert
from pretrain.objectives import Objective
from pretrain.stages import STAGES
from pretrain.stages.structbert import StructBertStage
from pretrain.training import distributed

PARITY = Objective("parity", "parity_labels", "with_parity below: the sample's real-token count mod 2",
                   "ParityModel.parity_head, on [CLS]", lambda cfg, labels: 2 * labels.shape[0] * cfg.hidden * 2)


class ParityModel(StructBert):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.parity_head = nn.Linear(cfg.hidden, 2)

    def objective_losses(self, h, batch):
        return {**super().objective_losses(h, batch), PARITY.name: masked_ce(self.parity_head(h[:, 0]), batch[PARITY.labels])}


def with_parity(collate):
    def collate_with_parity(samples):
        batch = collate(samples)
        batch[PARITY.labels] = batch["attention_mask"].sum(1).remainder(2).to(torch.int64)
        return batch

    return collate_with_parity


class ParityData(torch.utils.data.Dataset):
    """Stage one's samples, and in each batch the parity labels."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, g):
        return self.inner[g]

    def __getattr__(self, name):  # everything else (the spans, the stats) is stage one's
        return getattr(self.inner, name)

    @property
    def collate_fn(self):
        return with_parity(self.inner.collate_fn)


class ParityStage(StructBertStage):
    name = "toy"
    objectives = StructBertStage.objectives + (PARITY,)

    @classmethod
    def model_class(cls):
        return ParityModel

    def dataset(self, corpus, seed):
        return ParityData(super().dataset(corpus, seed))


if __name__ == "__main__":
    STAGES[ParityStage.name] = ParityStage
    sys.argv = distributed.strip_local_rank(sys.argv)
    train.main()
