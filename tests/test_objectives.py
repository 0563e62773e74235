"""StructBERT token objectives: whole-word MLM and the word structural objective (WSO)."""
import numpy as np
import pytest

from pretrain.data.masking import ObjectiveConfig, shuffle_trigrams, trigram_candidates, whole_word_mask, word_ids
from pretrain.errors import UserError
from pretrain.labels import IGNORE

CLS, SEP, MASK = 1, 2, 3
RANDOM_IDS = np.arange(5000, 6000)  # disjoint from the corpus ids below, so a random replacement is visible


def pair_sequence(rng, n_words_a=40, n_words_b=40, word_lens=(2, 3, 4)):
    """[CLS] A [SEP] B [SEP] with words of 2-4 tokens; ids are unique (1000 + position) so moves are traceable."""
    starts, types = [0], [0]
    for seg, n_words in enumerate((n_words_a, n_words_b)):
        for _ in range(n_words):
            n = int(rng.choice(word_lens))
            starts += [1] + [0] * (n - 1)
            types += [seg] * n
        starts.append(0)
        types.append(seg)  # the [SEP] closing the segment
    n = len(starts)
    ids = 1000 + np.arange(n)
    special = np.zeros(n, bool)
    special[0] = True
    special[np.flatnonzero(np.diff(types))] = True  # [SEP] after A
    special[-1] = True
    ids[special] = SEP
    ids[0] = CLS
    return ids, np.array(starts), special, np.array(types)


def test_word_ids_restart_after_special_even_mid_word():
    # B begins with word_start=0 (a sentence cut mid-word): still a new word, never joined to A's last word
    ws = np.array([0, 1, 0, 0, 0, 1])
    special = np.array([1, 0, 0, 1, 0, 0], bool)
    assert word_ids(ws, special).tolist() == [-1, 0, 0, -1, 1, 2]


def test_whole_words_are_masked_together_and_specials_never():
    rng = np.random.default_rng(0)
    for trial in range(200):
        ids, ws, special, _ = pair_sequence(rng)
        out, labels = whole_word_mask(ids, ws, special, ObjectiveConfig(), rng, MASK, RANDOM_IDS)
        predicted = labels != IGNORE
        assert not predicted[special].any() and (out[special] == ids[special]).all()
        assert (labels[predicted] == ids[predicted]).all()
        assert (out[~predicted] == ids[~predicted]).all()  # MLM touches only predicted positions
        words = word_ids(ws, special)
        for w in np.unique(words[~special]):
            flags = predicted[words == w]
            assert flags.all() or not flags.any(), f"word {w} partially predicted"


def test_mask_rate_and_80_10_10_per_word():
    rng = np.random.default_rng(1)
    n_real = n_pred = 0
    actions = {"mask": 0, "random": 0, "keep": 0}
    for _ in range(400):
        ids, ws, special, _ = pair_sequence(rng)
        out, labels = whole_word_mask(ids, ws, special, ObjectiveConfig(), rng, MASK, RANDOM_IDS)
        predicted = labels != IGNORE
        n_real += (~special).sum()
        n_pred += predicted.sum()
        words = word_ids(ws, special)
        for w in np.unique(words[predicted]):
            tok = out[words == w]
            if (tok == MASK).all():
                actions["mask"] += 1
            elif np.isin(tok, RANDOM_IDS).all():
                actions["random"] += 1
            else:
                assert (tok == ids[words == w]).all(), "a word mixed [MASK]/random/kept tokens"
                actions["keep"] += 1
    assert abs(n_pred / n_real - 0.15) < 0.01
    total = sum(actions.values())
    assert abs(actions["mask"] / total - 0.8) < 0.025
    assert abs(actions["random"] / total - 0.1) < 0.02
    assert abs(actions["keep"] / total - 0.1) < 0.02


def test_prediction_count_is_exact_without_whole_words_and_never_zero():
    rng = np.random.default_rng(2)
    cfg = ObjectiveConfig(whole_word=False)
    ids, ws, special, _ = pair_sequence(rng)
    _, labels = whole_word_mask(ids, ws, special, cfg, rng, MASK, RANDOM_IDS)
    assert (labels != IGNORE).sum() == round(0.15 * (~special).sum())
    # a single 3-token word: round(0.15 * 3) = 0 -> still one prediction (the whole word)
    ids = np.array([CLS, 10, 11, 12, SEP])
    special = np.array([1, 0, 0, 0, 1], bool)
    _, labels = whole_word_mask(ids, np.array([0, 1, 0, 0, 0]), special, ObjectiveConfig(), rng, MASK, RANDOM_IDS)
    assert (labels != IGNORE).tolist() == [False, True, True, True, False]


def test_mlm_is_a_pure_function_of_the_rng():
    ids, ws, special, _ = pair_sequence(np.random.default_rng(3))
    a = whole_word_mask(ids, ws, special, ObjectiveConfig(), np.random.default_rng(7), MASK, RANDOM_IDS)
    b = whole_word_mask(ids, ws, special, ObjectiveConfig(), np.random.default_rng(7), MASK, RANDOM_IDS)
    assert all((x == y).all() for x, y in zip(a, b))


def brute_force_candidates(free, types, k):
    return [p for p in range(len(free) - k + 1) if free[p : p + k].all() and len(set(types[p : p + k])) == 1]


def origins(original, shuffled):
    """Where each token came from (ids are unique outside specials; specials are never moved)."""
    where = {int(t): i for i, t in enumerate(original) if t >= 1000}
    return np.array([where.get(int(t), i) for i, t in enumerate(shuffled)])


def labelled_windows(labels: np.ndarray, k: int) -> list[int]:
    """Starts of the runs of labelled positions, each checked to be k long (shuffled windows never overlap)."""
    at = np.flatnonzero(labels != IGNORE)
    runs = np.split(at, np.flatnonzero(np.diff(at) > 1) + 1) if len(at) else []
    assert all(len(r) % k == 0 for r in runs), runs  # adjacent windows make runs of 2k, 3k, ...
    return [int(p) for r in runs for p in r[::k]]


def test_wso_labels_the_whole_window_moves_and_boundaries():
    """Issue 28, 3: every position of a shuffled trigram is labelled with its original token, also one the
    permutation left in place (three of the five non-identity permutations of 3 leave one); nothing else is."""
    rng = np.random.default_rng(4)
    cfg = ObjectiveConfig(wso_rate=0.3)  # many shuffles, so overlaps and boundaries are exercised
    fixed_points = 0
    for _ in range(200):
        ids, ws, special, types = pair_sequence(rng)
        predicted = (rng.random(len(ids)) < 0.15) & ~special
        out, labels = shuffle_trigrams(ids, predicted, special, types, cfg, rng)
        labelled = labels != IGNORE
        assert (labels[labelled] == ids[labelled]).all()  # label = original token at the position
        assert not (labelled & predicted).any() and not (labelled & special).any()
        assert (out[~labelled] == ids[~labelled]).all()  # nothing outside a shuffled window changed
        src = origins(ids, out)
        for p in labelled_windows(labels, cfg.wso_k):  # each window: a non-identity permutation of its own tokens
            window = slice(p, p + cfg.wso_k)
            assert sorted(src[window]) == list(range(p, p + cfg.wso_k)) and (out[window] != ids[window]).sum() >= 2
            fixed_points += int((out[window] == ids[window]).sum())
        assert not predicted[src[labelled]].any() and not special[src[labelled]].any()
        assert (types[src] == types).all()
        # never across a [SEP]: no special lies between a token's origin and its new place
        for p in np.flatnonzero(labelled):
            lo, hi = sorted((p, src[p]))
            assert not special[lo : hi + 1].any()
    assert fixed_points > 0  # labelled though not moved: what the old code left out


def permutation_cycles(src, moved):
    """Cycles of the position map; for k=3 each shuffled trigram is exactly one cycle (a swap or a 3-cycle)."""
    seen, lengths = set(), []
    for p in np.flatnonzero(moved):
        if p in seen:
            continue
        n, q = 0, p
        while q not in seen:
            seen.add(q)
            q, n = src[q], n + 1
        lengths.append(n)
    return lengths


def test_wso_realized_rate_and_uniform_non_identity_permutations():
    rng = np.random.default_rng(5)
    cfg = ObjectiveConfig()
    n_cycles = {2: 0, 3: 0}
    for _ in range(300):
        ids, ws, special, types = pair_sequence(rng, n_words_a=60, n_words_b=60)
        predicted = (rng.random(len(ids)) < 0.15) & ~special
        expected = round(cfg.wso_rate * len(brute_force_candidates(~predicted & ~special, types, 3)))
        out, labels = shuffle_trigrams(ids, predicted, special, types, cfg, rng)
        assert len(labelled_windows(labels, 3)) == expected
        cycles = permutation_cycles(origins(ids, out), (labels != IGNORE) & (out != ids))
        for c in cycles:
            n_cycles[c] += 1
    # non-identity permutations of 3: three swaps, two 3-cycles
    assert abs(n_cycles[3] / sum(n_cycles.values()) - 2 / 5) < 0.04


def test_trigram_candidates_match_brute_force():
    rng = np.random.default_rng(6)
    for k in (2, 3, 4):
        ids, ws, special, types = pair_sequence(rng, 10, 10)
        free = ~special & (rng.random(len(ids)) > 0.3)
        assert trigram_candidates(free, types, k).tolist() == brute_force_candidates(free, types, k)
    assert trigram_candidates(np.ones(2, bool), np.zeros(2), 3).tolist() == []


def test_wso_rate_zero_disables():
    ids, ws, special, types = pair_sequence(np.random.default_rng(7))
    out, labels = shuffle_trigrams(ids, np.zeros(len(ids), bool), special, types, ObjectiveConfig(wso_rate=0.0),
                                   np.random.default_rng(0))
    assert (out == ids).all() and (labels == IGNORE).all()


@pytest.mark.parametrize("field, value, fragment", [
    ("mask_rate", 1.5, "stage.objectives.mask_rate=1.5: must be in (0, 1)"),
    ("mask_rate", 0.0, "mask_rate=0.0"),
    ("wso_rate", 1.0, "wso_rate=1.0"),
    ("wso_rate", -0.1, "wso_rate=-0.1"),
    ("mask_token_prob", 1.2, "mask_token_prob=1.2"),
    ("random_token_prob", 0.3, "must be <= 1"),  # 0.8 + 0.3
    ("wso_k", 1, "wso_k=1"),
    ("wso_k", 2.5, "wso_k=2.5: must be an integer"),
    ("whole_word", "yes", "whole_word='yes'"),
    ("sso", 1, "sso=1"),
])
def test_validate_names_the_bad_field(field, value, fragment):
    with pytest.raises(UserError) as e:
        ObjectiveConfig(**{field: value}).validate()
    assert fragment in str(e.value)


def test_validate_accepts_defaults_and_ints_for_floats():
    assert ObjectiveConfig().validate() == ObjectiveConfig()
    ObjectiveConfig(mask_token_prob=1, random_token_prob=0).validate()
