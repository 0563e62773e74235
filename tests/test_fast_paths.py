"""The speed levers of bench/speed.py, each held to its plain path: the CPU lane dropout (its rate, scaling,
independence, gradient and seeding) and unpadded (packed) execution of the encoder and decoder (outputs and
gradients equal to the padded computation)."""
import pytest
import torch
from tolerance import assert_close_fp32

from pretrain.models import fast_paths
from pretrain.models.config import ModelConfig
from pretrain.models.fast_paths import Packing, attend, dropout
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.training.engine import to_device
from tests.test_model import batch as stage_one_batch
from tests.test_palm_model import batch as stage_two_batch

P = 0.1


def test_lane_dropout_rate_scale_and_independence():
    torch.manual_seed(0)
    x = torch.rand(1 << 20) + 0.5  # no zeros of its own
    y = dropout(x, P, True)
    dropped = y == 0
    # 1M Bernoulli(0.1) draws: standard error 3e-4; 5 of them
    assert abs(float(dropped.float().mean()) - P) < 1.5e-3
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - P), rtol=1e-6, atol=0)
    # both 32-bit lanes of one 64-bit draw are used, independently: neighbours drop together p^2 of the time
    both = (dropped[0::2] & dropped[1::2]).float().mean()
    assert abs(float(both) - P * P) < 1.5e-3
    # an odd number of elements (half a draw left over) and any shape
    z = dropout(torch.ones(3, 5, 7), 0.5, True)
    assert z.shape == (3, 5, 7) and set(z.unique().tolist()) <= {0.0, 2.0}


def test_lane_dropout_gradient_uses_the_forward_mask():
    x = (torch.rand(4096) + 0.5).requires_grad_()
    g = torch.randn(4096)
    torch.manual_seed(1)
    y = dropout(x, P, True)
    y.backward(g)
    dropped = y.detach() == 0
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, g / (1 - P)))
    x.grad = None
    torch.manual_seed(1)  # the same mask, without the rescaling
    y = dropout(x, P, True, rescale=False)
    y.backward(g)
    assert torch.equal(y.detach(), torch.where(dropped, 0.0, x.detach()))
    assert torch.equal(x.grad, torch.where(dropped, 0.0, g))


def test_lane_dropout_follows_torch_seed_and_is_off_in_eval():
    x = torch.ones(1000)
    torch.manual_seed(7)
    a = dropout(x, P, True)
    torch.manual_seed(7)
    b = dropout(x, P, True)
    c = dropout(x, P, True)  # the generator moved on: another mask
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert dropout(x, P, False) is x and dropout(x, 0.0, True) is x
    with pytest.raises(ValueError, match="must be in"):
        dropout(x, 1.0, True)


def test_attention_dropout_rescales_after_the_product():
    """attend's CPU path applies the mask to the probabilities and 1 / (1 - p) to probs @ v: the same as
    dropping and rescaling the probabilities (the plain formula), mask for mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    torch.manual_seed(3)
    y, _ = attend(q, k, v, mask, False, P, True, "sdpa")
    probs = ((q * 0.5) @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.manual_seed(3)
    want = dropout(probs, P, True) @ v
    assert_close_fp32(y, want, 5, "dropped attention")  # SDPA's kernel vs two matmuls: sums over 5 keys
    # without dropout: SDPA itself, equal to the plain formula
    assert_close_fp32(attend(q, k, v, mask, False, P, False, "sdpa")[0], probs @ v, 5, "attention")


def test_packing_round_trip_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.arange(8.0).view(2, 4, 1)
    p = Packing(mask)
    assert p.pack(x).flatten().tolist() == [0.0, 1.0, 2.0, 4.0]
    assert p.unpack(p.pack(x)).flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    assert Packing.of(torch.ones(2, 4, dtype=torch.bool)) is None and Packing.of(None) is None


@pytest.fixture
def padded_reference(monkeypatch):
    """Within the block, every layer computes the padded positions too (what transformers does)."""

    def use():
        monkeypatch.setattr(fast_paths.Packing, "of", staticmethod(lambda mask, index=None: None))

    return use


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(make, b, weights):
    model = make().train()
    loss, _ = model(b, weights)
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(a, b):
    """Packed and padded sum in other orders (other shapes): equal to the tolerances of tests/tolerance.py."""
    assert_close_fp32(a[0], b[0], 64, "loss")
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert_close_fp32(a[1][name], b[1][name], 64, name)


@pytest.mark.parametrize("pre_ln,checkpointing", [(True, False), (False, False), (True, True)])
def test_packed_stage_one_equals_padded(pre_ln, checkpointing, padded_reference):
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, pre_ln=pre_ln,
                      dropout=0.0, attn_dropout=0.0, activation_checkpointing=checkpointing)  # fmt: skip

    def make():
        torch.manual_seed(0)
        return StructBert(cfg)

    b = stage_one_batch(b=2, t=12)
    b["attention_mask"][1, 8:] = False  # padding in the second row (no labels there)
    b["input_ids"][1, 8:] = 0
    weights = {"mlm": 1.0, "wso": 1.0, "sso": 1.0}
    model = make().eval()
    assert Packing.of(b["attention_mask"]) is not None
    h = model.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert h[1, 8:].abs().max() == 0  # packed: padding positions are zeros
    packed = loss_and_grads(make, b, weights)
    padded_reference()
    h_ref = model.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert_close_fp32(h[b["attention_mask"]], h_ref[b["attention_mask"]], 64, "hidden")
    assert_same(packed, loss_and_grads(make, b, weights))


@pytest.mark.parametrize("copy,pre_ln,checkpointing", [(False, True, False), (True, True, False), (False, False, True)])
def test_packed_stage_two_equals_padded(copy, pre_ln, checkpointing, padded_reference):
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=2,
                      pre_ln=pre_ln, copy=copy, dropout=0.0, attn_dropout=0.0,
                      activation_checkpointing=checkpointing)  # fmt: skip

    def make():
        torch.manual_seed(0)
        return Palm(cfg)

    b = stage_two_batch()  # padded on both sides
    weights = {"lm": 1.0, "mlm": 0.5}
    packed = loss_and_grads(make, b, weights)
    padded_reference()
    assert_same(packed, loss_and_grads(make, b, weights))


def test_packed_training_with_dropout_keeps_the_rate():
    """Dropout on packed rows draws only for real tokens: the layer output's dropped share is still p."""
    torch.manual_seed(0)
    x = torch.rand(4, 64, 32) + 0.5
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[:, 40:] = False
    p = Packing(mask)
    y = p.unpack(dropout(p.pack(x), 0.5, True))
    assert y[~mask].abs().max() == 0
    assert abs(float((y[mask] == 0).float().mean()) - 0.5) < 0.05


@pytest.mark.parametrize("model_cls", [StructBert, Palm])
def test_checkpointed_recompute_draws_the_same_dropout_masks(model_cls):
    """Activation checkpointing reruns each layer's forward in the backward. torch's checkpoint restores the RNG
    state for it, so the lane dropout's seed draw, and with it every mask, repeats: loss and gradients equal the
    run without checkpointing, dropout on."""
    results = []
    for checkpointing in (False, True):
        cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=2,
                          activation_checkpointing=checkpointing)  # fmt: skip
        torch.manual_seed(0)
        model = model_cls(cfg).train()
        b = stage_one_batch() if model_cls is StructBert else stage_two_batch()
        weights = {"mlm": 1.0, "wso": 1.0, "sso": 1.0} if model_cls is StructBert else {"lm": 1.0, "mlm": 0.5}
        torch.manual_seed(5)
        loss, _ = model(b, weights)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    assert_same(*results)
    torch.manual_seed(6)  # and dropout is on: another seed, another loss
    assert not torch.equal(model(b, weights)[0].detach(), results[1][0])


# ---------------------------------------------------------------- packing indices found on the host


def test_host_pack_index_reads_no_mask_values():
    """With the index from the host, Packing.of never reads the device mask (on a GPU, `all` and `nonzero` of it
    would each wait for the device): a mask on the meta device, which has no values, is enough."""
    host = torch.ones(2, 6, dtype=torch.bool)
    host[1, 4:] = False
    index = fast_paths.with_pack_indices({"attention_mask": host})["pack_index"]
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    meta = host.to("meta")
    with pytest.raises(Exception):  # what the index spares: reading a meta tensor's values fails
        Packing.of(meta)
    p = Packing.of(meta, index)
    assert p is not None and p.index is index and (p.batch, p.length) == (2, 6)
    full = torch.ones(2, 6, dtype=torch.bool)
    assert Packing.of(full.to("meta"), fast_paths.with_pack_indices({"attention_mask": full})["pack_index"]) is None


def test_with_pack_indices_names_each_mask():
    mask = torch.tensor([[True, False], [True, True]])
    out = fast_paths.with_pack_indices({"enc_attention_mask": mask, "dec_attention_mask": mask, "input_ids": mask.long()})
    assert out["enc_pack_index"].tolist() == out["dec_pack_index"].tolist() == [0, 2, 3]
    assert "input_pack_index" not in out and "pack_index" not in out


@pytest.mark.parametrize("model_cls", [StructBert, Palm])
def test_models_give_the_same_results_with_host_pack_indices(model_cls):
    """The trainer's batches carry the host's packing indices (engine.to_device): loss and gradients equal those
    of the same batch without them (the mask read on the device)."""
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=2,
                      dropout=0.0, attn_dropout=0.0)  # fmt: skip
    if model_cls is StructBert:
        b = stage_one_batch(b=2, t=12)
        b["attention_mask"][1, 8:] = False
        weights = {"mlm": 1.0, "wso": 1.0, "sso": 1.0}
    else:
        b, weights = stage_two_batch(), {"lm": 1.0, "mlm": 0.5}
    results = []
    for batch in (b, to_device(b, torch.device("cpu"))):
        torch.manual_seed(0)
        results.append(loss_and_grads(lambda: model_cls(cfg), batch, weights))
    assert set(to_device(b, torch.device("cpu"))) > set(b)
    assert_same(*results)


def test_unpad_setting_and_device_table(monkeypatch):
    """model.unpad=false computes the padding positions too (not zeros); null follows the device type's entry."""
    b = stage_one_batch(b=2, t=12)
    b["attention_mask"][1, 8:] = False
    outputs = {}
    for unpad in (None, True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, unpad=unpad)
        outputs[unpad] = StructBert(cfg).eval().encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert outputs[True][1, 8:].abs().max() == 0 and outputs[None][1, 8:].abs().max() == 0
    assert outputs[False][1, 8:].abs().max() > 0
    assert_close_fp32(outputs[False][b["attention_mask"]], outputs[True][b["attention_mask"]], 64, "hidden")
    assert fast_paths.unpads(None, torch.device("cpu")) and not fast_paths.unpads(False, torch.device("cpu"))
    monkeypatch.setitem(fast_paths.UNPAD_BY_DEVICE, "cpu", False)
    assert not fast_paths.unpads(None, torch.device("cpu")) and fast_paths.unpads(True, torch.device("cpu"))
    assert fast_paths.unpads(None, torch.device("meta"))  # a device the table lacks: packed
