"""pretrain.export: a stage-one run trained by 2 ranks under the real launcher, exported and loaded with
transformers' Auto classes, gives our hidden states, MLM logits and sentence logits; the tokenizer gives our ids."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tolerance import assert_close_fp32

from pretrain.data.tokenizer import Tokenizer
from pretrain.models.config import ModelConfig
from pretrain.models.structbert import StructBert
from pretrain.run_record import read_model_record
from pretrain.training import checkpoint, partitions
from runs import DEEPSPEED, PALM, REPO, TINY, launch, trainer_refusal

transformers = None  # imported by _import_transformers below


@pytest.fixture(scope="module", autouse=True)
def _import_transformers():
    """When a test of this file runs, not at collection (about 1 to 4 s for every pytest-xdist worker)."""
    global transformers
    transformers = pytest.importorskip("transformers")

EXPORT = [sys.executable, "-m", "pretrain.export"]


@pytest.fixture(scope="module", params=[True, False], ids=["pre_ln", "post_ln"])
def exported(request, prepared, stage_one, tmp_path_factory):
    """A 2-rank stage-one run and its export: the session's (the toy model is pre-LN) and a post-LN one."""
    root = tmp_path_factory.mktemp("export")
    run, out = root / "run", root / "hf"
    if request.param:
        run = stage_one["two_ranks"]
    else:
        launch(DEEPSPEED, TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=4", "model.pre_ln=false"])
    proc = subprocess.run(EXPORT + [f"run.dir={run}", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(run), str(out), request.param


def our_model(run):
    record = read_model_record(run)
    assert record.stage == "structbert"
    cfg = dataclasses.replace(record.cfg, dropout=0.0, attn_dropout=0.0)
    model = StructBert(cfg)
    model.load_state_dict(partitions.consolidate(checkpoint.find(run, "run.dir")), strict=True)
    return model.eval(), cfg


@pytest.mark.e2e
def test_auto_classes_load_it_and_give_our_outputs(exported):
    run, out, pre_ln = exported
    ours, cfg = our_model(run)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == ("megatron-bert" if pre_ln else "bert")
    g = torch.Generator().manual_seed(0)
    ids, types = torch.randint(5, cfg.vocab_size, (3, 24), generator=g), torch.randint(0, 2, (3, 24), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 17:], mask[2, 9:] = False, False
    with torch.no_grad():
        h = ours.encoder(ids, types, mask)
        expected = {"AutoModel": h, "AutoModelForMaskedLM": ours.mlm_head(h, ours.encoder.embeddings.word.weight),
                    "AutoModelForSequenceClassification": ours.sentence_head(h)}  # fmt: skip
        for name, want in expected.items():
            model, info = getattr(transformers, name).from_pretrained(out, output_loading_info=True)
            assert not info["missing_keys"] and not info["mismatched_keys"], info
            got = model.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask.long())
            got = got.last_hidden_state if name == "AutoModel" else got.logits
            where = mask if want.dim() == 3 else slice(None)
            assert_close_fp32(got[where], want[where], 128, name)  # transformers' classes sum in other orders


def mixed_lines(n=300, seed=0):
    """Chinese from the corpus, Latin words with accents, digits, full-width forms, emoji, literal specials."""
    rng = np.random.default_rng(seed)
    pieces = ["越南总理", "今天在这里说", "Hello", "WORLD", "Café", "naïve", "12345", "３．１４", "ＡＢＣ", "😀", "🚀",
              "[MASK]", "[SEP]", "[cls]", "，", "。", "！", "？", "e-mail@x.com", "  ", "\t", "\u3000", "##ab", "x" * 120]
    return ["".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(n)]


@pytest.mark.e2e
def test_the_tokenizer_gives_our_ids(exported):
    run, out, _ = exported
    ours, theirs = Tokenizer(os.path.join(run, "vocab.txt")), transformers.AutoTokenizer.from_pretrained(out)
    for line in mixed_lines():
        assert theirs(line, add_special_tokens=False)["input_ids"] == ours.encode(line), line


@pytest.mark.e2e
def test_bad_input_is_one_line_and_leaves_nothing(exported, tmp_path):
    run, out, _ = exported

    def fails(args, message):
        proc = subprocess.run(EXPORT + args, cwd=REPO, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr

    fails([f"run.dir={tmp_path}", f"out={tmp_path / 'x'}"], "no model.json")
    untrained = tmp_path / "untrained"  # a run directory whose run never saved a checkpoint
    untrained.mkdir()
    for name in ("model.json", "vocab.txt"):
        (untrained / name).write_bytes(open(os.path.join(run, name), "rb").read())
    fails([f"run.dir={untrained}", f"out={tmp_path / 'x'}"], "neither a run directory with checkpoints/latest")
    fails([f"run.dir={run}", f"out={out}"], "exists and is not empty")
    fails([f"run.dir={run}", f"out={tmp_path / 'y'}", "step=999"], "step999: no such directory")
    assert sorted(os.listdir(tmp_path)) == ["untrained"]  # nothing half-written beside out


@pytest.mark.e2e
def test_round_trip_through_init_from_hf_is_exact(exported, tmp_path):
    """Export, then init_from=hf:<export> into a ZeRO-3 model over 2 ranks: stage one's outputs are the
    original's exactly; stage two's encoder too, with the decoder from the top encoder layers."""
    run, out, pre_ln = exported
    for stage, decoder_init in (("structbert", "random"), ("palm", "encoder_top"))[: 2 if pre_ln else 1]:
        result = tmp_path / f"{stage}.json"
        launch(["deepspeed", "--num_gpus", "2", os.path.join(REPO, "tests", "init_equality.py")],
               [run, decoder_init, str(result), f"hf:{out}", stage])  # fmt: skip
        diffs = json.loads(result.read_text())
        assert diffs["encoder_max_diff"] == diffs["mlm_max_diff"] == diffs["sentence_max_diff"] == 0.0, diffs
        assert diffs["decoder_from_top_layer"] == (stage == "palm")


@pytest.mark.e2e
def test_training_continues_from_an_hf_directory(exported, prepared, tmp_path):
    run, out, pre_ln = exported
    if not pre_ln:
        pytest.skip("one launch is enough: the mapping is tested both ways above")
    new = tmp_path / "continued"
    launch(DEEPSPEED, TINY + [f"data.dir={prepared}", f"run.dir={new}", "train.max_steps=2", f"init_from=hf:{out}"])
    info = json.load(open(new / "run.json"))
    assert info["initialized_from"] == f"hf:{out}"
    # 3 embedding tables, 2 layers x 12 tensors, the final LayerNorm: everything, nothing fresh
    assert info["init_tensors"]["carried"] == {"encoder": 29, "mlm_head": 5, "sentence_head": 4}
    assert info["init_tensors"]["fresh"] == {}


@pytest.mark.e2e
def test_an_hf_directory_takes_a_vocab_extended_from_its_own(exported, tmp_path):
    """init_from=hf: with data whose vocab extends the directory's (pretrain.vocab base=): its tokens keep their
    rows, and each new token starts from the mean of the rows of the pieces that stood for it."""
    from pretrain import init_sources
    from pretrain.training import init_from

    run, out, pre_ln = exported
    if not pre_ln:
        pytest.skip("the vocab's handling does not depend on the layout")
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:  # as transformers saves it
        ids = json.load(f)["model"]["vocab"]
    theirs = sorted(ids, key=ids.get)
    (tmp_path / "ext.txt").write_text("".join(t + "\n" for t in theirs + ["鑫", theirs[-1] + theirs[-2]]), encoding="utf-8")
    original, cfg = our_model(run)
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 8)  # the padding grows too
    model = StructBert(cfg)
    source = init_sources.init_source(f"hf:{out}", {n: tuple(p.shape) for n, p in model.named_parameters()}, cfg,
                                   str(tmp_path / "ext.txt"))  # fmt: skip
    init_from.load_into(model, source, rank=0)
    n, unk = len(theirs), theirs.index("[UNK]")
    pieces = [(unk,), tuple(Tokenizer("theirs", tokens=theirs).encode(theirs[-1] + theirs[-2]))]
    for ours, want in ((model.encoder.embeddings.word.weight, original.encoder.embeddings.word.weight),
                       (model.mlm_head.bias, original.mlm_head.bias)):  # fmt: skip
        assert torch.equal(ours[:n], want[:n])
        for row, ids in enumerate(pieces, start=n):
            assert torch.equal(ours[row], want[list(ids)].mean(0)), (row, ids)


@pytest.mark.e2e
def test_bad_hf_directories_fail_with_one_line(exported, prepared, tmp_path):
    run, out, pre_ln = exported
    if not pre_ln:
        pytest.skip("the checks do not depend on the layout")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    changed = tmp_path / "other_vocab"
    subprocess.run(["cp", "-r", out, str(changed)], check=True)
    vocab = open(os.path.join(run, "vocab.txt"), encoding="utf-8").read().split("\n")
    vocab[7] = "某"
    (changed / "vocab.txt").write_text("\n".join(vocab), encoding="utf-8")
    cases = [
        (f"init_from=hf:{other}", "model_type 'gpt2'; a BERT (post-LN) or MegatronBERT (pre-LN) is needed"),
        (f"init_from=hf:{tmp_path / 'none'}", "no such directory"),
        ("model.hidden=32", "hidden_size=64, model.hidden=32"),
        ("model.pre_ln=false", "a megatron-bert model is pre-LN; set model.pre_ln=true"),
        ("model.embedding_norm=true", "a megatron-bert model has no embedding LayerNorm; set model.embedding_norm=false"),
        (f"init_from=hf:{changed}", "first at id 7"),
    ]
    for i, (override, message) in enumerate(cases):
        args = TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", f"init_from=hf:{out}", override]
        if i == 0:  # the command's one line, once; the trainer's setup (before any rank writes) for the others
            proc = launch([sys.executable, "-m", "pretrain.train"], args, expect_rc=2)
            lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("pretrain.train: error:")]
            assert len(lines) == 1 and message in lines[0], proc.stderr
        else:
            assert message in trainer_refusal(args, world_size=2)
        assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def palm_exported(palm_run, tmp_path_factory):
    """The session's 2-rank stage-two run and its export."""
    run, out = palm_run, tmp_path_factory.mktemp("palm_export") / "hf"
    proc = subprocess.run(EXPORT + [f"run.dir={run}", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "greedy_tokens_differ False, beam_tokens_differ False" in proc.stdout
    return str(run), str(out)


@pytest.mark.e2e
def test_stage_two_generates_our_tokens_through_transformers(palm_exported):
    from safetensors import safe_open

    from pretrain.generate import load_model
    from pretrain.models.decoding import generate

    run, out = palm_exported
    ours, tok, _ = load_model(run, None)
    theirs, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True,
                                                                       output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert [k for k in f.keys() if k.endswith("word.weight")] == ["encoder.embeddings.word.weight"]  # once
    g = torch.Generator().manual_seed(1)
    src = torch.randint(5, ours.cfg.vocab_size, (2, 16), generator=g)
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 10:] = False
    dec = torch.randint(5, ours.cfg.vocab_size, (2, 7), generator=g)
    with torch.no_grad():
        h, _ = ours.decoder(dec, ours.encoder.embeddings, ours.encode(src, mask), mask)
        want = torch.nn.functional.linear(h, ours.encoder.embeddings.word.weight)
        got = theirs.eval()(input_ids=src, attention_mask=mask.long(), decoder_input_ids=dec).logits
        assert_close_fp32(got, want, 128, "decoder logits")  # model.ffn=128 (TINY)
        for prompt in ("小明住在北京，已经12年了。", "有一天，小红在公园遇到了张伟。"):
            ids = torch.tensor([[tok.cls_id] + tok.encode(prompt) + [tok.sep_id]])
            for strategy, beams, constraints in (("greedy", 1, {}), ("beam", 4, {}),
                                                 ("greedy", 1, dict(no_repeat_ngram_size=2, min_new_tokens=6)),
                                                 ("beam", 4, dict(no_repeat_ngram_size=3, min_new_tokens=6))):  # fmt: skip
                mine = generate(ours, ids, bos_id=tok.cls_id, eos_id=tok.sep_id, max_new_tokens=12, strategy=strategy,
                                num_beams=beams, length_penalty=1.0, vocab_tokens=tok.vocab_size, **constraints)  # fmt: skip
                hf = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                     num_beams=beams, do_sample=False, length_penalty=1.0, **constraints)[0, 1:].tolist()  # fmt: skip
                assert (hf[: hf.index(tok.sep_id)] if tok.sep_id in hf else hf) == mine, (prompt, strategy, constraints)


@pytest.mark.e2e
def test_the_tokenizer_s_output_goes_straight_into_generate(palm_exported):
    """The idiom a new user writes on the exported directory: the BERT tokenizer's token_type_ids included, greedy
    generate() gives pretrain.generate's decoding of the same prompt."""
    from pretrain.generate import load_model
    from pretrain.models.decoding import generate

    run, out = palm_exported
    ours, tok, _ = load_model(run, None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True)
    for prompt in ("小明住在北京，已经12年了。", "有一天，小红在公园遇到了张伟。"):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert "token_type_ids" in inputs
        hf = model.generate(**inputs, max_new_tokens=12)[0, 1:].tolist()
        mine = generate(ours, inputs["input_ids"], bos_id=tok.cls_id, eos_id=tok.sep_id, max_new_tokens=12,
                        strategy="greedy", num_beams=1, length_penalty=1.0, vocab_tokens=tok.vocab_size)  # fmt: skip
        assert (hf[: hf.index(tok.sep_id)] if tok.sep_id in hf else hf) == mine, prompt


@pytest.mark.e2e
def test_a_copy_mechanism_run_is_refused(prepared, tmp_path):
    run = tmp_path / "copy"
    launch([sys.executable, "-m", "pretrain.train"], PALM + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=1",
           "model.copy=true"])  # fmt: skip
    proc = subprocess.run(EXPORT + [f"run.dir={run}", f"out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "model.copy=true" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_the_streaming_writer_writes_what_safetensors_reads(tmp_path):
    """write_safetensors writes one tensor at a time (no second copy of the model); safetensors reads it back."""
    from safetensors.torch import load_file

    from pretrain.hf.export import write_safetensors
    from pretrain.hf.layout import to_hf_plan

    cfg = ModelConfig(vocab_size=40, hidden=8, layers=2, heads=2, ffn=16, max_positions=12)
    state = {k: torch.randn(v.shape) for k, v in StructBert(cfg).state_dict().items()}
    plan = to_hf_plan(state, cfg)
    write_safetensors(str(tmp_path / "m.safetensors"), plan, state)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert set(back) == {theirs for theirs, _, _ in plan}
    for theirs, ours, third in plan:
        assert torch.equal(back[theirs], state[ours] if third is None else state[ours].chunk(3)[third])
    with pytest.raises(Exception, match="does not know where to put"):
        to_hf_plan({**state, "decoder.layers.0.ffn.up.weight": torch.zeros(1)}, cfg)


def test_an_embedding_norm_has_no_place_in_megatron_bert(tmp_path):
    """MegatronBERT (the pre-LN export and init_from=hf:) has no embedding LayerNorm: a pre-LN encoder with
    model.embedding_norm=true is refused with one line, both ways (format=plug holds it); post-LN BERT has one,
    and the PALM class carries the switch."""
    from pretrain import init_sources
    from pretrain.errors import UserError
    from pretrain.hf.export import EncoderExport, PalmExport

    cfg = ModelConfig(vocab_size=40, hidden=8, layers=2, heads=2, ffn=16, max_positions=12)
    with_norm = dataclasses.replace(cfg, embedding_norm=True)
    with pytest.raises(UserError, match=r"^run.dir=r: model.embedding_norm=true; transformers' MegatronBERT \(the pre-LN"
                                        r" export\) has no embedding LayerNorm to hold it: export with format=plug$"):  # fmt: skip
        EncoderExport.refuse(with_norm, "r")
    EncoderExport.refuse(cfg, "r")  # PLUG's layout without it, and post-LN BERT, which always has one
    EncoderExport.refuse(dataclasses.replace(with_norm, pre_ln=False), "r")
    PalmExport.refuse(with_norm, "r")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "megatron-bert"}))
    with pytest.raises(UserError, match=r"^init_from=hf:\S+: a megatron-bert model has no embedding LayerNorm; set "
                                        r"model.embedding_norm=false$"):  # fmt: skip
        init_sources.init_source(f"hf:{tmp_path}", {}, with_norm, None)
    with pytest.raises(UserError, match="hidden_size=None, model.hidden=8"):  # past that check without the switch
        init_sources.init_source(f"hf:{tmp_path}", {}, cfg, None)
