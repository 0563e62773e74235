"""Fused kernels and their plain fallbacks agree: attention (SDPA vs the math reference), Adam (DeepSpeed's fused
vs torch.optim.AdamW), LAMB (DeepSpeed FusedLamb vs pretrain.training.optim.Lamb); fp16 numerics and the fp16 metric columns."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from tolerance import assert_close_fp32

from pretrain.errors import UserError
from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.decoding import generate
from pretrain.models.fast_paths import attend
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.training.config import batch_geometry, deepspeed_config, model_config
from pretrain.training.metrics import fp16_columns
from pretrain.training.optim import Lamb
from runs import DEEPSPEED, PYTHON, REPO, TINY, launch, rows

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (FusedLamb/FusedAdam kernels, SDPA's GPU kernels)")


def config(*overrides: str):
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose("config", overrides=["run.dir=/nonexistent/run", "data.dir=/nonexistent/data", *overrides])


# ---------------------------------------------------------------- attention: sdpa vs math


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict) -> None:
    """SDPA and the plain formula sum in other orders: equal to the tolerances of tests/tolerance.py."""
    assert a.keys() == b.keys()
    for name in a:
        assert_close_fp32(a[name], b[name], 64, name)


def structbert_batch(b=3, t=14, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, -4:], mask[2, -7:] = False, False  # padded rows: the padding mask is exercised
    mlm, wso = torch.full((b, t), IGNORE), torch.full((b, t), IGNORE)
    mlm[:, 2], mlm[:, 5], wso[:, 6] = ids[:, 2], ids[:, 5], ids[:, 6]
    return {"input_ids": ids, "token_type_ids": torch.zeros(b, t, dtype=torch.long), "attention_mask": mask,
            "mlm_labels": mlm, "wso_labels": wso, "sso_labels": torch.tensor([0, 1, 2][:b])}  # fmt: skip


@pytest.mark.parametrize("pre_ln", [True, False])
def test_structbert_sdpa_and_math_attention_agree(pre_ln):
    results = {}
    for impl in ("sdpa", "math"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, pre_ln=pre_ln,
                          dropout=0.0, attn_dropout=0.0, attention=impl)  # fmt: skip
        model = StructBert(cfg).train()  # training forward, dropout off: the two must be the same function
        loss, _ = model(structbert_batch(), {"mlm": 1.0, "wso": 1.0, "sso": 1.0})
        loss.backward()
        results[impl] = {"loss": loss.detach(), **_grads(model)}
    _assert_same(results["sdpa"], results["math"])


def palm(impl: str, **kw) -> Palm:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=2,
                      dropout=0.0, attn_dropout=0.0, attention=impl, **kw)  # fmt: skip
    return Palm(cfg)


def palm_batch(b=2, s=10, t=8, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    enc, dec = torch.randint(5, 50, (b, s), generator=g), torch.randint(5, 50, (b, t), generator=g)
    enc_mask, dec_mask = torch.ones(b, s, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)
    enc_mask[1, -3:], dec_mask[1, -2:] = False, False
    labels = torch.where(dec_mask, torch.randint(5, 50, (b, t), generator=g), IGNORE)
    mlm = torch.full((b, s), IGNORE)
    mlm[:, 1] = enc[:, 1]
    return {"enc_input_ids": enc, "enc_attention_mask": enc_mask, "mlm_labels": mlm, "dec_input_ids": dec,
            "dec_attention_mask": dec_mask, "dec_labels": labels}  # fmt: skip


@pytest.mark.parametrize("copy", [False, True])
def test_palm_sdpa_and_math_attention_agree_in_training(copy):
    results = {}
    for impl in ("sdpa", "math"):
        model = palm(impl, copy=copy).train()
        loss, _ = model(palm_batch(), {"lm": 1.0, "mlm": 0.5})
        loss.backward()
        results[impl] = {"loss": loss.detach(), **_grads(model)}
    _assert_same(results["sdpa"], results["math"])


@pytest.mark.parametrize("copy", [False, True])
def test_palm_sdpa_and_math_attention_agree_in_cached_generation(copy):
    models = {impl: palm(impl, copy=copy).eval() for impl in ("sdpa", "math")}
    b = palm_batch(t=9)
    enc, mask, dec = b["enc_input_ids"], b["enc_attention_mask"], b["dec_input_ids"]
    caches = {impl: m.new_cache() for impl, m in models.items()}
    with torch.no_grad():
        memory = {impl: m.encode(enc, mask) for impl, m in models.items()}
        assert_close_fp32(memory["sdpa"], memory["math"], 64, "memory")
        for t in (3, 4, 5, 7, 9):  # causal prefix into an empty cache, one token a step, two after a cache
            out = {}
            for impl, m in models.items():
                out[impl], caches[impl] = m.next_token_logprobs(dec[:, :t], memory[impl], mask, enc, caches[impl])
            assert_close_fp32(out["sdpa"], out["math"], 64, f"logprobs at {t}")
    src = torch.tensor([[7, 12, 30, 41, 9, 22, 15]])
    for kw in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}):
        a, b_ = (generate(models[i], src, bos_id=1, eos_id=2, max_new_tokens=10, **kw) for i in ("sdpa", "math"))
        assert a == b_ and len(a) == 10


def test_fp16_attention_matches_the_exact_computation():
    """fp16 q, k, v: the math path (float32 softmax) and SDPA (its CPU kernels upcast too) give the exact
    attention of those fp16 inputs, computed in float64, to within fp16 rounding of the scores and output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 32, generator=g).mul(2).half() for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[1, ..., -5:] = False
    exact = {causal: attend(q.double(), k.double(), v.double(), None if causal else mask, causal, 0.0, False, "math")[0]
             for causal in (False, True)}  # fmt: skip
    for impl in ("math", "sdpa"):
        for causal in (False, True):
            y, _ = attend(q, k, v, None if causal else mask, causal, 0.0, False, impl)
            assert y.dtype == torch.float16 and torch.isfinite(y).all()
            torch.testing.assert_close(y.double(), exact[causal], rtol=0, atol=1e-2)
    _, probs = attend(q, k, v, mask, False, 0.0, False, "math", need_probs=True)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(2, 2, 16), rtol=0, atol=2e-3)


def test_layer_norm_statistics_are_float32_for_half_inputs():
    """Rows whose sum overflows fp16 (65504): only float accumulation of mean and variance gets them right.
    PyTorch's layer_norm accumulates in float for half inputs (CPU here; the CUDA kernel uses acc_type<half> =
    float too, checked on GPU by test_gpu_half_layer_norm_and_sdpa)."""
    x = (300 + torch.randn(4, 1024, generator=torch.Generator().manual_seed(0))).half()
    assert not torch.isfinite(x.sum(-1)).any()  # a half-precision accumulator would overflow
    ln = torch.nn.LayerNorm(1024).half()
    torch.testing.assert_close(ln(x).float(), F.layer_norm(x.float(), (1024,)), rtol=0, atol=4e-3)


def test_attention_setting_is_validated():
    assert model_config(config().model, 100, 64).attention == "sdpa"
    assert model_config(config("model.attention=math").model, 100, 64).attention == "math"
    with pytest.raises(UserError, match=r"^model.attention=flash: must be sdpa or math$"):
        model_config(config("model.attention=flash").model, 100, 64)


def test_unpad_setting_is_validated():
    assert model_config(config().model, 100, 64).unpad is None
    assert model_config(config("model.unpad=false").model, 100, 64).unpad is False
    with pytest.raises(UserError, match=r"^model.unpad=sometimes: must be true, false or null \(by device type\)$"):
        model_config(config("model.unpad=sometimes").model, 100, 64)


# ---------------------------------------------------------------- LAMB


def lamb_reference(w, grads, lr, betas, eps, wd, max_coeff=10.0, min_coeff=0.01):
    """DeepSpeed FusedLamb's kernel (csrc/lamb/fused_lamb_cuda_kernel.cu), element by element in Python floats."""
    w, m, v = [float(x) for x in w], [0.0] * len(w), [0.0] * len(w)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = [float(x) for x in g]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u = [mi / (math.sqrt(vi) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        w_norm, u_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in u))
        coeff = 1.0 if w_norm == 0 or u_norm == 0 else min(max(w_norm / u_norm, min_coeff), max_coeff)
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = [wi - step_size * coeff * ui for wi, ui in zip(w, u)]
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize("scale, wd", [(1.0, 0.01), (1.0, 0.0), (1e-4, 0.1), (50.0, 0.0), (0.0, 0.01)])
def test_lamb_matches_the_reference_step(scale, wd):
    """scale: tiny weights clamp the trust ratio at min_coeff, large ones at max_coeff, zero weights give 1."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(24, generator=g, dtype=torch.float64) * scale
    grads = [torch.randn(24, generator=g, dtype=torch.float64) for _ in range(5)]
    expected = lamb_reference(w0, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, wd=wd)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        p = torch.nn.Parameter(w0.to(dtype).clone())
        opt = Lamb([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
        for grad in grads:
            p.grad = grad.to(dtype)
            opt.step()
        torch.testing.assert_close(p.detach().double(), expected, rtol=tol, atol=tol * max(scale, 1e-3))


def test_lamb_laid_out_takes_each_parameters_trust_ratio():
    """Issue 28, 6: a flat tensor holding several parameters (a ZeRO partition), told its layout, is stepped as the
    parameters one by one: one trust ratio each, not one over the whole tensor."""
    g = torch.Generator().manual_seed(5)
    shapes, scales = [(6, 4), (4,), (10,)], [1.0, 1e-3, 30.0]  # unlike norms: one shared ratio would be far off
    w0 = [torch.randn(s, generator=g, dtype=torch.float64) * c for s, c in zip(shapes, scales)]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4)]
    apart = [torch.nn.Parameter(w.clone()) for w in w0]
    flat = torch.nn.Parameter(torch.cat([w.flatten() for w in w0]))
    opt_apart, opt_flat = Lamb(apart, lr=1e-2, weight_decay=0.01), Lamb([flat], lr=1e-2, weight_decay=0.01)
    opt_flat.lay_out(flat, [w.numel() for w in w0])
    unaware = torch.nn.Parameter(flat.detach().clone())
    opt_unaware = Lamb([unaware], lr=1e-2, weight_decay=0.01)
    for step_grads in grads:
        for p, gr in zip(apart, step_grads):
            p.grad = gr.clone()
        flat.grad = unaware.grad = torch.cat([gr.flatten() for gr in step_grads])
        for opt in (opt_apart, opt_flat, opt_unaware):
            opt.step()
    together = torch.cat([p.detach().flatten() for p in apart])
    torch.testing.assert_close(flat.detach(), together, rtol=1e-12, atol=1e-12)
    assert (unaware.detach() - together).abs().max() > 1e-3  # what a ratio over the whole tensor gives
    with pytest.raises(ValueError, match="slices of 5 elements for a tensor of 38"):
        opt_flat.lay_out(flat, [2, 3])


def test_lamb_state_dict_resume_is_bitwise():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        groups = [{"params": [model[0].weight, model[1].weight], "weight_decay": 0.01},
                  {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}]  # fmt: skip
        return model, Lamb(groups, lr=1e-2)

    def step(model, opt, i):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    straight, opt = make()
    for i in range(6):
        step(straight, opt, i)
    first, opt1 = make()
    for i in range(3):
        step(first, opt1, i)
    saved = (first.state_dict(), opt1.state_dict())
    resumed, opt2 = make()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for i in range(3, 6):
        step(resumed, opt2, i)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the DeepSpeed config


def test_optimizer_config():
    geometry = batch_geometry(config().train, 2)
    adam = deepspeed_config(config(), geometry)
    assert adam["optimizer"]["type"] == "AdamW" and adam["optimizer"]["params"]["torch_adam"] is True
    assert "client_optimizer" not in adam
    fused_adam = deepspeed_config(config("deepspeed.torch_adam=false"), geometry)
    assert fused_adam["optimizer"]["params"]["torch_adam"] is False
    lamb = deepspeed_config(config("train.optimizer=lamb"), geometry)
    assert lamb["zero_allow_untested_optimizer"] is True and lamb["scheduler"]["type"] == "WarmupDecayLR"
    # never DeepSpeed's Lamb (FusedLamb), whose trust ratios span a rank's whole partition
    assert "optimizer" not in lamb and lamb["client_optimizer"]["type"] == "pretrain.training.optim.Lamb"
    assert lamb["client_optimizer"]["params"]["weight_decay"] == 0.01
    with pytest.raises(UserError, match=r"^train.optimizer=sgd: must be adamw or lamb$"):
        deepspeed_config(config("train.optimizer=sgd"), geometry)


def test_v100_fp16_loss_scaling_config_and_metric_columns(monkeypatch):
    """The zero3_v100 settings as DeepSpeed reads them, its loss scaler driven through overflows, and the
    columns read off a ZeRO-3 optimizer (its real `loss_scale` property) and the engine's skipped_steps."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    cfg = config("deepspeed=zero3_v100")
    ds = deepspeed_config(cfg, batch_geometry(cfg.train, 1))
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1.0}  # fmt: skip
    args = DeepSpeedConfig(ds).float16_config.dynamic_loss_scale_args()
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # no process group in a unit test
    scaler = loss_scaler.CreateLossScaler(torch.float16, 0, True, args)
    opt = object.__new__(DeepSpeedZeroOptimizer_Stage3)  # only what the loss_scale property reads
    opt.custom_loss_scaler, opt.loss_scaler = False, scaler

    class Engine:
        optimizer, skipped_steps = opt, 0

        def __init__(self, fp16):
            self.fp16 = fp16

        def fp16_enabled(self):
            return self.fp16

    assert fp16_columns(Engine(False)) == {}
    engine = Engine(True)
    assert fp16_columns(engine) == {"skipped_steps": 0, "loss_scale": 65536.0}
    for _ in range(2):  # hysteresis 2: the first overflow only skips, the second halves the scale
        scaler.update_scale(True)
        engine.skipped_steps += 1
    assert fp16_columns(engine) == {"skipped_steps": 2, "loss_scale": 32768.0}


# ---------------------------------------------------------------- real 2-rank runs (the deepspeed launcher)


def _run(prepared, run_dir, *extra):
    args = TINY + [f"data.dir={prepared}", f"run.dir={run_dir}", "train.log_every=1", "train.eval_every=1000",
                   "train.save_every=1000", *extra]  # fmt: skip
    launch(DEEPSPEED, args)
    return rows(str(run_dir), "train")


@pytest.mark.e2e
def test_fused_and_plain_adam_agree_over_ten_steps(prepared, tmp_path):
    """torch.optim.AdamW vs DeepSpeed's fused Adam (its JIT-built CPU op here; FusedAdam on GPU), 2 ranks, ZeRO-3."""
    plain = _run(prepared, tmp_path / "plain", "train.max_steps=10", "deepspeed.torch_adam=true")
    fused = _run(prepared, tmp_path / "fused", "train.max_steps=10", "deepspeed.torch_adam=false")
    assert [r["step"] for r in plain] == [r["step"] for r in fused] == list(range(1, 11))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(plain, fused)]
    print(f"fused vs plain Adam, |loss difference| per step (max {max(diffs):.3g}):", *(f"{d:.2g}" for d in diffs))
    assert diffs[0] == 0.0  # the same weights and batch before any update
    assert max(diffs) < 1e-3, diffs
    assert [r["lr"] for r in plain] == [r["lr"] for r in fused]


@pytest.mark.e2e
def test_lamb_trains_and_resumes_bitwise_on_cpu_and_steps_alike_on_one_rank(prepared, tmp_path):
    """train.optimizer=lamb on CPU: the plain LAMB as a client optimizer under ZeRO-3, with DeepSpeed's scheduler.
    Issue 28, 6: its trust ratios are each parameter's, summed across the ranks' partitions, so one rank trains as
    two do (the same global batch, no dropout); a ratio per flat partition spanned every layer on one rank and half
    of each on two."""
    # LAMB's step is relative to ||w|| and, as in FusedLamb, scaled by sqrt(1 - b2^t) / (1 - b1^t) (about 0.17 over
    # these steps): its learning rate is not Adam's.
    common = ["train.optimizer=lamb", "train.max_steps=24", "train.save_every=8", "train.lr=0.1",
              "train.global_batch_size=8", "model.dropout=0.0", "model.attn_dropout=0.0"]  # fmt: skip
    straight = _run(prepared, tmp_path / "straight", *common)
    launch(PYTHON, TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'one'}", "train.log_every=1",
                           "train.eval_every=1000", *common])  # fmt: skip
    diffs = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows(str(tmp_path / "one"), "train"), straight)]
    print("lamb, 1 rank against 2: largest relative loss difference", f"{max(diffs):.1e}")
    assert len(diffs) == 24 and max(diffs) < 1e-4, diffs
    info = json.load(open(tmp_path / "straight" / "run.json"))["deepspeed_config"]
    assert "optimizer" not in info and info["client_optimizer"]["type"] == "pretrain.training.optim.Lamb"
    losses = [r["loss"] for r in straight]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"lamb: mean loss of steps 1-4 {first:.3f}, of steps 21-24 {last:.3f}")
    assert last < first - 1.0, (first, last)
    lrs = [r["lr"] for r in straight]
    assert lrs[0] < lrs[2] and lrs[-1] < max(lrs)  # the WarmupDecayLR schedule drives the client optimizer
    assert all("loss_scale" not in r and "skipped_steps" not in r for r in straight)  # fp32: no fp16 columns
    resumed_dir = tmp_path / "resumed"
    _run(prepared, resumed_dir, *common, "train.exit_at_step=12")
    resumed = _run(prepared, resumed_dir, *common)
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_lamb_and_fused_adam_agree_with_the_plain_ones():
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.lamb import FusedLamb

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 48), (48,), (1000,)]
    w0 = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(5)]
    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    pairs = [
        (lambda ps: FusedLamb(ps, **hyper), lambda ps: Lamb(ps, **hyper)),
        (lambda ps: FusedAdam(ps, adam_w_mode=True, **hyper), lambda ps: torch.optim.AdamW(ps, **hyper)),
    ]
    for make_fused, make_plain in pairs:
        out = []
        for make in (make_fused, make_plain):
            ps = [torch.nn.Parameter(w.clone()) for w in w0]
            opt = make(ps)
            for step_grads in grads:
                for p, gr in zip(ps, step_grads):
                    p.grad = gr.clone()
                opt.step()
            out.append(ps)
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_gpu_half_layer_norm_and_sdpa():
    """On GPU: fp16 LayerNorm keeps float statistics; SDPA's fused kernels (memory-efficient on V100, flash on
    sm80+) agree with the float32-softmax math path."""
    x = (300 + torch.randn(4, 1024, device="cuda")).half()
    ln = torch.nn.LayerNorm(1024).cuda().half()
    torch.testing.assert_close(ln(x).float(), F.layer_norm(x.float(), (1024,)), rtol=0, atol=4e-3)
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half) for _ in range(3))
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool, device="cuda")
    mask[1, ..., -9:] = False
    for m, causal in ((mask, False), (None, True)):
        fused, _ = attend(q, k, v, m, causal, 0.0, False, "sdpa")
        plain, _ = attend(q, k, v, m, causal, 0.0, False, "math")
        torch.testing.assert_close(fused, plain, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- resume state of the CUDA generator


def test_checkpoint_rng_state_carries_the_cuda_generator(monkeypatch):
    """On a GPU dropout draws from the CUDA generator: a resumed run must restore it, per rank, or its dropout
    differs from an unbroken run's. Here the CUDA side is simulated; needs_cuda below runs it for real."""
    from pretrain.training import rng

    device_state = {"now": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: device_state.update(now=s.clone()))
    saved = rng.rng_state()
    assert torch.equal(saved["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    device_state["now"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    rng.set_rng_state(saved)
    assert torch.equal(device_state["now"], torch.tensor([1, 2, 3], dtype=torch.uint8))


@pytest.mark.gpu
@needs_cuda
def test_cuda_dropout_resumes_exactly():
    from pretrain.training import rng

    torch.cuda.init()
    rng.seed_rng(7)
    saved = rng.rng_state()
    first = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
    torch.cuda.manual_seed(123)  # what a fresh process would hold before set_rng_state
    rng.set_rng_state(saved)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5), first)
