"""Stage two starts from stage one: a StructBERT ZeRO-3 checkpoint, written by any number of ranks, is
consolidated on rank 0 and copied into the partitioned PALM model one parameter at a time.

The encoder (and its MLM head) keep their names across the stages, so the mapping is the identity on them;
the decoder is new, or (`model.decoder_init=encoder_top`) takes the self-attention and FFN of the top
encoder layers. Everything that can be wrong with `init_from` is checked from the checkpoint's recorded
parameter shapes, before any rank starts or writes, so a bad path costs one line, not a failed job.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re

import torch

from pretrain.errors import UserError
from pretrain.model import ModelConfig

_DECODER_FROM_ENCODER = {"self_attn.": "attn.", "self_attn_norm.": "attn_norm.", "ffn.": "ffn.", "ffn_norm.": "ffn_norm."}


def resolve(path: str) -> str:
    """The checkpoint directory `init_from` names: a run directory (its newest checkpoint) or a checkpoint."""
    if not os.path.isdir(path):
        raise UserError(f"init_from={path}: no such directory")
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            path = os.path.join(path, "checkpoints", f.read().strip())
    if not glob.glob(os.path.join(path, "*mp_rank_00_model_states.pt")):
        raise UserError(f"init_from={path}: neither a run directory with checkpoints/latest nor a DeepSpeed checkpoint")
    return path


def recorded_shapes(tag_dir: str) -> dict[str, tuple[int, ...]]:
    """Every parameter's full (unpartitioned) shape, as DeepSpeed records it beside rank 0's partition."""
    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    shapes = {}
    for group in state.get("param_shapes") or []:
        shapes.update({name: tuple(shape) for name, shape in group.items()})
    if not shapes:
        raise UserError(f"init_from={tag_dir}: the checkpoint records no parameter shapes (not a ZeRO-3 checkpoint?)")
    return shapes


def source_names(target_names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Stage-two parameter -> the stage-one parameter it starts from (missing = keeps its fresh init)."""
    mapping = {n: n for n in target_names if n.startswith(("encoder.", "mlm_head."))}
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
    have = recorded_shapes(tag_dir)
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


def consolidate(tag_dir: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO checkpoint, whatever number of ranks wrote it (DeepSpeed's own tool)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its per-shard progress report
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir))


def load_into(model: torch.nn.Module, tag_dir: str, mapping: dict[str, str], rank: int) -> None:
    """Copy the mapped stage-one weights into the ZeRO-3-partitioned model: only rank 0 holds the
    consolidated checkpoint; one parameter at a time is gathered, set on rank 0 and re-partitioned."""
    import deepspeed

    source = consolidate(tag_dir) if rank == 0 else None
    for name, param in model.named_parameters():  # the same order on every rank: gathering is collective
        if name not in mapping:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(source[mapping[name]].to(param.dtype).view_as(param.data))
