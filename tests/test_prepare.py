import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from synthetic import synthetic_documents, write_synthetic_corpus
from tokenizers import pre_tokenizers

import pretrain.prepare
from pretrain.data.corpus import (_SENTENCE, bounded_pieces, iter_input_files, iter_paragraphs, read_documents,
                                  split_sentences)  # fmt: skip
from pretrain.data.indexed import IndexedCorpus
from pretrain.data.prepare_parts import valid_documents
from pretrain.data.tokenizer import (CONTINUATION, SPECIAL_TOKENS, Tokenizer, _normalizer, build_vocab, count_words,
                                     encode_paragraphs, jieba_segmenter)  # fmt: skip
from pretrain.errors import UserError
from pretrain.prepare import PrepareConfig, load_config, prepare, shard_files
from pretrain.vocab import VocabConfig, build

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BERT_LAYOUT = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
               + list("!,。我爱北京天安门") + ["hell", "##o", "world", "1", "##2", "##3"])


def write_vocab(path, tokens) -> str:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.prepare", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *fragments, prog="pretrain.prepare"):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
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


def old_build_vocab(sentences, vocab_size: int, out_path: str, min_word_count: int = 2) -> None:
    """build_vocab as it was before prepare streamed (it counted the chunks of the whole corpus at once): the vocab
    must not change."""
    import itertools

    normalizer, pre_tokenizer = _normalizer(), pre_tokenizers.BertPreTokenizer()
    chunks = Counter()
    sentences = iter(sentences)
    while batch := list(itertools.islice(sentences, 1000)):
        chunks.update(normalizer.normalize_str("\n".join(batch)).split())
    words = Counter()
    for chunk, n in chunks.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
            words[word] += n
    chars = Counter()
    for word, n in words.items():
        if len(word) > 100:
            continue
        chars[word[0]] += n
        for ch in word[1:]:
            chars["##" + ch] += n
    budget = vocab_size - len(SPECIAL_TOKENS)
    by_count = lambda counts: sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # noqa: E731
    alphabet = [t for t, _ in by_count(chars)][:budget]
    whole_words = Counter({w: n for w, n in words.items() if 1 < len(w) <= 100 and n >= min_word_count})
    vocab = SPECIAL_TOKENS + alphabet + [w for w, _ in by_count(whole_words)][: budget - len(alphabet)]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(t + "\n" for t in vocab))


def old_encode_sentences(tok, sentences, segmenter):
    """Word starts as they were computed before encode_paragraphs (one sentence at a time, with sets)."""
    out = []
    for sentence, enc in zip(sentences, tok.encode_batch(sentences)):
        if not enc.ids:
            continue
        word_offsets, pos = set(), 0
        for word in segmenter(sentence):
            word_offsets.add(pos)
            pos += len(word)
        starts = [start in word_offsets and not piece.startswith(CONTINUATION)
                  for (start, _), piece in zip(enc.offsets, enc.tokens)]
        out.append((enc.ids, starts))
    return out


def write_mixed_corpus(root) -> str:
    """A .txt, a .jsonl and a nested .txt with what prepare must handle alike whatever the chunking: Latin words,
    digits, accents, quotes, spaces between sentences, CRLF and a BOM, a document that tokenizes to nothing,
    and bad lines (skipped with on_error=skip, max_line_bytes=2000)."""
    rng = random.Random(11)
    pieces = ["我爱北京天安门", "你好", "Hello WORLD", "123", "café", "“测试。”", "他说：", "……", "再见！", "  ", "，",
              "ok? ", "《书》", "第2版", "ÉCOLE", "中华人民共和国", "研究生命起源", "结婚的和尚未结婚的"]

    def paragraph():
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))).strip() or "空"

    (root / "sub").mkdir(parents=True, exist_ok=True)
    with open(root / "a.txt", "w", encoding="utf-8", newline="") as f:
        for _ in range(60):
            f.write("\r\n".join(paragraph() for _ in range(rng.randint(1, 5))) + "\r\n\r\n")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            text = "\n".join(paragraph() for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            if i == 20:
                f.write("{bad json\n" + json.dumps({"text": "\x01\x02"}) + "\n\n")
    with open(root / "sub" / "c.txt", "wb") as f:
        f.write("\ufeff第一段。第二句！\n\n".encode() + b"bad \xff line\n" + "好。\n\n\x01\n\n".encode()
                + b"x" * 3000 + b"\n" + "长文。".encode() * 400 + b"\n" + "尾。".encode())
    return str(root)


MIXED = dict(vocab_size=300, valid_fraction=0.1, seed=7, on_error="skip", max_line_bytes=2000)


@pytest.mark.e2e
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
    assert valid_documents(1000, 0.01, 1).tolist() == valid_documents(1000, 0.01, 1).tolist()
    assert len(valid_documents(1000, 0.01, 1)) == 10
    assert len(valid_documents(10, 0.01, 1)) == 1  # at least one
    assert len(valid_documents(2, 0.9, 1)) == 1  # train keeps one
    assert valid_documents(1, 0.5, 1).size == 0 and valid_documents(100, 0.0, 1).size == 0


def test_valid_split_rule_is_unchanged():
    """The demo's figures depend on which documents are held out: the rule is random.Random(seed).sample."""
    for num_docs, fraction, seed in [(3182, 0.01, 1234), (1000, 0.05, 7), (10**7, 0.001, 3)]:
        n = min(max(1, round(fraction * num_docs)), num_docs - 1)
        expected = sorted(random.Random(seed).sample(range(num_docs), n))
        valid = valid_documents(num_docs, fraction, seed)
        assert valid.dtype == np.int64 and valid.tolist() == expected


def test_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    documents = write_synthetic_corpus(corpus, num_docs=60, seed=3)
    meta = prepare(PrepareConfig(input=str(corpus), out=str(tmp_path / "out"), vocab_size=400, valid_fraction=0.1))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train.idx", "valid.bin", "valid.idx", "vocab.txt"]
    assert json.loads((out / "meta.json").read_text()) == meta
    tok = Tokenizer(str(out / "vocab.txt"))
    valid = valid_documents(len(documents), 0.1, 1234)
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
    paragraph = "我爱北京天安门123"
    enc = encode_paragraphs(tok, [paragraph, "  ", "\x01"], jieba_segmenter())
    words = jieba_segmenter()(paragraph)
    assert words == ["我", "爱", "北京", "天安门", "123"]
    assert [tok.id_to_token(i) for i in enc.ids] == list("我爱北京天安门") + ["1", "##2", "##3"]
    assert enc.word_start.tolist() == [1, 1, 1, 0, 1, 0, 0, 1, 0, 0]
    assert enc.sentence_tokens.tolist() == [10] and enc.paragraph_sentences.tolist() == [1, 0, 0]
    assert enc.ids.dtype == np.int32 and enc.word_start.dtype == np.uint8


def test_encode_paragraphs_matches_one_sentence_at_a_time(tmp_path):
    """One jieba cut per paragraph, flat arrays: the same ids and word starts as cutting each sentence alone."""
    root = write_mixed_corpus(tmp_path / "mixed")
    documents, _ = read_documents(iter_input_files(root), on_error="skip", max_line_bytes=10_000)
    paragraphs = [p for doc in documents for p in doc] + ["天安门。  “你好！”他说…… 研究生命起源。", "结婚的和尚未结婚的"]
    build_vocab((s for p in paragraphs for s in split_sentences(p)), 300, str(tmp_path / "vocab.txt"))
    tok, segment = Tokenizer(str(tmp_path / "vocab.txt")), jieba_segmenter()
    expected = old_encode_sentences(tok, [s for p in paragraphs for s in split_sentences(p)], segment)
    enc = encode_paragraphs(tok, paragraphs, segment)
    bounds = np.cumsum(enc.sentence_tokens)[:-1]
    got = [(i.tolist(), s.tolist()) for i, s in zip(np.split(enc.ids, bounds), np.split(enc.word_start, bounds))]
    assert got == [(ids, [int(s) for s in starts]) for ids, starts in expected]
    assert len(got) > 500 and enc.paragraph_sentences.sum() == len(got)
    assert tok.unk_id in enc.ids  # the 3000-character word


def test_long_paragraphs_are_cut_between_sentences(tmp_path):
    """bounded_pieces: pieces of at most the limit that together are the paragraph, with the paragraph's sentences
    and jieba words, for every limit from the longest sentence up; a sentence over the limit is cut into pieces of
    at most the limit, after a character jieba cuts alone when there is one."""
    root = write_mixed_corpus(tmp_path / "mixed")
    documents, _ = read_documents(iter_input_files(root), on_error="skip", max_line_bytes=10_000)
    paragraph = "".join(p for doc in documents for p in doc)  # some 10,000 characters, one paragraph
    segment = jieba_segmenter()
    longest = max(m.end() - m.start() for m in _SENTENCE.finditer(paragraph))
    for limit in (longest, longest + 1, 2 * longest + 3, 5000, len(paragraph) - 1):
        pieces = list(bounded_pieces(paragraph, limit))
        assert "".join(pieces) == paragraph and max(map(len, pieces)) <= limit, limit
        assert len(pieces) >= len(paragraph) / limit
        assert [s for p in pieces for s in split_sentences(p)] == split_sentences(paragraph), limit
        assert [w for p in pieces for w in segment(p)] == segment(paragraph), limit
    assert list(bounded_pieces(paragraph, len(paragraph))) == [paragraph]

    no_end = "我爱北京天安门" * 10 + " hello world " + "研究生命起源" * 20  # one sentence, 203 characters
    pieces = list(bounded_pieces("第一句。" + no_end + "。末句", 100))
    assert pieces[0] == "第一句。" and "".join(pieces[1:]) == no_end + "。末句"
    assert max(map(len, pieces)) <= 100
    assert pieces[1].endswith(" hello world ")  # after the last character in its second half that jieba cuts alone
    assert pieces[2] == "研究生命起源" * 16 + "研究生命"  # no such character: cut at the limit
    assert len(pieces) == 4


def test_vocab_is_the_old_builders(tmp_path, zh_corpus):
    root = write_mixed_corpus(tmp_path / "mixed")
    documents, _ = read_documents(iter_input_files(root) + [zh_corpus], on_error="skip", max_line_bytes=10_000)
    sentences = [s for doc in documents for p in doc for s in split_sentences(p)]
    for size in (40, 300, 5000):
        old_build_vocab(sentences, size, str(tmp_path / "old.txt"))
        build_vocab(sentences, size, str(tmp_path / "new.txt"))
        assert (tmp_path / "old.txt").read_bytes() == (tmp_path / "new.txt").read_bytes(), size
    # Counts add up, in any order and cut anywhere: what lets workers count apart.
    parts = [count_words(sentences[i : i + 37]) for i in range(0, len(sentences), 37)]
    assert sum(reversed(parts), Counter()) == count_words(sentences) == count_words(sentences, batch=5)


# sha256[:16] of each file prepared by the code before streaming (commit 75a8aba), meta.json without "inputs".
OLD_OUTPUT = {
    "zh": {"train.bin": "798f3142661da9f7", "train.idx": "b98ee743e0ea196e", "valid.bin": "648f1e959898a583",
           "valid.idx": "966b142323bdd0b8", "vocab.txt": "2061c20e6c6725a2", "meta.json": "bb292fd15f81030d"},
    "mixed": {"train.bin": "c6e4bdae682149b2", "train.idx": "38d903b97d4fc466", "valid.bin": "1a3621f9a3a14d74",
              "valid.idx": "d953f1ccdeb5b44c", "vocab.txt": "e6e3f76f6d03ea41", "meta.json": "6fffb309688295d1"},
}  # fmt: skip


def digests(out) -> dict:
    found = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()[:16] for name in os.listdir(out)}
    meta = json.loads((out / "meta.json").read_text())
    for added in ("inputs", "to_simplified", "unknown"):  # what meta.json gained since (issue 28); the data is unchanged
        meta.pop(added, None)
    found["meta.json"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return found


def longest_sentence(paths) -> int:
    """The most characters a paragraph of `paths` has from one sentence end to the next (what bounded_pieces needs
    at least to cut only between sentences)."""
    return max(m.end() - m.start() for _, p in iter_paragraphs(iter_input_files(paths), "skip", 2000)
               for m in _SENTENCE.finditer(p))


E2E = pytest.mark.e2e  # two workers are two processes: make test-fast leaves them to make test


@pytest.mark.parametrize("workers, chunk_chars, pieces", [(1, None, False), pytest.param(2, None, False, marks=E2E),
                                                          (1, 50, False), pytest.param(2, 50, False, marks=E2E),
                                                          pytest.param(2, None, True, marks=E2E)])  # fmt: skip
def test_output_is_the_old_code_s(tmp_path, zh_corpus, monkeypatch, workers, chunk_chars, pieces):
    """Byte-identical to what the code before streaming wrote, with 1 or 2 workers, with chunks so small that
    documents are cut between tasks, and with every paragraph cut into pieces as small as its longest sentence."""
    if chunk_chars:
        monkeypatch.setattr(pretrain.prepare, "_CHUNK_CHARS", chunk_chars)
        monkeypatch.setattr(pretrain.prepare, "_IN_FLIGHT", 1)
    mixed = write_mixed_corpus(tmp_path / "mixed")
    seen = Counter()

    def counted_pieces(paragraph, limit):
        pieces = list(bounded_pieces(paragraph, limit))
        seen.update(paragraphs=1, pieces=len(pieces))
        return pieces

    for name, corpus, settings in (("zh", zh_corpus, dict(vocab_size=500, valid_fraction=0.05)),
                                   ("mixed", mixed, MIXED)):
        if pieces:
            monkeypatch.setattr(pretrain.prepare, "_PIECE_CHARS", longest_sentence(corpus))
            monkeypatch.setattr(pretrain.prepare, "bounded_pieces", counted_pieces)
        seen.clear()
        prepare(PrepareConfig(input=corpus, out=str(tmp_path / "prepared" / name), workers=workers, **settings))
        assert digests(tmp_path / "prepared" / name) == OLD_OUTPUT[name]
        if pieces:  # many paragraphs were cut (of both passes)
            assert seen["pieces"] > seen["paragraphs"] + 50, (name, seen)


def test_input_that_changes_between_the_passes_is_an_error(tmp_path, zh_corpus, monkeypatch):
    reads = []

    def growing(*args, **kwargs):  # a document more on the second read, as if appended meanwhile
        reads.append(1)
        yield from iter_paragraphs(*args, **kwargs)
        if len(reads) > 1:
            yield True, "多了一篇。"

    monkeypatch.setattr(pretrain.prepare, "iter_paragraphs", growing)
    with pytest.raises(UserError, match=r"changed while being prepared \(200 documents, then 201\)"):
        prepare(PrepareConfig(input=zh_corpus, out=str(tmp_path / "out"), vocab_size=300))
    assert sorted(os.listdir(tmp_path)) == ["zh_corpus.txt"]


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


@pytest.mark.e2e
def test_cli_summary(tmp_path, zh_corpus):
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}", "vocab_size=300", "workers=2")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train = meta["splits"]["train"]
    assert f"train: {train['documents']} documents, {train['sentences']} sentences, {train['tokens']} tokens" \
        in result.stdout


@pytest.mark.e2e
def test_cli_empty_input(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text(" \n\n\u3000\n")
    result = cli(f"input={corpus}", f"out={tmp_path / 'out'}")
    assert_one_line_error(result, f"input={corpus}: no text found (empty input)")
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]


@pytest.mark.e2e
def test_cli_vocab_missing_mask(tmp_path, zh_corpus):
    vocab = write_vocab(tmp_path / "vocab.txt", [t for t in BERT_LAYOUT if t != "[MASK]"])
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}", f"vocab={vocab}")
    assert_one_line_error(result, vocab, "[MASK]")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_cli_out_not_empty(tmp_path, zh_corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli(f"input={zh_corpus}", f"out={tmp_path / 'out'}")
    assert_one_line_error(result, "out=", "not empty", "overwrite=true")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_cli_unknown_key_is_one_line(tmp_path):
    assert_one_line_error(cli("input=a", "out=b", "bogus=1"), "bogus")


# ---- shards: one vocab, a subset of the files each, together the whole corpus --------------------------------
def documents_of(prepared) -> Counter:
    """The multiset of documents of both splits, each as (token ids, word starts, sentence lengths)."""
    docs = Counter()
    for split in ("train", "valid"):
        c = IndexedCorpus.open(os.path.join(prepared, split))
        for d in range(c.num_docs):
            s0, s1 = c.doc_offsets[d], c.doc_offsets[d + 1]
            t0, t1 = c.sent_offsets[s0], c.sent_offsets[s1]
            lengths = np.diff(c.sent_offsets[s0 : s1 + 1])
            docs[c.tokens[t0:t1].tobytes(), c.word_start[t0:t1].tobytes(), lengths.tobytes()] += 1
    return docs


def assert_shards_make_the_whole(shard_dirs, whole_dir):
    metas = [json.loads((shard / "meta.json").read_text()) for shard in shard_dirs]
    whole = json.loads((whole_dir / "meta.json").read_text())
    assert sorted(p for m in metas for p in m["inputs"]) == sorted(whole["inputs"])
    assert [(m["shard"], m["num_shards"]) for m in metas] == [(i, len(metas)) for i in range(len(metas))]
    assert {m["vocab_sha256"] for m in metas} == {whole["vocab_sha256"]}
    for key in ("documents", "sentences", "tokens", "single_sentence_documents"):
        assert sum(m["splits"][s][key] for m in metas for s in ("train", "valid")) == \
            sum(whole["splits"][s][key] for s in ("train", "valid")), key
    assert all(m["splits"]["valid"]["documents"] >= 1 for m in metas)  # each its own split
    assert sum((documents_of(shard) for shard in shard_dirs), Counter()) == documents_of(whole_dir)


def write_parts(root, sizes=(150, 20, 60, 90, 5)):
    root.mkdir()
    for i, n in enumerate(sizes):
        write_synthetic_corpus(root / f"part{i}.txt", num_docs=n, seed=i)
    return str(root)


def test_shard_files_are_dealt_by_size(tmp_path):
    files = iter_input_files(write_parts(tmp_path / "in"))  # part0 > part3 > part2 > part1 > part4 in bytes
    shards = [shard_files(files, i, 3) for i in range(3)]
    names = [[os.path.basename(p) for p in shard] for shard in shards]
    assert names == [["part0.txt"], ["part3.txt"], ["part1.txt", "part2.txt", "part4.txt"]]
    assert shard_files(files, 0, 1) == files and [shard_files(files, i, 3) for i in range(3)] == shards
    assert [len(shard_files(files, i, 5)) for i in range(5)] == [1] * 5
    assert shard_files(files, 5, 6) == []


def test_shards_together_are_the_whole(tmp_path):
    inputs = write_parts(tmp_path / "in")
    vocab = tmp_path / "vocab.txt"
    build(VocabConfig(input=inputs, out=str(vocab), vocab_size=400))
    prepare(PrepareConfig(input=inputs, out=str(tmp_path / "whole"), vocab_size=400, valid_fraction=0.05))
    assert (tmp_path / "whole" / "vocab.txt").read_bytes() == vocab.read_bytes()  # pretrain.vocab builds prepare's
    shards = [tmp_path / f"shard-{i}" for i in range(3)]
    for i, shard in enumerate(shards):
        prepare(PrepareConfig(input=inputs, out=str(shard), vocab=str(vocab), shard=i, num_shards=3,
                              valid_fraction=0.05))
    assert_shards_make_the_whole(shards, tmp_path / "whole")
    # A shard is its files prepared on their own: the same split rule over its own documents.
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("part1.txt", "part2.txt", "part4.txt"):
        (alone / name).write_bytes((tmp_path / "in" / name).read_bytes())
    prepare(PrepareConfig(input=str(alone), out=str(tmp_path / "alone_out"), vocab=str(vocab), valid_fraction=0.05))
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "vocab.txt"):
        assert (tmp_path / "alone_out" / name).read_bytes() == (shards[2] / name).read_bytes(), name


def vocab_cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.vocab", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.e2e
def test_vocab_cli(tmp_path, zh_corpus):
    prepare(PrepareConfig(input=zh_corpus, out=str(tmp_path / "prepared"), vocab_size=300))
    result = vocab_cli(f"input={zh_corpus}", f"out={tmp_path / 'vocab.txt'}", "vocab_size=300", "workers=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'vocab.txt'} in ")
    assert "from 200 documents in 1 files" in result.stdout
    assert (tmp_path / "vocab.txt").read_bytes() == (tmp_path / "prepared" / "vocab.txt").read_bytes()
    before = sorted(os.listdir(tmp_path))
    result = vocab_cli(f"input={zh_corpus}", f"out={tmp_path / 'vocab.txt'}")
    assert_one_line_error(result, "out=", "exists (pass overwrite=true", prog="pretrain.vocab")
    assert_one_line_error(vocab_cli(f"input={zh_corpus}", f"out={tmp_path}"), "is a directory", prog="pretrain.vocab")
    (tmp_path / "empty.txt").write_text("\n \n")
    assert_one_line_error(vocab_cli(f"input={tmp_path / 'empty.txt'}", f"out={tmp_path / 'v2.txt'}"), "no text found",
                          prog="pretrain.vocab")
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["empty.txt"])


@pytest.mark.e2e
@pytest.mark.parametrize("args, fragments", [
    (["shard=3", "num_shards=3", "vocab={vocab}"], ["shard=3: must be in [0, 3) for num_shards=3"]),
    (["shard=-1", "num_shards=2", "vocab={vocab}"], ["shard=-1: must be in [0, 2)"]),
    (["num_shards=0"], ["num_shards=0: must be >= 1"]),
    (["shard=1", "num_shards=2"], ["num_shards=2 needs vocab=", "python -m pretrain.vocab input="]),
    (["shard=2", "num_shards=3", "vocab={vocab}"], ["shard=2: no input files for this shard", "has 2 files"]),
])
def test_cli_bad_shards(tmp_path, args, fragments):
    inputs = write_parts(tmp_path / "in", sizes=(3, 4))
    vocab = write_vocab(tmp_path / "vocab.txt", BERT_LAYOUT)
    before = sorted(os.listdir(tmp_path))
    result = cli(f"input={inputs}", f"out={tmp_path / 'out'}", *(a.format(vocab=vocab) for a in args))
    assert_one_line_error(result, *fragments)
    assert sorted(os.listdir(tmp_path)) == before


# ---- memory: bounded whatever the corpus size ---------------------------------------------------------------------
PEAK_RSS = """
import re, resource, sys
from pretrain.prepare import PrepareConfig, prepare
prepare(PrepareConfig(input=sys.argv[1], out=sys.argv[2], workers=2, vocab_size=400, max_line_bytes=int(sys.argv[3])))
# Not ru_maxrss for this process: Linux carries it over from before exec, i.e. from pytest.
main_kb = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]
print(main_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.e2e
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of the main process and of the largest worker, for a corpus and one four times its size: holding
    the corpus (as prepare did before streaming, ~5 bytes per input byte) would add ~25 MB to the main process."""
    peaks = []
    for num_docs in (6000, 24000):  # 1.6 and 6.5 MB
        corpus = tmp_path / f"corpus{num_docs}.txt"
        write_synthetic_corpus(corpus, num_docs=num_docs, seed=num_docs)
        out = str(tmp_path / f"out{num_docs}")
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(corpus), out, "1000000"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks.append([int(kb) / 1024 for kb in result.stdout.split()])  # MB
    (main_small, workers_small), (main_big, workers_big) = peaks
    print(f"peak RSS, 1.6 MB corpus: main {main_small:.0f} MB, worker {workers_small:.0f} MB; "
          f"6.5 MB corpus: main {main_big:.0f} MB, worker {workers_big:.0f} MB")
    assert main_big - main_small < 8 and workers_big - workers_small < 8, peaks
    assert main_big < 500 and workers_big < 500, peaks


@pytest.mark.e2e
def test_memory_per_line_is_bounded(tmp_path):
    """One line of 2 MB without a sentence end (the worst case: a 700,000-character run for jieba and the
    tokenizer), between ordinary documents: a worker's peak stays within docs/data.md's figure for it (about 170 MB:
    it gets the line in pieces of at most 64K characters) and the main process's within about 60 MB plus 3 bytes per
    byte of the line (it holds the line). Given the whole line (before the pieces), a worker peaked at 754 MB."""
    documents = synthetic_documents(100, seed=3)
    no_end = "".join(s.translate(str.maketrans("", "", "。！？；!?…，“”：")) for d in documents for p in d for s in p)
    line = (no_end * (2_000_000 // len(no_end.encode()) + 1)).encode()[:2_000_000].decode(errors="ignore")
    corpus = tmp_path / "long_line.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in documents[:20]:
            f.write("\n".join("".join(p) for p in doc) + "\n\n")
        f.write(line + "\n\n")
        for doc in documents[20:]:
            f.write("\n".join("".join(p) for p in doc) + "\n\n")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(corpus), str(tmp_path / "out"), "3000000"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    main, worker = (int(kb) / 1024 for kb in result.stdout.split())  # MB
    line_mb = len(line.encode()) / 1e6
    print(f"peak RSS with a {line_mb:.1f} MB line: main {main:.0f} MB, worker {worker:.0f} MB")
    assert worker < 1.25 * 170, (main, worker)
    assert main < 1.25 * (60 + 3 * line_mb), (main, worker)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["valid"]["documents"] == 101
