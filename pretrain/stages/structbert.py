"""Stage one: a StructBERT encoder trained on whole-word masked LM, the word structural objective (WSO) and the
sentence structural objective (SSO)."""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from pretrain import init_sources
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.masking import ObjectiveConfig
from pretrain.data.sources import source_sample
from pretrain.data.structbert import SSO_NEXT, SSO_PREVIOUS, SSO_RANDOM, StructBertDataset
from pretrain.errors import UserError
from pretrain.hf.export import EncoderExport
from pretrain.labels import IGNORE
from pretrain.models.structbert import StructBert
from pretrain.objectives import MLM, SSO, WSO
from pretrain.stages.base import Stage, corpus_span, targets_of
from pretrain.training import flops, init_from
from pretrain.training.config import BatchGeometry, model_config

SSO_NAMES = {SSO_RANDOM: "random", SSO_NEXT: "next", SSO_PREVIOUS: "previous", IGNORE: None}


class StructBertStage(Stage):
    """Stage one: whole-word MLM + word structure + sentence structure on a StructBERT encoder."""

    name, ordinal = "structbert", "stage-one"
    objectives = (MLM, WSO, SSO)
    objective_config = ObjectiveConfig

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.seq_len = int(cfg.stage.seq_len)
        self.model_cfg = model_config(cfg.model, self.vocab_size, self.seq_len, self.activation_checkpointing)

    def init_source(self) -> init_from.InitSource | None:
        """None (random weights), or a transformers BERT/MegatronBERT directory (init_from=hf:<dir>) to continue
        pre-training from."""
        if self.init_from is None:
            return None
        if not str(self.init_from).startswith((init_sources.HF, init_sources.PLUG)):
            raise UserError(f"init_from={self.init_from}: stage one starts from random weights, from hf:<a transformers"
                            " BERT directory> or plug:<PLUG's shards> (a stage-one checkpoint is for stage=palm)")  # fmt: skip
        return init_sources.init_source(str(self.init_from), self._meta_shapes(), self.model_cfg, self.tokenizer.vocab_path)

    @classmethod
    def model_class(cls):
        return StructBert

    @classmethod
    def hf_export(cls):
        return EncoderExport

    def dataset(self, corpus: IndexedCorpus, seed: int) -> StructBertDataset:
        return StructBertDataset(corpus, seq_len=self.seq_len, seed=seed, cfg=self.objective_cfg, **self._token_ids())

    def train_dataset(self, geometry: BatchGeometry):
        return self._train_blend(lambda corpus, seed, _own_count: self.dataset(corpus, seed))

    def valid_dataset(self, corpus: IndexedCorpus, seed: int, step: int) -> StructBertDataset:
        return self.dataset(corpus, seed)

    def token_counts(self, batch: dict) -> tuple[int, int]:
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def train_flops(self, batch: dict) -> int:
        """The model FLOPs of training on a host batch (training/flops.py)."""
        return flops.structbert_train_flops(self.model_cfg, batch, self.objectives)


    def sample_row(self, data, g: int) -> dict:
        """The input as ids and tokens, the token types, the MLM and word-structure (WSO) targets, the SSO label and
        name, and A and B as the corpus has them (and a blend's source)."""
        ds, j, source = source_sample(data, g)
        s, tok = ds[j], self.tokenizer
        span_a, span_b, label = ds.sample_spans(j)
        ids = s["input_ids"].tolist()
        return {
            **({} if source is None else {"source": source}),
            "input_ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "token_type_ids": s["token_type_ids"].tolist(),
            "mlm": targets_of(s["mlm_labels"], tok), "wso": targets_of(s["wso_labels"], tok),
            "sso_label": label, "sso": SSO_NAMES[label],
            "a": corpus_span(ds, span_a, tok), "b": None if span_b is None else corpus_span(ds, span_b, tok),
        }  # fmt: skip

    def sample_overview(self, data, indices: list[int]) -> list[str]:
        """The SSO label shares, and how much of the text masked LM and WSO corrupt."""
        labels, counts = [], np.zeros(5, np.int64)  # text tokens, MLM targets, WSO targets, WSO moved, windows
        for ds, j, _ in (source_sample(data, g) for g in indices):
            labels.append(ds.sample_spans(j)[2])
            s = ds[j]
            wso = s["wso_labels"] != IGNORE
            counts += [len(s["input_ids"]) - (2 if s["sso_label"] == IGNORE else 3),  # [CLS] A [SEP] (B [SEP])
                       int((s["mlm_labels"] != IGNORE).sum()), int(wso.sum()),
                       int((wso & (s["input_ids"] != s["wso_labels"])).sum()), int(wso.sum()) // self.objective_cfg.wso_k]
        labels, (text, mlm, wso, moved, windows) = np.array(labels), counts
        shares = ", ".join(f"{SSO_NAMES[k] or 'none (one-sentence document)'} {np.mean(labels == k):.1%}" for k in SSO_NAMES)
        return [f"  SSO labels: {shares}",
                f"  of the text tokens: masked LM predicts {mlm / text:.1%}; WSO shuffles {windows / len(indices):.1f} windows "
                f"of {self.objective_cfg.wso_k} a sample, predicts {wso / text:.1%} and displaces {moved / text:.1%}"]
