"""A stage binds a model to its data and objectives; the trainer only sees this interface:
`objectives`, `weights`, `init_plan()`, `make_model()`, `train_loader()`, `valid_loader()`, `token_counts()`,
`summarize()`."""
from __future__ import annotations

import math
import os
import sys

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from pretrain import init_from
from pretrain.dataset import StepSampler, StructBertDataset, eval_batches
from pretrain.errors import UserError
from pretrain.indexed import IndexedCorpus
from pretrain.objectives import ObjectiveConfig
from pretrain.palm_data import LengthGroupedStepSampler, PalmDataset, check_range
from pretrain.run_config import BatchGeometry, model_config
from pretrain.tokenizer import Tokenizer


class _Stage:
    """What both stages share: the tokenizer, the corpora, the objective config, the loaders' plumbing."""

    objectives: tuple[str, ...] = ()

    def __init__(self, cfg: DictConfig, meta: dict):
        self.cfg = cfg
        self.tokenizer = Tokenizer(os.path.join(cfg.data.dir, "vocab.txt"))
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

    def _token_ids(self) -> dict:
        t = self.tokenizer
        return dict(cls_id=t.cls_id, sep_id=t.sep_id, mask_id=t.mask_id, pad_id=t.pad_id, random_ids=t.normal_ids)

    def _loader(self, data, batch_sampler, workers: int = 0) -> DataLoader:
        return DataLoader(
            data, batch_sampler=batch_sampler, collate_fn=data.collate_fn,
            num_workers=workers, persistent_workers=workers > 0,
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG (exact resume)
        )  # fmt: skip

    def _valid(self, data, geometry: BatchGeometry, rank: int) -> DataLoader | None:
        """A fixed validation set, the same number of batches on every rank (ZeRO-3 needs all ranks in step)."""
        if data is None or len(data) == 0:
            return None
        per_round = geometry.micro * geometry.world
        n = min(int(self.cfg.train.eval_samples), len(data)) // per_round * per_round or per_round
        return self._loader(data, eval_batches(n, geometry.micro, geometry.world, rank))

    def _objective_columns(self, reduced: dict) -> dict:
        row = {"loss": sum(self.weights[k] * (reduced[f"{k}_loss"] or 0.0) for k in self.objectives)}
        for k in self.objectives:
            row[f"{k}_loss"], row[f"{k}_acc"] = reduced[f"{k}_loss"], reduced[f"{k}_acc"]
        return row

    def _throughput_columns(self, reduced: dict) -> dict:
        row = {"tokens_per_s": reduced["tokens_per_s"], "padding": reduced["padding"]}
        if reduced["step_time_s"] is not None:
            row["step_time_s"] = reduced["step_time_s"]
        return row


class StructBertStage(_Stage):
    """Stage one: whole-word MLM + word structure + sentence structure on a StructBERT encoder."""

    objectives = ("mlm", "wso", "sso")

    def __init__(self, cfg: DictConfig, meta: dict):
        super().__init__(cfg, meta)
        activation_ckpt = bool(cfg.deepspeed.activation_checkpointing)
        self.model_cfg = model_config(cfg.model, meta["vocab_size"], int(cfg.data.seq_len), activation_ckpt)

    def init_plan(self):
        if self.cfg.init_from is not None:
            raise UserError(f"init_from={self.cfg.init_from}: stage one starts from random weights (init_from is for stage=palm)")
        return None

    def make_model(self):
        from pretrain.model import StructBert

        return StructBert(self.model_cfg)

    def dataset(self, split: str) -> StructBertDataset:
        return StructBertDataset(self.corpora[split], seq_len=int(self.cfg.data.seq_len), seed=int(self.cfg.seed),
                                 cfg=self.objective_cfg, **self._token_ids())  # fmt: skip

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int) -> DataLoader:
        sampler = StepSampler(
            micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world, rank=rank,
            start_step=start_step, max_steps=int(self.cfg.train.max_steps),
        )  # fmt: skip
        return self._loader(self.dataset("train"), sampler, int(self.cfg.data.num_workers))

    def valid_loader(self, geometry: BatchGeometry, rank: int, step: int) -> DataLoader | None:
        return self._valid(self.dataset("valid") if self.corpora["valid"].num_docs else None, geometry, rank)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def summarize(self, reduced: dict, step: int, split: str) -> dict:
        return {**self._objective_columns(reduced), **self._throughput_columns(reduced)}


class PalmStage(_Stage):
    """Stage two: decoder LM on the continuation of the encoder's context, plus encoder whole-word MLM during
    the first `palm.mlm_fraction` of the steps."""

    objectives = ("lm", "mlm")

    def __init__(self, cfg: DictConfig, meta: dict):
        super().__init__(cfg, meta)
        p = cfg.palm
        # checked here, not only in the dataset, so that a bad range fails before any rank starts
        self.src_len, self.tgt_len = check_range("src_len", p.src_len), check_range("tgt_len", p.tgt_len)
        longest, key = max((self.src_len[1], "palm.src_len"), (self.tgt_len[1], "palm.tgt_len"))
        activation_ckpt = bool(cfg.deepspeed.activation_checkpointing)
        self.model_cfg = model_config(cfg.model, meta["vocab_size"], longest, activation_ckpt, seq_len_key=f"{key}[1]")
        if self.model_cfg.decoder_layers < 1:
            raise UserError(f"model.decoder_layers={self.model_cfg.decoder_layers}: stage=palm needs >= 1")
        if not 0.0 <= float(p.mlm_fraction) <= 1.0:
            raise UserError(f"palm.mlm_fraction={p.mlm_fraction}: must be in [0, 1]")
        if int(p.group_steps) < 1:
            raise UserError(f"palm.group_steps={p.group_steps}: must be >= 1")
        # Steps 1..mlm_steps train with masked LM, the rest without: a function of the step, so resume-exact.
        self.mlm_steps = math.floor(float(p.mlm_fraction) * int(cfg.train.max_steps) + 0.5)

    def mlm_active(self, step: int) -> bool:
        """Whether step `step` (1-based: the step just trained) had masked LM."""
        return step <= self.mlm_steps

    def init_plan(self) -> tuple[str, dict[str, str]] | None:
        """(checkpoint dir, parameter mapping), checked against this model's shapes on the meta device."""
        if self.cfg.init_from is None:
            return None
        tag_dir = init_from.resolve(str(self.cfg.init_from))
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in self.make_model().named_parameters()}
        return tag_dir, init_from.check(str(self.cfg.init_from), tag_dir, shapes, self.model_cfg)

    def make_model(self):
        from pretrain.palm import Palm

        return Palm(self.model_cfg)

    def dataset(self, split: str, mlm_until: int):
        return PalmDataset(self.corpora[split], src_len=self.src_len, tgt_len=self.tgt_len, seed=int(self.cfg.seed),
                           mlm_cfg=self.objective_cfg, mlm_until=mlm_until, **self._token_ids())  # fmt: skip

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int) -> DataLoader:
        data = self.dataset("train", mlm_until=self.mlm_steps * geometry.global_batch)
        sampler = LengthGroupedStepSampler(
            data.lengths, micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world,
            rank=rank, start_step=start_step, max_steps=int(self.cfg.train.max_steps),
            group_steps=int(self.cfg.palm.group_steps), seed=int(self.cfg.seed), boundary_step=self.mlm_steps,
        )  # fmt: skip
        return self._loader(data, sampler, int(self.cfg.data.num_workers))

    def valid_loader(self, geometry: BatchGeometry, rank: int, step: int) -> DataLoader | None:
        """Validation follows the phase of the step: masked encoder input while MLM is on, clean after."""
        if not self.corpora["valid"].num_docs:
            return None
        return self._valid(self.dataset("valid", mlm_until=sys.maxsize if self.mlm_active(step) else 0), geometry, rank)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        enc, dec = batch["enc_attention_mask"], batch["dec_attention_mask"]
        return int(enc.sum() + dec.sum()), enc.numel() + dec.numel()

    def summarize(self, reduced: dict, step: int, split: str) -> dict:
        row = {**self._objective_columns(reduced), "mlm_active": self.mlm_active(step)}
        if split == "valid" and reduced["lm_loss"] is not None:
            row["lm_ppl"] = math.exp(min(reduced["lm_loss"], 50.0))
        return {**row, **self._throughput_columns(reduced)}


STAGES = {"structbert": StructBertStage, "palm": PalmStage}


def build_stage(cfg: DictConfig, meta: dict):
    name = cfg.stage.name
    if name not in STAGES:
        raise UserError(f"stage={name}: unknown (known: {', '.join(STAGES)})")
    return STAGES[name](cfg, meta)
