"""PalmDataset (context/target spans, lengths, snapping, MLM switch), collate_palm, LengthGroupedStepSampler."""
import numpy as np
import pytest
import torch

from pretrain.data.indexed import corpus_from_documents
from pretrain.data.masking import IGNORE, ObjectiveConfig
from pretrain.data.palm import PalmDataset, collate_palm
from pretrain.data.sampling import LengthGroupedStepSampler, StepSampler
from pretrain.errors import UserError

PAD, CLS, SEP, MASK = 0, 1, 2, 3
RANDOM_IDS = np.arange(100, 200)
BASE = 1000  # corpus token id = BASE + global token index, so a sample tells where each token came from
SRC, TGT = (8, 24), (6, 16)


def make_corpus(sentence_lengths_per_doc):
    docs, pos = [], 0
    for lengths in sentence_lengths_per_doc:
        doc = []
        for n in lengths:
            doc.append((list(range(BASE + pos, BASE + pos + n)), [1 if i % 2 == 0 else 0 for i in range(n)]))
            pos += n
        docs.append(doc)
    return corpus_from_documents(docs)


def random_corpus(seed=0, n_docs=60):
    """Long documents of 1..12-token sentences, and the short kinds: 1 token, 2 tokens, one short sentence."""
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, 13, size=rng.integers(2, 15))) for _ in range(n_docs)]
    return make_corpus(docs + [[1], [2], [5], [1, 1], [3, 2], [1]])


def dataset(corpus, src_len=SRC, tgt_len=TGT, seed=0, mlm_until=0, cfg=ObjectiveConfig(), **kw):
    return PalmDataset(corpus, src_len=src_len, tgt_len=tgt_len, seed=seed, mlm_cfg=cfg, mlm_until=mlm_until,
                       cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, random_ids=RANDOM_IDS, **kw)


def drawn_lengths(ds, g):
    """(Ls, Lt) as the contract says they are drawn: first, from the sample's own rng."""
    epoch, position = divmod(g, len(ds))
    anchor = int(ds.epoch_permutation(epoch)[position])
    rng = np.random.default_rng([2, ds.seed, epoch, anchor])
    return int(rng.integers(ds.src_len[0], ds.src_len[1] + 1)), int(rng.integers(ds.tgt_len[0], ds.tgt_len[1] + 1))


def parts(s):
    """(context, target) as corpus token positions, checking the [CLS]/[SEP] layout on the way."""
    enc, dec_in, dec_lab = s["enc_input_ids"], s["dec_input_ids"], s["dec_labels"]
    assert enc[0] == CLS and enc[-1] == SEP and dec_in[0] == CLS and dec_lab[-1] == SEP
    assert np.array_equal(dec_in[1:], dec_lab[:-1])
    clean = np.where(s["mlm_labels"] != IGNORE, s["mlm_labels"], enc)
    return clean[1:-1] - BASE, dec_lab[:-1] - BASE


class Layout:
    def __init__(self, corpus):
        self.sent_ends = corpus.sent_offsets[1:]
        self.doc_tok = corpus.sent_offsets[corpus.doc_offsets]

    def doc(self, tok):
        return int(np.searchsorted(self.doc_tok, tok, side="right") - 1)

    def doc_range(self, tok):
        d = self.doc(tok)
        return int(self.doc_tok[d]), int(self.doc_tok[d + 1])


def test_spans_are_one_documents_text_within_the_drawn_lengths():
    corpus = random_corpus()
    ds, lay = dataset(corpus), Layout(corpus)
    drawn, full = [], []
    for g in range(20 * len(ds)):
        s = ds[g]
        assert set(s) == {"enc_input_ids", "mlm_labels", "dec_input_ids", "dec_labels"}
        assert all(v.dtype == np.int64 for v in s.values()) and (s["mlm_labels"] == IGNORE).all()
        ctx, tgt = parts(s)
        ls, lt = drawn_lengths(ds, g)
        assert len(ctx) >= 1 and len(tgt) >= 1
        assert len(ctx) + 2 <= ls and len(tgt) + 1 <= lt
        span = np.concatenate([ctx, tgt])
        assert (np.diff(span) == 1).all() and lay.doc(span[0]) == lay.doc(span[-1])  # contiguous, one document
        doc_start, doc_end = lay.doc_range(span[0])
        drawn.append((ls, lt))
        if doc_end - doc_start >= ls + lt - 3:  # room for both: only snapping may shorten a part
            assert len(ctx) + 2 >= ls - int(0.25 * (ls - 2)) and len(tgt) + 1 >= lt - int(0.25 * (lt - 1))
            full.append((len(ctx) + 2, len(tgt) + 1))
        else:  # too short: the whole document, split between context and target (then snapped)
            assert span[0] == doc_start
    drawn, full = np.array(drawn), np.array(full)
    assert drawn[:, 0].min() == SRC[0] and drawn[:, 0].max() == SRC[1]
    assert drawn[:, 1].min() == TGT[0] and drawn[:, 1].max() == TGT[1]
    assert full[:, 0].min() <= SRC[0] and full[:, 0].max() == SRC[1]
    assert full[:, 1].min() <= TGT[0] + 1 and full[:, 1].max() == TGT[1]


def test_short_documents_give_samples_and_one_token_documents_are_counted():
    corpus = make_corpus([[1], [2], [5], [1, 1], [40, 40], [1]])
    ds, lay = dataset(corpus), Layout(corpus)
    st = ds.stats()
    assert st["dropped_docs"] == 2 and st["num_docs"] == 6 and st["num_anchors"] == len(ds)
    seen = set()
    for g in range(10 * len(ds)):
        ctx, tgt = parts(ds[g])
        assert len(ctx) >= 1 and len(tgt) >= 1
        doc = lay.doc(ctx[0])
        seen.add(doc)
        assert doc not in (0, 5)  # the 1-token documents
        if doc in (1, 2, 3):  # shorter than any context + target: the whole document
            assert ctx[0] == lay.doc_range(ctx[0])[0] and tgt[-1] + 1 == lay.doc_range(ctx[0])[1]
        if doc == 1:
            assert len(ctx) == len(tgt) == 1
    assert seen == {1, 2, 3, 4}
    # 8 tokens shared as Ls : Lt = 4 : 8 would give the context 3, more than the 2 that [CLS] ctx [SEP] <= 4 allows
    ctx, tgt = parts(dataset(make_corpus([[8]]), src_len=(4, 4), tgt_len=(8, 8))[0])
    assert (len(ctx), len(tgt)) == (2, 6)
    with pytest.raises(UserError, match="no document of 2 or more tokens"):
        dataset(make_corpus([[1], [1]]))


def spans(ds, g):
    ctx, tgt = parts(ds[g])
    return (int(ctx[0]), int(ctx[-1]) + 1), (int(tgt[0]), int(tgt[-1]) + 1)


def test_parts_snap_back_to_sentence_ends_within_the_tolerance():
    # Ls=12, Lt=8: context 10 tokens (tolerance 2), target 7 (tolerance 1); chunks of 17 tokens.
    corpus = make_corpus([[8, 20], [7, 20], [10, 6, 20]])
    ds = dataset(corpus, src_len=(12, 12), tgt_len=(8, 8))
    expected = {
        ((0, 8), (8, 15)),  # the sentence end at 8 is 2 tokens before the nominal split at 10: snapped
        ((8, 18), (18, 25)),  # no sentence end inside; also the chunk at 25, 3 tokens from the end, moved back to 8
        ((28, 38), (38, 45)),  # the sentence end at 35 is 3 tokens back: too far, not snapped
        ((35, 45), (45, 52)),
        ((55, 65), (65, 71)),  # split on a sentence end; the target end 72 snaps back to 71
        ((65, 75), (75, 82)),  # the other start unit of the same chunk
        ((71, 81), (81, 88)),  # the last chunk [88, 91) too moves back, to this unit
    }
    seen = {spans(ds, g) for g in range(40 * len(ds))}
    assert seen == expected


def test_snap_never_empties_a_part():
    # Ls=6: a nominal context of 4 tokens, tolerance int(0.25 * 4) = 1, so the context from the document's start
    # ends with its 3-token first sentence; with snap=0 it keeps all 4
    corpus = make_corpus([[3, 30]])
    snapped = {spans(dataset(corpus, src_len=(6, 6), tgt_len=(4, 4)), g)[0] for g in range(20)}
    plain = {spans(dataset(corpus, src_len=(6, 6), tgt_len=(4, 4), snap=0.0), g)[0] for g in range(20)}
    assert (0, 3) in snapped and (0, 4) not in snapped and (0, 4) in plain
    # snap=1 tolerates any distance, yet a part is never cut back to its own start
    for docs in ([[30], [2, 30]], [[1, 1, 1]]):
        ds = dataset(make_corpus(docs), snap=1.0)
        for g in range(10 * len(ds)):
            ctx, tgt = parts(ds[g])
            assert len(ctx) >= 1 and len(tgt) >= 1


def test_lengths_match_the_samples():
    corpus = random_corpus(1)
    ds = dataset(corpus, mlm_until=10**9)
    for g in range(5 * len(ds)):
        s = ds[g]
        assert ds.lengths(g) == (len(s["enc_input_ids"]), len(s["dec_input_ids"]))
        assert len(s["mlm_labels"]) == len(s["enc_input_ids"]) and len(s["dec_labels"]) == len(s["dec_input_ids"])


def test_samples_are_pure_functions_of_seed_and_index():
    corpus = random_corpus(2)
    ds, fresh, other = dataset(corpus, mlm_until=100), dataset(corpus, mlm_until=100), dataset(corpus, seed=1)
    for g in (0, 5, 3 * len(ds) + 2, 99, 17, 5):  # out of order and across epochs
        x, y = ds[g], fresh[g]
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert sorted(ds.epoch_permutation(3)) == list(range(len(ds)))
    differs = [spans(ds, g) != spans(other, g) for g in range(40)]
    assert sum(differs) > 20


def test_mlm_only_below_mlm_until_and_on_the_same_span():
    corpus = make_corpus([list(np.random.default_rng(3).integers(4, 12, size=200)), [5], [2, 3]])
    until = 150
    cfg = ObjectiveConfig(mask_rate=0.15, mask_token_prob=1.0, random_token_prob=0.0)
    masked, clean = dataset(corpus, mlm_until=until, cfg=cfg, src_len=(60, 80)), dataset(corpus, src_len=(60, 80))
    rates = []
    for g in range(300):
        m, c = masked[g], clean[g]
        assert all(np.array_equal(m[k], c[k]) for k in ("dec_input_ids", "dec_labels"))
        predicted = m["mlm_labels"] != IGNORE
        if g >= until:
            assert np.array_equal(m["enc_input_ids"], c["enc_input_ids"]) and not predicted.any()
            continue
        assert np.array_equal(np.where(predicted, m["mlm_labels"], m["enc_input_ids"]), c["enc_input_ids"])
        assert not predicted[[0, -1]].any() and m["enc_input_ids"][0] == CLS and m["enc_input_ids"][-1] == SEP
        assert (m["enc_input_ids"][predicted] == MASK).all() and predicted.any()
        if len(predicted) >= 40:
            rates.append(predicted.sum() / (len(predicted) - 2))
    assert len(rates) > 100 and abs(np.mean(rates) - 0.15) < 0.02


def test_collate_pads_each_side_to_a_multiple_of_eight():
    def sample(n_enc, n_dec):
        return {"enc_input_ids": np.arange(10, 10 + n_enc), "mlm_labels": np.full(n_enc, 5),
                "dec_input_ids": np.arange(20, 20 + n_dec), "dec_labels": np.full(n_dec, 6)}

    b = collate_palm([sample(5, 17), sample(9, 3)], pad_id=PAD)
    assert b["enc_input_ids"].shape == (2, 16) and b["dec_input_ids"].shape == (2, 24)
    assert b["enc_attention_mask"].dtype == torch.bool and b["dec_attention_mask"].dtype == torch.bool
    assert b["enc_attention_mask"].sum(1).tolist() == [5, 9] and b["dec_attention_mask"].sum(1).tolist() == [17, 3]
    assert (b["enc_input_ids"][0, 5:] == PAD).all() and (b["mlm_labels"][0, 5:] == IGNORE).all()
    assert (b["dec_input_ids"][1, 3:] == PAD).all() and (b["dec_labels"][1, 3:] == IGNORE).all()
    assert b["dec_labels"][0, :17].tolist() == [6] * 17
    assert collate_palm([sample(13, 3)], pad_id=PAD, enc_max_len=14)["enc_input_ids"].shape == (1, 14)


def test_dataloader_workers_do_not_change_batches():
    ds = dataset(random_corpus(4), mlm_until=3 * 4)  # boundary_step * GB
    kw = dict(micro_batch=4, grad_accum=2, world_size=1, rank=0, max_steps=4, group_steps=2, boundary_step=3)

    def batches(workers):
        sampler = LengthGroupedStepSampler(ds.lengths, **kw)
        return list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                                collate_fn=ds.collate_fn))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 8
    for x, y in zip(serial, parallel):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(src_len=[64, 32]), "palm.src_len=[64, 32]"),
    (dict(tgt_len=(3, 8)), "palm.tgt_len=[3, 8]"),
    (dict(tgt_len=[8]), "palm.tgt_len=[8]"),
    (dict(seed=-1), "seed=-1"),
    (dict(mlm_until=-5), "mlm_until=-5"),
    (dict(snap=1.5), "palm.snap=1.5"),
    (dict(cfg=ObjectiveConfig(mask_rate=2.0)), "mask_rate=2.0"),
])
def test_dataset_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(UserError) as e:
        dataset(random_corpus(), **kwargs)
    assert fragment in str(e.value)


def test_dataset_rejects_empty_corpus_and_random_ids():
    with pytest.raises(UserError, match="no tokens"):
        dataset(make_corpus([]))
    with pytest.raises(UserError, match="random_ids"):
        PalmDataset(random_corpus(), src_len=SRC, tgt_len=TGT, seed=0, mlm_cfg=ObjectiveConfig(), mlm_until=0,
                    cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, random_ids=np.zeros(0, np.int64))


# ---- sampler ---------------------------------------------------------------------------------------
TABLE = np.random.default_rng(7).integers(4, 200, size=(100_000, 2))


def table_lengths(g):
    return int(TABLE[g, 0]), int(TABLE[g, 1])


def run(world, micro, accum, max_steps, **kw):
    """Per rank, per step: the list of its micro batches."""
    out = []
    for r in range(world):
        batches = list(LengthGroupedStepSampler(table_lengths, micro_batch=micro, grad_accum=accum, world_size=world,
                                                rank=r, max_steps=max_steps, **kw))
        assert all(len(b) == micro for b in batches) and len(batches) == max_steps * accum
        out.append([batches[t * accum : (t + 1) * accum] for t in range(max_steps)])
    return out


def step_set(per_rank, t):
    return sorted(g for rank in per_rank for batch in rank[t] for g in batch)


def test_sampler_uses_every_index_of_a_pool_once_whatever_the_world_size():
    k, steps = 4, 12  # three whole pools
    one = run(world=1, micro=4, accum=2, max_steps=steps, group_steps=k)
    two = run(world=2, micro=2, accum=2, max_steps=steps, group_steps=k)  # the same global batch of 8
    for t in range(steps):
        assert step_set(one, t) == step_set(two, t)  # same grouping: the same samples in each step
    for first in range(0, steps, k):
        used = [g for t in range(first, first + k) for g in step_set(two, t)]
        assert sorted(used) == list(range(first * 8, (first + k) * 8))  # each index of the pool exactly once


def test_sampler_groups_lengths_and_shuffles_pool_steps():
    micro, accum, world, k, steps = 4, 2, 2, 8, 32

    def padding(batches):
        total = 0
        for b in batches:
            lens = np.array([table_lengths(g) for g in b])
            width = -(-lens.max(0) // 8) * 8
            total += int((width * len(b) - lens.sum(0)).sum())
        return total

    per_rank = run(world, micro, accum, steps, group_steps=k)
    grouped = [b for r in per_rank for step in r for b in step]
    plain = [b for r in range(world) for b in StepSampler(micro_batch=micro, grad_accum=accum, world_size=world,
                                                         rank=r, max_steps=steps)]
    assert sorted(g for b in grouped for g in b) == sorted(g for b in plain for g in b)
    # independent uniform enc/dec lengths, grouped by the encoder's then the decoder's: far less padding
    assert padding(grouped) < 0.6 * padding(plain)
    step_mean = [np.mean([sum(table_lengths(g)) for g in step_set(per_rank, t)]) for t in range(steps)]
    for first in range(0, steps, k):  # pool-steps are not visited short to long
        assert step_mean[first : first + k] != sorted(step_mean[first : first + k])


def test_sampler_pools_stop_at_the_boundary_step():
    micro, accum, world, boundary = 2, 2, 1, 6
    gb = micro * accum * world
    s = LengthGroupedStepSampler(table_lengths, micro_batch=micro, grad_accum=accum, world_size=world, rank=0,
                                 group_steps=4, boundary_step=boundary)
    assert [s.pool_bounds(t) for t in (0, 3, 4, 5, 6, 9, 10)] == [(0, 4), (0, 4), (4, 6), (4, 6), (6, 10),
                                                                  (6, 10), (10, 14)]
    per_rank = run(world, micro, accum, 14, group_steps=4, boundary_step=boundary)
    before = [g for t in range(boundary) for g in step_set(per_rank, t)]
    after = [g for t in range(boundary, 14) for g in step_set(per_rank, t)]
    assert sorted(before) == list(range(boundary * gb)) and min(after) >= boundary * gb
    zero = LengthGroupedStepSampler(table_lengths, micro_batch=1, grad_accum=1, world_size=1, rank=0,
                                    group_steps=4, boundary_step=0)
    assert zero.pool_bounds(0) == (0, 4) and zero.pool_bounds(5) == (4, 8)


def test_sampler_resume_is_the_tail():
    kw = dict(micro_batch=2, grad_accum=3, world_size=2, rank=1, group_steps=4, seed=5, boundary_step=7)
    full = list(LengthGroupedStepSampler(table_lengths, **kw, max_steps=15))
    for start in (1, 5, 7, 9):  # mid pool, at a pool start, at the boundary
        resumed = LengthGroupedStepSampler(table_lengths, **kw, start_step=start, max_steps=15)
        assert list(resumed) == full[start * 3 :] and len(resumed) == (15 - start) * 3
    it = iter(LengthGroupedStepSampler(table_lengths, **kw, start_step=5))
    assert [next(it) for _ in range(len(full) - 15)] == full[15:]
    with pytest.raises(TypeError):
        len(LengthGroupedStepSampler(table_lengths, **kw))
    other_seed = list(LengthGroupedStepSampler(table_lengths, **{**kw, "seed": 6}, max_steps=15))
    assert other_seed != full


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(micro_batch=0), "micro_batch=0"),
    (dict(grad_accum=0), "grad_accum=0"),
    (dict(world_size=0), "world_size=0"),
    (dict(rank=2), "rank=2"),
    (dict(group_steps=0), "group_steps=0"),
    (dict(start_step=-1), "start_step=-1"),
    (dict(seed=-3), "seed=-3"),
    (dict(boundary_step=-2), "boundary_step=-2"),
])
def test_sampler_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(UserError) as e:
        LengthGroupedStepSampler(table_lengths, **{**dict(micro_batch=2, grad_accum=1, world_size=2, rank=0), **kwargs})
    assert fragment in str(e.value)
