"""prepare's sentence encoder (pretrain/data/wordpiece.py) against the tokenizer it stands in for: for every sentence,
the ids and character offsets that tokenizers' WordPiece gives that sentence on its own, on text chosen to break
the shortcut (characters the normalizer changes or drops next to CJK ones, CJK outside the table's range, long
words, sentences that tokenize to nothing) and on random mixtures of it."""
import random

import numpy as np
import pytest

from pretrain.data.corpus import sentence_spans
from pretrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from pretrain.data.wordpiece import SentenceEncoder

HARD = [
    "我爱北京天安门。Hello WORLD, ÉCOLE café！", "中\u0301文\u0300字。", "豈更車。", "㐀𠀀鿦鿿一龥。",  # compat, ext A/B, past U+9FA5
    "a\x00b\x07c\u200bd\ufffde。", "\t中\u3000文\r\n字\u00a0。", "ΣΑΣ İstanbul ﬁ ＡＢＣ１２３。", "你好😀世界🇨🇳。",
    "x" * 150 + "中" + "y" * 99 + "。", "\x01\x02。", "  ", "", "第2版《书》…… “测试。”他说：再见！",
    "https://example.com/a_b?c=1&d=2 中文 e-mail: a@b.cn。", "ｈｅｌｌｏ中ｗｏｒｌｄ。", "ＩＩ Ⅱ ① ½ ²。", "hellos hello。",
]
VOCAB = SPECIAL_TOKENS + list("我爱北京天安门中文字一。，！hello") + ["hell", "##o", "##s", "world", "cafe", "ecole", "1",
                                                                "##2", "##3", "豈", "更", "㐀", "龥", "ａ", "ｈ", "##ｅ"]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    return Tokenizer(str(path))


def one_at_a_time(tok: Tokenizer, paragraphs: list[str]) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """ids, offsets in the paragraphs' concatenation and sentence numbers, encoding each sentence alone."""
    ids, offsets, sentences, base, n = [], [], [], 0, 0
    for paragraph in paragraphs:
        for begin, end in sentence_spans(paragraph):
            enc = tok._tok.encode(paragraph[begin:end], add_special_tokens=False)
            ids += enc.ids
            offsets += [(base + begin + b, base + begin + e) for b, e in enc.offsets]
            sentences += [n] * len(enc.ids)
            n += 1
        base += len(paragraph)
    return ids, offsets, sentences


def together(tok: Tokenizer, paragraphs: list[str]):
    spans, base = [], 0
    for paragraph in paragraphs:
        spans += [(base + b, base + e) for b, e in sentence_spans(paragraph)]
        base += len(paragraph)
    got = SentenceEncoder(tok).encode("".join(paragraphs), spans)
    assert got.ids.dtype == np.int32
    return got.ids.tolist(), list(zip(got.begins.tolist(), got.ends.tolist())), got.sentence.tolist()


def test_hard_text_gives_the_tokenizers_tokens(tok):
    assert together(tok, HARD) == one_at_a_time(tok, HARD)
    ids, _, _ = together(tok, HARD)
    assert tok.unk_id in ids and tok.token_to_id("豈") in ids and tok.token_to_id("##s") in ids


def test_random_mixtures_give_the_tokenizers_tokens(tok):
    """Paragraphs cut from the hard text at random characters and glued in random order: every adjacency of a
    table character with another kind of character, at sentence ends and starts too."""
    rng = random.Random(0)
    pool = "".join(HARD) + "我爱北京。。！？" * 20
    for _ in range(200):
        paragraphs = []
        for _ in range(rng.randint(1, 6)):
            start = rng.randrange(len(pool))
            paragraphs.append("".join(rng.choice([pool[start : start + rng.randint(0, 40)], rng.choice(pool)])
                                      for _ in range(rng.randint(1, 8))))  # fmt: skip
        assert together(tok, paragraphs) == one_at_a_time(tok, paragraphs), paragraphs


def test_a_vocab_with_a_character_twice_takes_its_first_id(tmp_path):
    """WordPiece's vocab maps a token to its first line (Tokenizer's rule): the table must too."""
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in SPECIAL_TOKENS + ["中", "文", "中"]), encoding="utf-8")
    tok = Tokenizer(str(path))
    assert together(tok, ["中文中。"]) == one_at_a_time(tok, ["中文中。"])
    assert together(tok, ["中文中。"])[0] == [5, 6, 5, tok.unk_id]
