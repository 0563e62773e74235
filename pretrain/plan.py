"""Memory plan for ZeRO-3 training: does the model fit, and on how few nodes?

    python -m pretrain.plan model=plug nodes=4 gpus_per_node=8 gpu_mem_gb=32 seq_len=512 micro_batch=1 \
        [stage=structbert|palm] [activation_checkpointing=true] [vocab_size=N] [max_nodes=1024] [json=true] \
        [model.<field>=...]   (e.g. model.attention=math: the plain attention, which keeps the s x s scores)
        [deepspeed=zero3_v100|zero3_bf16|zero3_cpu] [precision=fp16|bf16|fp32]  (the hardware profile whose ZeRO-3
        buffers are counted, "auto" sizes filled from the model's width; precision: the profile's unless given)
    python -m pretrain.plan model=plug stage=palm generate=true nodes=1 gpus_per_node=8 gpu_mem_gb=16 \
        seq_len=512 micro_batch=8 new_tokens=128 [num_beams=1] [precision=bf16|fp16|fp32] [max_live_parameters=1e9]
        (pretrain.generate's memory per rank, as it runs with those settings: generation_plan)

Parameters: the model the trainer would build, on the meta device. Model states per GPU: DeepSpeed's own
ZeRO-3 estimator. Activations: activation_bytes' formula. ZeRO-3 buffers: buffer_bytes'. The model lives in
pretrain/training/memory.py, where the trainer's check before the model is built (train.memory_check) uses it too.
GiB (2**30 bytes) throughout, as DeepSpeed prints.
"""
from __future__ import annotations

import functools
import json
import os
import sys

from omegaconf import OmegaConf

from pretrain import cli
from pretrain.errors import UserError, exit_on_user_error
from pretrain.models.config import ModelConfig
from pretrain.stages import STAGES, stage_class
from pretrain.training import memory
from pretrain.training.config import model_config
from pretrain.training.memory import BYTES, CUDA_CONTEXT_GB, RESERVE_FRACTION, GiB

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
MODEL_DIR, DEEPSPEED_DIR = os.path.join(CONF_DIR, "model"), os.path.join(CONF_DIR, "deepspeed")
DEFAULTS = {"model": None, "stage": next(iter(STAGES)), "nodes": 1, "gpus_per_node": 8, "gpu_mem_gb": 32.0,
            "seq_len": 512, "micro_batch": 1, "activation_checkpointing": False, "vocab_size": None,
            "max_nodes": 1024, "json": False, "generate": False, "new_tokens": 128, "num_beams": 1,
            "precision": None, "max_live_parameters": 10**9, "deepspeed": "zero3_v100"}  # fmt: skip
# generate=true's own keys (its plan: generation_plan), as pretrain.generate takes them. max_live_parameters: ZeRO-3
# gathers a module's parameters as it runs it, prefetching the next ones, and keeps at most this many gathered
# (DeepSpeed's stage3_max_live_parameters; its default, 1e9, is pretrain.generate's).
# precision: generation's, bf16 unless given; a training plan's, the deepspeed profile's unless given.
GENERATION_KEYS = ("generate", "new_tokens", "num_beams", "precision", "max_live_parameters")


@functools.lru_cache(maxsize=8)
def count_model(cfg: ModelConfig, stage: str) -> memory.ModelCount:
    """The model the trainer builds for this stage, counted on the meta device (training/memory.py count_model)."""
    return memory.count_model(lambda: stage_class(stage).model_class()(cfg))


def model_states_bytes(total: int, largest: int, nodes: int, gpus_per_node: int, element: int = 2) -> int:
    return memory.model_states_bytes(total, largest, nodes, gpus_per_node, element)


def activation_bytes(cfg: ModelConfig, stage: str, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """16-bit activations per GPU of this stage's model (training/memory.py activation_bytes has the formula)."""
    stage_cls = stage_class(stage)
    return memory.activation_bytes(cfg, stage_cls.generates, stage_cls.vocab_projections, seq_len, micro_batch,
                                   checkpointing)  # fmt: skip


usable_bytes = memory.usable_bytes


def smallest_nodes(need, usable: int, max_nodes: int):
    """Fewest nodes whose per-GPU need(nodes) (model states + activations + ZeRO-3 buffers) fits, or None up to
    max_nodes. Model states only shrink as nodes are added, activations do not depend on them, and the buffers grow
    only from one rank to several: so the first fit is the answer."""
    return next((n for n in range(1, max_nodes + 1) if need(n) <= usable), None)


def _check(key: str, value, ok: bool, want: str) -> None:
    if not ok:
        raise UserError(f"{key}={value}: must be {want}")


def parse(argv: list[str]) -> tuple[dict, ModelConfig]:
    """key=value arguments -> (settings, the ModelConfig the trainer would build). model.<field>=value overrides
    a field of conf/model/<model>.yaml (checked against that file here)."""
    given, extra = cli.parse(argv, DEFAULTS, command="pretrain.plan", doc=__doc__, open_prefixes=("model.",))
    args, overrides = OmegaConf.to_container(given), extra["model."]
    models = sorted(n[: -len(".yaml")] for n in os.listdir(MODEL_DIR) if n.endswith(".yaml"))
    _check("model", args["model"], args["model"] in models, f"one of {', '.join(models)} (conf/model/)")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (YAML reads true as a bool)
    for key in ("nodes", "gpus_per_node", "seq_len", "micro_batch", "max_nodes", "new_tokens", "num_beams",
                "max_live_parameters"):
        _check(key, args[key], is_int(args[key]) and args[key] >= 1, "an integer >= 1")
    g = args["gpu_mem_gb"]
    _check("gpu_mem_gb", g, (is_int(g) or isinstance(g, float)) and g > 0, "a number > 0")
    for key in ("activation_checkpointing", "json", "generate"):
        _check(key, args[key], isinstance(args[key], bool), "true or false")
    _check("stage", args["stage"], args["stage"] in STAGES, " or ".join(STAGES))
    _check("precision", args["precision"], args["precision"] is None or args["precision"] in BYTES, " or ".join(BYTES))
    profiles = sorted(n[: -len(".yaml")] for n in os.listdir(DEEPSPEED_DIR) if n.endswith(".yaml"))
    _check("deepspeed", args["deepspeed"], args["deepspeed"] in profiles, f"one of {', '.join(profiles)} (conf/deepspeed/)")
    m = OmegaConf.load(os.path.join(MODEL_DIR, f"{args['model']}.yaml"))
    for key, value in overrides.items():
        _check(f"model.{key}", value, key in m, f"a field of conf/model/{args['model']}.yaml")
        m[key] = value
    for key in ("hidden", "layers", "heads", "ffn", "max_positions", "type_vocab", "decoder_layers"):
        lo = 1 if key != "decoder_layers" else stage_class(args["stage"]).min_decoder_layers
        _check(f"model.{key}", m[key], is_int(m[key]) and m[key] >= lo, f"an integer >= {lo}")
    # vocab_size: the prepared corpus's (meta.json), padded as the trainer pads it; plug fixes its own.
    if m.vocab_size is None and args["vocab_size"] is None:
        raise UserError(f"model={args['model']} takes its vocab from the data: give vocab_size=<prepared vocab size>")
    v = args["vocab_size"]
    _check("vocab_size", v, v is None or (is_int(v) and v >= 1), "an integer >= 1")
    cfg = model_config(m, args["vocab_size"] or 0, args["seq_len"], args["activation_checkpointing"], "seq_len")
    return args, cfg


def generation_bytes(cfg: ModelConfig, total: int, largest: int, ranks: int, src_len: int, new_tokens: int,
                     batch: int, beams: int, element: int = 2, max_live: int = 10**9) -> dict[str, int]:  # fmt: skip
    """pretrain.generate's memory per rank, `element` bytes a number (2: bf16/fp16, 4: fp32), no optimizer state:
      weights   this rank's partition of every parameter, P/N
      gathered  the parameters ZeRO-3 holds whole while it runs and prefetches modules: at most max_live, and at
                least the largest module (none on one rank, which holds them all)
      cache     every decoder layer's keys and values: self-attention's over the new tokens, cross-attention's
                over the source, for batch x beams sequences: 2 (k, v) x layers x (T + S) x h
      working   the encoder's output, the widest activation of one layer (batch x source x FFN), and the fp32
                next-token scores (batch x beams x vocab): held while a step runs"""
    rows, h, e = batch * beams, cfg.hidden, element
    parts = {
        "weights": e * -(-total // ranks),
        "gathered": 0 if ranks == 1 else e * max(largest, min(total, max_live)),
        "cache": e * 2 * cfg.decoder_layers * (new_tokens + src_len) * h * rows,
        "working": e * batch * src_len * (h + cfg.ffn) + e * rows * src_len * h + 4 * rows * cfg.vocab_size,
    }
    return {**parts, "total": sum(parts.values())}


def generation_plan(args: dict, cfg: ModelConfig) -> dict:
    """generate=true: the memory per rank of pretrain.generate on nodes x gpus_per_node ranks, and the fewest nodes
    it fits on."""
    stage = stage_class(args["stage"])
    if not stage.generates:
        raise UserError(f"generate=true: stage={args['stage']} does not generate (its model has no decoder)")
    _check("new_tokens", args["new_tokens"], args["new_tokens"] <= cfg.max_positions,
           f"at most model.max_positions={cfg.max_positions}")  # fmt: skip
    counted, per_node = count_model(cfg, args["stage"]), args["gpus_per_node"]
    total, largest = counted.total, counted.largest
    args = {**args, "precision": args["precision"] or "bf16"}
    need = lambda nodes: generation_bytes(cfg, total, largest, nodes * per_node, args["seq_len"], args["new_tokens"],  # noqa: E731
                                          args["micro_batch"], args["num_beams"], BYTES[args["precision"]],
                                          args["max_live_parameters"])  # fmt: skip
    usable, parts = usable_bytes(args["gpu_mem_gb"]), need(args["nodes"])
    fits = (n for n in range(1, args["max_nodes"] + 1) if need(n)["total"] <= usable)
    return {
        **{k: args[k] for k in DEFAULTS if k not in ("json", "deepspeed")}, "model_class": stage.model_class().__name__,
        "vocab_size": cfg.vocab_size, "total_params": total, "largest_layer_params": largest,
        "per_rank_bytes": parts, "usable_bytes": usable, "fits": parts["total"] <= usable, "min_nodes": next(fits, None),
    }  # fmt: skip


def _gib(x: int) -> str:
    return f"{x / GiB:.2f} GiB"


def _head(p: dict, what: str = "") -> list[str]:
    """The lines both plans open with: the model, its parameters, the GPUs."""
    return [
        f"model             {p['model']}, stage {p['stage']} ({p['model_class']}), vocab {p['vocab_size']}{what}",
        f"parameters        {p['total_params']:,} (largest layer {p['largest_layer_params']:,})",
        f"GPUs              {p['nodes']} nodes x {p['gpus_per_node']} x {p['gpu_mem_gb']:g} GiB;"
        f" usable {_gib(p['usable_bytes'])} ({RESERVE_FRACTION:.0%} + {CUDA_CONTEXT_GB:g} GiB reserved)",
    ]  # fmt: skip


def render_generation(p: dict) -> str:
    parts, n = p["per_rank_bytes"], p["min_nodes"]
    smallest = "none" if n is None else f"{n} ({n * p['gpus_per_node']} GPUs)"
    return "\n".join([
        *_head(p, ": generation"),
        f"per rank          weights {_gib(parts['weights'])} ({p['precision']} partition), gathered {_gib(parts['gathered'])},"
        f" cache {_gib(parts['cache'])}, working {_gib(parts['working'])}",
        f"total/GPU         {_gib(parts['total'])} at batch {p['micro_batch']} x beams {p['num_beams']}, source"
        f" {p['seq_len']}, {p['new_tokens']} new tokens: {'fits' if p['fits'] else 'does NOT fit'}",
        f"smallest nodes    {smallest} (of 1..{p['max_nodes']})",
    ])  # fmt: skip


def plan(argv: list[str]) -> dict:
    """The plan for these arguments, as the dict json=true prints."""
    args, cfg = parse(argv)
    if args["generate"]:
        return generation_plan(args, cfg)
    counted, stage = count_model(cfg, args["stage"]), stage_class(args["stage"])
    profile = OmegaConf.load(os.path.join(DEEPSPEED_DIR, f"{args['deepspeed']}.yaml"))
    precision = args["precision"] or str(profile.precision)
    zero = memory.zero_sizes(OmegaConf.to_container(profile.zero), cfg.hidden, f"conf/deepspeed/{args['deepspeed']}.yaml zero")
    shape = lambda nodes: memory.RunShape(cfg, stage.generates, stage.vocab_projections, args["seq_len"],  # noqa: E731
                                          args["micro_batch"], zero, precision, nodes, args["gpus_per_node"])  # fmt: skip
    act = [activation_bytes(cfg, args["stage"], args["seq_len"], args["micro_batch"], ck) * BYTES[precision] // 2
           for ck in (False, True)]  # fmt: skip
    need, usable = memory.need_bytes(shape(args["nodes"]), counted), usable_bytes(args["gpu_mem_gb"])
    return {
        **{k: args[k] for k in DEFAULTS if k not in ("json", "vocab_size", *GENERATION_KEYS)}, "precision": precision,
        "model_class": stage.model_class().__name__, "vocab_size": cfg.vocab_size,
        "attention": getattr(cfg, "attention", "sdpa"),
        "total_params": counted.total, "largest_layer_params": counted.largest,
        "model_states_bytes": need["model_states"], "activation_bytes": act[False], "activation_bytes_checkpointed": act[True],
        "zero_buffer_bytes": need["buffers"], "zero_sizes": {k: zero[k] for k in memory.AUTO_SIZES if k in zero},
        "usable_bytes": usable, "need_bytes": need["total"], "fits": need["total"] <= usable,
        "min_nodes": smallest_nodes(lambda n: memory.need_bytes(shape(n), counted)["total"], usable, args["max_nodes"]),
    }  # fmt: skip


def render(p: dict) -> str:
    ck, sizes = "on" if p["activation_checkpointing"] else "off", p["zero_sizes"]
    n = p["min_nodes"]
    smallest = "none" if n is None else f"{n} ({n * p['gpus_per_node']} GPUs)"
    return "\n".join([
        *_head(p),
        f"model states/GPU  {_gib(p['model_states_bytes'])} (DeepSpeed ZeRO-3 estimator, no offload)",
        f"activations/GPU   {_gib(p['activation_bytes'])} without checkpointing,"
        f" {_gib(p['activation_bytes_checkpointed'])} with ({p['precision']}, micro_batch {p['micro_batch']} x seq_len"
        f" {p['seq_len']}, {p['attention']} attention)",
        f"ZeRO buffers/GPU  {_gib(p['zero_buffer_bytes'])} (deepspeed={p['deepspeed']}: reduce bucket"
        f" {sizes['reduce_bucket_size']:,}, prefetch {sizes['stage3_prefetch_bucket_size']:,}, persistent up to"
        f" {sizes['stage3_param_persistence_threshold']:,} elements)",
        f"total/GPU         {_gib(p['need_bytes'])} with checkpointing {ck}: {'fits' if p['fits'] else 'does NOT fit'}",
        f"smallest nodes    {smallest} (of 1..{p['max_nodes']}) at micro_batch {p['micro_batch']}, checkpointing {ck}",
    ])  # fmt: skip


def main(argv: list[str]) -> None:
    p = plan(argv)
    print(json.dumps(p) if parse(argv)[0]["json"] else (render_generation if p.get("generate") else render)(p))  # parse again: cheap, keeps plan's dict clean


if __name__ == "__main__":
    with exit_on_user_error("pretrain.plan"):
        main(sys.argv[1:])
