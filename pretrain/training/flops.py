"""Model FLOPs of a training micro-batch, counted on the host from the batch's shapes (no device sync), and the
devices' peak throughput, for the `tflops` and `mfu` columns of the train rows.

The convention is the usual one for model FLOPs utilisation (Megatron-LM's, PaLM's MFU): only the matrix
multiplications count, 2 FLOPs per multiply-add; embedding lookups, layer norms, softmax, GELU, dropout, biases and
the loss are not counted. What is computed is counted: the position-wise work (projections, FFN) runs on the real
tokens only where a batch has padding (models/fast_paths.Packing), attention over the padded square.
With h = model.hidden, f = model.ffn, V = the (padded) vocabulary, per forward of a micro-batch of B samples
padded to S encoder and T decoder slots, of which N and M hold real tokens:

- encoder layer: 2·N·(4h² + 2·h·f) for the QKV and output projections and the FFN, plus 2·2·B·S²·h for the
  attention (QKᵀ and PV).
- decoder layer (stage two): self-attention projections 2·M·4h², cross-attention query and output projections
  2·M·2h², cross-attention key/value projections 2·N·2h² (on the encoder's tokens), FFN 2·M·2·h·f,
  self-attention scores 2·2·B·T²·h counted in full (the causal half is computed too:
  SDPA on CPU, and the math reference, mask a full T×T product; a causal GPU kernel skips about half of it, so
  the figure there is a little high), cross-attention 2·2·B·T·S·h.
- heads: the models project the vocabulary only at predicted positions. The MLM head (dense h² + vocabulary h·V)
  at each position with a label (stage one: an MLM or a word-structure label; stage two: an MLM label on the
  encoder), stage two's LM projection h·V at each decoder position with a label, stage one's sentence head
  (pooler h² + classifier h·sso_classes) once per sample, each ×2. Stage two's frozen sentence head is not run.
  With model.copy (PALM's pointer-generator, not PLUG's): the context 2·B·T·S·h and the gate 2·2h per label.

Training is forward × 3 (the backward is twice the forward). With activation checkpointing every encoder and
decoder layer is run forward once more in the backward: ×4 for the layers, the heads staying ×3. The recompute is
work the device does, so it is counted (PaLM would call the ratio to the peak hardware FLOPs utilisation, HFU,
keeping MFU for the ×3 figure). One exception, not modelled: torch's non-reentrant checkpoint stops recomputing
once it has every tensor the backward needs, and with pre-LN and dropout 0 nothing needs the FFN's output, so its
down projection (2·B·S·h·f a layer) is not recomputed; with dropout > 0 (every conf/model option) or post-LN it is.

tests/test_flops.py checks all of this against torch's FlopCounterMode on the real models.
"""
from __future__ import annotations

import torch

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.objectives import LM, MLM, SSO, WSO, Objective, head_flops

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (no sparsity), matched in this order on a substring of
# torch.cuda.get_device_name(). MFU is against this peak whatever the run's precision (the usual convention), so an
# fp32 run's MFU is low by construction. The PCIe cards run slower clocks than the SXM ones the short names mean.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),  # the H100's chip with more and faster memory
    ("A100", 312.0),
    ("V100-PCIE", 112.0),
    ("V100", 125.0),
)


def encoder_layer_flops(cfg: ModelConfig, b: int, s: int, n: int | None = None) -> int:
    """One encoder layer's forward over B samples of S token slots, n of them real (None: all)."""
    h, f, n = cfg.hidden, cfg.ffn, b * s if n is None else n
    return 2 * n * (4 * h * h + 2 * h * f) + 2 * 2 * b * s * s * h


def decoder_layer_flops(cfg: ModelConfig, b: int, t: int, s: int, m: int | None = None, n: int | None = None) -> int:
    """One decoder layer's forward over B samples of T decoder and S encoder token slots, m and n of them real."""
    h, f = cfg.hidden, cfg.ffn
    m, n = b * t if m is None else m, b * s if n is None else n
    projections = 2 * m * (4 * h * h + 2 * h * h + 2 * h * f) + 2 * n * 2 * h * h
    return projections + 2 * 2 * b * t * t * h + 2 * 2 * b * t * s * h


def structbert_forward_flops(cfg: ModelConfig, batch: dict,
                             objectives: tuple[Objective, ...] = (MLM, WSO, SSO)) -> tuple[int, int]:  # fmt: skip
    """(layers, heads): stage one's forward FLOPs of a micro-batch, split as activation checkpointing needs; the
    heads are the objectives' (pretrain/objectives.py: a masked-LM and a word-structure label never share a
    position, so the shared head's cost is theirs summed)."""
    b, s = batch["input_ids"].shape
    layers = cfg.layers * encoder_layer_flops(cfg, b, s, int(batch["attention_mask"].sum()))
    return layers, head_flops(objectives, cfg, batch)


def palm_forward_flops(cfg: ModelConfig, batch: dict, objectives: tuple[Objective, ...] = (LM, MLM)) -> tuple[int, int]:
    """(layers, heads): stage two's forward FLOPs of a micro-batch."""
    b, s = batch["enc_input_ids"].shape
    t = batch["dec_input_ids"].shape[1]
    h = cfg.hidden
    n, m = int(batch["enc_attention_mask"].sum()), int(batch["dec_attention_mask"].sum())
    layers = cfg.layers * encoder_layer_flops(cfg, b, s, n) + cfg.decoder_layers * decoder_layer_flops(cfg, b, t, s, m, n)
    heads = head_flops(objectives, cfg, batch)
    if cfg.copy:  # the pointer-generator's context and gate, per decoder label
        heads += 2 * b * t * s * h + 2 * int((batch[LM.labels] != IGNORE).sum()) * 2 * h
    return layers, heads


def train_flops(cfg: ModelConfig, forward: tuple[int, int]) -> int:
    """Forward, backward (twice the forward) and, with activation checkpointing, the layers' recompute."""
    layers, heads = forward
    return (4 if cfg.activation_checkpointing else 3) * layers + 3 * heads


def structbert_train_flops(cfg: ModelConfig, batch: dict, objectives: tuple[Objective, ...] = (MLM, WSO, SSO)) -> int:
    return train_flops(cfg, structbert_forward_flops(cfg, batch, objectives))


def palm_train_flops(cfg: ModelConfig, batch: dict, objectives: tuple[Objective, ...] = (LM, MLM)) -> int:
    return train_flops(cfg, palm_forward_flops(cfg, batch, objectives))


def lookup_peak(device_name: str) -> float | None:
    """The table's peak for a device name, None when it has none."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def peak_tflops(override: float | None) -> float | None:
    """train.peak_tflops if given, else this GPU's peak from the table; None on CPU or an unknown GPU (no MFU)."""
    if override is not None:
        return override

    if not torch.cuda.is_available():
        return None
    return lookup_peak(torch.cuda.get_device_name())
