"""Stage two: a PALM encoder-decoder, started from stage one's encoder, trained on the decoder's LM of the text
that follows the encoder's context (both lengths drawn from ranges), plus the encoder's whole-word masked LM during
the first `stage.mlm_fraction` of the steps."""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
from omegaconf import DictConfig

from pretrain import init_sources
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.palm import PalmDataset, check_range, length_report
from pretrain.data.palm_lengths import render_lengths
from pretrain.data.sampling import LengthGroupedStepSampler
from pretrain.data.sources import source_sample
from pretrain.errors import UserError
from pretrain.hf.export import PalmExport
from pretrain.labels import IGNORE
from pretrain.models.palm import Palm
from pretrain.objectives import LM, MLM
from pretrain.stages.base import Stage, corpus_span, targets_of
from pretrain.training import flops, init_from
from pretrain.training.config import BatchGeometry, model_config


class PalmStage(Stage):
    """Stage two: decoder LM on the continuation of the encoder's context, plus encoder whole-word MLM during
    the first `stage.mlm_fraction` of the steps."""

    name, ordinal = "palm", "stage-two"
    objectives = (LM, MLM)
    generates, min_decoder_layers, vocab_projections = True, 1, 2  # the encoder's masked LM and the decoder's LM

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        p = cfg.stage
        # checked here, not only in the dataset, so that a bad range fails before any rank starts
        self.src_len, self.tgt_len = check_range("src_len", p.src_len), check_range("tgt_len", p.tgt_len)
        longest, key = max((self.src_len[1], "stage.src_len"), (self.tgt_len[1], "stage.tgt_len"))
        self.seq_len = longest  # the longest sequence a batch holds: the memory check's activations
        self.model_cfg = model_config(cfg.model, self.vocab_size, longest, self.activation_checkpointing,
                                      seq_len_key=f"{key}[1]")  # fmt: skip
        if self.model_cfg.copy:  # the copy mechanism copies source text, never a special token
            t = self.tokenizer
            excluded = (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id)
            self.model_cfg = dataclasses.replace(self.model_cfg, copy_excluded=excluded)
        if self.model_cfg.decoder_layers < self.min_decoder_layers:
            raise UserError(f"model.decoder_layers={self.model_cfg.decoder_layers}: stage={self.name} needs"
                            f" >= {self.min_decoder_layers}")  # fmt: skip
        if not 0.0 <= float(p.mlm_fraction) <= 1.0:
            raise UserError(f"stage.mlm_fraction={p.mlm_fraction}: must be in [0, 1]")
        self.group_steps, self.snap = int(p.group_steps), float(p.snap)
        if self.group_steps < 1:
            raise UserError(f"stage.group_steps={p.group_steps}: must be >= 1")
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
        return init_sources.init_source(str(self.init_from), self._meta_shapes(), self.model_cfg, self.tokenizer.vocab_path)

    @classmethod
    def model_class(cls):
        return Palm

    @classmethod
    def hf_export(cls):
        return PalmExport

    def dataset(self, corpus: IndexedCorpus, seed: int, mlm_until: int) -> PalmDataset:
        return PalmDataset(corpus, src_len=self.src_len, tgt_len=self.tgt_len, seed=seed, mlm_cfg=self.objective_cfg,
                           mlm_until=mlm_until, snap=self.snap, **self._token_ids())  # fmt: skip

    def train_dataset(self, geometry: BatchGeometry):
        mlm_until = self.mlm_steps * geometry.global_batch  # in the run's samples, whichever source they come from
        return self._train_blend(lambda corpus, seed, own_count: self.dataset(corpus, seed, own_count(mlm_until)))

    def valid_dataset(self, corpus: IndexedCorpus, seed: int, step: int) -> PalmDataset:
        """Validation follows the phase of the step: masked encoder input while MLM is on, clean after."""
        return self.dataset(corpus, seed, mlm_until=sys.maxsize if self.mlm_active(step) else 0)

    def train_sampler(self, data, geometry: BatchGeometry, rank: int, start_step: int,
                      max_steps: int | None = None) -> LengthGroupedStepSampler:  # fmt: skip
        """Steps grouped by length within pools (few padded tokens), the pools never straddling the masked-LM
        switch: the same samples per step whatever the number of ranks."""
        return LengthGroupedStepSampler(
            data.lengths, micro_batch=geometry.micro, grad_accum=geometry.accum, world_size=geometry.world,
            rank=rank, start_step=start_step, max_steps=self.max_steps if max_steps is None else max_steps,
            group_steps=self.group_steps, seed=self.seed, boundary_step=self.mlm_steps,
        )  # fmt: skip

    def token_counts(self, batch: dict) -> tuple[int, int]:
        enc, dec = batch["enc_attention_mask"], batch["dec_attention_mask"]
        return int(enc.sum() + dec.sum()), enc.numel() + dec.numel()

    def train_flops(self, batch: dict) -> int:
        """The model FLOPs of training on a host batch (training/flops.py)."""
        return flops.palm_train_flops(self.model_cfg, batch, self.objectives)

    def sample_row(self, data, g: int) -> dict:
        """The encoder input and its MLM targets, the decoder input and labels (null where a position predicts
        nothing), the drawn and realised lengths, whether the target ends its document, whether masked LM is
        active, and the context and target as the corpus has them (and a blend's source)."""
        ds, j, source = source_sample(data, g)
        s, span, tok = ds[j], ds.sample_spans(j), self.tokenizer
        enc, dec_in, dec_lab = s["enc_input_ids"].tolist(), s["dec_input_ids"].tolist(), s["dec_labels"].tolist()
        return {
            **({} if source is None else {"source": source}),
            "enc_input_ids": enc, "enc_tokens": [tok.id_to_token(i) for i in enc], "mlm": targets_of(s["mlm_labels"], tok),
            "mlm_active": j < ds.mlm_until,
            "dec_input_ids": dec_in, "dec_tokens": [tok.id_to_token(i) for i in dec_in],
            "dec_labels": [None if i == IGNORE else i for i in dec_lab],
            "dec_label_tokens": [None if i == IGNORE else tok.id_to_token(i) for i in dec_lab],
            "drawn_lengths": list(span["drawn"]), "realised_lengths": list(span["realised"]),
            "ends_document": span["ends_document"], "moved_to_longer_document": span["moved"],
            "context": corpus_span(ds, (span["start"], span["split"]), tok),
            "target": corpus_span(ds, (span["split"], span["end"]), tok),
        }  # fmt: skip

    def sample_overview(self, data, indices: list[int]) -> list[str]:
        """The drawn and realised lengths, where contexts and targets end, and the share with masked LM."""
        samples = [source_sample(data, g)[:2] for g in indices]
        r = length_report(samples)
        return render_lengths(r) + [
            f"  contexts ending on a sentence end: {r['context_ends_sentence']:.1%}; targets: {r['target_ends_sentence']:.1%}; "
            f"targets ending where their document ends ([SEP]): {r['target_ends_document']:.1%}",
            f"  samples moved to a document long enough for their lengths: {r['moved_to_longer_document']:.1%}",
            f"  samples with masked LM on the encoder: {np.mean([j < ds.mlm_until for ds, j in samples]):.1%}"]
