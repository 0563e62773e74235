"""What every pre-training stage shares, and the interface the rest of the framework sees.

A stage binds a model to its data and objectives. Built from the config, it reads its settings at once (so that a
config is checked, and every key read, before any rank starts); the trainer then sees: `name`, `objectives`,
`weights`, `model_cfg`, `init_source()`, `make_model()`, `train_loader()`, `valid_loaders()`, `index()`,
`token_counts()`, `train_flops()`, `phase_columns()`; `pretrain.samples` sees `train_dataset()`, `train_sampler()`,
`sample_row()` and `sample_overview()`.

What needs no data is said by the class itself, so that readers of a finished run (export, generate, plan) ask the
stage its model.json names (pretrain/stages/__init__.py) instead of branching on its name: `model_class()`, `hf_export()`,
`generates`, `min_decoder_layers`, `vocab_projections`.
"""
from __future__ import annotations

import abc
import os
from functools import partial

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from pretrain.data import index_cache
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import MaskingConfig
from pretrain.data.sampling import StepSampler, eval_batches
from pretrain.data.sources import Blend, BlendedDataset, read_sources
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.labels import IGNORE
from pretrain.training.config import BatchGeometry

MAX_STORED_EPOCHS = 4  # a corpus run over more often is small: its later epochs' orders are computed, not stored


class Stage(abc.ABC):
    """What the stages share: the tokenizer, the corpora, the objective config, the loaders' plumbing. The abstract
    methods are what a stage must say for itself: a stage class missing one cannot be built (Python's TypeError
    names the hooks it lacks). __init__ of a stage also sets `model_cfg`, its models.config.ModelConfig."""

    name: str  # what stage= selects, and what model.json and the checkpoints record
    ordinal: str  # its place in PLUG's recipe, as messages name it ("stage-one")
    objectives: tuple[str, ...] = ()
    objective_config: type[MaskingConfig] = MaskingConfig
    generates = False  # its model has a decoder: pretrain.generate continues text with it
    min_decoder_layers = 0  # model.decoder_layers below this is refused
    vocab_projections = 1  # vocabulary-sized logits per position (the memory plan's activations)

    @classmethod
    @abc.abstractmethod
    def model_class(cls) -> type[nn.Module]:
        """The model this stage trains: what model.json's shapes build again."""

    @classmethod
    @abc.abstractmethod
    def hf_export(cls):
        """How this stage's model is written as a transformers directory (pretrain/hf/export.py)."""

    @abc.abstractmethod
    def init_source(self):
        """Where the model's first weights come from (training.init_from.InitSource), or None: random init."""

    @abc.abstractmethod
    def train_dataset(self, geometry: BatchGeometry):
        """The training samples: one source's dataset, or the blend of several (_train_blend)."""

    @abc.abstractmethod
    def valid_dataset(self, corpus: IndexedCorpus, seed: int, step: int):
        """One corpus's validation samples, as the model is at `step` (stage two's phase)."""

    @abc.abstractmethod
    def token_counts(self, batch: dict) -> tuple[int, int]:
        """(real tokens, all positions) of a host batch: the throughput and padding columns."""

    @abc.abstractmethod
    def train_flops(self, batch: dict) -> int:
        """The model FLOPs of training on a host batch (training/flops.py): the tflops and MFU columns."""

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
        names = [o.name for o in self.objectives]
        self.weights = {k: float(cfg.stage.loss_weights[k]) for k in names}
        unused = set(cfg.stage.loss_weights) - set(names)
        if unused:
            raise UserError(f"stage.loss_weights: {sorted(unused)} are not objectives of stage={self.name}"
                            f" ({', '.join(names)})")  # fmt: skip
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
        """`make(corpus, seed, own_count)`'s dataset of the train split: one source's, or the sources' blended
        (validation is per source). own_count(g) is how many of the source's own samples the global indices
        below g take (g itself for one source): a boundary counted in the run's samples, as the source sees it."""
        if len(self.sources) == 1:
            return make(self.corpora[0]["train"], self.sources[0].seed, int)
        blend = Blend([src.weight for src in self.sources])
        datasets = [make(corpora["train"], src.seed, partial(blend.dealt_below, k))
                    for k, (src, corpora) in enumerate(zip(self.sources, self.corpora))]  # fmt: skip
        return BlendedDataset(datasets, self.sources, blend)

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

    def make_model(self) -> nn.Module:
        return self.model_class()(self.model_cfg)

    def train_sampler(self, data, geometry: BatchGeometry, rank: int, start_step: int,
                      max_steps: int | None = None) -> StepSampler:  # fmt: skip
        """The batches of each step from start_step on: every sample a function of (seed, step), so a run restarts
        at any step; max_steps (this run's by default) only ends the iteration."""
        return StepSampler(micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world, rank=rank,
                           start_step=start_step, max_steps=self.max_steps if max_steps is None else max_steps)  # fmt: skip

    def train_loader(self, geometry: BatchGeometry, rank: int, start_step: int, max_steps: int | None = None,
                     data=None) -> DataLoader:  # fmt: skip
        """data: the train dataset when the caller has built it already (a rollback restarts the loader)."""
        data = self.train_dataset(geometry) if data is None else data
        return self._loader(data, self.train_sampler(data, geometry, rank, start_step, max_steps), self.num_workers)

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

    # pretrain.samples: one training sample as a JSON object, and what to check in a corpus at a glance
    @abc.abstractmethod
    def sample_row(self, data, g: int) -> dict:
        """pretrain.samples' row of sample g: what the model sees, decoded."""

    @abc.abstractmethod
    def sample_overview(self, data, indices: list[int]) -> list[str]:
        """pretrain.samples' summary lines over the samples `indices`."""


def targets_of(labels: np.ndarray, tok: Tokenizer) -> list[dict]:
    """The positions of a label array that predict something, with the id and token each predicts."""
    return [{"position": int(i), "id": int(labels[i]), "token": tok.id_to_token(int(labels[i]))}
            for i in np.flatnonzero(labels != IGNORE)]  # fmt: skip


def corpus_span(data, span: tuple[int, int], tok: Tokenizer) -> dict:
    """Where a span of the corpus lies, and its text as the corpus has it (before masking or shuffling)."""
    return {"span": [int(span[0]), int(span[1])], "document": data.corpus.document_of(span[0]),
            "text": tok.decode(int(i) for i in data.corpus.tokens[span[0] : span[1]])}  # fmt: skip


