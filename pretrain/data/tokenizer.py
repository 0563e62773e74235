"""BERT-Chinese WordPiece tokenization, a deterministic vocab builder, and jieba word starts.

Text is normalized like bert-base-chinese: clean text, lower-case, strip accents, and every CJK
character is a word of its own; words are split into WordPiece pieces ('##' marks a continuation).
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import re
import weakref
from collections import Counter
from importlib.metadata import version
from typing import Callable, Iterable, NamedTuple

import jieba
import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from pretrain.data.corpus import sentence_spans
from pretrain.data.wordpiece import SentenceEncoder
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

    def __init__(self, vocab_path: str, tokens: list[str] | None = None):
        self.vocab_path = vocab_path  # with tokens: only a name for errors
        self._tokens = read_vocab(vocab_path) if tokens is None else tokens
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


class VocabExtension(NamedTuple):
    """The data's vocab is a model's vocab with tokens appended: ids below `rows` mean what the model learnt, and
    each new id starts from the rows of the model's pieces that stood for its token before (`pieces`)."""

    rows: int  # the model's tokens
    pieces: dict[int, tuple[int, ...]]  # a new id -> the model's ids its token was split into ([UNK] for a new char)


def vocab_extension(theirs: list[str], vocab_path: str, where: str, their_path: str) -> VocabExtension | None:
    """A model's vocab (theirs, from their_path) against the data's (vocab_path): None when they are the same token
    for token, the extension when the data's is theirs followed by new tokens (pretrain.vocab base=), else one line
    naming the first difference: the ids must mean what the model learnt."""
    ours = read_vocab(vocab_path)
    if theirs == ours:
        return None
    if len(ours) > len(theirs) and ours[: len(theirs)] == theirs:
        return VocabExtension(len(theirs), replaced_pieces(theirs, ours[len(theirs):]))
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    raise UserError(f"{where}: its vocab differs from the data's ({len(theirs)} vs {len(ours)} tokens; first at "
                    f"id {first}), and the data's is not an extension of it; prepare the data with vocab={their_path}"
                    " or with one that pretrain.vocab base= extends from it")  # fmt: skip


def replaced_pieces(theirs: list[str], new: list[str]) -> dict[int, tuple[int, ...]]:
    """Each new token's id (numbered after theirs) -> the ids of theirs that WordPiece split its text into: what
    the data held in its place before the vocab was extended. A continuation (##x) is split as one."""
    tok = Tokenizer("the model's vocab", tokens=theirs)
    out = {}
    for i, token in enumerate(new, start=len(theirs)):
        continuation = token.startswith(CONTINUATION) and len(token) > len(CONTINUATION)
        ids = tok.encode(token[len(CONTINUATION):] if continuation else token) or [tok.unk_id]
        if continuation:  # the first piece as a continuation, where theirs has one
            ids[0] = tok.token_to_id(CONTINUATION + tok.id_to_token(ids[0])) or ids[0]
        out[i] = tuple(ids)
    return out


def _is_word_char(ch: str) -> bool:
    """Alphanumeric but not CJK: the words that need a space between them when decoding."""
    return ch.isalnum() and not _is_cjk(ch)


# The code point ranges that BERT's handle_chinese_chars makes one-character words.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES)


def build_vocab(sentences: Iterable[str], vocab_size: int, out_path: str, min_word_count: int = 2) -> None:
    """Write a WordPiece vocab.txt of at most `vocab_size` tokens built from `sentences` (see write_vocab)."""
    write_vocab(count_words(sentences), vocab_size, out_path, min_word_count)


def count_words(sentences: Iterable[str], batch: int = 10_000) -> Counter[str]:
    """How often each pre-tokenized word occurs in `sentences`: what a vocab is built from. The counts of a
    corpus are the sum of its parts' counts, so parts may be counted apart (in parallel) and added up.

    Memory holds one batch of sentences besides the counts, which grow with the distinct words only.
    """
    # The pre-tokenizer never looks across whitespace, so pre-tokenizing each distinct whitespace-separated
    # chunk of a batch once gives the same word counts as pre-tokenizing every sentence, and is faster.
    normalizer, pre_tokenizer = _normalizer(), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    sentences = iter(sentences)
    while group := list(itertools.islice(sentences, batch)):
        chunks: Counter[str] = Counter()
        for i in range(0, len(group), 1000):  # normalize_str slows down on longer strings
            chunks.update(normalizer.normalize_str("\n".join(group[i : i + 1000])).split())
        for chunk, n in chunks.items():
            for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
                words[word] += n
    return words


def write_vocab(words: Counter[str], vocab_size: int, out_path: str, min_word_count: int = 2) -> None:
    """Write a WordPiece vocab.txt of at most `vocab_size` tokens: specials, then characters, then whole words.

    tokenizers' WordPiece trainer gives a different vocab from run to run (hash-map ties), so this is a
    count-based builder with every tie broken by the token string: byte-identical output for the same counts.
    Characters come first (word-initial `c` and continuation `##c`, most frequent first), so nothing is
    [UNK] unless the alphabet alone exceeds the budget; the rest of the budget goes to the most frequent
    multi-character words (Latin words, numbers), which then tokenize as one piece.
    """
    budget = vocab_size - len(SPECIAL_TOKENS)
    alphabet = by_count(character_pieces((w, n) for w, n in words.items() if len(w) <= MAX_WORD_CHARS))[:budget]
    whole_words = Counter({w: n for w, n in words.items() if 1 < len(w) <= MAX_WORD_CHARS and n >= min_word_count})
    vocab = SPECIAL_TOKENS + alphabet + by_count(whole_words)[: budget - len(alphabet)]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(t + "\n" for t in vocab))


def character_pieces(words: Iterable[tuple[str, int]]) -> Counter[str]:
    """(word, count) pairs' characters counted as WordPiece pieces: a word's first as itself, the others as ##c."""
    chars: Counter[str] = Counter()
    for word, n in words:
        chars[word[0]] += n
        for ch in word[1:]:
            chars[CONTINUATION + ch] += n
    return chars


def by_count(counts: Counter[str]) -> list[str]:
    """The tokens, most frequent first, ties broken by the token: the same list for the same counts."""
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


_jieba_cut: Callable[[str], list[str]] | None = None


def jieba_segmenter() -> Callable[[str], list[str]]:
    """jieba.lcut with its dictionary loaded (once per process) and its logging quiet."""
    global _jieba_cut
    if _jieba_cut is None:
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba_cut = jieba.lcut
    return _jieba_cut


def jieba_version() -> str:
    return jieba.__version__


# prepare's segmenter= choices. rjieba (jieba-rs's binding, `pip install rjieba`) cut the demo corpus exactly as jieba
# and 20 times faster, but not every text: it keeps "COVID-19" whole where jieba cuts at the hyphen (RESULTS.md,
# bench/segmenters.py). jieba stays the default, so a corpus prepared as before is byte-identical.
SEGMENTERS = ("jieba", "rjieba")


def check_segmenter(name: str) -> None:
    """A UserError unless `name` is one of SEGMENTERS and can be imported here (nothing is loaded: jieba's
    dictionary costs a process about 100 MB, which prepare's main process does not need with workers)."""
    if name not in SEGMENTERS:
        raise UserError(f"segmenter={name}: must be {' or '.join(SEGMENTERS)}")
    if name == "rjieba":
        if importlib.util.find_spec("rjieba") is None:
            raise UserError("segmenter=rjieba needs the rjieba package: pip install rjieba")


def segmenter(name: str) -> Callable[[str], list[str]]:
    """The word segmenter `name` (one of SEGMENTERS), loaded once per process."""
    check_segmenter(name)
    if name == "jieba":
        return jieba_segmenter()
    import rjieba  # rjieba: optional (the `fast` extra)

    return rjieba.cut


def segmenter_version(name: str) -> str:
    """What meta.json records of the segmenter: its name and version."""
    return f"{name} {jieba_version() if name == 'jieba' else version(name)}"


class Encoded(NamedTuple):
    """Paragraphs encoded, flat: sentence s is ids[t:t + sentence_tokens[s]] where t = sentence_tokens[:s].sum()."""

    ids: np.ndarray  # [num_tokens] int32
    word_start: np.ndarray  # [num_tokens] uint8
    sentence_tokens: np.ndarray  # [num_sentences] int64, each > 0
    paragraph_sentences: np.ndarray  # [num_paragraphs] int64: how many of the sentences each paragraph has
    unknown: Counter  # the text each [UNK] stands for (a character, or a word WordPiece could not cut), counted


def encode_paragraphs(tok: Tokenizer, paragraphs: list[str], segmenter: Callable[[str], list[str]]) -> Encoded:
    """Token ids and word starts of the sentences (split_sentences) of `paragraphs`; a sentence that tokenizes
    to nothing is dropped.

    word_start[i] = 1 iff token i begins where a segmenter word begins and is not a '##' piece, so
    whole-word masking and word-structure objectives can treat the tokens of one word as a unit.
    """
    spans, paragraph_of_span, word_lengths = [], [], []
    base = 0  # where the paragraph starts in the paragraphs' concatenation
    for k, paragraph in enumerate(paragraphs):
        spans.extend((base + begin, base + end) for begin, end in sentence_spans(paragraph))
        paragraph_of_span.extend([k] * (len(spans) - len(paragraph_of_span)))
        # One cut per paragraph gives the words of its sentences: jieba cuts every run of [一-鿕a-zA-Z0-9+#&._%-]
        # on its own (the HMM included), and a sentence ends with 。！？；!?… or a closing quote or bracket, none of
        # which is in such a run, so no run spans two sentences.
        word_lengths.extend(map(len, segmenter(paragraph)))
        base += len(paragraph)
    text = "".join(paragraphs)
    tokens = _sentence_encoder(tok).encode(text, spans)
    per_sentence = np.bincount(tokens.sentence, minlength=len(spans))
    kept = per_sentence > 0  # a sentence that tokenizes to nothing is dropped
    paragraph_sentences = np.bincount(np.asarray(paragraph_of_span, dtype=np.int64)[kept], minlength=len(paragraphs))

    word_lengths = np.asarray(word_lengths, dtype=np.int64)
    word_ends = np.cumsum(word_lengths)
    if (word_ends[-1] if len(word_ends) else 0) != base:
        raise RuntimeError("the segmenter's words do not add up to the text")  # the positions below would be wrong
    at_word_begin = np.zeros(base + 1, dtype=bool)
    at_word_begin[word_ends - word_lengths] = True

    ids, token_begins = tokens.ids, tokens.begins
    word_start = at_word_begin[token_begins] & ~_continuation(tok)[ids]
    unknown, unknown_at = Counter(), np.flatnonzero(ids == tok.unk_id)
    unknown.update(text[token_begins[i] : tokens.ends[i]] for i in unknown_at.tolist())
    return Encoded(ids, word_start.astype(np.uint8), per_sentence[kept].astype(np.int64),
                   paragraph_sentences.astype(np.int64), unknown)  # fmt: skip


_CONTINUATIONS: "weakref.WeakKeyDictionary[Tokenizer, np.ndarray]" = weakref.WeakKeyDictionary()
_SENTENCE_ENCODERS: "weakref.WeakKeyDictionary[Tokenizer, SentenceEncoder]" = weakref.WeakKeyDictionary()


def _sentence_encoder(tok: Tokenizer) -> SentenceEncoder:
    if tok not in _SENTENCE_ENCODERS:
        _SENTENCE_ENCODERS[tok] = SentenceEncoder(tok)
    return _SENTENCE_ENCODERS[tok]


def _continuation(tok: Tokenizer) -> np.ndarray:
    """[vocab_size] bool: whether each token is a '##' piece."""
    if tok not in _CONTINUATIONS:
        pieces = (tok.id_to_token(i).startswith(CONTINUATION) for i in range(tok.vocab_size))
        _CONTINUATIONS[tok] = np.fromiter(pieces, dtype=bool, count=tok.vocab_size)
    return _CONTINUATIONS[tok]
