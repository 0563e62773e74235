"""PALM (stage two) without DeepSpeed: causality, masking, tying, the copy mechanism, cached decoding."""
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_fp32

from pretrain.labels import IGNORE
from pretrain.models.config import ModelConfig
from pretrain.models.decoding import generate, generate_batch
from pretrain.models.palm import Palm

V, H = 50, 32
LM_ONLY = {"lm": 1.0, "mlm": 0.0}
BOTH = {"lm": 1.0, "mlm": 0.5}


def tiny(**kw) -> Palm:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden=H, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=2, **kw)
    return Palm(cfg).eval()


def batch(b=2, s=10, t=8, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(5, V, (b, s), generator=g)
    dec = torch.randint(5, V, (b, t), generator=g)
    enc_mask, dec_mask = torch.ones(b, s, dtype=torch.bool), torch.ones(b, t, dtype=torch.bool)
    enc_mask[1, -3:], dec_mask[1, -2:] = False, False  # the second row is padded on both sides
    enc[1, -3:], dec[1, -2:] = 0, 0
    labels = torch.where(dec_mask, torch.randint(5, V, (b, t), generator=g), IGNORE)
    mlm = torch.full((b, s), IGNORE)
    mlm[:, 1], mlm[0, 4] = enc[:, 1], enc[0, 4]
    return {
        "enc_input_ids": enc, "enc_attention_mask": enc_mask, "mlm_labels": mlm,
        "dec_input_ids": dec, "dec_attention_mask": dec_mask, "dec_labels": labels,
    }  # fmt: skip


def decoder_hidden(model: Palm, b: dict) -> torch.Tensor:
    memory = model.encode(b["enc_input_ids"], b["enc_attention_mask"])
    return model.decoder(b["dec_input_ids"], model.encoder.embeddings, memory, b["enc_attention_mask"])[0]


def test_needs_a_decoder():
    with pytest.raises(ValueError, match="decoder_layers"):
        Palm(ModelConfig(vocab_size=V, hidden=H, layers=2, heads=4, ffn=64, decoder_layers=0))


@pytest.mark.parametrize("pre_ln", [True, False])
def test_decoder_is_causal(pre_ln):
    model, b = tiny(pre_ln=pre_ln), batch()
    h = decoder_hidden(model, b)
    b["dec_input_ids"] = b["dec_input_ids"].clone()
    b["dec_input_ids"][:, 5] = 3
    h2 = decoder_hidden(model, b)
    torch.testing.assert_close(h2[:, :5], h[:, :5], rtol=0, atol=1e-6)
    assert (h2[:, 5:] - h[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("copy", [False, True])
def test_encoder_padding_does_not_change_decoder(copy):
    model, b = tiny(copy=copy), batch()
    h = decoder_hidden(model, b)
    padded = dict(b)
    padded["enc_input_ids"] = torch.cat([b["enc_input_ids"], torch.full((2, 4), 7)], 1)
    padded["enc_attention_mask"] = torch.cat([b["enc_attention_mask"], torch.zeros(2, 4, dtype=torch.bool)], 1)
    padded["mlm_labels"] = torch.cat([b["mlm_labels"], torch.full((2, 4), IGNORE)], 1)
    # a longer encoder input: other summation blocks, not bitwise
    assert_close_fp32(decoder_hidden(model, padded), h, 64, "decoder hidden")
    assert_close_fp32(model(padded, BOTH)[0], model(b, BOTH)[0], 64, "loss")


def test_losses_equal_full_vocab_reference():
    model, b = tiny(), batch()
    loss, stats = model(b, BOTH)
    word = model.encoder.embeddings.word.weight
    logits = F.linear(decoder_hidden(model, b), word)  # every position, padding included
    lm_ref = F.cross_entropy(logits.reshape(-1, V), b["dec_labels"].reshape(-1), ignore_index=IGNORE)
    memory = model.encode(b["enc_input_ids"], b["enc_attention_mask"])
    mlm_logits = model.mlm_head(memory, word)
    mlm_ref = F.cross_entropy(mlm_logits.reshape(-1, V), b["mlm_labels"].reshape(-1), ignore_index=IGNORE)
    assert_close_fp32(loss, lm_ref + 0.5 * mlm_ref, 64, "loss")  # logits of the labelled rows only
    n = int((b["dec_labels"] != IGNORE).sum())
    assert stats["lm"][2] == n == 14 and stats["mlm"][2] == 3
    assert_close_fp32(torch.tensor(float(stats["lm"][0])), lm_ref.detach() * n, 64 * n, "lm sum")
    at = b["dec_labels"] != IGNORE
    assert stats["lm"][1] == float((logits[at].argmax(-1) == b["dec_labels"][at]).sum())


def test_mlm_off_still_backprops_and_projection_is_tied():
    model, b = tiny(), batch()
    b["mlm_labels"] = torch.full_like(b["mlm_labels"], IGNORE)
    loss, stats = model(b, LM_ONLY)
    loss.backward()
    assert stats["mlm"] == (0.0, 0.0, 0)
    word = model.encoder.embeddings.word.weight
    assert word.grad is not None and word.grad.abs().sum() > 0
    vocab_sized = [n for n, p in model.named_parameters() if p.shape == (V, H)]
    assert vocab_sized == ["encoder.embeddings.word.weight"]
    keys = model.state_dict().keys()
    assert not any(k.startswith("decoder.embeddings") for k in keys)
    assert sum(k.endswith("word.weight") for k in keys) == 1
    # the stage-one sentence head rides along frozen: no gradient, in no optimizer group
    assert all(not p.requires_grad and p.grad is None for p in model.sentence_head.parameters())


def test_decoder_parameter_names_match_the_encoder_layers():
    """init_from maps decoder self-attention and FFN onto encoder layers by name and shape."""
    params = dict(tiny().named_parameters())
    pairs = {"self_attn.qkv": "attn.qkv", "self_attn.out": "attn.out", "self_attn_norm": "attn_norm",
             "ffn.up": "ffn.up", "ffn.down": "ffn.down", "ffn_norm": "ffn_norm"}  # fmt: skip
    for dec, enc in pairs.items():
        for kind in ("weight", "bias"):
            assert params[f"decoder.layers.1.{dec}.{kind}"].shape == params[f"encoder.layers.1.{enc}.{kind}"].shape
    assert params["decoder.layers.0.cross_attn.kv.weight"].shape == (2 * H, H)


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("pre_ln", [True, False])
def test_cached_and_uncached_logprobs_agree(copy, pre_ln):
    model, b = tiny(copy=copy, pre_ln=pre_ln), batch(t=10)
    enc, mask = b["enc_input_ids"], b["enc_attention_mask"]
    memory = model.encode(enc, mask)
    dec = b["dec_input_ids"]
    cache = model.new_cache()
    # three tokens into the empty cache (causal), one a step, then two after a non-empty cache
    for t in (3, 4, 5, 6, 8):
        full, _ = model.next_token_logprobs(dec[:, :t], memory, mask, enc)
        cached, cache = model.next_token_logprobs(dec[:, :t], memory, mask, enc, cache)
        assert cache.length == t
        assert_close_fp32(cached, full, 64, f"cached at {t}")  # attention over the cache: other blocks
        torch.testing.assert_close(full.exp().sum(-1), torch.ones(2))
    # a reordered cache (beam search) continues the swapped rows
    cache.reorder(torch.tensor([1, 0]))
    swapped = lambda x: x.flip(0)  # noqa: E731
    full, _ = model.next_token_logprobs(swapped(dec), swapped(memory), swapped(mask), swapped(enc))
    cached, _ = model.next_token_logprobs(swapped(dec), swapped(memory), swapped(mask), swapped(enc), cache)
    assert_close_fp32(cached, full, 64, "reordered cache")


def test_copy_distribution_sums_to_one_and_backprops():
    model, b = tiny(copy=True), batch()
    loss, stats = model(b, BOTH)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.copy_gate.weight.grad.abs().sum() > 0
    memory = model.encode(b["enc_input_ids"], b["enc_attention_mask"])
    logprobs, _ = model.next_token_logprobs(b["dec_input_ids"], memory, b["enc_attention_mask"], b["enc_input_ids"])
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(2))
    # the loss is the NLL of P itself: the same as the scores' own log-probabilities at the labelled positions
    embeddings, enc_mask = model.encoder.embeddings, b["enc_attention_mask"]
    h, probs = model.decoder(b["dec_input_ids"], embeddings, memory, enc_mask, copy_probs=True)
    at = b["dec_labels"] != IGNORE
    scores = model._vocab_scores(h, probs, memory, b["enc_input_ids"], at)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(int(at.sum())))
    nll = -scores.detach().gather(-1, b["dec_labels"][at][:, None]).sum()
    assert_close_fp32(torch.tensor(float(stats["lm"][0])), nll, 64 * int(at.sum()), "copy nll")


def test_copy_with_p_gen_zero_puts_all_mass_on_source_tokens():
    model, b = tiny(copy=True), batch()
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-1e4)
    memory = model.encode(b["enc_input_ids"], b["enc_attention_mask"])
    logprobs, _ = model.next_token_logprobs(b["dec_input_ids"], memory, b["enc_attention_mask"], b["enc_input_ids"])
    p = logprobs.exp()
    for row in range(2):
        source = b["enc_input_ids"][row][b["enc_attention_mask"][row]].unique()
        torch.testing.assert_close(p[row, source].sum(), torch.tensor(1.0))
    assert p[1, 0] < 1e-6  # the padding id 0 sits only under masked source positions


def test_copy_never_copies_a_special_or_a_replaced_token():
    """Issue 28, 5: in the masked-LM phase the copy distribution scattered onto the encoder's input ids, [MASK] and
    random replacements among them. With p_gen = 0 (copy only) all mass goes to the source text: none to [CLS],
    [SEP], [MASK] or a token masked LM put in, all of it to the tokens of the text (a kept-as-is MLM target too)."""
    CLS, SEP, MASK, STRANGER = 2, 3, 4, 49
    model, b = tiny(copy=True, copy_excluded=(0, 1, CLS, SEP, MASK)), batch()
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-1e4)
    enc, mlm = b["enc_input_ids"].clamp(5, STRANGER - 1), torch.full_like(b["mlm_labels"], IGNORE)
    enc[:, 0], enc[0, -1], enc[1, 6] = CLS, SEP, SEP  # [CLS] text [SEP]; row 1 is padded after position 6
    mlm[:, 2], enc[:, 2] = enc[:, 2], MASK  # masked
    mlm[:, 3], enc[:, 3] = enc[:, 3], STRANGER  # replaced by a random token
    mlm[:, 4] = enc[:, 4]  # predicted, but left as it is: source text
    enc_mask = b["enc_attention_mask"]
    memory = model.encode(enc, enc_mask)
    h, probs = model.decoder(b["dec_input_ids"], model.encoder.embeddings, memory, enc_mask, copy_probs=True)
    at = b["dec_labels"] != IGNORE
    p = model._vocab_scores(h, probs, memory, enc, at, model._copyable(enc, mlm)).exp()
    rows = at.nonzero()[:, 0]
    for ids in (CLS, SEP, MASK, STRANGER):
        assert (p[:, ids] < 1e-6).all(), ids
    for i, row in enumerate(rows.tolist()):
        text = torch.cat([enc[row, 1:2], enc[row, 4 : 6 if row == 1 else -1]])
        torch.testing.assert_close(p[i, text.unique()].sum(), torch.tensor(1.0))
        assert p[i, enc[row, 4]] > 0  # the kept MLM target is copyable


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    b = batch()
    results = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt, dropout=0.0, attn_dropout=0.0, copy=True).train()
        loss, _ = model(b, BOTH)
        loss.backward()
        results.append((loss.detach(), model.decoder.layers[0].self_attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def gen(model, **kw):
    src = torch.tensor([[7, 12, 30, 41, 9, 22, 15]])
    return generate(model, src, bos_id=1, eos_id=2, max_new_tokens=12, **kw)


@pytest.mark.parametrize("copy", [False, True])
def test_generate_cache_agrees_and_special_cases_equal_greedy(copy):
    model = tiny(copy=copy)
    greedy = gen(model, strategy="greedy")
    assert len(greedy) == 12 and 2 not in greedy  # an untrained model rarely picks eos: all steps are exercised
    assert gen(model, strategy="greedy", use_cache=False) == greedy
    assert gen(model, strategy="beam", num_beams=1) == greedy
    assert gen(model, strategy="beam", num_beams=1, use_cache=False) == greedy
    assert gen(model, strategy="sample", top_k=1, generator=torch.Generator().manual_seed(3)) == greedy
    assert gen(model, strategy="sample", top_p=1e-6, generator=torch.Generator().manual_seed(3)) == greedy
    beam = gen(model, strategy="beam", num_beams=4)
    assert gen(model, strategy="beam", num_beams=4, use_cache=False) == beam
    sampling = {"strategy": "sample", "temperature": 2.0, "top_k": 20, "top_p": 0.9}
    sample = gen(model, **sampling, generator=torch.Generator().manual_seed(5))
    again = gen(model, **sampling, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert sample == again and sample != greedy


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("copy", [False, True])
def test_a_padded_batch_decodes_each_row_as_alone(strategy, copy):
    """generate_batch over sources of three lengths (padded) gives each row generate's tokens for it alone; a row
    that ends early (eos made certain for it) is fed eos while the others go on."""
    model = tiny(copy=copy, init_std=0.3)  # larger weights than BERT's init: each source decodes to its own tokens
    sources = [[7, 12, 30, 41, 9, 22, 15], [33, 8], [19, 4, 27, 11]]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for r, src in enumerate(sources):
        ids[r, : len(src)], mask[r, : len(src)] = torch.tensor(src), True
    kw = {"strategy": strategy, "bos_id": 1, "eos_id": 2, "max_new_tokens": 10, "num_beams": 3, "top_k": 20,
          "temperature": 1.5}  # fmt: skip
    seeds = lambda: [torch.Generator().manual_seed(10 + r) for r in range(3)]  # noqa: E731

    def each_alone(**more):
        return [generate(model, torch.tensor([src]), generator=g, **kw, **more) for src, g in zip(sources, seeds())]

    alone = each_alone(min_new_tokens=10)
    assert generate_batch(model, ids, mask, generators=seeds(), min_new_tokens=10, **kw) == alone
    assert generate_batch(model, ids, mask, generators=seeds(), min_new_tokens=10, use_cache=False, **kw) == alone
    assert len(set(map(tuple, alone))) == 3 and all(len(a) == 10 for a in alone)  # distinct rows, every step run

    original = model.next_token_logprobs

    def second_source_ends_after_two(dec, memory, mask, enc_ids, cache=None):
        logprobs, cache = original(dec, memory, mask, enc_ids, cache)
        if dec.shape[1] > 2:  # eos made certain from the third new token on, in the rows of source [33, 8]
            rows = enc_ids[:, 0] == 33
            logprobs[rows] = (logprobs[rows] + 100.0 * F.one_hot(torch.tensor(2), V)).log_softmax(-1)
        return logprobs, cache

    model.next_token_logprobs = second_source_ends_after_two
    short = each_alone()
    assert len(short[1]) == 2 and max(map(len, short)) > 4  # the batch goes on after its second row ends
    assert generate_batch(model, ids, mask, generators=seeds(), **kw) == short
    steps = []
    stop_after_four = lambda done: steps.append(done) or len(steps) > 4  # noqa: E731  (ranks that agree to stop)
    lengths = [len(o) for o in generate_batch(model, ids, mask, generators=seeds(), all_done=stop_after_four, **kw)]
    assert lengths == [min(4, len(o)) for o in short] and steps[:2] == [False, False]


def test_beam_beats_greedy_score_and_stops_at_eos():
    model = tiny()
    src = torch.tensor([[7, 12, 30, 41, 9, 22, 15]])
    memory = model.encode(src, torch.ones_like(src, dtype=torch.bool))

    @torch.no_grad()
    def score(tokens):  # summed log-probability of tokens (no eos): what beam search maximises at lp=0
        total, dec = 0.0, [1]
        for tok in tokens:
            lp, _ = model.next_token_logprobs(torch.tensor([dec]), memory, torch.ones_like(src, dtype=torch.bool), src)
            total, dec = total + float(lp[0, tok]), dec + [tok]
        return total

    greedy = gen(model, strategy="greedy")
    beam = gen(model, strategy="beam", num_beams=4, length_penalty=0.0)
    assert len(beam) == 12 and score(beam) >= score(greedy) - 1e-6
    # eos made near-certain from the fourth new token on: every strategy stops there, eos excluded
    original = model.next_token_logprobs

    def eos_after_three(dec, *args):
        logprobs, cache = original(dec, *args)
        if dec.shape[1] > 3:
            logprobs = (logprobs + 100.0 * F.one_hot(torch.tensor(2), V)).log_softmax(-1)
        return logprobs, cache

    model.next_token_logprobs = eos_after_three
    assert gen(model, strategy="greedy") == greedy[:3]
    assert len(gen(model, strategy="beam", num_beams=4)) == 3
    assert len(gen(model, strategy="sample", generator=torch.Generator().manual_seed(0))) == 3


def test_training_mode_is_restored():
    model = tiny().train()
    gen(model, strategy="greedy")
    assert model.training


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strategy": "topk"}, "strategy"),
        ({"strategy": "sample", "top_k": -1}, "top_k"),
        ({"strategy": "sample", "top_p": 0.0}, "top_p"),
        ({"strategy": "sample", "top_p": 1.5}, "top_p"),
        ({"strategy": "sample", "temperature": 0.0}, "temperature"),
        ({"strategy": "beam", "num_beams": 0}, "num_beams"),
        ({"strategy": "greedy", "max_new_tokens": 0}, "max_new_tokens"),
        ({"strategy": "greedy", "max_new_tokens": 65}, "max_new_tokens"),
    ],
)
def test_generate_rejects_bad_arguments(kw, match):
    args = {"bos_id": 1, "eos_id": 2, "max_new_tokens": 5, **kw}
    with pytest.raises(ValueError, match=match):
        generate(tiny(), torch.tensor([[7, 8, 9]]), **args)
    with pytest.raises(ValueError, match="enc_input_ids"):
        generate(tiny(), torch.tensor([[7, 8], [9, 10]]), bos_id=1, eos_id=2, max_new_tokens=5, strategy="greedy")


def test_no_repeat_ngrams_and_min_new_tokens_constrain_every_strategy():
    """A model that always prefers token 7, then 8, then eos: greedy and beam repeat 7 forever; with
    no_repeat_ngram_size=n no n-gram of bos + output occurs twice; with min_new_tokens eos waits."""
    model = tiny()
    preference = torch.full((V,), -20.0)
    preference[7], preference[8], preference[2] = 0.0, -1.0, -2.0

    def fixed(dec, *args):
        return preference.expand(dec.shape[0], -1).log_softmax(-1), None

    model.next_token_logprobs = fixed
    for strategy in ("greedy", "beam"):
        assert gen(model, strategy=strategy) == [7] * 12
        for n in (1, 2, 3):
            out = [1] + gen(model, strategy=strategy, no_repeat_ngram_size=n)
            ngrams = [tuple(out[i : i + n]) for i in range(len(out) - n + 1)]
            assert len(ngrams) == len(set(ngrams)) and len(out) > 1, (strategy, n, out)
    preference[2] = 5.0  # now eos first
    assert gen(model, strategy="greedy") == []
    assert gen(model, strategy="greedy", min_new_tokens=4) == [7, 7, 7, 7]
    assert len(gen(model, strategy="beam", min_new_tokens=4)) == 4
    with pytest.raises(ValueError, match="no_repeat_ngram_size=-1"):
        gen(model, strategy="greedy", no_repeat_ngram_size=-1)


def test_beam_search_with_fewer_live_candidates_than_beams():
    """A vocab of 4 (2 of them barred as n-gram repeats) leaves fewer live candidates than 4 beams: the search goes on
    with dead beams; with every candidate barred it ends with what it has."""
    model = tiny()
    choice = torch.tensor([-1.0, -5.0, -0.5, -2.0])  # eos (2) likely but barred before 4 tokens

    def four_tokens(dec, *args):
        return choice.expand(dec.shape[0], -1).log_softmax(-1), None

    model.next_token_logprobs = four_tokens
    out = gen(model, strategy="beam", num_beams=4, min_new_tokens=4)
    assert len(out) >= 4 and 2 not in out
    assert gen(model, strategy="beam", num_beams=2, no_repeat_ngram_size=1) in ([], [0], [3], [0, 3], [3, 0])


def test_padding_rows_of_the_vocab_are_never_chosen():
    """vocab_tokens: the ids from the tokenizer's size on (an embedding padded to a multiple of 128) are barred."""
    model = tiny()
    original = model.next_token_logprobs

    def padding_first(dec, *args):
        logprobs, cache = original(dec, *args)
        return (logprobs + 50.0 * F.one_hot(torch.tensor(V - 1), V)).log_softmax(-1), cache

    model.next_token_logprobs = padding_first
    for strategy in ("greedy", "beam", "sample"):
        g = torch.Generator().manual_seed(0)
        assert set(gen(model, strategy=strategy, generator=g)) == {V - 1}  # what it picks when nothing bars it
        out = gen(model, strategy=strategy, vocab_tokens=V - 1, generator=torch.Generator().manual_seed(0))
        assert out and V - 1 not in out, (strategy, out)
