"""A stage binds a model to its data and objectives. It reads its settings when built (so that a config is
checked, and every key read, before any rank starts), and the trainer only sees this interface:
`name`, `objectives`, `weights`, `model_cfg`, `init_source()`, `make_model()`, `train_loader()`,
`valid_loaders()`, `index()`, `token_counts()`, `train_flops()`, `phase_columns()`."""
from __future__ import annotations

import math
import os
import sys

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pretrain.data import index_cache
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import MaskingConfig, ObjectiveConfig
from pretrain.data.palm import PalmDataset, check_range
from pretrain.data.sources import BlendedDataset, read_sources
from pretrain.data.sampling import LengthGroupedStepSampler, StepSampler, eval_batches
from pretrain.data.structbert import StructBertDataset
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.training import flops, init_from
from pretrain.training.config import BatchGeometry, model_config

MAX_STORED_EPOCHS = 4  # a corpus run over more often is small: its later epochs' orders are computed, not stored


class _Stage:
    """What both stages share: the tokenizer, the corpora, the objective config, the loaders' plumbing."""

    name: str
    objectives: tuple[str, ...] = ()
    objective_config: type[MaskingConfig] = MaskingConfig

    def __init__(self, cfg: DictConfig):
        self.seed, self.max_steps = int(cfg.seed), int(cfg.train.max_steps)
        self.sources = read_sources(cfg.data, self.seed)
        self.vocab_size = int(self.sources[0].meta["vocab_size"])
        self.tokenizer = Tokenizer(os.path.join(self.sources[0].dir, "vocab.txt"))
        given = {key: cfg.stage.objectives[key] for key in cfg.stage.objectives}
        known = set(self.objective_config.__dataclass_fields__)
        unknown = set(given) - known
        if unknown:
            raise UserError(f"stage.objectives: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        self.objective_cfg = self.objective_config(**given).validate()
        self.weights = {k: float(cfg.stage.loss_weights[k]) for k in self.objectives}
        unused = set(cfg.stage.loss_weights) - set(self.objectives)
        if unused:
            raise UserError(f"stage.loss_weights: {sorted(unused)} are not objectives of stage={self.name}"
                            f" ({', '.join(self.objectives)})")  # fmt: skip
        # per source: {"train": IndexedCorpus, "valid": IndexedCorpus}
        self.corpora = [{split: IndexedCorpus.open(os.path.join(src.dir, split)) for split in ("train", "valid")}
                        for src in self.sources]  # fmt: skip
        for src, corpora in zip(self.sources, self.corpora):
            if corpora["train"].num_docs == 0:
                raise UserError(f"data.dir={src.dir}: the train split has no documents")
        self.num_workers, self.eval_samples = int(cfg.data.num_workers), int(cfg.train.eval_samples)
        self.activation_checkpointing = bool(cfg.deepspeed.activation_checkpointing)
        self.init_from = cfg.init_from

    def _train_blend(self, make) -> torch.utils.data.Dataset:
        """`make(corpus, seed)`'s dataset of the train split: one source's, or the sources' blended (validation is
        per source)."""
        datasets = [make(corpora["train"], src.seed) for src, corpora in zip(self.sources, self.corpora)]
        return datasets[0] if len(datasets) == 1 else BlendedDataset(datasets, self.sources)

    def valid_loaders(self, geometry: BatchGeometry, rank: int, step: int) -> dict[str, DataLoader]:
        """The valid split's loaders: {"valid": ...} for one source; with several, one per source
        ("valid/<name>"), each of up to train.eval_samples samples, the "valid" row then summing them all."""
        loaders = {}
        for src, corpora in zip(self.sources, self.corpora):
            if corpora["valid"].num_docs:
                loader = self._valid(self.valid_dataset(corpora["valid"], src.seed, step), geometry, rank)
                if loader is not None:
                    loaders["valid" if len(self.sources) == 1 else f"valid/{src.name}"] = loader
        return loaders

    def index(self, geometry: BatchGeometry) -> None:
        """Compute and store the derived arrays of every dataset this run builds, and the permutations of the epochs
        it will reach (index_cache.py): for the local rank 0, before the other ranks build theirs."""
        with index_cache.writing():
            data = self.train_dataset(geometry)
            for dataset in getattr(data, "datasets", [data]):
                reached = -(-self.max_steps * geometry.global_batch // len(dataset))
                dataset.epoch_permutation.store(min(reached, MAX_STORED_EPOCHS))
            for src, corpora in zip(self.sources, self.corpora):
                if corpora["valid"].num_docs:
                    self.valid_dataset(corpora["valid"], src.seed, 0).epoch_permutation.store(1)

    def _token_ids(self) -> dict:
        t = self.tokenizer
        return dict(cls_id=t.cls_id, sep_id=t.sep_id, mask_id=t.mask_id, pad_id=t.pad_id, random_ids=t.normal_ids)

    def _loader(self, data, batch_sampler, workers: int = 0) -> DataLoader:
        return DataLoader(
            data, batch_sampler=batch_sampler, collate_fn=data.collate_fn,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),  # keeps the loader from drawing on the global RNG (exact resume)
        )  # fmt: skip

    def _valid(self, data, geometry: BatchGeometry, rank: int) -> DataLoader | None:
        """A fixed validation set, the same number of batches on every rank (ZeRO-3 needs all ranks in step)."""
        if len(data) == 0:
            return None
        per_round = geometry.micro * geometry.world
        n = min(self.eval_samples, len(data)) // per_round * per_round or per_round
        return self._loader(data, eval_batches(n, geometry.micro, geometry.world, rank))

    def phase_columns(self, step: int) -> dict:
        """Columns of a metrics row that say which phase of the stage step `step` was in."""
        return {}

    def _meta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape, from the model built on the meta device (no memory)."""
        with torch.device("meta"):
            return {n: tuple(p.shape) for n, p in self.make_model().named_parameters()}


class StructBertStage(_Stage):
    """Stage one: whole-word MLM + word structure + sentence structure on a StructBERT encoder."""

    name = "structbert"
    objectives = ("mlm", "wso", "sso")
    objective_config = ObjectiveConfig

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.seq_len = int(cfg.data.seq_len)
        self.model_cfg = model_config(cfg.model, self.vocab_size, self.seq_len, self.activation_checkpointing)

    def init_source(self) -> init_from.InitSource | None:
        """None (random weights), or a transformers BERT/MegatronBERT directory (init_from=hf:<dir>) to continue
        pre-training from."""
        if self.init_from is None:
            return None
        if not str(self.init_from).startswith((init_from.HF, init_from.PLUG)):
            raise UserError(f"init_from={self.init_from}: stage one starts from random weights, from hf:<a transformers"
                            " BERT directory> or plug:<PLUG's shards> (a stage-one checkpoint is for stage=palm)")  # fmt: skip
        return init_from.init_source(str(self.init_from), self._meta_shapes(), self.model_cfg, self.tokenizer.vocab_path)

    def make_model(self):
        from pretrain.models.structbert import StructBert

        return StructBert(self.model_cfg)

    def dataset(self, corpus: IndexedCorpus, seed: int) -> StructBertDataset:
        return StructBertDataset(corpus, seq_len=self.seq_len, seed=seed, cfg=self.objective_cfg, **self._token_ids())

    def train_dataset(self, geometry: BatchGeometry):
        return self._train_blend(self.dataset)

    def valid_dataset(self, corpus: IndexedCorpus, seed: int, step: int) -> StructBertDataset:
        return self.dataset(corpus, seed)

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int) -> DataLoader:
        sampler = StepSampler(micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world,
                              rank=rank, start_step=start_step, max_steps=self.max_steps)  # fmt: skip
        return self._loader(self.train_dataset(geometry), sampler, self.num_workers)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def train_flops(self, batch: dict) -> int:
        """The model FLOPs of training on a host batch (training/flops.py)."""
        return flops.structbert_train_flops(self.model_cfg, batch)


class PalmStage(_Stage):
    """Stage two: decoder LM on the continuation of the encoder's context, plus encoder whole-word MLM during
    the first `palm.mlm_fraction` of the steps."""

    name = "palm"
    objectives = ("lm", "mlm")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        p = cfg.palm
        # checked here, not only in the dataset, so that a bad range fails before any rank starts
        self.src_len, self.tgt_len = check_range("src_len", p.src_len), check_range("tgt_len", p.tgt_len)
        longest, key = max((self.src_len[1], "palm.src_len"), (self.tgt_len[1], "palm.tgt_len"))
        self.model_cfg = model_config(cfg.model, self.vocab_size, longest, self.activation_checkpointing,
                                      seq_len_key=f"{key}[1]")  # fmt: skip
        if self.model_cfg.decoder_layers < 1:
            raise UserError(f"model.decoder_layers={self.model_cfg.decoder_layers}: stage=palm needs >= 1")
        if not 0.0 <= float(p.mlm_fraction) <= 1.0:
            raise UserError(f"palm.mlm_fraction={p.mlm_fraction}: must be in [0, 1]")
        self.group_steps, self.snap = int(p.group_steps), float(p.snap)
        if self.group_steps < 1:
            raise UserError(f"palm.group_steps={p.group_steps}: must be >= 1")
        # Steps 1..mlm_steps train with masked LM, the rest without: a function of the step, so resume-exact.
        self.mlm_steps = math.floor(float(p.mlm_fraction) * self.max_steps + 0.5)

    def mlm_active(self, step: int) -> bool:
        """Whether step `step` (1-based: the step just trained) had masked LM."""
        return step <= self.mlm_steps

    def phase_columns(self, step: int) -> dict:
        return {"mlm_active": self.mlm_active(step)}

    def init_source(self) -> init_from.InitSource | None:
        """The stage-one checkpoint and its parameter mapping, checked against this model's shapes on the meta
        device."""
        if self.init_from is None:
            return None
        return init_from.init_source(str(self.init_from), self._meta_shapes(), self.model_cfg, self.tokenizer.vocab_path)

    def make_model(self):
        from pretrain.models.palm import Palm

        return Palm(self.model_cfg)

    def dataset(self, corpus: IndexedCorpus, seed: int, mlm_until: int) -> PalmDataset:
        return PalmDataset(corpus, src_len=self.src_len, tgt_len=self.tgt_len, seed=seed, mlm_cfg=self.objective_cfg,
                           mlm_until=mlm_until, snap=self.snap, **self._token_ids())  # fmt: skip

    def train_dataset(self, geometry: BatchGeometry):
        mlm_until = self.mlm_steps * geometry.global_batch
        return self._train_blend(lambda corpus, seed: self.dataset(corpus, seed, mlm_until))

    def valid_dataset(self, corpus: IndexedCorpus, seed: int, step: int) -> PalmDataset:
        """Validation follows the phase of the step: masked encoder input while MLM is on, clean after."""
        return self.dataset(corpus, seed, mlm_until=sys.maxsize if self.mlm_active(step) else 0)

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int) -> DataLoader:
        data = self.train_dataset(geometry)
        sampler = LengthGroupedStepSampler(
            data.lengths, micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world,
            rank=rank, start_step=start_step, max_steps=self.max_steps, group_steps=self.group_steps,
            seed=self.seed, boundary_step=self.mlm_steps,
        )  # fmt: skip
        return self._loader(data, sampler, self.num_workers)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        enc, dec = batch["enc_attention_mask"], batch["dec_attention_mask"]
        return int(enc.sum() + dec.sum()), enc.numel() + dec.numel()

    def train_flops(self, batch: dict) -> int:
        """The model FLOPs of training on a host batch (training/flops.py)."""
        return flops.palm_train_flops(self.model_cfg, batch)


STAGES = {stage.name: stage for stage in (StructBertStage, PalmStage)}


def build_stage(cfg: DictConfig):
    name = cfg.stage.name
    if name not in STAGES:
        raise UserError(f"stage={name}: unknown (known: {', '.join(STAGES)})")
    return STAGES[name](cfg)
