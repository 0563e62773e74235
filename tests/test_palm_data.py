"""PalmDataset (context/target spans, lengths, snapping, MLM switch), collate_palm, LengthGroupedStepSampler."""
import numpy as np
import pytest
import torch

from pretrain.data.indexed import corpus_from_documents
from pretrain.data.masking import ObjectiveConfig
from pretrain.data.palm import PalmDataset, collate_palm
from pretrain.data.sampling import LengthGroupedStepSampler, StepSampler
from pretrain.errors import UserError
from pretrain.labels import IGNORE

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
    assert enc[0] == CLS and enc[-1] == SEP and dec_in[0] == CLS and dec_lab[-1] in (SEP, IGNORE)
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


def test_spans_are_one_documents_text_at_the_drawn_lengths():
    """Realised lengths are the drawn ones up to snapping (within snap of a part's length, either way), also
    for anchors in documents too short for them: such a sample moves to a document with room."""
    corpus = random_corpus()
    ds, lay = dataset(corpus), Layout(corpus)
    moved = 0
    for g in range(20 * len(ds)):
        s = ds[g]
        assert set(s) == {"enc_input_ids", "mlm_labels", "dec_input_ids", "dec_labels"}
        assert all(v.dtype == np.int64 for v in s.values()) and (s["mlm_labels"] == IGNORE).all()
        ctx, tgt = parts(s)
        ls, lt = drawn_lengths(ds, g)
        info = ds.sample_spans(g)
        assert info["drawn"] == (ls, lt) and info["realised"] == (len(ctx) + 2, len(tgt) + 1)
        assert (info["start"], info["split"], info["end"]) == (ctx[0], tgt[0], tgt[-1] + 1)
        span = np.concatenate([ctx, tgt])
        assert (np.diff(span) == 1).all() and lay.doc(span[0]) == lay.doc(span[-1])  # contiguous, one document
        assert len(ctx) + 2 <= SRC[1] and len(tgt) + 1 <= TGT[1]
        assert abs(len(ctx) - (ls - 2)) <= int(0.25 * (ls - 2)) and abs(len(tgt) - (lt - 1)) <= int(0.25 * (lt - 1))
        moved += info["moved"]
    assert moved > 0  # the corpus's short documents cannot hold the longer draws


def test_lengths_follow_the_draws_on_a_corpus_of_short_documents():
    """Issue 9, finding 3: most documents are shorter than most draws. The realised lengths' mean and histogram
    still follow the uniform draws (the old code shrank such samples to their document)."""
    rng = np.random.default_rng(5)
    docs = [list(rng.integers(3, 15, size=rng.integers(1, 6))) for _ in range(300)]  # about 8 to 80 tokens
    docs += [list(rng.integers(3, 15, size=60)) for _ in range(10)]  # and a few long ones
    ds = dataset(make_corpus(docs), src_len=(16, 96), tgt_len=(16, 64))
    st = ds.stats(probe=3000)
    assert st["moved_to_longer_document"] > 0.3
    for side in ("encoder", "decoder"):
        h = st["length_histogram"][side]
        assert abs(h["mean_realised"] - h["mean_drawn"]) < 0.03 * h["mean_drawn"], h
        assert sum(h["drawn"]) == 3000 and sum(h["realised"]) + h["realised_below"] == 3000
        assert max(abs(np.array(h["realised"]) - np.array(h["drawn"]))) < 0.03 * 3000, h


def test_target_ends_with_sep_only_where_its_document_ends():
    """Issue 9, finding 2: [SEP] is the end of the text; a target cut inside a document has no end label."""
    corpus = random_corpus(3)
    ds, lay = dataset(corpus), Layout(corpus)
    ends = {True: 0, False: 0}
    for g in range(10 * len(ds)):
        s = ds[g]
        ctx, tgt = parts(s)
        at_end = tgt[-1] + 1 == lay.doc_range(tgt[0])[1]
        assert s["dec_labels"][-1] == (SEP if at_end else IGNORE)
        assert ds.sample_spans(g)["ends_document"] == at_end
        ends[at_end] += 1
    assert min(ends.values()) > 0.05 * sum(ends.values()), ends


def test_documents_too_short_for_any_draw_are_shared_between_the_parts():
    corpus = make_corpus([[1], [2], [5], [1, 1], [6], [1]])  # no document holds a context and a target
    ds, lay = dataset(corpus), Layout(corpus)
    st = ds.stats()
    assert st["dropped_docs"] == 2 and st["num_docs"] == 6 and st["num_anchors"] == len(ds)
    seen = set()
    for g in range(10 * len(ds)):
        ctx, tgt = parts(ds[g])
        assert len(ctx) >= 1 and len(tgt) >= 1
        doc = lay.doc(ctx[0])
        seen.add(doc)
        assert ctx[0] == lay.doc_range(ctx[0])[0] and tgt[-1] + 1 == lay.doc_range(ctx[0])[1]  # the whole document
        if doc == 1:
            assert len(ctx) == len(tgt) == 1
    assert seen == {1, 2, 3, 4}  # not the 1-token documents
    # 8 tokens shared as Ls : Lt = 4 : 8 would give the context 3, more than the 2 that [CLS] ctx [SEP] <= 4 allows
    ctx, tgt = parts(dataset(make_corpus([[8]]), src_len=(4, 4), tgt_len=(8, 8))[0])
    assert (len(ctx), len(tgt)) == (2, 6)
    with pytest.raises(UserError, match="no document of 2 or more tokens"):
        dataset(make_corpus([[1], [1]]))


def spans(ds, g):
    ctx, tgt = parts(ds[g])
    return (int(ctx[0]), int(ctx[-1]) + 1), (int(tgt[0]), int(tgt[-1]) + 1)


def test_snap_moves_to_the_nearest_sentence_end_either_way():
    ds = dataset(make_corpus([[8, 5, 10, 20]]), snap=0.25)  # sentence ends at 8, 13, 23, 43
    wide = np.array([1, 40])  # the drawn range's bounds, far away

    def snap(at, tol, bounds=wide, cap=40):
        return ds._snap(at, np.asarray(bounds), cap=cap, tol=tol)

    assert snap(10, tol=10) == 8  # 2 back: within int(0.25 * 10) = 2
    assert snap(11, tol=10) == 13  # 2 forward, nearer than 8
    assert snap(16, tol=10) == 16  # nearest ends 3 away: too far, kept
    assert snap(21, tol=12) == 23  # forward within 3
    assert snap(21, tol=12, cap=22) == 21  # not past the cap, and no further back than it lets it go forward
    assert snap(22, tol=40, cap=23) == 23  # up to the cap (a document's end) is allowed
    assert snap(12, tol=10, bounds=[10, 40]) == 13  # 8 is 4 back: too far; 13 is within reach
    assert snap(9, tol=10, bounds=[8, 40]) == 9  # 8 is the bound: the move back from it to 9 would not fit
    assert snap(10, tol=40, bounds=[7, 40]) == 13  # 8 is nearer, but from 8 a move of 2 back would leave [7, 40]
    assert snap(21, tol=40, bounds=[1, 22]) == 13  # 23 is past the bound; from 13 a move of 8 up stays within it
    assert dataset(make_corpus([[8, 5, 10, 20]]), snap=0.0)._snap(12, wide, cap=40, tol=10) == 12


def test_snap_never_empties_a_part():
    for docs in ([[30], [2, 30]], [[1, 1, 1]]):
        ds = dataset(make_corpus(docs), snap=0.5)
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
    (dict(src_len=[64, 32]), "stage.src_len=[64, 32]"),
    (dict(tgt_len=(3, 8)), "stage.tgt_len=[3, 8]"),
    (dict(tgt_len=[8]), "stage.tgt_len=[8]"),
    (dict(seed=-1), "seed=-1"),
    (dict(mlm_until=-5), "mlm_until=-5"),
    (dict(snap=0.6), "stage.snap=0.6"),
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


@pytest.mark.e2e
def test_sampler_uses_every_index_of_a_pool_once_whatever_the_world_size():
    k, steps = 4, 12  # three whole pools
    one = run(world=1, micro=4, accum=2, max_steps=steps, group_steps=k)
    two = run(world=2, micro=2, accum=2, max_steps=steps, group_steps=k)  # the same global batch of 8
    for t in range(steps):
        assert step_set(one, t) == step_set(two, t)  # same grouping: the same samples in each step
    for first in range(0, steps, k):
        used = [g for t in range(first, first + k) for g in step_set(two, t)]
        assert sorted(used) == list(range(first * 8, (first + k) * 8))  # each index of the pool exactly once


@pytest.mark.e2e
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


@pytest.mark.e2e
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
