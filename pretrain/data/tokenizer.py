"""BERT-Chinese WordPiece tokenization, a deterministic vocab builder, and jieba word starts.

Text is normalized like bert-base-chinese: clean text, lower-case, strip accents, and every CJK
character is a word of its own; words are split into WordPiece pieces ('##' marks a continuation).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections import Counter
from typing import Callable, Iterable

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from pretrain.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTINUATION = "##"
MAX_WORD_CHARS = 100  # longer words become one [UNK], as in BERT
_BRACKETED = re.compile(r"^\[.*\]$")  # [PAD], [unused7], ...: never drawn as random MLM replacements


def _normalizer():
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)


def vocab_sha256(path: str) -> str:
    """The vocab's fingerprint: prepare records it in meta.json, training checks the data against it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_vocab(path: str) -> list[str]:
    """Tokens by id, read the way tokenizers' WordPiece reads vocab.txt (split on '\\n', right-stripped)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read vocab ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: vocab is not UTF-8 (byte offset {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


class Tokenizer:
    """WordPiece over a vocab.txt (Google bert-base-chinese layout or one from `build_vocab`)."""

    def __init__(self, vocab_path: str):
        self.vocab_path = vocab_path
        self._tokens = read_vocab(vocab_path)
        ids = {tok: i for i, tok in reversed(list(enumerate(self._tokens)))}  # first occurrence wins
        missing = [t for t in SPECIAL_TOKENS if t not in ids]
        if missing:
            raise UserError(f"{vocab_path}: vocab lacks special token(s) {' '.join(missing)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        self.vocab_size = len(self._tokens)
        self.normal_ids = np.array([i for i, t in enumerate(self._tokens) if not _BRACKETED.match(t)], dtype=np.int64)
        self._ids = ids
        model = models.WordPiece(ids, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION,
                                 max_input_chars_per_word=MAX_WORD_CHARS)
        self._tok = _HFTokenizer(model)
        self._tok.normalizer = _normalizer()
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no [CLS]/[SEP] added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]):
        """tokenizers Encodings (ids, tokens, char offsets into each text)."""
        return self._tok.encode_batch(texts, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: '##' pieces glued on, specials dropped, a space only between two alphanumeric words."""
        out: list[str] = []
        for i in ids:
            tok = self._tokens[int(i)]
            if _BRACKETED.match(tok):
                continue
            if tok.startswith(CONTINUATION) and len(tok) > len(CONTINUATION):
                out.append(tok[len(CONTINUATION):])
                continue
            if out and out[-1] and _is_word_char(out[-1][-1]) and _is_word_char(tok[0]):
                out.append(" ")
            out.append(tok)
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self._tokens[int(i)]

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)


def _is_word_char(ch: str) -> bool:
    """Alphanumeric but not CJK: the words that need a space between them when decoding."""
    return ch.isalnum() and not _is_cjk(ch)


# The code point ranges that BERT's handle_chinese_chars makes one-character words.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES)


def build_vocab(sentences: Iterable[str], vocab_size: int, out_path: str, min_word_count: int = 2) -> None:
    """Write a WordPiece vocab.txt of at most `vocab_size` tokens: specials, then characters, then whole words.

    tokenizers' WordPiece trainer gives a different vocab from run to run (hash-map ties), so this is a
    count-based builder with every tie broken by the token string: byte-identical output for the same input.
    Characters come first (word-initial `c` and continuation `##c`, most frequent first), so nothing is
    [UNK] unless the alphabet alone exceeds the budget; the rest of the budget goes to the most frequent
    multi-character words (Latin words, numbers), which then tokenize as one piece.
    """
    # The pre-tokenizer never looks across whitespace, so pre-tokenizing each distinct whitespace-separated
    # chunk once gives the same word counts as pre-tokenizing every sentence, many times faster.
    normalizer, pre_tokenizer = _normalizer(), pre_tokenizers.BertPreTokenizer()
    chunks: Counter[str] = Counter()
    sentences = iter(sentences)
    while batch := list(itertools.islice(sentences, 1000)):
        chunks.update(normalizer.normalize_str("\n".join(batch)).split())
    words: Counter[str] = Counter()
    for chunk, n in chunks.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
            words[word] += n
    chars: Counter[str] = Counter()
    for word, n in words.items():
        if len(word) > MAX_WORD_CHARS:
            continue
        chars[word[0]] += n
        for ch in word[1:]:
            chars[CONTINUATION + ch] += n
    budget = vocab_size - len(SPECIAL_TOKENS)
    by_count = lambda counts: sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # noqa: E731
    alphabet = [t for t, _ in by_count(chars)][:budget]
    whole_words = Counter({w: n for w, n in words.items() if 1 < len(w) <= MAX_WORD_CHARS and n >= min_word_count})
    vocab = SPECIAL_TOKENS + alphabet + [w for w, _ in by_count(whole_words)][: budget - len(alphabet)]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(t + "\n" for t in vocab))


_jieba_cut: Callable[[str], list[str]] | None = None


def jieba_segmenter() -> Callable[[str], list[str]]:
    """jieba.lcut with its dictionary loaded (once per process) and its logging quiet."""
    global _jieba_cut
    if _jieba_cut is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba_cut = jieba.lcut
    return _jieba_cut


def jieba_version() -> str:
    import jieba

    return jieba.__version__


def encode_sentences(tok: Tokenizer, sentences: list[str], segmenter: Callable[[str], list[str]]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, word_start uint8) per sentence; sentences that tokenize to nothing are dropped.

    word_start[i] = 1 iff token i begins where a segmenter word begins and is not a '##' piece, so
    whole-word masking and word-structure objectives can treat the tokens of one word as a unit.
    """
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
        out.append((np.array(enc.ids, dtype=np.int32), np.array(starts, dtype=np.uint8)))
    return out
