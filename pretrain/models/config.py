"""The model's shapes and switches, shared by both stages (stage two adds the decoder fields)."""
from __future__ import annotations

from dataclasses import dataclass

ATTENTION_IMPLS = ("sdpa", "math")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_positions: int = 512
    type_vocab: int = 3
    dropout: float = 0.1
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12
    init_std: float = 0.02
    pre_ln: bool = True
    # A LayerNorm after the embedding sum also in a pre-LN model (post-LN always has one), as PLUG's released model
    # has (`bert.embeddings.LayerNorm`): what its weights were trained with, so importing or exporting them needs it
    embedding_norm: bool = False
    sso_classes: int = 3
    activation_checkpointing: bool = False  # recompute each layer in backward: memory for compute
    decoder_layers: int = 0  # stage two (PALM) only
    decoder_init: str = "random"  # random | encoder_top (copy the top encoder layers' self-attention and FFN)
    copy: bool = False  # PALM's pointer-generator over the source tokens (PLUG does not use it)
    copy_excluded: tuple[int, ...] = ()  # with copy: ids never copied (the tokenizer's specials, [MASK] among them)
    attention: str = "sdpa"  # sdpa (fused kernels on GPU) | math (the plain reference, see `attend`)
    unpad: bool | None = None  # position-wise work on real tokens only (fast_paths.Packing); None: by device type

    def __post_init__(self):
        object.__setattr__(self, "copy_excluded", tuple(int(i) for i in self.copy_excluded))  # a list in model.json

    @property
    def normed_embeddings(self) -> bool:
        """Whether the encoder normalises its embedding sum: post-LN always, pre-LN with embedding_norm."""
        return not self.pre_ln or self.embedding_norm

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads
