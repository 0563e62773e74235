"""Throughput accounting (pretrain/training/flops.py, the tflops / mfu / peak_mem_gb columns of the train rows): the
formula by hand, against torch's FlopCounterMode on the real models, and in real runs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.objectives import MLM
from pretrain.training import flops, metrics
from runs import PYTHON, TINY, launch, rows

THROUGHPUT = ("tflops", "mfu", "peak_mem_gb", "peak_mem_gb_per_rank")


def config(**kw) -> ModelConfig:
    base = dict(vocab_size=32, hidden=8, layers=2, heads=2, ffn=16, max_positions=64)
    return ModelConfig(**{**base, **kw})


def labels(shape, at: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.full(shape, IGNORE)
    for i, j in at:
        out[i, j] = 7
    return out


def stage_one_batch(b=2, s=6, mlm_at=((0, 1), (1, 2)), wso_at=((0, 4), (1, 3))) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(5, 32, (b, s), generator=g), "token_type_ids": torch.zeros(b, s, dtype=torch.long),
        "attention_mask": torch.ones(b, s, dtype=torch.bool), "mlm_labels": labels((b, s), mlm_at),
        "wso_labels": labels((b, s), wso_at), "sso_labels": torch.tensor([0, 2, 1, 0][:b]),
    }  # fmt: skip


def stage_two_batch(b=2, s=6, t=4, mlm_at=((0, 1), (1, 3)), lm_at=((0, 0), (0, 1), (0, 2), (1, 0), (1, 3))) -> dict:
    g = torch.Generator().manual_seed(0)
    enc_mask, dec_mask = torch.ones(b, s, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)
    enc_mask[1, -2:] = False  # padding: the projections and FFN skip it (Packing), attention does not
    return {
        "enc_input_ids": torch.randint(5, 32, (b, s), generator=g), "enc_attention_mask": enc_mask,
        "mlm_labels": labels((b, s), mlm_at), "dec_input_ids": torch.randint(5, 32, (b, t), generator=g),
        "dec_attention_mask": dec_mask, "dec_labels": labels((b, t), lm_at),
    }  # fmt: skip


def test_stage_one_by_hand():
    """hidden 8, 2 layers, ffn 16, vocab 32, batch 2, seq 6; 4 predicted positions, 2 MLM and 2 word-structure
    ones (never the same: word structure shuffles unmasked tokens), each projected once by the shared head."""
    B, S, h, f, V = 2, 6, 8, 16, 32
    layer = 2 * B * S * (4 * h * h + 2 * h * f) + 2 * 2 * B * S * S * h
    assert layer == 2 * 12 * (256 + 256) + 4 * 2 * 36 * 8 == 14592
    heads = 2 * 4 * (h * h + h * V) + 2 * B * (h * h + h * 3)
    assert heads == 8 * 320 + 4 * 88 == 2912
    batch = stage_one_batch()
    assert flops.structbert_forward_flops(config(), batch) == (2 * 14592, 2912)
    assert flops.structbert_train_flops(config(), batch) == 3 * 29184 + 3 * 2912 == 96288
    # Activation checkpointing: the layers' forward once more, not the heads'.
    assert flops.structbert_train_flops(config(activation_checkpointing=True), batch) == 4 * 29184 + 3 * 2912 == 125472


def test_stage_two_by_hand():
    """The same encoder over 6 encoder slots (two of them padding: N = 10 real rows of 12) and 2 decoder layers
    over 4 decoder slots (M = 8, no padding); 2 MLM positions on the encoder, 5 decoder labels."""
    B, S, T, h, f, V, N, M = 2, 6, 4, 8, 16, 32, 10, 8
    encoder_layer = 2 * N * (4 * h * h + 2 * h * f) + 2 * 2 * B * S * S * h  # attention over the padded square
    assert encoder_layer == 10240 + 2304 == 12544
    decoder_layer = (
        2 * M * 4 * h * h  # self-attention QKV + out: 4096
        + 2 * M * 2 * h * h  # cross-attention q + out: 2048
        + 2 * N * 2 * h * h  # cross-attention k, v over the encoder's real tokens: 2560
        + 2 * M * 2 * h * f  # FFN: 4096
        + 2 * 2 * B * T * T * h  # self-attention scores and PV, the full square: 1024
        + 2 * 2 * B * T * S * h  # cross-attention: 1536
    )  # fmt: skip
    assert decoder_layer == 4096 + 2048 + 2560 + 4096 + 1024 + 1536 == 15360
    layers = 2 * 12544 + 2 * 15360
    heads = 2 * 2 * (h * h + h * V) + 2 * 5 * h * V
    assert heads == 1280 + 2560
    cfg = config(decoder_layers=2)
    assert flops.palm_forward_flops(cfg, stage_two_batch()) == (layers, heads)
    assert flops.palm_train_flops(cfg, stage_two_batch()) == 3 * 55808 + 3 * 3840 == 178944
    # After the MLM phase (no MLM labels) only the LM projection is left of the heads.
    no_mlm = stage_two_batch(mlm_at=())
    assert flops.palm_forward_flops(cfg, no_mlm) == (layers, 2560)


def counted(model, batch: dict, weights: dict) -> int:
    """FLOPs of one forward and backward as torch's FlopCounterMode counts them (matmuls, exactly)."""
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.train()(batch, weights)
        loss.backward()
    return counter.get_total_flops()


STAGE_ONE_WEIGHTS, STAGE_TWO_WEIGHTS = {"mlm": 1.0, "wso": 1.0, "sso": 1.0}, {"lm": 1.0, "mlm": 0.5}


# attention="math": the attention products are plain bmm, which the counter counts. Dropout stays at the configs'
# 0.1 (it changes no matmul): with checkpointing, see test_checkpointing_early_stop_with_pre_ln_and_no_dropout.
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pre_ln", [True, False])
def test_stage_one_matches_the_flop_counter(checkpointing, pre_ln):
    cfg = config(attention="math", activation_checkpointing=checkpointing, pre_ln=pre_ln)
    torch.manual_seed(0)
    batch = stage_one_batch(b=3, s=16, mlm_at=[(0, 1), (1, 5), (2, 9)], wso_at=[(0, 3), (2, 4)])
    assert counted(StructBert(cfg), batch, STAGE_ONE_WEIGHTS) == flops.structbert_train_flops(cfg, batch)
    batch["attention_mask"][1, 11:] = False  # padding: the model packs the real rows, the formula follows
    assert counted(StructBert(cfg), batch, STAGE_ONE_WEIGHTS) == flops.structbert_train_flops(cfg, batch)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pre_ln, copy", [(True, False), (False, False), (True, True)])
def test_stage_two_matches_the_flop_counter(checkpointing, pre_ln, copy):
    cfg = config(attention="math", activation_checkpointing=checkpointing, pre_ln=pre_ln, copy=copy, decoder_layers=2)
    torch.manual_seed(0)
    batch = stage_two_batch(b=3, s=10, t=7, lm_at=[(0, 0), (1, 3), (2, 6), (2, 1)])
    assert counted(Palm(cfg), batch, STAGE_TWO_WEIGHTS) == flops.palm_train_flops(cfg, batch)
    batch["dec_attention_mask"][0, 5:] = False  # decoder padding too (no labels there)
    assert counted(Palm(cfg), batch, STAGE_TWO_WEIGHTS) == flops.palm_train_flops(cfg, batch)


def test_checkpointing_early_stop_with_pre_ln_and_no_dropout():
    """The one case the formula overstates (flops.py's docstring): torch's non-reentrant checkpoint stops the
    recompute once the backward has what it needs, and with pre-LN and dropout 0 nothing needs the FFN's output."""
    B, S, T, h, f = 3, 16, 7, 8, 16
    cfg = config(attention="math", activation_checkpointing=True, dropout=0.0, attn_dropout=0.0)
    batch = stage_one_batch(b=B, s=S, mlm_at=[(0, 1)], wso_at=[(2, 4)])
    assert counted(StructBert(cfg), batch, STAGE_ONE_WEIGHTS) == flops.structbert_train_flops(cfg, batch) - 2 * (2 * B * S * h * f)
    cfg = config(attention="math", activation_checkpointing=True, dropout=0.0, attn_dropout=0.0, decoder_layers=2)
    batch = stage_two_batch(b=B, s=S, t=T)
    n = int(batch["enc_attention_mask"].sum())  # the encoder's FFN runs on its real rows only
    skipped = 2 * (2 * n * h * f) + 2 * (2 * B * T * h * f)
    assert counted(Palm(cfg), batch, STAGE_TWO_WEIGHTS) == flops.palm_train_flops(cfg, batch) - skipped


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sdpa_on_cpu(dropout):
    """attention="sdpa" on CPU: with attention dropout, attend runs its own math path (plain bmm, the lane dropout),
    which the counter counts; without, SDPA's fused CPU kernel, for which FlopCounterMode has no formula (it counts
    0): the counter then falls short of the formula by exactly the attention products, forward and backward."""
    B, S, h = 3, 16, 8
    cfg = config(attention="sdpa", dropout=dropout, attn_dropout=dropout)
    batch = stage_one_batch(b=B, s=S, mlm_at=[(0, 1), (1, 5)], wso_at=[(2, 4)])
    attention = 2 * 3 * (2 * 2 * B * S * S * h)  # 2 layers, x3
    invisible = attention if dropout == 0 else 0
    assert counted(StructBert(cfg), batch, STAGE_ONE_WEIGHTS) == flops.structbert_train_flops(cfg, batch) - invisible


def test_peak_table():
    assert flops.lookup_peak("NVIDIA H100 80GB HBM3") == 989
    assert flops.lookup_peak("NVIDIA H200") == 989
    assert flops.lookup_peak("NVIDIA H100 PCIe") == 756
    assert flops.lookup_peak("NVIDIA A100-SXM4-80GB") == 312
    assert flops.lookup_peak("Tesla V100-SXM2-32GB") == 125
    assert flops.lookup_peak("NVIDIA GeForce RTX 4090") is None
    assert flops.peak_tflops(400.0) == 400.0
    if not torch.cuda.is_available():
        assert flops.peak_tflops(None) is None


def test_window_tflops_is_per_rank(monkeypatch):
    """The ranks' FLOPs summed, over the ranks and the seconds: 2 ranks of 3e12 FLOPs in 2 s is 1.5 TFLOP/s."""
    clock = iter([100.0, 102.0, 102.0])  # the start, the reduce, the next window's start
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics, "all_reduce_tensor_sum", lambda t: [2 * v for v in t.tolist()])
    monkeypatch.setattr(metrics, "world_size", lambda: 2)
    window = metrics.Window((MLM,))
    window.add({"mlm": (1.0, 1.0, 1)}, 10, 12, flops=1e12)
    window.add({"mlm": (1.0, 1.0, 1)}, 10, 12, flops=2e12)
    window.mark_step()
    assert window.reduce()["tflops"] == pytest.approx(1.5)
    columns = metrics.throughput_columns({"tflops": 1.5}, 100.0)
    assert columns["mfu"] == pytest.approx(0.015) and columns["peak_mem_gb"] == columns["peak_mem_gb_per_rank"][0] > 0
    assert metrics.throughput_columns({"tflops": 1.5}, None)["mfu"] is None


def check_train_rows(run_dir: str, world: int, peak: float | None = None) -> None:
    train = rows(run_dir, "train")
    assert train
    for r in train:
        assert r["tflops"] > 0 and r["peak_mem_gb"] > 0, r
        assert len(r["peak_mem_gb_per_rank"]) == world and r["peak_mem_gb"] == max(r["peak_mem_gb_per_rank"]), r
        if peak is not None:
            assert r["mfu"] == pytest.approx(r["tflops"] / peak), r
        elif not torch.cuda.is_available():
            assert r["mfu"] is None and 0.1 < r["peak_mem_gb"] < 64, r  # RSS of a tiny CPU run
    assert all(not set(THROUGHPUT) & set(r) for r in rows(run_dir, "valid"))


@pytest.mark.e2e
def test_train_rows_of_both_stages_have_the_columns(stage_one, palm_run):
    check_train_rows(stage_one["two_ranks"], 2)
    check_train_rows(stage_one["one_rank"], 1)
    check_train_rows(palm_run, 2)


@pytest.mark.e2e
def test_peak_tflops_gives_mfu(prepared, tmp_path):
    run = str(tmp_path / "run")
    launch(PYTHON, TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2", "train.log_every=1",
                           "train.eval_samples=4", "train.peak_tflops=0.5"])  # fmt: skip
    check_train_rows(run, 1, peak=0.5)
    assert [r["step"] for r in rows(run, "train")] == [1, 2]


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_bad_peak_tflops_is_one_line(prepared, tmp_path, value):
    from hydra import compose, initialize_config_dir

    from pretrain.errors import UserError
    from pretrain.training.config import run_settings
    from runs import REPO

    with initialize_config_dir(config_dir=f"{REPO}/conf", version_base=None):
        cfg = compose("config", overrides=[f"data.dir={prepared}", f"run.dir={tmp_path}", f"train.peak_tflops={value}"])
    with pytest.raises(UserError, match=rf"^train.peak_tflops={value}: must be a number > 0"):
        run_settings(cfg)
    if value == "0":  # one launch: the exit status and the single line
        proc = launch(PYTHON, TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", "train.peak_tflops=0"],
                      expect_rc=2)  # fmt: skip
        assert proc.stderr.strip() == "pretrain.train: error: train.peak_tflops=0: must be a number > 0 (TFLOP/s) or null"
        assert not (tmp_path / "run").exists()
