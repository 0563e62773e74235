"""A stage binds a model to its data and objectives; the trainer only sees this interface."""
from __future__ import annotations

import os
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from pretrain.dataset import StepSampler, StructBertDataset, eval_batches
from pretrain.errors import UserError
from pretrain.indexed import IndexedCorpus
from pretrain.model import StructBert
from pretrain.objectives import ObjectiveConfig
from pretrain.run_config import BatchGeometry, model_config
from pretrain.tokenizer import Tokenizer


class StructBertStage:
    """Stage one: whole-word MLM + word structure + sentence structure on a StructBERT encoder."""

    objectives = ("mlm", "wso", "sso")

    def __init__(self, cfg: DictConfig, meta: dict):
        self.cfg = cfg
        self.tokenizer = Tokenizer(os.path.join(cfg.data.dir, "vocab.txt"))
        self.model_cfg = model_config(
            cfg.model, meta["vocab_size"], int(cfg.data.seq_len), bool(cfg.deepspeed.activation_checkpointing)
        )
        known = set(ObjectiveConfig.__dataclass_fields__)
        unknown = set(cfg.stage.objectives) - known
        if unknown:
            raise UserError(f"stage.objectives: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        self.objective_cfg = ObjectiveConfig(**OmegaConf.to_container(cfg.stage.objectives))
        self.objective_cfg.validate()
        self.weights = {k: float(cfg.stage.loss_weights[k]) for k in self.objectives}
        self.corpora = {split: IndexedCorpus.open(os.path.join(cfg.data.dir, split)) for split in ("train", "valid")}
        if self.corpora["train"].num_docs == 0:
            raise UserError(f"data.dir={cfg.data.dir}: the train split has no documents")

    def make_model(self) -> StructBert:
        return StructBert(self.model_cfg)

    def dataset(self, split: str) -> StructBertDataset:
        t = self.tokenizer
        return StructBertDataset(
            self.corpora[split], seq_len=int(self.cfg.data.seq_len), seed=int(self.cfg.seed), cfg=self.objective_cfg,
            cls_id=t.cls_id, sep_id=t.sep_id, mask_id=t.mask_id, pad_id=t.pad_id, random_ids=t.normal_ids,
        )  # fmt: skip

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int) -> DataLoader:
        sampler = StepSampler(
            micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world, rank=rank,
            start_step=start_step, max_steps=int(self.cfg.train.max_steps),
        )  # fmt: skip
        workers, data = int(self.cfg.data.num_workers), self.dataset("train")
        return DataLoader(
            data, batch_sampler=sampler, collate_fn=data.collate_fn,
            num_workers=workers, persistent_workers=workers > 0,
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG (exact resume)
        )  # fmt: skip

    def valid_loader(self, geometry: BatchGeometry, rank: int) -> DataLoader | None:
        """A fixed validation set, the same number of batches on every rank (ZeRO-3 needs all ranks in step)."""
        data = self.dataset("valid") if self.corpora["valid"].num_docs else None
        if data is None or len(data) == 0:
            return None
        per_round = geometry.micro * geometry.world
        n = min(int(self.cfg.train.eval_samples), len(data)) // per_round * per_round or per_round
        batches = eval_batches(n, geometry.micro, geometry.world, rank)
        return DataLoader(data, batch_sampler=batches, collate_fn=data.collate_fn)

    def summarize(self, reduced: dict) -> dict:
        """The logged row: total loss as trained (weighted sum of the objective means) and each objective."""
        losses = [self.weights[k] * (reduced[f"{k}_loss"] or 0.0) for k in self.objectives]
        row = {"loss": sum(losses)}
        for k in self.objectives:
            row[f"{k}_loss"], row[f"{k}_acc"] = reduced[f"{k}_loss"], reduced[f"{k}_acc"]
        row["tokens_per_s"] = reduced["tokens_per_s"]
        if reduced["step_time_s"] is not None:
            row["step_time_s"] = reduced["step_time_s"]
        return row


STAGES = {"structbert": StructBertStage}


def build_stage(cfg: DictConfig, meta: dict):
    name = cfg.stage.name
    if name not in STAGES:
        raise UserError(f"stage={name}: unknown (known: {', '.join(STAGES)})")
    return STAGES[name](cfg, meta)
