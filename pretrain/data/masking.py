"""The token-level corruptions of the pre-training objectives, as pure numpy functions of (sequence, config, rng).
Their losses: models/layers.py (the heads and masked_ce); their weights: stage.loss_weights.

MLM   Chinese whole-word masking: whole jieba words are chosen until 15% of the non-special tokens are
      predicted; per chosen word one draw decides 80% [MASK] / 10% random ids / 10% unchanged.
WSO   word structural objective: a share of the trigrams left untouched by MLM is shuffled by a
      non-identity permutation and the model must restore the original tokens of each shuffled trigram, all
      three (same head as MLM).
Both take an explicit `np.random.Generator`, so a sample is a pure function of its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from pretrain.errors import UserError
from pretrain.labels import IGNORE


@dataclass(frozen=True)
class MaskingConfig:
    """Masked LM alone: stage two's `stage.objectives`."""

    mask_rate: float = 0.15  # share of non-special tokens the MLM predicts
    mask_token_prob: float = 0.8  # per chosen word: replace by [MASK]
    random_token_prob: float = 0.1  # per chosen word: replace each token by a random id (else unchanged)
    whole_word: bool = True  # False: every token is its own "word" (plain BERT masking)

    def _bad(self, name: str, why: str):
        raise UserError(f"stage.objectives.{name}={getattr(self, name)!r}: {why}")

    def validate(self) -> "MaskingConfig":
        """Raise UserError naming the first bad field; return self so it can be chained."""
        bad = self._bad
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                bad(f.name, "must be true or false")
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                bad(f.name, "must be an integer")
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                bad(f.name, "must be a number")
        if not 0 < self.mask_rate < 1:
            bad("mask_rate", "must be in (0, 1)")
        for name in ("mask_token_prob", "random_token_prob"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "must be in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1 + 1e-9:
            bad("random_token_prob", f"mask_token_prob + random_token_prob = "
                f"{self.mask_token_prob + self.random_token_prob:g}: must be <= 1")
        return self


@dataclass(frozen=True)
class ObjectiveConfig(MaskingConfig):
    """Masked LM and the structural objectives: stage one's `stage.objectives`."""

    wso_rate: float = 0.05  # share of the candidate (unpredicted) k-grams that are shuffled; 0 disables WSO
    wso_k: int = 3  # length of the shuffled n-grams (trigrams in the paper)
    sso: bool = True  # sentence structural objective (3-way next / previous / random segment)

    def validate(self) -> "ObjectiveConfig":
        super().validate()
        if not 0 <= self.wso_rate < 1:
            self._bad("wso_rate", "must be in [0, 1) (0 disables the word structural objective)")
        if self.wso_k < 2:
            self._bad("wso_k", "must be >= 2 (a shuffle needs at least two tokens)")
        return self


def word_ids(word_start: np.ndarray, special: np.ndarray) -> np.ndarray:
    """Word index of every token, -1 for specials. A word starts at word_start=1 and also right after a
    special token, so a word never spans [CLS]/[SEP] even when a segment begins mid-word (cut sentence)."""
    special = np.asarray(special, dtype=bool)
    after_special = np.concatenate([[True], special[:-1]])
    starts = ~special & ((np.asarray(word_start) != 0) | after_special)
    ids = np.cumsum(starts) - 1
    return np.where(special, -1, ids)


def choose_words(word_len: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Google's wwm selection: visit words in random order, keep a word if the running count stays
    <= target, skip it otherwise. If nothing fits (every word longer than target) keep the first word
    visited, so a non-empty sequence always has a prediction. Returns a bool mask over words."""
    chosen = np.zeros(len(word_len), dtype=bool)
    order = rng.permutation(len(word_len))
    count = 0
    for w in order:
        if count + word_len[w] <= target:
            chosen[w] = True
            count += word_len[w]
            if count == target:
                break
    if count == 0 and len(order):
        chosen[order[0]] = True
    return chosen


def whole_word_mask(ids: np.ndarray, word_start: np.ndarray, special: np.ndarray, cfg: MaskingConfig,
                    rng: np.random.Generator, mask_id: int, random_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLM corruption. Returns (input_ids, mlm_labels): labels hold the original id at predicted positions
    and IGNORE elsewhere; specials are never predicted."""
    ids = np.asarray(ids, dtype=np.int64)
    special = np.asarray(special, dtype=bool)
    words = word_ids(word_start, special) if cfg.whole_word else np.where(special, -1, np.cumsum(~special) - 1)
    n_real = int((~special).sum())
    out, labels = ids.copy(), np.full(len(ids), IGNORE, dtype=np.int64)
    if n_real == 0:
        return out, labels
    target = max(1, int(round(cfg.mask_rate * n_real)))
    word_len = np.bincount(words[~special])
    chosen_words = np.flatnonzero(choose_words(word_len, target, rng))
    # one draw per chosen word, so a word is either all [MASK], all random or all kept
    draw = rng.random(len(chosen_words))
    action = np.full(len(word_len), -1)  # -1 not chosen, 0 [MASK], 1 random, 2 keep
    action[chosen_words] = np.where(draw < cfg.mask_token_prob, 0,
                                    np.where(draw < cfg.mask_token_prob + cfg.random_token_prob, 1, 2))
    tok_action = np.where(special, -1, action[np.maximum(words, 0)])
    predicted = tok_action >= 0
    labels[predicted] = ids[predicted]
    out[tok_action == 0] = mask_id
    to_random = np.flatnonzero(tok_action == 1)
    random_ids = np.asarray(random_ids, dtype=np.int64)
    out[to_random] = random_ids[rng.integers(len(random_ids), size=len(to_random))]
    return out, labels


def trigram_candidates(free: np.ndarray, token_type: np.ndarray, k: int) -> np.ndarray:
    """Start positions p where p..p+k-1 are all free (non-special, unpredicted) and in one segment."""
    free = np.asarray(free, dtype=bool)
    if len(free) < k:
        return np.zeros(0, dtype=np.int64)
    windows_free = np.lib.stride_tricks.sliding_window_view(free, k).all(axis=1)
    token_type = np.asarray(token_type)
    same_segment = token_type[: len(free) - k + 1] == token_type[k - 1 :]
    return np.flatnonzero(windows_free & same_segment)


def non_identity_permutation(k: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform over the k! - 1 non-identity permutations (rejection: at most 1/2 of draws are redrawn)."""
    while True:
        perm = rng.permutation(k)
        if (perm != np.arange(k)).any():
            return perm


def shuffle_trigrams(input_ids: np.ndarray, predicted: np.ndarray, special: np.ndarray, token_type: np.ndarray,
                     cfg: ObjectiveConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """WSO corruption on the positions MLM left alone. Returns (input_ids, wso_labels): labels hold the original
    token at each of the K positions of every shuffled k-gram (the paper's objective: the likelihood of the whole
    subsequence in its original order, so a token a permutation left in place is predicted too), IGNORE elsewhere
    (never at an MLM position).

    The rate: wso_rate of the candidate windows, every start position whose K tokens are unpredicted and in one
    segment, overlapping (the trigrams of a text, as the paper's "5% of the trigrams" reads; the reference code
    also draws per candidate position, at 10%). Shuffled windows never overlap. The shares of a corpus's tokens
    this predicts and displaces: pretrain.samples prints them; docs/concepts.md has the demo's."""
    out = np.asarray(input_ids, dtype=np.int64).copy()
    labels = np.full(len(out), IGNORE, dtype=np.int64)
    k = cfg.wso_k
    free = ~np.asarray(predicted, dtype=bool) & ~np.asarray(special, dtype=bool)
    candidates = trigram_candidates(free, token_type, k)
    n_shuffle = int(round(cfg.wso_rate * len(candidates)))
    if n_shuffle == 0:
        return out, labels
    taken = np.zeros(len(out), dtype=bool)
    done = 0
    for p in rng.permutation(candidates):
        if taken[p : p + k].any():  # overlapping shuffles would make the original order ambiguous
            continue
        taken[p : p + k] = True
        perm = non_identity_permutation(k, rng)
        original = out[p : p + k].copy()
        out[p : p + k] = original[perm]
        labels[p : p + k] = original  # the whole trigram is restored, the positions the shuffle left too
        done += 1
        if done == n_shuffle:
            break
    return out, labels
