"""Where our parameters sit in Hugging Face transformers' BERT and MegatronBERT, both ways.

Pre-LN (PLUG) is MegatronBERT: LayerNorm before attention and FFN (`attention.ln`, `ln`) and one after the last
layer (`encoder.ln`), none on the embeddings. Post-LN is BERT: LayerNorm after each residual
(`attention.output.LayerNorm`, `output.LayerNorm`) and on the embeddings. Our fused [Q; K; V] projection is
transformers' query, key and value, thirds along dim 0. The MLM head is `cls.predictions` (its decoder is the
tied word embedding), the sentence head's pooler is `bert.pooler`, its 3-way classifier `classifier`
(what AutoModelForSequenceClassification loads).
"""
from __future__ import annotations

import re

import torch

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig

SSO_LABELS = {0: "random", 1: "next", 2: "previous"}  # data/structbert.py's SSO_RANDOM, SSO_NEXT, SSO_PREVIOUS
HEADS = {
    "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_head.bias": "cls.predictions.bias",
    "sentence_head.pooler.weight": "bert.pooler.dense.weight",
    "sentence_head.pooler.bias": "bert.pooler.dense.bias",
    "sentence_head.classifier.weight": "classifier.weight",
    "sentence_head.classifier.bias": "classifier.bias",
}


def encoder_names(cfg: ModelConfig, prefix: str = "bert.") -> dict[str, str]:
    """Our encoder's parameter names -> transformers' (BERT or MegatronBERT), the fused QKV aside (split_qkv)."""
    names = {
        "encoder.embeddings.word.weight": "embeddings.word_embeddings.weight",
        "encoder.embeddings.position.weight": "embeddings.position_embeddings.weight",
        "encoder.embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    }
    if cfg.pre_ln:  # MegatronBERT: LayerNorm before attention and FFN, one after the last layer
        attn_norm, ffn_norm = "attention.ln", "ln"
        names.update({f"encoder.final_norm.{p}": f"encoder.ln.{p}" for p in ("weight", "bias")})
    else:  # BERT: after each residual, and on the embeddings
        attn_norm, ffn_norm = "attention.output.LayerNorm", "output.LayerNorm"
        names.update({f"encoder.embeddings.norm.{p}": f"embeddings.LayerNorm.{p}" for p in ("weight", "bias")})
    for i in range(cfg.layers):
        ours, theirs = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            names.update({
                f"{ours}attn.out.{p}": f"{theirs}attention.output.dense.{p}",
                f"{ours}attn_norm.{p}": f"{theirs}{attn_norm}.{p}",
                f"{ours}ffn.up.{p}": f"{theirs}intermediate.dense.{p}",
                f"{ours}ffn.down.{p}": f"{theirs}output.dense.{p}",
                f"{ours}ffn_norm.{p}": f"{theirs}{ffn_norm}.{p}",
            })  # fmt: skip
    return {k: prefix + v for k, v in names.items()}


def to_hf_plan(our_names, cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
    """Where each tensor of a stage-one state dict goes in transformers' layout: (their name, our name, which
    third of our fused [Q; K; V] it is, or None for the whole tensor). The parts of one tensor are consecutive."""
    names = {**encoder_names(cfg), **HEADS}
    plan = []
    for ours in our_names:
        if ours in names:
            plan.append((names[ours], ours, None))
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", ours)
        if m is None:  # a parameter we do not know how to place: refuse rather than drop it silently
            raise UserError(f"the checkpoint has {ours}, which the export does not know where to put")
        base = f"bert.encoder.layer.{m.group(1)}.attention.self."
        plan += [(f"{base}{part}.{m.group(2)}", ours, i) for i, part in enumerate(("query", "key", "value"))]
    return plan


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names for what a transformers BERT/MegatronBERT state dict holds (with or without the `bert.` prefix
    of the task classes): the encoder, and whichever heads it has. The fused QKV is concatenated back."""
    bare = not any(k.startswith("bert.") for k in tensors)
    names = {**encoder_names(cfg, prefix="" if bare else "bert."), **HEADS}
    if bare:
        names.update({k: v[len("bert."):] for k, v in HEADS.items() if v.startswith("bert.")})
    ours = {mine: tensors[theirs] for mine, theirs in names.items() if theirs in tensors}
    prefix = "" if bare else "bert."
    for i in range(cfg.layers):
        for p in ("weight", "bias"):
            base = f"{prefix}encoder.layer.{i}.attention.self."
            parts = [tensors.get(f"{base}{x}.{p}") for x in ("query", "key", "value")]
            if all(t is not None for t in parts):
                ours[f"encoder.layers.{i}.attn.qkv.{p}"] = torch.cat(parts, 0)
    return ours
