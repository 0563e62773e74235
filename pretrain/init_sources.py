"""`init_from=`: where a run's first weights come from, in one place. Every prefix is defined here and only here:

    <run dir or checkpoint>   a run of ours (DeepSpeed ZeRO-3 checkpoint; each rank reads its own partitions)
    hf:<dir>                  a local transformers BERT or MegatronBERT directory (pretrain/hf/load.py)
    plug:<dir>                AliceMind PLUG's tensor-parallel shards (pretrain/plug/read.py)

Each maps to a training.init_from.InitSource, checked against our model before any rank starts; a directory of
another project carries its own reader, so training/ never imports hf/ or plug. A new kind of source is one more
prefix here and a function that returns an InitSource (docs/extending.md).
"""
from __future__ import annotations

from pretrain.errors import UserError
from pretrain.hf import load as hf_load
from pretrain.models.config import ModelConfig
from pretrain.plug.read import plug_source
from pretrain.training import init_from
from pretrain.training.init_from import InitSource

HF = "hf:"
PLUG = "plug:"


def init_source(arg: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig,
                vocab_path: str | None = None) -> InitSource:  # fmt: skip
    """Pre-training from `arg` (init_from=): our shapes and, given vocab_path, the data's vocab checked."""
    if arg.startswith(HF):
        return hf_load.hf_source(arg, arg[len(HF):], target_shapes, cfg, vocab_path)
    if arg.startswith(PLUG):
        return plug_source(arg, arg[len(PLUG):], target_shapes, cfg, vocab_path)
    return init_from.checkpoint_source(arg, target_shapes, cfg, vocab_path)


def finetune_source(arg: str, target_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, vocab_path: str,
                    needs_stage_two: bool, fresh: tuple[str, ...] = ()) -> InitSource:
    """Fine-tuning (pretrain.finetune) from `arg`: the encoder (and for generation the whole PALM) is carried by
    name, the task's new layer is fresh, and so is every parameter whose name starts with one of `fresh`."""
    where = f"init_from={arg}"
    if arg.startswith(HF):
        if needs_stage_two:
            raise UserError(f"{where}: a generation task starts from a stage-two (palm) checkpoint, not a transformers directory")
        source = hf_load.hf_source(arg, arg[len(HF):], target_shapes, cfg, vocab_path)
    elif arg.startswith(PLUG):
        source = plug_source(arg, arg[len(PLUG):], target_shapes, cfg, vocab_path, needs_stage_two)
    else:
        source = init_from.finetune_checkpoint_source(arg, target_shapes, cfg, needs_stage_two)
    return source.restricted(target_shapes, fresh)


def of_another_project(arg: str) -> bool:
    """Whether `arg` names another project's directory (hf:, plug:) rather than a run of ours."""
    return arg.startswith((HF, PLUG))


def run_vocab(arg: str) -> str | None:
    """The vocab.txt of what `arg` names (a run directory, one of its checkpoints, hf:<dir>, plug:<dir>), if any."""
    return init_from.vocab_beside(arg.removeprefix(HF).removeprefix(PLUG))
