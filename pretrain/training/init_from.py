"""Stage two starts from stage one: a StructBERT ZeRO-3 checkpoint, written by any number of ranks, is
consolidated on rank 0 and copied into the partitioned PALM model one parameter at a time.

The encoder and its heads (MLM, sentence) keep their names across the stages, so the mapping is the identity on them;
the decoder is new, or (`model.decoder_init=encoder_top`) takes the self-attention and FFN of the top
encoder layers. Everything that can be wrong with `init_from` is checked from the checkpoint's recorded
parameter shapes, before any rank starts or writes, so a bad path costs one line, not a failed job.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.training import checkpoint

_DECODER_FROM_ENCODER = {"self_attn.": "attn.", "self_attn_norm.": "attn_norm.", "ffn.": "ffn.", "ffn_norm.": "ffn_norm."}


@dataclass(frozen=True)
class InitSource:
    """Where stage two's weights come from: a stage-one checkpoint, and which of its parameters each of ours takes."""

    tag_dir: str
    mapping: dict[str, str]  # our parameter -> the checkpoint's (missing: keeps its fresh init)
    fresh: tuple[str, ...]  # our parameters that keep their fresh init

    def report(self) -> dict[str, dict[str, int]]:
        """Parameter tensors carried from the checkpoint and left fresh, counted per top-level module."""
        def count(names):
            out: dict[str, int] = {}
            for name in names:
                out[name.split(".")[0]] = out.get(name.split(".")[0], 0) + 1
            return out
        return {"carried": count(self.mapping), "fresh": count(self.fresh)}


def init_source(init_from: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> InitSource:
    """The checkpoint `init_from` names (a run directory or a checkpoint), checked against our shapes."""
    tag_dir = checkpoint.find(init_from, "init_from")
    mapping = check(init_from, tag_dir, target_shapes, cfg)
    return InitSource(tag_dir, mapping, tuple(n for n in target_shapes if n not in mapping))


def source_names(target_names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Stage-two parameter -> the stage-one parameter it starts from (missing = keeps its fresh init)."""
    mapping = {n: n for n in target_names if n.startswith(("encoder.", "mlm_head.", "sentence_head."))}
    if cfg.decoder_init == "encoder_top":
        first = cfg.layers - cfg.decoder_layers  # decoder layer i <- encoder layer first + i
        for name in target_names:
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
            if not m:
                continue
            for dec, enc in _DECODER_FROM_ENCODER.items():
                if m.group(2).startswith(dec):
                    mapping[name] = f"encoder.layers.{first + int(m.group(1))}.{enc}{m.group(2)[len(dec):]}"
    return mapping


def check(init_from: str, tag_dir: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> dict[str, str]:
    """The mapping, once the checkpoint is known to be a stage-one model of this model's dimensions."""
    have = checkpoint.recorded_shapes(tag_dir, "init_from")
    where = f"init_from={init_from}"
    if any(n.startswith("decoder.") for n in have):
        raise UserError(f"{where}: a stage-two (palm) checkpoint; stage two starts from a stage-one (structbert) one")
    if not any(n.startswith("encoder.") for n in have):
        raise UserError(f"{where}: no encoder parameters; not a stage-one (structbert) checkpoint")
    if cfg.decoder_init == "encoder_top" and cfg.decoder_layers > cfg.layers:
        raise UserError(f"model.decoder_init=encoder_top: model.decoder_layers={cfg.decoder_layers} > model.layers={cfg.layers}")
    their_layers = len({m.group(1) for n in have if (m := re.match(r"encoder\.layers\.(\d+)\.", n))})
    if their_layers != cfg.layers:
        raise UserError(f"{where}: the checkpoint has {their_layers} encoder layers, model.layers={cfg.layers}")
    mapping = source_names(list(target_shapes), cfg)
    for target, source in mapping.items():
        if source not in have:
            raise UserError(f"{where}: the checkpoint has no {source} (model.pre_ln or the model differ)")
        if have[source] != target_shapes[target]:
            raise UserError(
                f"{where}: {source} is {list(have[source])} in the checkpoint, {list(target_shapes[target])} in this model"
                f" ({_likely_cause(source, have[source], target_shapes[target], cfg)})"
            )
    return mapping


def _likely_cause(name: str, theirs: tuple, ours: tuple, cfg: ModelConfig) -> str:
    if name == "encoder.embeddings.word.weight" and theirs[0] != ours[0]:
        return f"vocab size {theirs[0]} vs {ours[0]}: the data or model.vocab_size differ"
    if name == "encoder.embeddings.position.weight" and theirs[0] != ours[0]:
        return f"model.max_positions={cfg.max_positions} vs {theirs[0]}"
    if theirs[-1] != ours[-1]:
        return f"model.hidden={cfg.hidden} vs {theirs[-1]}"
    return "model.ffn or model.heads differ"


def load_into(model: torch.nn.Module, source: InitSource, rank: int) -> None:
    """Copy the mapped stage-one weights into the ZeRO-3-partitioned model: only rank 0 holds the
    consolidated checkpoint; one parameter at a time is gathered, set on rank 0 and re-partitioned."""
    import deepspeed

    weights = checkpoint.consolidate(source.tag_dir) if rank == 0 else None
    for name, param in model.named_parameters():  # the same order on every rank: gathering is collective
        if name not in source.mapping:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(weights[source.mapping[name]].to(param.dtype).view_as(param.data))
