"""Many sentences through the WordPiece tokenizer at once, with the ids and character offsets that tokenizers gives
for each sentence on its own, about five times faster on Chinese text.

tokenizers spends most of its time on alignment bookkeeping for every character. But under BERT's normalizer a
common CJK character is a word of its own (handle_chinese_chars pads it with spaces) that nothing else changes (it
has no case, accent, decomposition or control category), so its token is a table lookup, done here for all of them
at once in numpy. Everything else, the runs of text between those characters within a sentence, goes through the
tokenizer itself, once per distinct run (cached): a run's ends are word boundaries there too, and the normalizer
and pre-tokenizer work character by character, so the run's tokens are those the whole sentence would give.
tests/test_prepare.py checks the equality against per-sentence encoding on the demo corpus and on hard text.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

# The unified ideographs of Unicode 1.1: assigned in every Unicode version a tokenizers build may carry (later
# additions up to U+9FFF would be unassigned, hence "control" and dropped, under an older table), so the table
# lookup holds whatever that version is. The rest of CJK goes through the tokenizer.
_FAST_FIRST, _FAST_LAST = 0x4E00, 0x9FA5
_CACHE_LIMIT = 1 << 18  # distinct runs kept; a corpus of many distinct runs (Latin text) starts over past it


class Tokens(NamedTuple):
    ids: np.ndarray  # [num_tokens] int32, in text order
    begins: np.ndarray  # [num_tokens] int64, character offsets into the text
    ends: np.ndarray  # [num_tokens] int64
    sentence: np.ndarray  # [num_tokens] int64: the index in `spans` of the sentence each token is in


class SentenceEncoder:
    """encode(text, spans): the tokens of each of the sentences text[begin:end] as the tokenizer encodes it alone."""

    def __init__(self, tok):  # a pretrain.data.tokenizer.Tokenizer
        self._encode = tok._tok.encode
        self._table = np.full(_FAST_LAST - _FAST_FIRST + 1, tok.unk_id, dtype=np.int32)
        for token, i in tok._ids.items():  # the ids WordPiece has: the first occurrence of a token
            if len(token) == 1 and _FAST_FIRST <= ord(token) <= _FAST_LAST:
                self._table[ord(token) - _FAST_FIRST] = i
        self._runs: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def encode(self, text: str, spans: list[tuple[int, int]]) -> Tokens:
        """spans: (begin, end) of each sentence in `text`, in order and disjoint."""
        chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        delta = np.zeros(len(chars) + 1, dtype=np.int64)
        np.add.at(delta, bounds[:, 0], 1)
        np.add.at(delta, bounds[:, 1], -1)
        inside = np.cumsum(delta[:-1]) > 0
        fast = inside & (chars >= _FAST_FIRST) & (chars <= _FAST_LAST)
        slow = inside & ~fast
        # a run of slow characters ends at a fast one, outside the sentences, or where a sentence begins or ends
        cut = np.zeros(len(chars) + 1, dtype=bool)
        cut[bounds.ravel()] = True
        before = np.concatenate(([False], slow[:-1])) if len(chars) else slow
        after = np.concatenate((slow[1:], [False])) if len(chars) else slow
        run_begins = np.flatnonzero(slow & (~before | cut[:-1]))
        run_ends = np.flatnonzero(slow & (~after | cut[1:])) + 1

        per_run = [self._run(text[b:e]) for b, e in zip(run_begins.tolist(), run_ends.tolist())]
        counts = np.fromiter((len(r[0]) for r in per_run), dtype=np.int64, count=len(per_run))
        n = int(counts.sum())
        run_ids = np.fromiter(itertools.chain.from_iterable(r[0] for r in per_run), dtype=np.int32, count=n)
        at = np.repeat(run_begins, counts)  # where each run token's run begins: its place in the text
        run_token_begins = at + np.fromiter(itertools.chain.from_iterable(r[1] for r in per_run), np.int64, count=n)
        run_token_ends = at + np.fromiter(itertools.chain.from_iterable(r[2] for r in per_run), np.int64, count=n)

        fast_at = np.flatnonzero(fast)
        place = np.concatenate((fast_at, at))  # a fast character's own place, a run token's run's
        within = np.concatenate((np.zeros(len(fast_at), np.int64), np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)))
        order = np.lexsort((within, place))
        sentence = np.searchsorted(bounds[:, 0], place[order], side="right") - 1
        return Tokens(np.concatenate((self._table[chars[fast_at] - _FAST_FIRST], run_ids))[order],
                      np.concatenate((fast_at, run_token_begins))[order],
                      np.concatenate((fast_at + 1, run_token_ends))[order], sentence)  # fmt: skip

    def _run(self, run: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        got = self._runs.get(run)
        if got is None:
            enc = self._encode(run, add_special_tokens=False)
            got = (tuple(enc.ids), tuple(b for b, _ in enc.offsets), tuple(e for _, e in enc.offsets))
            if len(self._runs) >= _CACHE_LIMIT:
                self._runs.clear()
            self._runs[run] = got
        return got
