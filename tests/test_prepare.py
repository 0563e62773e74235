import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pretrain.data.indexed import IndexedCorpus
from pretrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer, build_vocab, encode_sentences, jieba_segmenter
from pretrain.errors import UserError
from pretrain.prepare import PrepareConfig, _valid_documents, load_config, prepare
from synthetic import write_synthetic_corpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BERT_LAYOUT = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
               + list("!,。我爱北京天安门") + ["hell", "##o", "world", "1", "##2", "##3"])


def write_vocab(path, tokens) -> str:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.prepare", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain.prepare: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_tokenizer_with_bert_base_chinese_layout(tmp_path):
    tok = Tokenizer(write_vocab(tmp_path / "vocab.txt", BERT_LAYOUT))
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 4, 5, 6, 7)
    assert tok.vocab_size == len(BERT_LAYOUT)
    assert [tok.id_to_token(i) for i in tok.normal_ids] == BERT_LAYOUT[8:]
    assert tok.normal_ids.dtype == np.int64

    ids = tok.encode("我爱北京天安门! Hello WORLD 123 猫")
    assert [tok.id_to_token(i) for i in ids] == ["我", "爱", "北", "京", "天", "安", "门", "!", "hell", "##o", "world",
                                                 "1", "##2", "##3", "[UNK]"]
    assert tok.decode(ids) == "我爱北京天安门!hello world 123"
    assert tok.decode([tok.cls_id, *tok.encode("我爱"), tok.sep_id, tok.pad_id]) == "我爱"
    assert tok.token_to_id("北") == BERT_LAYOUT.index("北") and tok.token_to_id("猫") is None


def test_vocab_missing_special_tokens(tmp_path):
    path = write_vocab(tmp_path / "vocab.txt", [t for t in BERT_LAYOUT if t not in ("[MASK]", "[CLS]")])
    with pytest.raises(UserError, match=r"vocab.txt: vocab lacks special token\(s\) \[CLS\] \[MASK\]"):
        Tokenizer(path)


def test_build_vocab_is_deterministic(tmp_path, zh_corpus):
    sentences = open(zh_corpus, encoding="utf-8").read().split()
    build_vocab(sentences, 300, str(tmp_path / "a.txt"))
    # A fresh interpreter with another hash seed: the order of ties must not depend on set/dict order.
    code = (f"from pretrain.data.tokenizer import build_vocab; "
            f"build_vocab(reversed({sentences!r}), 300, {str(tmp_path / 'b.txt')!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env={**os.environ, "PYTHONHASHSEED": "7"})
    a, b = (tmp_path / "a.txt").read_bytes(), (tmp_path / "b.txt").read_bytes()
    assert a == b
    tokens = a.decode().splitlines()
    assert tokens[:5] == SPECIAL_TOKENS and len(tokens) == len(set(tokens)) <= 300
    tok = Tokenizer(str(tmp_path / "a.txt"))
    assert all(tok.unk_id not in tok.encode(s) for s in sentences)


def test_valid_split_sizes():
    assert _valid_documents(1000, 0.01, 1) == _valid_documents(1000, 0.01, 1)
    assert len(_valid_documents(1000, 0.01, 1)) == 10
    assert len(_valid_documents(10, 0.01, 1)) == 1  # at least one
    assert len(_valid_documents(2, 0.9, 1)) == 1  # train keeps one
    assert _valid_documents(1, 0.5, 1) == set() and _valid_documents(100, 0.0, 1) == set()


def test_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    documents = write_synthetic_corpus(corpus, num_docs=60, seed=3)
    meta = prepare(PrepareConfig(input=str(corpus), out=str(tmp_path / "out"), vocab_size=400, valid_fraction=0.1))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train.idx", "valid.bin", "valid.idx", "vocab.txt"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = Tokenizer(str(out / "vocab.txt"))
    valid = _valid_documents(len(documents), 0.1, 1234)
    expected = {"train": [], "valid": []}
    for i, doc in enumerate(documents):
        expected["valid" if i in valid else "train"].append([s for paragraph in doc for s in paragraph])
    segment = jieba_segmenter()
    for split, docs in expected.items():
        corpus_split = IndexedCorpus.open(str(out / split))
        counts = meta["splits"][split]
        assert (corpus_split.num_docs, corpus_split.num_sents, corpus_split.num_tokens) == (
            counts["documents"], counts["sentences"], counts["tokens"]) == (
            len(docs), sum(map(len, docs)), sum(len(tok.encode(s)) for d in docs for s in d))
        for d, doc in enumerate(docs):
            sentence_ids = corpus_split.doc_sentence_range(d)
            assert len(sentence_ids) == len(doc)
            for s, sentence in zip(sentence_ids, doc):
                ids = corpus_split.sentence(s)
                assert ids.tolist() == tok.encode(sentence)
                assert tok.decode(ids) == sentence  # synthetic text is lower-case with no spaces
                starts = corpus_split.word_start[corpus_split.sent_offsets[s] : corpus_split.sent_offsets[s + 1]]
                assert_word_starts(tok, sentence, segment(sentence), ids, starts)
    assert meta["vocab_size"] == tok.vocab_size <= 400 and meta["token_dtype"] == "uint16"
    assert meta["segmenter"].startswith("jieba ") and meta["inputs"] == [str(corpus)]


def assert_word_starts(tok, sentence, words, ids, starts):
    """The tokens of each jieba word carry exactly one start flag, on the word's first token; '##' never starts."""
    enc = tok.encode_batch([sentence])[0]
    assert enc.ids == ids.tolist()
    pos = 0
    for word in words:
        inside = [i for i, (begin, _) in enumerate(enc.offsets) if pos <= begin < pos + len(word)]
        if inside:
            assert starts[inside].tolist() == [1] + [0] * (len(inside) - 1), (sentence, word)
        pos += len(word)
    assert not any(starts[i] for i, piece in enumerate(enc.tokens) if piece.startswith("##"))


def test_word_starts_on_mixed_text(tmp_path):
    tok = Tokenizer(write_vocab(tmp_path / "vocab.txt", BERT_LAYOUT))
    sentence = "我爱北京天安门123"
    [(ids, starts)] = encode_sentences(tok, [sentence, "  "], jieba_segmenter())
    words = jieba_segmenter()(sentence)
    assert words == ["我", "爱", "北京", "天安门", "123"]
    assert [tok.id_to_token(i) for i in ids] == list("我爱北京天安门") + ["1", "##2", "##3"]
    assert starts.tolist() == [1, 1, 1, 0, 1, 0, 0, 1, 0, 0]
    assert ids.dtype == np.int32 and starts.dtype == np.uint8


def test_workers_give_byte_identical_output(tmp_path, zh_corpus):
    for workers in (1, 2):
        prepare(PrepareConfig(input=zh_corpus, out=str(tmp_path / f"w{workers}"), workers=workers, vocab_size=500,
                              valid_fraction=0.05))
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w2")) and "meta.json" in names
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_given_vocab_is_copied(tmp_path, zh_corpus):
    built = prepare(PrepareConfig(input=zh_corpus, out=str(tmp_path / "built"), vocab_size=500))
    given_path = tmp_path / "built" / "vocab.txt"
    given = prepare(PrepareConfig(input=zh_corpus, out=str(tmp_path / "given"), vocab=str(given_path)))
    assert (tmp_path / "given" / "vocab.txt").read_bytes() == given_path.read_bytes()
    assert given == built
    for name in ("train.bin", "train.idx", "valid.idx"):
        assert (tmp_path / "given" / name).read_bytes() == (tmp_path / "built" / name).read_bytes()


def test_bert_layout_vocab_gives_wider_ids(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("我爱北京。天安门！\n", encoding="utf-8")
    vocab = write_vocab(tmp_path / "vocab.txt", BERT_LAYOUT + [f"x{i}" for i in range(70000)])
    meta = prepare(PrepareConfig(input=str(corpus), out=str(tmp_path / "out"), vocab=vocab))
    assert meta["token_dtype"] == "int32"
    split = IndexedCorpus.open(str(tmp_path / "out" / "train"))
    assert split.num_sents == 2 and split.sentence(1).tolist() == Tokenizer(vocab).encode("天安门！")


def test_single_sentence_documents_are_kept_and_counted(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("只有一句。\n\n第一句。第二句。\n\n又一篇\n\n第一段。\n第二段。\n", encoding="utf-8")
    meta = prepare(PrepareConfig(input=str(corpus), out=str(tmp_path / "out"), vocab_size=100, valid_fraction=0))
    assert meta["splits"]["train"]["documents"] == 4
    assert meta["splits"]["train"]["sentences"] == 6
    assert meta["splits"]["train"]["single_sentence_documents"] == 2
    assert meta["splits"]["valid"] == dict(documents=0, sentences=0, tokens=0, single_sentence_documents=0)
    assert IndexedCorpus.open(str(tmp_path / "out" / "valid")).num_docs == 0


def test_meta_is_deterministic_and_out_is_guarded(tmp_path, zh_corpus):
    out = tmp_path / "out"
    prepare(PrepareConfig(input=zh_corpus, out=str(out), vocab_size=300))
    first = (out / "meta.json").read_bytes()
    with pytest.raises(UserError, match="exists and is not empty"):
        prepare(PrepareConfig(input=zh_corpus, out=str(out), vocab_size=300))
    (out / "stale").write_text("x")
    prepare(PrepareConfig(input=zh_corpus, out=str(out), vocab_size=300, overwrite=True))
    assert (out / "meta.json").read_bytes() == first and not (out / "stale").exists()
    meta = json.loads(first)
    assert meta["format_version"] == 1 and meta["lowercase"] is True
    assert meta["vocab_sha256"] == __import__("hashlib").sha256((out / "vocab.txt").read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["out", "zh_corpus.txt"]  # no temporary directories left


def test_cli_summary(tmp_path, zh_corpus):
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}", "vocab_size=300", "workers=2")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train = meta["splits"]["train"]
    assert f"train: {train['documents']} documents, {train['sentences']} sentences, {train['tokens']} tokens" \
        in result.stdout


def test_cli_empty_input(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text(" \n\n\u3000\n")
    result = cli(f"input={corpus}", f"out={tmp_path / 'out'}")
    assert_one_line_error(result, f"input={corpus}: no text found (empty input)")
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


def test_cli_vocab_missing_mask(tmp_path, zh_corpus):
    vocab = write_vocab(tmp_path / "vocab.txt", [t for t in BERT_LAYOUT if t != "[MASK]"])
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}", f"vocab={vocab}")
    assert_one_line_error(result, vocab, "[MASK]")
    assert not (tmp_path / "out").exists()


def test_cli_out_not_empty(tmp_path, zh_corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}")
    assert_one_line_error(result, "out=", "not empty", "overwrite=true")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_cli_bad_utf8_leaves_nothing(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes("好。\n".encode() + b"\xc3\x28\n")
    result = cli(f"input={corpus}", f"out={tmp_path / 'out'}")
    assert_one_line_error(result, f"{corpus}: invalid UTF-8 at byte offset 7 (line 2)")
    assert sorted(os.listdir(tmp_path)) == ["bad.txt"]


@pytest.mark.parametrize("args, fragments", [
    (["out=x"], ["missing input="]),
    (["input=a", "out=b", "vocab_sise=10"], ["vocab_sise"]),
    (["input=a", "out=b", "workers=two"], ["workers", "two"]),
    (["input=a", "out=b", "on_error=ignore"], ["on_error=ignore"]),
    (["input=a", "out=b", "valid_fraction=1.5"], ["valid_fraction=1.5"]),
    (["input", "out=b"], ["input: expected key=value"]),
])
def test_config_errors(tmp_path, args, fragments):
    with pytest.raises(UserError) as e:
        prepare(load_config(args))
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)


def test_config_takes_paths_verbatim():
    cfg = load_config(["input=data/*.txt", "out=a b:c", "workers=3", "overwrite=true", "vocab="])
    assert (cfg.input, cfg.out, cfg.workers, cfg.overwrite, cfg.vocab) == ("data/*.txt", "a b:c", 3, True, None)


def test_cli_unknown_key_is_one_line(tmp_path):
    assert_one_line_error(cli("input=a", "out=b", "bogus=1"), "bogus")
