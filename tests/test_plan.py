"""pretrain.plan: exact parameter counts, DeepSpeed's estimator, activation estimates, the node search, bad input."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                           estimate_zero3_model_states_mem_needs_all_cold, model_to_params)  # fmt: skip

from pretrain import plan as P
from pretrain.errors import UserError, exit_on_user_error
from pretrain.models.layers import count_parameters
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert

V100 = ["gpus_per_node=8", "gpu_mem_gb=32", "seq_len=512"]


def closed_form(cfg, stage: str) -> int:
    """The parameter count written out by hand, a cross-check independent of the module tree."""
    h, f, v = cfg.hidden, cfg.ffn, cfg.vocab_size
    ln = 2 * h
    attn = 4 * h * h + 4 * h  # fused QKV (3h x h + 3h) and output (h x h + h)
    ffn = 2 * h * f + f + h
    embedding_norm = not cfg.pre_ln or cfg.embedding_norm  # post-LN always; pre-LN with model.embedding_norm (PLUG)
    n = (v + cfg.max_positions + cfg.type_vocab) * h + (ln if embedding_norm else 0)  # embeddings
    n += cfg.layers * (attn + ffn + 2 * ln) + (ln if cfg.pre_ln else 0)  # encoder layers, final LayerNorm
    n += h * h + h + ln + v  # MLM head: transform, LayerNorm, output bias (the projection is the tied embedding)
    n += h * h + h + h * cfg.sso_classes + cfg.sso_classes  # pooler, sentence classifier (frozen in stage two)
    if stage == "structbert":
        return n
    n += cfg.decoder_layers * (2 * attn + ffn + 3 * ln) + (ln if cfg.pre_ln else 0)  # self + cross attention
    return n + (2 * h + 1 if cfg.copy else 0)


@pytest.mark.parametrize("stage", ["structbert", "palm"])
@pytest.mark.parametrize("model,vocab", [("toy", 1001), ("base", 21128)])
def test_count_equals_the_real_model(model, vocab, stage):
    # base's width, vocabulary padding and decoder depth; two of its twelve layers (each layer is counted alike),
    # which makes the real model a quarter of the size to build.
    argv = [f"model={model}", f"vocab_size={vocab}", f"stage={stage}", "seq_len=128"]
    argv += ["model.layers=2"] if model == "base" else []
    p, (_, cfg) = P.plan(argv), P.parse(argv)
    assert cfg.vocab_size % (8 if model == "toy" else 128) == 0 and cfg.vocab_size >= vocab  # padded as the trainer
    torch.manual_seed(0)
    real = (Palm if stage == "palm" else StructBert)(cfg)  # on CPU, real tensors
    assert p["total_params"] == count_parameters(real) == closed_form(cfg, stage)
    # With real storage, DeepSpeed's own model_to_params (shared tensors counted once) agrees on both numbers.
    assert model_to_params(real) == (p["total_params"], p["largest_layer_params"])


@pytest.mark.parametrize("stage", ["structbert", "palm"])
def test_plug_count_matches_closed_form(stage):
    p = P.plan(["model=plug", f"stage={stage}"])
    _, cfg = P.parse(["model=plug", f"stage={stage}"])
    assert p["total_params"] == closed_form(cfg, stage)
    assert p["largest_layer_params"] == 8192 * 32768 + 32768
    assert 19e9 < p["total_params"] < 27e9


@pytest.mark.parametrize("nodes", [1, 4, 16])
def test_model_states_are_deepspeeds_estimate(nodes, capsys):
    p = P.plan(["model=plug", "stage=palm", f"nodes={nodes}", *V100, "json=true"])
    total, largest = p["total_params"], p["largest_layer_params"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, num_nodes=nodes,
                                                      cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert p["model_states_bytes"] == gpu
    assert gpu == 4 * largest + int(18 * total / (8 * nodes))  # the formula in REFERENCES.md
    # ...and the printing variant shows the same figure on its "no offload, zero_init" row.
    capsys.readouterr()
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=8, num_nodes=nodes)
    no_offload = "offload_param=none, offload_optimizer=none, zero_init=1"
    row = [r for r in capsys.readouterr().out.splitlines() if no_offload in r]
    assert row and row[0].split("|")[1].strip() == f"{gpu / 2**30:.2f}GB"


@pytest.mark.parametrize("stage", ["structbert", "palm"])
def test_more_nodes_never_need_more_memory(stage):
    per_node = [P.plan(["model=plug", f"stage={stage}", f"nodes={n}", *V100]) for n in range(1, 65)]
    states = [p["model_states_bytes"] for p in per_node]
    need = [p["need_bytes"] for p in per_node]
    assert states == sorted(states, reverse=True) and need == sorted(need, reverse=True)
    assert states[0] > states[-1]


@pytest.mark.parametrize("stage", ["structbert", "palm"])
@pytest.mark.parametrize("model", ["toy", "base", "plug"])
@pytest.mark.parametrize("seq_len,micro", [(128, 1), (512, 4)])
def test_checkpointing_reduces_activations(model, stage, seq_len, micro):
    _, cfg = P.parse([f"model={model}", "vocab_size=21128", f"stage={stage}"])
    for attention in ("math", "sdpa"):
        c = dataclasses.replace(cfg, attention=attention)
        full, ckpt = (P.activation_bytes(c, stage, seq_len, micro, ck) for ck in (False, True))
        assert 0 < ckpt < full
    # The plain attention keeps the s x s scores; SDPA's memory-efficient kernel does not.
    math_, sdpa = (P.activation_bytes(dataclasses.replace(cfg, attention=a), stage, seq_len, micro, False)
                   for a in ("math", "sdpa"))  # fmt: skip
    assert sdpa < math_


def test_activations_follow_korthikanti():
    """PLUG's FFN is 4h, so an encoder layer is the paper's sbh(34 + 5as/h) bytes (plain attention keeps the
    scores, as the paper's does); the logits' s*b*V*6 on top."""
    _, cfg = P.parse(["model=plug", "model.attention=math"])
    s, b, h, a, v, layers = 512, 2, 8192, 128, 21504, 24
    full = P.activation_bytes(cfg, "structbert", s, b, False)
    assert full == layers * s * b * h * (34 + 5 * a * s // h) + 6 * s * b * v
    ckpt = P.activation_bytes(cfg, "structbert", s, b, True)
    assert ckpt == layers * 2 * s * b * h + s * b * h * (34 + 5 * a * s // h) + 6 * s * b * v
    # Stage two: 6 decoder layers of sbh(47 + 10as/h) and a second vocabulary projection.
    palm = P.activation_bytes(cfg, "palm", s, b, False)
    assert palm == full + 6 * s * b * h * (47 + 10 * a * s // h) + 6 * s * b * v
    # SDPA (the default): 4 bytes of log-sum-exp per head and token in place of each 5as^2b.
    sdpa = P.activation_bytes(dataclasses.replace(cfg, attention="sdpa"), "structbert", s, b, False)
    assert sdpa == layers * (s * b * h * 34 + 4 * a * s * b) + 6 * s * b * v


@pytest.mark.parametrize(
    "extra", [["activation_checkpointing=true"], [], ["stage=palm", "activation_checkpointing=true"],
              ["stage=palm", "micro_batch=8", "activation_checkpointing=true"], ["stage=palm", "micro_batch=4"]],
)  # fmt: skip
def test_smallest_node_count_is_consistent(extra):
    p = P.plan(["model=plug", *V100, *extra])
    n = p["min_nodes"]
    assert n is not None
    assert P.plan(["model=plug", *V100, *extra, f"nodes={n}"])["fits"]
    if n > 1:
        assert not P.plan(["model=plug", *V100, *extra, f"nodes={n - 1}"])["fits"]


def test_nothing_fits_and_everything_fits():
    assert P.plan(["model=plug", "gpu_mem_gb=1", "max_nodes=16"])["min_nodes"] is None  # 1 GiB: all reserve
    p = P.plan(["model=toy", "vocab_size=1000", "gpus_per_node=1", "gpu_mem_gb=16"])
    assert p["fits"] and p["min_nodes"] == 1


def test_model_override():
    p = P.plan(["model=plug", "model.layers=12", "model.hidden=4096", "model.heads=32", "model.ffn=16384"])
    assert p["largest_layer_params"] == 21504 * 4096  # the word embeddings, now larger than the FFN (67M)
    _, cfg = P.parse(["model=plug", "model.layers=12", "model.hidden=4096", "model.heads=32", "model.ffn=16384"])
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.ffn) == (12, 4096, 32, 16384)
    assert p["total_params"] == closed_form(cfg, "structbert")


@pytest.mark.parametrize(
    "argv",
    [["model=nosuch"], ["nodes=2"], ["model=plug", "nodes=0"], ["model=plug", "nodes=abc"], ["model=plug", "nodes"],
     ["model=plug", "gpu_mem_gb=0"], ["model=plug", "gpu_mem_gb=-3"], ["model=plug", "bogus=1"],
     ["model=plug", "model.bogus=1"], ["model=toy"], ["model=plug", "seq_len=4096"], ["model=plug", "stage=t5"],
     ["model=plug", "json=maybe"], ["model=plug", "micro_batch=true"], ["model=plug", "model.hidden=abc"],
     ["model=toy", "vocab_size=100", "stage=palm", "model.decoder_layers=0"], ["model=plug", "vocab_size=30000"]],
)  # fmt: skip
def test_bad_input_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e, exit_on_user_error("pretrain.plan"):
        P.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain.plan: error: ") and err.count("\n") == 1, err


@pytest.mark.e2e
def test_command_line():
    """The real entry point: json=true prints one JSON object on stdout; bad input exits 2 with one line."""
    argv = ["model=plug", "nodes=4", *V100, "micro_batch=1", "activation_checkpointing=true", "json=true"]
    out = subprocess.run([sys.executable, "-m", "pretrain.plan", *argv], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == P.plan(argv)
    bad = subprocess.run([sys.executable, "-m", "pretrain.plan", "model=plug", "nodes=0"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr == "pretrain.plan: error: nodes=0: must be an integer >= 1\n"
    assert bad.stdout == ""


def test_generation_plan_per_rank():
    """generate=true: the bf16 partition shrinks with the ranks, one rank gathers nothing, the cache grows with the
    sequences; PLUG fits on 8 x 16 GiB and on one 140 GiB GPU, and a stage without a decoder is refused."""
    eight = P.plan(["model=plug", "stage=palm", "generate=true", "gpus_per_node=8", "gpu_mem_gb=16", "micro_batch=8"])
    one = P.plan(["model=plug", "stage=palm", "generate=true", "gpus_per_node=1", "gpu_mem_gb=140", "micro_batch=8"])
    total = eight["total_params"]
    assert eight["per_rank_bytes"]["weights"] == 2 * -(-total // 8) and one["per_rank_bytes"]["weights"] == 2 * total
    assert one["per_rank_bytes"]["gathered"] == 0 < eight["per_rank_bytes"]["gathered"]
    assert eight["fits"] and one["fits"] and eight["min_nodes"] == one["min_nodes"] == 1
    cfg = P.parse(["model=plug", "stage=palm"])[1]
    assert eight["per_rank_bytes"]["cache"] == 2 * 2 * cfg.decoder_layers * (128 + 512) * cfg.hidden * 8
    beams = P.plan(["model=plug", "stage=palm", "generate=true", "micro_batch=8", "num_beams=4"])
    assert beams["per_rank_bytes"]["cache"] == 4 * eight["per_rank_bytes"]["cache"]
    assert not P.plan(["model=plug", "stage=palm", "generate=true", "gpus_per_node=2", "gpu_mem_gb=16"])["fits"]
    with pytest.raises(UserError, match=r"^generate=true: stage=structbert does not generate"):
        P.plan(["model=plug", "generate=true"])
