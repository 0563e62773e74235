"""PLUG's state dict of our model: each tensor's name there and ours, and how a tensor-parallel rank's piece is cut
from it (the rules: pretrain/plug/__init__.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pretrain.models.config import ModelConfig

VOCAB_DIVISOR = 128  # PLUG's --make-vocab-size-divisible-by (arguments.py), times the tensor-parallel size
SHARD = "mp_rank_{:02d}_model_states.pt"
SHARD_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
COLUMN, ROW, VOCAB, WHOLE = "column", "row", "vocab", "replicated"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FP16_MAX = 65504.0
WORD = "bert.embeddings.word_embeddings.weight"
TIED = "cls.predictions.decoder_weight"  # PLUG's alias of WORD (a second name of the same parameter)


@dataclass(frozen=True)
class Entry:
    """One tensor of PLUG's state dict: its name, ours (None: we have no such tensor, the identity is written),
    how it is split over the tensor-parallel ranks, and the stride of that split."""

    plug: str
    ours: str | None
    split: str = WHOLE
    stride: int = 1

    @property
    def dim(self) -> int | None:
        """The dimension split over the ranks (None: replicated)."""
        return {COLUMN: 0, VOCAB: 0, ROW: 1}.get(self.split)

    @property
    def is_norm(self) -> bool:
        return "layernorm" in self.plug.lower()


def _linear(plug: str, ours: str, split: str = WHOLE, stride: int = 1) -> list[Entry]:
    """An nn.Linear, ColumnParallelLinear (split with its bias) or RowParallelLinear (its bias whole)."""
    return [Entry(f"{plug}.weight", f"{ours}.weight", split, stride),
            Entry(f"{plug}.bias", f"{ours}.bias", WHOLE if split == ROW else split, stride)]  # fmt: skip


def _norm(plug: str, ours: str | None) -> list[Entry]:
    return [Entry(f"{plug}.{p}", None if ours is None else f"{ours}.{p}") for p in ("weight", "bias")]


def layout(cfg: ModelConfig, decoder: bool) -> list[Entry]:
    """PLUG's state dict of our model, in PLUG's order: BertForPreTraining's names for an encoder (stage one),
    PalmForPreTraining's (the same plus `decoder.decoder.*`) for an encoder-decoder (stage two).

    Where a stage is passed below (export), it is the stage's class: its `generates` says whether its model has
    the decoder, its `name` is recorded in config.json."""
    e = "bert.embeddings."
    out = [
        Entry(WORD, "encoder.embeddings.word.weight", VOCAB),
        Entry(f"{e}position_embeddings.weight", "encoder.embeddings.position.weight"),
        Entry(f"{e}token_type_embeddings.weight", "encoder.embeddings.token_type.weight"),
        *_norm(f"{e}LayerNorm", "encoder.embeddings.norm" if cfg.normed_embeddings else None),
    ]
    for i in range(cfg.layers):
        p, o = f"bert.encoder.layer.{i}.", f"encoder.layers.{i}."
        qkv = _linear(f"{p}attention.self.query_key_value", f"{o}attn.qkv", COLUMN, 3)
        attn_out = _linear(f"{p}attention.output.dense", f"{o}attn.out", ROW)
        ffn = _linear(f"{p}intermediate.dense", f"{o}ffn.up", COLUMN) + _linear(f"{p}output.dense", f"{o}ffn.down", ROW)
        if cfg.pre_ln:  # BertAttention.LayerNorm before attention, BertLayer.LayerNorm before the FFN
            out += _norm(f"{p}attention.LayerNorm", f"{o}attn_norm") + qkv + attn_out + ffn[:2] + ffn[2:]
            out += _norm(f"{p}LayerNorm", f"{o}ffn_norm")
        else:  # post-LN: BertSelfOutput.LayerNorm and BertOutput.LayerNorm, after each residual
            out += qkv + attn_out + _norm(f"{p}attention.output.LayerNorm", f"{o}attn_norm") + ffn
            out += _norm(f"{p}output.LayerNorm", f"{o}ffn_norm")
    if cfg.pre_ln:
        out += _norm("bert.encoder.LayerNorm", "encoder.final_norm")
    out += _linear("bert.pooler.dense", "sentence_head.pooler")
    out += [Entry(TIED, "encoder.embeddings.word.weight", VOCAB), Entry("cls.predictions.bias", "mlm_head.bias", VOCAB)]
    out += _linear("cls.predictions.transform.dense", "mlm_head.dense")
    out += _norm("cls.predictions.transform.LayerNorm", "mlm_head.norm")
    out += _linear("cls.seq_relationship", "sentence_head.classifier")
    if not decoder:
        return out
    for j in range(cfg.decoder_layers):
        p, o = f"decoder.decoder.layer.{j}.", f"decoder.layers.{j}."
        out += _linear(f"{p}attention.query_key_value", f"{o}self_attn.qkv", COLUMN, 3)
        out += _linear(f"{p}attention.dense", f"{o}self_attn.out", ROW)
        out += _linear(f"{p}cross_attention.query", f"{o}cross_attn.q", COLUMN)
        out += _linear(f"{p}cross_attention.key_value", f"{o}cross_attn.kv", COLUMN, 2)
        out += _linear(f"{p}cross_attention.dense", f"{o}cross_attn.out", ROW)
        out += _norm(f"{p}input_layernorm", f"{o}self_attn_norm")  # before the self-attention
        out += _norm(f"{p}post_attention_layernorm", f"{o}cross_attn_norm")  # before the cross-attention
        out += _norm(f"{p}post_cross_attention_layernorm", f"{o}ffn_norm")  # before the FFN
        out += _linear(f"{p}intermediate", f"{o}ffn.up", COLUMN) + _linear(f"{p}output", f"{o}ffn.down", ROW)
    return out + _norm("decoder.decoder.final_layernorm", "decoder.final_norm")


def plug_vocab_size(tokens: int, tp: int) -> int:
    """PLUG's padded vocab: the tokens rounded up to a multiple of 128 x tp (21128 -> 21504 at tp 8)."""
    multiple = VOCAB_DIVISOR * tp
    return -(-tokens // multiple) * multiple


def piece(full: torch.Tensor, e: Entry, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor (a view), cut as PLUG's _initialize_affine_weight cuts it."""
    if e.dim is None:
        return full
    chunks = full.chunk(tp * e.stride, e.dim)  # equal: check_export checked the sizes divide
    return chunks[rank] if e.stride == 1 else torch.cat(chunks[rank::tp], e.dim)


def merge(pieces: list[torch.Tensor], e: Entry) -> torch.Tensor:
    """The full tensor from the ranks' pieces (the inverse of `piece`)."""
    if e.dim is None:
        return pieces[0]
    parts = [p.chunk(e.stride, e.dim) for p in pieces]
    return torch.cat([parts[r][j] for j in range(e.stride) for r in range(len(pieces))], e.dim)
