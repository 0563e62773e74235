"""Memory plan for ZeRO-3 training: does the model fit, and on how few nodes?

    python -m pretrain.plan model=plug nodes=4 gpus_per_node=8 gpu_mem_gb=32 seq_len=512 micro_batch=1 \
        [stage=structbert|palm] [activation_checkpointing=true] [vocab_size=N] [max_nodes=1024] [json=true] \
        [model.<field>=...]   (e.g. model.attention=math: the plain attention, which keeps the s x s scores)
    python -m pretrain.plan model=plug stage=palm generate=true nodes=1 gpus_per_node=8 gpu_mem_gb=16 \
        seq_len=512 micro_batch=8 new_tokens=128 [num_beams=1] [precision=bf16|fp16|fp32] [max_live_parameters=1e9]
        (pretrain.generate's memory per rank, as it runs with those settings: generation_plan)

Parameters: the model the trainer would build, on the meta device. Model states per GPU: DeepSpeed's own
ZeRO-3 estimator. Activations: activation_bytes' formula. GiB (2**30 bytes) throughout, as DeepSpeed prints.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import torch
from omegaconf import OmegaConf

from pretrain import cli
from pretrain.errors import UserError, exit_on_user_error
from pretrain.models.config import ModelConfig
from pretrain.models.layers import count_parameters
from pretrain.stages import STAGES, stage_class
from pretrain.training.config import model_config

GiB = 2**30
MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model")
# Kept free on every GPU: 10% for allocator fragmentation and ZeRO-3's prefetch/reduce buckets (which the
# estimator leaves out), and about 1 GiB that the CUDA context and kernels take before the first tensor.
RESERVE_FRACTION, CUDA_CONTEXT_GB = 0.10, 1.0
DEFAULTS = {"model": None, "stage": next(iter(STAGES)), "nodes": 1, "gpus_per_node": 8, "gpu_mem_gb": 32.0,
            "seq_len": 512, "micro_batch": 1, "activation_checkpointing": False, "vocab_size": None,
            "max_nodes": 1024, "json": False, "generate": False, "new_tokens": 128, "num_beams": 1,
            "precision": "bf16", "max_live_parameters": 10**9}  # fmt: skip
# generate=true's own keys (its plan: generation_plan), as pretrain.generate takes them. max_live_parameters: ZeRO-3
# gathers a module's parameters as it runs it, prefetching the next ones, and keeps at most this many gathered
# (DeepSpeed's stage3_max_live_parameters; its default, 1e9, is pretrain.generate's).
GENERATION_KEYS = ("generate", "new_tokens", "num_beams", "precision", "max_live_parameters")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _stage3():
    """deepspeed.runtime.zero.stage3, imported with stdout sent to stderr: DeepSpeed's logger, created on
    import, announces the accelerator on stdout, which would spoil json=true."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero import stage3
    return stage3


@functools.lru_cache(maxsize=8)
def count_model(cfg: ModelConfig, stage: str) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) of the model the trainer builds for this stage, built on
    the meta device (shapes, no storage: PLUG-27B costs nothing). Not under deepspeed.zero.Init as the trainer
    does: that needs a process group (it calls init_distributed), which a planner has not got; the parameters are
    the same. init_weights works on meta tensors (its GatheredParameters is a no-op without ZeRO parameters)."""
    stage3 = _stage3()  # before init_weights imports deepspeed, whose import would print on stdout
    with torch.device("meta"):
        model = stage_class(stage).model_class()(cfg)
    # DeepSpeed's largest layer (model_to_params): the most parameters one module owns itself (recurse=False): PLUG's
    # FFN up-projection, small models' word embeddings. Its total dedups by data_ptr(), 0 on meta: not used.
    return count_parameters(model), stage3.model_to_params(model)[1]


def model_states_bytes(total: int, largest: int, nodes: int, gpus_per_node: int) -> int:
    """DeepSpeed's per-GPU estimate, ZeRO-3 with parameters and optimizer on the GPU, built under zero.Init:
    18 bytes/param / GPUs (fp16 params and grads, fp32 master and Adam m, v, and a margin) + 4 x largest layer."""
    _, gpu, _ = _stage3().estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True,
    )  # fmt: skip
    return gpu


def activation_bytes(cfg: ModelConfig, stage: str, seq_len: int, micro_batch: int, checkpointing: bool) -> int:
    """fp16 activations kept for backward per GPU, after Korthikanti et al. 2022, sec. 4.1 (s tokens, b samples,
    h hidden, a heads, f FFN width; 2 bytes per fp16 element, 1 per dropout-mask element):
      attention 11sbh + 5as^2b: QKV input 2, Q and K 4, V 2, out-projection input 2, dropout mask 1 (x sbh);
                softmax output 2, its dropout mask 1, the dropped-out probabilities 2 (x as^2b)
      FFN 3sbh + 4sbf: up-projection input 2 and dropout mask 1 (x sbh); GELU input and output 2 each (x sbf)
      LayerNorm 2sbh each
    Encoder layer 18sbh + 4sbf + 5as^2b = sbh(34 + 5as/h) at f = 4h, the paper's figure. A decoder layer adds
    cross-attention (decoder length taken = s; the encoder output its keys and values come from is one tensor
    shared by all layers) and a LayerNorm: 31sbh + 4sbf + 10as^2b. That is model.attention=math; with sdpa
    PyTorch runs the memory-efficient kernel on V100 (FlashAttention on sm80+), which keeps no s x s matrix, only
    a fp32 log-sum-exp: 4asb in place of each 5as^2b (the copy mechanism's one hand-computed layer aside).
    Checkpointing as the model does it (each layer wrapped): every layer's fp16 input (2sbh) is kept, plus one
    layer's full activations while it is recomputed. Vocabulary projections: fp16 logits (2) + the fp32
    log-softmax that cross-entropy keeps (4), at all s positions (an upper bound: the heads project predicted
    positions only); stage two has two (encoder masked LM, decoder). Left out, each below one layer's share:
    embeddings, final LayerNorms, head transforms, the encoder output."""
    s, b, h, f, a, v = seq_len, micro_batch, cfg.hidden, cfg.ffn, cfg.heads, cfg.vocab_size
    plain = getattr(cfg, "attention", "sdpa") == "math"  # model.attention: sdpa | math (older configs: SDPA)
    scores = 5 * a * s * s * b if plain else 4 * a * s * b
    encoder_layer = 18 * s * b * h + 4 * s * b * f + scores
    decoder_layer = 31 * s * b * h + 4 * s * b * f + 2 * scores
    stage_cls = stage_class(stage)
    n_dec = cfg.decoder_layers if stage_cls.generates else 0  # a model without a decoder ignores decoder_layers
    logits = 6 * s * b * v * stage_cls.vocab_projections
    if not checkpointing:
        return cfg.layers * encoder_layer + n_dec * decoder_layer + logits
    return 2 * s * b * h * (cfg.layers + n_dec) + (decoder_layer if n_dec else encoder_layer) + logits


def usable_bytes(gpu_mem_gb: float) -> int:
    return int(gpu_mem_gb * GiB * (1 - RESERVE_FRACTION) - CUDA_CONTEXT_GB * GiB)


def smallest_nodes(total: int, largest: int, gpus_per_node: int, act: int, usable: int, max_nodes: int):
    """Fewest nodes whose per-GPU model states + activations fit, or None up to max_nodes. Model states only
    shrink as nodes are added and activations do not depend on them, so the first fit is the answer."""
    fits = (n for n in range(1, max_nodes + 1) if model_states_bytes(total, largest, n, gpus_per_node) + act <= usable)
    return next(fits, None)


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
    _check("precision", args["precision"], args["precision"] in BYTES, " or ".join(BYTES))
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
    (total, largest), per_node = count_model(cfg, args["stage"]), args["gpus_per_node"]
    need = lambda nodes: generation_bytes(cfg, total, largest, nodes * per_node, args["seq_len"], args["new_tokens"],  # noqa: E731
                                          args["micro_batch"], args["num_beams"], BYTES[args["precision"]],
                                          args["max_live_parameters"])  # fmt: skip
    usable, parts = usable_bytes(args["gpu_mem_gb"]), need(args["nodes"])
    fits = (n for n in range(1, args["max_nodes"] + 1) if need(n)["total"] <= usable)
    return {
        **{k: args[k] for k in DEFAULTS if k != "json"}, "model_class": stage.model_class().__name__,
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
    (total, largest), per_node = count_model(cfg, args["stage"]), args["gpus_per_node"]
    act = [activation_bytes(cfg, args["stage"], args["seq_len"], args["micro_batch"], ck) for ck in (False, True)]
    used = act[args["activation_checkpointing"]]  # False/True index 0/1
    states, usable = model_states_bytes(total, largest, args["nodes"], per_node), usable_bytes(args["gpu_mem_gb"])
    return {
        **{k: args[k] for k in DEFAULTS if k not in ("json", "vocab_size", *GENERATION_KEYS)},
        "model_class": stage_class(args["stage"]).model_class().__name__, "vocab_size": cfg.vocab_size,
        "attention": getattr(cfg, "attention", "sdpa"),
        "total_params": total, "largest_layer_params": largest,
        "model_states_bytes": states, "activation_bytes": act[False], "activation_bytes_checkpointed": act[True],
        "usable_bytes": usable, "need_bytes": states + used, "fits": states + used <= usable,
        "min_nodes": smallest_nodes(total, largest, per_node, used, usable, args["max_nodes"]),
    }  # fmt: skip


def render(p: dict) -> str:
    ck = "on" if p["activation_checkpointing"] else "off"
    n = p["min_nodes"]
    smallest = "none" if n is None else f"{n} ({n * p['gpus_per_node']} GPUs)"
    return "\n".join([
        *_head(p),
        f"model states/GPU  {_gib(p['model_states_bytes'])} (DeepSpeed ZeRO-3 estimator, no offload)",
        f"activations/GPU   {_gib(p['activation_bytes'])} without checkpointing,"
        f" {_gib(p['activation_bytes_checkpointed'])} with (fp16, micro_batch {p['micro_batch']} x seq_len"
        f" {p['seq_len']}, {p['attention']} attention)",
        f"total/GPU         {_gib(p['need_bytes'])} with checkpointing {ck}: {'fits' if p['fits'] else 'does NOT fit'}",
        f"smallest nodes    {smallest} (of 1..{p['max_nodes']}) at micro_batch {p['micro_batch']}, checkpointing {ck}",
    ])  # fmt: skip


def main(argv: list[str]) -> None:
    p = plan(argv)
    print(json.dumps(p) if parse(argv)[0]["json"] else (render_generation if p.get("generate") else render)(p))  # parse again: cheap, keeps plan's dict clean


if __name__ == "__main__":
    with exit_on_user_error("pretrain.plan"):
        main(sys.argv[1:])
