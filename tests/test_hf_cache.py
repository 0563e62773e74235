"""The exported PALM class's key/value cache (pretrain/hf/modeling_plug_palm.py): generate() with use_cache=True gives the tokens
use_cache=False gives (greedy, beam search, sampling), on a padded batch, and a cached step-by-step forward gives
the full forward's logits. No run is trained: a small PALM with random weights is written as the export writes one
(the class file copied as modeling_plug_palm.py, named in auto_map) and loaded with trust_remote_code, so what
runs is the file an export holds, outside this package."""
import json
import os
import shutil

import pytest
import torch
from tolerance import assert_close_fp32, fp32_atol

from pretrain.hf.export import PALM_MODULE

transformers = hf_palm = None  # imported by _import_transformers below


@pytest.fixture(scope="module", autouse=True)
def _import_transformers():
    """transformers and the class module take about 5 s to import: when a test of this file runs, not when the
    file is collected, which each of make test's pytest-xdist workers does."""
    global transformers, hf_palm
    transformers = pytest.importorskip("transformers")
    from pretrain.hf import modeling_plug_palm as hf_palm

NEW = 14  # new tokens per generate call
PAD, BOS, EOS = 0, 1, 2


def export_like(out, pre_ln: bool):
    """More decoder layers than encoder layers: transformers 5 would size the cache by the encoder's."""
    torch.manual_seed(0)
    cfg = hf_palm.PlugPalmConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_decoder_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, pre_ln=pre_ln, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, decoder_start_token_id=BOS, architectures=["PlugPalmForConditionalGeneration"],
        auto_map={"AutoConfig": f"{PALM_MODULE}.PlugPalmConfig",
                  "AutoModelForSeq2SeqLM": f"{PALM_MODULE}.PlugPalmForConditionalGeneration"},
    )  # fmt: skip
    built = hf_palm.PlugPalmForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in built.parameters():  # wider than the default init: greedy then does not just repeat one token
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    built.save_pretrained(out)
    shutil.copyfile(hf_palm.__file__, os.path.join(out, f"{PALM_MODULE}.py"))
    transformers.GenerationConfig(decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                                  max_new_tokens=64, use_cache=True).save_pretrained(out)  # as export.py writes it
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    # the export's copy of the file (transformers' dynamic module), not this package's module
    assert type(loaded) is not hf_palm.PlugPalmForConditionalGeneration
    assert type(loaded).__module__.startswith("transformers_modules.") and type(loaded).__module__.endswith(PALM_MODULE)
    return loaded


@pytest.fixture(scope="module")
def pre_ln(tmp_path_factory):
    return export_like(tmp_path_factory.mktemp("palm_pre_ln"), True)


@pytest.fixture(scope="module", params=[True, False], ids=["pre_ln", "post_ln"])
def either(request, tmp_path_factory):
    return export_like(tmp_path_factory.mktemp("palm"), request.param)


def padded_batch():
    """Three sources of 10, 6 and 3 tokens, right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 96, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return ids.masked_fill(mask == 0, PAD), mask


class Counts:
    """Decoder tokens fed per forward, and how often each layer computes cross-attention keys and values."""

    def __init__(self, model):
        self.fed, self.cross_kv = [], 0
        self.handles = [model.decoder.layers[0].register_forward_pre_hook(lambda m, a: self.fed.append(a[0].shape[1]))]
        for layer in model.decoder.layers:
            self.handles.append(layer.cross_attn.kv.register_forward_hook(lambda *_: setattr(self, "cross_kv", self.cross_kv + 1)))

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=False, num_beams=4),
                                      dict(do_sample=True, top_k=20)], ids=["greedy", "beam", "sample"])  # fmt: skip
def test_generate_with_the_cache_gives_the_tokens_without(pre_ln, settings):
    """Pre-LN (PLUG's) only: a random post-LN model decodes one token over and over, which would prove little."""
    model = pre_ln
    ids, mask = padded_batch()
    layers = model.config.num_decoder_layers
    got = {}
    for use_cache in (False, True):
        counts = Counts(model)
        torch.manual_seed(7)  # sampling draws from the global generator, the same draws either way
        got[use_cache] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                        use_cache=use_cache, **settings)  # fmt: skip
        counts.close()
        if use_cache:  # one token a step; the encoder's keys and values once per layer per generate call
            assert counts.fed == [1] * NEW and counts.cross_kv == layers
        else:
            assert counts.fed == list(range(1, NEW + 1)) and counts.cross_kv == layers * NEW
    assert got[True].shape == (3, 1 + NEW)
    assert len(set(got[True][:, 1:].flatten().tolist())) > 5, got[True]  # not a degenerate decode
    assert torch.equal(got[True], got[False]), (got[True], got[False])


def test_cached_steps_give_the_full_forward_logits(either):
    model = either
    ids, mask = padded_batch()
    dec = torch.randint(5, 96, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert full.cache is None  # no cache unless asked for
        memory = model.get_encoder()(ids, mask)
        cache, steps, at = None, [], 0
        # a prefix of 3 (causal from position 0), single tokens, then 2 at once after a cache (the offset mask)
        for n in (3, 1, 1, 2, 1, 1):
            out = model(attention_mask=mask, encoder_outputs=memory, decoder_input_ids=dec[:, at : at + n],
                        cache=cache, use_cache=True)  # fmt: skip
            cache, at = out.cache, at + n
            steps.append(out.logits)
    assert cache.get_seq_length() == dec.shape[1] and len(cache.self_attention_cache.layers) == 3
    # the cached steps sum attention over the cache in other blocks than the full forward does
    assert_close_fp32(torch.cat(steps, 1), full.logits, model.config.intermediate_size, "cached steps")


@pytest.mark.parametrize("embedding_norm", [True, False], ids=["embedding_norm", "no_embedding_norm"])
def test_the_class_computes_our_palms_logits(tmp_path, embedding_norm):
    """Our Palm's weights (random, its LayerNorms too), written as the export writes them (palm_config, the plan,
    write_extra's class file and generation config), loaded with trust_remote_code: PalmExport.check finds our
    decoder logits and our greedy and beam tokens. With model.embedding_norm=true (PLUG's released model) the
    class normalises the embeddings as ours does; config.json carries the switch."""
    import types

    from pretrain.hf.export import PalmExport, palm_config, write_safetensors
    from pretrain.models.config import ModelConfig
    from pretrain.models.palm import Palm

    cfg = ModelConfig(vocab_size=96, hidden=32, layers=2, heads=4, ffn=64, max_positions=64, decoder_layers=3,
                      dropout=0.0, attn_dropout=0.0, embedding_norm=embedding_norm)  # fmt: skip
    torch.manual_seed(0)
    ours = Palm(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():  # wide, so that no mix-up hides; the LayerNorms' gains around 1
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5)
    assert isinstance(ours.encoder.embeddings.norm, torch.nn.LayerNorm) == embedding_norm
    tok = types.SimpleNamespace(pad_id=PAD, cls_id=BOS, sep_id=EOS, vocab_size=cfg.vocab_size)  # what palm_config and write_extra read
    state = ours.state_dict()
    write_safetensors(str(tmp_path / "model.safetensors"), PalmExport.plan(state, cfg), state)
    palm_config(cfg, tok).save_pretrained(tmp_path)
    PalmExport.write_extra(str(tmp_path), tok, cfg)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["embedding_norm"] is embedding_norm
    ids, mask = padded_batch()
    with torch.no_grad():
        diffs = PalmExport.check(ours, str(tmp_path), ids, mask.bool(), torch.Generator().manual_seed(3))
    dec = torch.randint(5, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))  # check's first draw
    with torch.no_grad():
        h, _ = ours.decoder(dec, ours.encoder.embeddings, ours.encode(ids, mask.bool()), mask.bool())
        want = torch.nn.functional.linear(h, ours.encoder.embeddings.word.weight)  # the logits check compares
    assert diffs["decoder_logits"] <= fp32_atol(want, cfg.ffn), (diffs, fp32_atol(want, cfg.ffn))
    assert diffs["greedy_tokens_differ"] == 0.0 and diffs["beam_tokens_differ"] == 0.0, diffs
    # the class's embeddings are a LayerNorm exactly when ours are: a config without the switch cannot hold them
    built = hf_palm.PlugPalmForConditionalGeneration(palm_config(cfg, tok))
    built.load_state_dict(state, strict=True)
    if embedding_norm:
        plain = hf_palm.PlugPalmForConditionalGeneration(hf_palm.PlugPalmConfig(**{**palm_config(cfg, tok).to_dict(),
                                                                                  "embedding_norm": False}))  # fmt: skip
        with pytest.raises(RuntimeError, match="encoder.embeddings.norm.weight"):
            plain.load_state_dict(state, strict=True)


def test_generate_takes_what_the_tokenizer_returns(tmp_path):
    """The standard idiom on an export: AutoTokenizer and AutoModelForSeq2SeqLM from the directory, then
    model.generate(**tokenizer(text, return_tensors="pt")). The BERT tokenizer hands token_type_ids too (zeros for
    one text); the class takes them into its encoder, and greedy decoding gives our decoding's tokens. Pair types
    (1 on the second text) are used as our encoder would use them."""
    from synthetic import synthetic_documents

    from pretrain.data.corpus import split_sentences
    from pretrain.data.tokenizer import Tokenizer, build_vocab
    from pretrain.hf.export import PalmExport, palm_config, save_tokenizer, write_safetensors
    from pretrain.models.config import ModelConfig
    from pretrain.models.decoding import generate
    from pretrain.models.palm import Palm

    sentences = [s for doc in synthetic_documents(100) for p in doc for s in split_sentences("".join(p))]
    build_vocab(sentences, 300, str(tmp_path / "vocab.txt"))
    tok = Tokenizer(str(tmp_path / "vocab.txt"))
    cfg = ModelConfig(vocab_size=tok.vocab_size + 4, hidden=32, layers=2, heads=4, ffn=64, max_positions=64,
                      decoder_layers=2, dropout=0.0, attn_dropout=0.0)  # fmt: skip  (+4: padding rows, as trained)
    torch.manual_seed(0)
    ours = Palm(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():  # wide, so that greedy decoding does not repeat one token
            if p.dim() > 1:
                p.normal_(0.0, 1.0)
    out = tmp_path / "hf"
    state = ours.state_dict()
    out.mkdir()
    write_safetensors(str(out / "model.safetensors"), PalmExport.plan(state, cfg), state)
    palm_config(cfg, tok).save_pretrained(out)
    PalmExport.write_extra(str(out), tok, cfg)
    save_tokenizer(tok.vocab_path, str(out))

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    decoded = set()
    for prompt in ("小明住在北京，已经12年了。", "有一天，小红在公园遇到了张伟。"):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert "token_type_ids" in inputs  # what raised "model_kwargs are not used by the model" before
        ids = torch.tensor([[tok.cls_id] + tok.encode(prompt) + [tok.sep_id]])
        assert torch.equal(inputs["input_ids"], ids)
        hf = model.generate(**inputs, max_new_tokens=12)[0, 1:].tolist()
        mine = generate(ours, ids, bos_id=tok.cls_id, eos_id=tok.sep_id, max_new_tokens=12, strategy="greedy",
                        num_beams=1, length_penalty=1.0, vocab_tokens=tok.vocab_size)  # fmt: skip
        assert (hf[: hf.index(tok.sep_id)] if tok.sep_id in hf else hf) == mine, prompt
        decoded.update(mine)
    assert len(decoded) > 5, decoded  # not a degenerate decode

    pair = tokenizer("小明住在北京。", "他每天都去公园。", return_tensors="pt")
    assert pair["token_type_ids"].any()
    with torch.no_grad():
        got = model.get_encoder()(**pair).last_hidden_state
        mask = pair["attention_mask"].bool()
        want = ours.encoder(pair["input_ids"], pair["token_type_ids"], mask)
        zeros = ours.encoder(pair["input_ids"], torch.zeros_like(pair["token_type_ids"]), mask)
    assert_close_fp32(got, want, cfg.ffn, "encoder with pair types")
    assert (got - zeros).abs().max() > 1e-2  # the types are used, not dropped
