"""The encoder and its heads, without DeepSpeed: masking, tying, the predicted-positions-only projection."""
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_fp32

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.structbert import StructBert
from pretrain.objectives import MLM, SSO, WSO
from pretrain.training.distributed import strip_local_rank

WEIGHTS = {"mlm": 1.0, "wso": 1.0, "sso": 1.0}


def tiny(pre_ln=True, **kw) -> StructBert:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, pre_ln=pre_ln, **kw)
    return StructBert(cfg).eval()


def batch(b=2, t=12, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (b, t), generator=g)
    mlm = torch.full((b, t), IGNORE)
    wso = torch.full((b, t), IGNORE)
    mlm[:, 2], mlm[:, 5], wso[:, 7] = ids[:, 2], ids[:, 5], ids[:, 7]
    return {
        "input_ids": ids, "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "attention_mask": torch.ones(b, t, dtype=torch.bool), "mlm_labels": mlm, "wso_labels": wso,
        "sso_labels": torch.tensor([0, 2][:b]),
    }  # fmt: skip


@pytest.mark.parametrize("pre_ln", [True, False])
def test_padding_does_not_change_real_positions(pre_ln):
    model, b = tiny(pre_ln), batch()
    h = model.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    pad = lambda x, v: torch.cat([x, torch.full((x.shape[0], 4), v, dtype=x.dtype)], 1)  # noqa: E731
    mask = pad(b["attention_mask"], False)
    h_padded = model.encoder(pad(b["input_ids"], 0), pad(b["token_type_ids"], 0), mask)
    assert_close_fp32(h_padded[:, :12], h, 64, "padded")  # other shapes, other summation blocks: not bitwise
    # ...and the mask really is applied: attending to the padding would change the outputs.
    h_leaky = model.encoder(pad(b["input_ids"], 0), pad(b["token_type_ids"], 0), torch.ones_like(mask))
    assert (h_leaky[:, :12] - h).abs().max() > 1e-3


def test_pre_ln_and_post_ln_differ_in_structure():
    pre, post = tiny(True), tiny(False)
    assert isinstance(post.encoder.final_norm, torch.nn.Identity) and not isinstance(pre.encoder.final_norm, torch.nn.Identity)
    assert isinstance(pre.encoder.embeddings.norm, torch.nn.Identity)
    assert isinstance(post.encoder.embeddings.norm, torch.nn.LayerNorm)


def test_losses_equal_full_vocab_reference_and_decoder_is_tied():
    model, b = tiny(), batch()
    loss, stats = model(b, WEIGHTS)
    h = model.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    head = model.mlm_head
    logits = F.linear(head.norm(F.gelu(head.dense(h))), model.encoder.embeddings.word.weight, head.bias)  # all positions
    mlm_ref = F.cross_entropy(logits.view(-1, 50), b["mlm_labels"].view(-1), ignore_index=IGNORE)
    wso_ref = F.cross_entropy(logits.view(-1, 50), b["wso_labels"].view(-1), ignore_index=IGNORE)
    sso_ref = F.cross_entropy(model.sentence_head(h), b["sso_labels"])
    assert_close_fp32(loss, mlm_ref + wso_ref + sso_ref, 64, "loss")  # logits of the labelled rows only
    assert stats["mlm"][2] == 4 and stats["wso"][2] == 2 and stats["sso"][2] == 2
    # Tied: the output projection has no weight of its own, and its gradient lands in the embedding.
    assert not any("mlm_head" in n and "weight" in n and p.shape[0] == 50 for n, p in model.named_parameters())
    loss.backward()
    assert model.encoder.embeddings.word.weight.grad[b["mlm_labels"][0, 2]].abs().sum() > 0


def test_ignored_sso_labels_and_no_predictions_keep_the_graph():
    model, b = tiny(), batch()
    b["sso_labels"][:] = IGNORE
    b["wso_labels"][:] = IGNORE
    loss, stats = model(b, WEIGHTS)
    assert stats["sso"][2] == 0 and stats["wso"][2] == 0
    loss.backward()  # no error: every rank must be able to run the same backward


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    b = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt).train()
        torch.manual_seed(5)  # same dropout masks: the recompute replays the RNG state
        loss, _ = model(b, WEIGHTS)
        loss.backward()
        grads.append((loss.detach(), model.encoder.layers[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert_close_fp32(grads[0][1], grads[1][1], 64, "qkv grad")  # the recompute's backward may sum in another order


def test_strip_local_rank_handles_both_launcher_spellings(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["prog", "--local_rank=1", "a=b"]) == ["prog", "a=b"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["prog", "--local_rank", "3", "x=y"]) == ["prog", "x=y"]


def test_statistics_stay_tensors_until_the_window_is_reduced():
    """A float() per micro-batch would wait for the GPU each time: the models hand tensors to the metrics window,
    which reads them once, at the log step, into the same running sums."""
    from pretrain.training.metrics import Window

    model, b = tiny(), batch()
    _, stats = model(b, WEIGHTS)
    assert all(isinstance(v[0], torch.Tensor) and isinstance(v[1], torch.Tensor) for v in stats.values()), stats
    window = Window((MLM, WSO, SSO))
    for _ in range(3):
        window.add(stats, 20, 24)
    window.mark_step()
    reduced = window.reduce()
    for name, (loss_sum, correct, n) in stats.items():
        assert reduced[f"{name}_count"] == 3 * n
        assert reduced[f"{name}_loss"] == (float(loss_sum) + float(loss_sum) + float(loss_sum)) / (3 * n)
        assert reduced[f"{name}_acc"] == (float(correct) * 3) / (3 * n)
    assert reduced["padding"] == 1 - 60 / 72


# ---- model.embedding_norm -------------------------------------------------------------------------------------
def toy_cfg(**kw):
    """conf/model/toy.yaml's shapes, read as the trainer reads them."""
    import dataclasses
    import os

    from omegaconf import OmegaConf

    from pretrain.training.config import model_config

    m = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf", "model", "toy.yaml"))
    return dataclasses.replace(model_config(m, 100, 128), **kw)


def toy_keys(cfg, decoder: bool) -> set[str]:
    """The state dict a toy model had before model.embedding_norm existed, written out by hand: pre-LN, no
    embedding LayerNorm."""
    wb = ("weight", "bias")
    keys = {f"encoder.embeddings.{e}.weight" for e in ("word", "position", "token_type")}
    keys |= {f"encoder.layers.{i}.{m}.{p}" for i in range(cfg.layers)
             for m in ("attn.qkv", "attn.out", "attn_norm", "ffn.up", "ffn.down", "ffn_norm") for p in wb}  # fmt: skip
    keys |= {f"encoder.final_norm.{p}" for p in wb} | {"mlm_head.bias"}
    keys |= {f"{m}.{p}" for m in ("mlm_head.dense", "mlm_head.norm", "sentence_head.pooler",
                                  "sentence_head.classifier") for p in wb}  # fmt: skip
    if decoder:
        keys |= {f"decoder.layers.{j}.{m}.{p}" for j in range(cfg.decoder_layers)
                 for m in ("self_attn.qkv", "self_attn.out", "self_attn_norm", "cross_attn.q", "cross_attn.kv",
                           "cross_attn.out", "cross_attn_norm", "ffn.up", "ffn.down", "ffn_norm") for p in wb}  # fmt: skip
        keys |= {f"decoder.final_norm.{p}" for p in wb}
    return keys


NORM_KEYS = ["encoder.embeddings.norm.weight", "encoder.embeddings.norm.bias"]


@pytest.mark.parametrize("stage", ["structbert", "palm"])
def test_embedding_norm_false_leaves_the_toy_models_as_they_were(stage):
    """model=toy (the demo) has embedding_norm=false: the pre-LN embeddings have no LayerNorm, the state dict's keys
    are those written out by hand, and turning the switch on adds exactly the two LayerNorm tensors after the
    embeddings, every other tensor drawn the same (same order, same values: no RNG draw moved)."""
    from pretrain.models.palm import Palm

    cls = Palm if stage == "palm" else StructBert
    cfg = toy_cfg()
    assert cfg.pre_ln and cfg.embedding_norm is False
    torch.manual_seed(0)
    off = cls(cfg)
    assert isinstance(off.encoder.embeddings.norm, torch.nn.Identity)
    state = off.state_dict()
    assert set(state) == toy_keys(cfg, decoder=stage == "palm")
    torch.manual_seed(0)
    on = cls(toy_cfg(embedding_norm=True))
    assert isinstance(on.encoder.embeddings.norm, torch.nn.LayerNorm)
    with_norm = on.state_dict()
    names = list(state)
    at = names.index("encoder.embeddings.token_type.weight") + 1
    assert list(with_norm) == names[:at] + NORM_KEYS + names[at:]
    for name, t in state.items():
        assert torch.equal(with_norm[name], t), name
    # initialised as every other LayerNorm (init_weights): weight 1, bias 0
    assert torch.equal(with_norm[NORM_KEYS[0]], torch.ones(cfg.hidden))
    assert torch.equal(with_norm[NORM_KEYS[1]], torch.zeros(cfg.hidden))


def test_embedding_norm_is_a_layernorm_before_the_first_block():
    """With the switch on, the hidden states are those of the same weights with the embedding sum normalised."""
    from pretrain.models.layers import init_weights

    on, off = tiny(embedding_norm=True), tiny()
    with torch.no_grad():
        on.encoder.embeddings.norm.weight.normal_(1.0, 0.3)
        on.encoder.embeddings.norm.bias.normal_(0.0, 0.3)
    b = batch()
    h_on = on.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    h_off = off.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert (h_on - h_off).abs().max() > 1e-2  # it changes what the encoder computes
    off.encoder.embeddings.norm = on.encoder.embeddings.norm  # the only difference between the two
    torch.testing.assert_close(off.encoder(b["input_ids"], b["token_type_ids"], b["attention_mask"]), h_on, rtol=0, atol=0)
    init_weights(on.encoder.embeddings, 0.02)  # BERT's init sets it as it sets every LayerNorm
    assert torch.equal(on.encoder.embeddings.norm.weight, torch.ones(32))
    assert torch.equal(on.encoder.embeddings.norm.bias, torch.zeros(32))


def test_the_model_confs_set_embedding_norm():
    """Every conf/model/*.yaml has the key; only model=plug (PLUG's released weights have the LayerNorm) sets it;
    anything but a bool is one line."""
    import os

    from omegaconf import OmegaConf

    from pretrain.errors import UserError
    from pretrain.training.config import model_config

    conf = os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf", "model")
    for name in ("toy", "base", "large", "plug"):
        m = OmegaConf.load(os.path.join(conf, f"{name}.yaml"))
        assert isinstance(m.embedding_norm, bool), name
        assert model_config(m, 100, 128).embedding_norm is (name == "plug"), name
    m = OmegaConf.load(os.path.join(conf, "toy.yaml"))
    del m["embedding_norm"]  # a model config written before the key existed
    assert model_config(m, 100, 128).embedding_norm is False
    m.embedding_norm = "yes"
    with pytest.raises(UserError, match=r"^model.embedding_norm=yes: must be true or false [^\n]*$"):
        model_config(m, 100, 128)
