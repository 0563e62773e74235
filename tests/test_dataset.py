"""StructBertDataset: chunking, SSO pairs, reproducibility; collate, StepSampler, eval_batches."""
import numpy as np
import pytest
import torch

from pretrain.data.indexed import IndexedCorpus, corpus_from_documents
from pretrain.data.masking import ObjectiveConfig
from pretrain.data.sampling import StepSampler, eval_batches
from pretrain.data.structbert import StructBertDataset, collate
from pretrain.errors import UserError
from pretrain.labels import IGNORE

PAD, CLS, SEP, MASK = 0, 1, 2, 3
RANDOM_IDS = np.arange(100, 200)
BASE = 1000  # corpus token id = BASE + global token index, so a sample tells where each token came from


def make_corpus(sentence_lengths_per_doc):
    docs, pos = [], 0
    for lengths in sentence_lengths_per_doc:
        doc = []
        for n in lengths:
            ids = list(range(BASE + pos, BASE + pos + n))
            starts = [1 if i % 2 == 0 else 0 for i in range(n)]  # words of 2 tokens
            doc.append((ids, starts))
            pos += n
        docs.append(doc)
    return corpus_from_documents(docs)


def random_corpus(seed=0, n_docs=40, max_sents=8, single_sentence_docs=5):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(1, 13, size=rng.integers(2, max_sents + 1))) for _ in range(n_docs)]
    docs += [[int(rng.integers(1, 13))] for _ in range(single_sentence_docs)]
    return make_corpus(docs)


def dataset(corpus, seq_len=40, seed=0, cfg=ObjectiveConfig()):
    return StructBertDataset(corpus, seq_len=seq_len, seed=seed, cfg=cfg, cls_id=CLS, sep_id=SEP,
                             mask_id=MASK, pad_id=PAD, random_ids=RANDOM_IDS)


def original_tokens(s):
    """Undo MLM and WSO with their labels."""
    return np.where(s["mlm_labels"] != IGNORE, s["mlm_labels"],
                    np.where(s["wso_labels"] != IGNORE, s["wso_labels"], s["input_ids"]))


def segments(s):
    orig = original_tokens(s)
    len_a = int((s["token_type_ids"] == 0).sum())
    a = orig[1 : len_a - 1] - BASE
    b = orig[len_a:-1] - BASE if len_a < len(orig) else None
    return a, b


def consecutive(x):
    return len(x) > 0 and (np.diff(x) == 1).all()


class Layout:
    def __init__(self, corpus):
        self.sent_start = set(corpus.sent_offsets[:-1].tolist())
        self.sent_end = set(corpus.sent_offsets[1:].tolist())
        self.doc_tok = corpus.sent_offsets[corpus.doc_offsets]

    def doc(self, tok):
        return int(np.searchsorted(self.doc_tok, tok, side="right") - 1)


def test_sample_layout_and_sso_semantics():
    """[CLS] A [SEP] B [SEP]: A and B start where sentences start; label 1 is a run of sentences and the run
    that follows it (each maybe cut from its tail), label 2 the same swapped, label 0 one of them and a span of
    another document that ends at a sentence end as often as B does under labels 1 and 2."""
    corpus = random_corpus(n_docs=300, single_sentence_docs=30)
    ds = dataset(corpus)
    lay = Layout(corpus)

    counts = {0: 0, 1: 0, 2: 0, IGNORE: 0}
    b_ends_a_sentence = {0: 0, 1: 0, 2: 0}
    for g in range(8 * len(ds)):
        s = ds[g]
        assert set(s) == {"input_ids", "token_type_ids", "mlm_labels", "wso_labels", "sso_label"}
        assert all(v.dtype == np.int64 for v in s.values()) and s["sso_label"].shape == ()
        ids, tt = s["input_ids"], s["token_type_ids"]
        assert len(ids) <= ds.seq_len and all(len(v) == len(ids) for k, v in s.items() if k != "sso_label")
        label = int(s["sso_label"])
        assert ids[0] == CLS and ids[-1] == SEP
        len_a = int((tt == 0).sum())
        assert (tt[:len_a] == 0).all() and (tt[len_a:] == 1).all() and ids[len_a - 1] == SEP
        assert not ((s["mlm_labels"] != IGNORE) & (s["wso_labels"] != IGNORE)).any()
        a, b = segments(s)
        span_a, span_b, spans_label = ds.sample_spans(g)  # the spans the sample was built from
        assert spans_label == label and (a[0], a[-1] + 1) == span_a
        assert consecutive(a) and a[0] in lay.sent_start
        counts[label] += 1
        if label == IGNORE:  # a document of one sentence: [CLS] A [SEP] only
            assert b is None and span_b is None and a[-1] + 1 in lay.sent_end
            continue
        assert consecutive(b) and (b[0], b[-1] + 1) == span_b and b[0] in lay.sent_start
        assert len(a) + len(b) <= ds.max_tokens
        b_ends_a_sentence[label] += b[-1] + 1 in lay.sent_end
        uncut = len(a) + len(b) < ds.max_tokens  # a cut brings the pair to max_tokens exactly
        if label == 1:  # B is the text that follows A's sentences (after what was cut from A's tail)
            assert a[-1] < b[0] and lay.doc(a[0]) == lay.doc(b[-1]) and (b[0] == a[-1] + 1 or not uncut)
        elif label == 2:  # the same pair swapped: the later text comes first
            assert b[-1] < a[0] and lay.doc(b[0]) == lay.doc(a[-1]) and (a[0] == b[-1] + 1 or not uncut)
        else:  # B from another document
            assert lay.doc(b[0]) != lay.doc(a[0]) and lay.doc(b[0]) == lay.doc(b[-1])
    assert counts[IGNORE] > 0
    total = counts[0] + counts[1] + counts[2]
    assert total > 2000
    for label in (0, 1, 2):
        assert abs(counts[label] / total - 1 / 3) < 0.04, counts
    shares = [b_ends_a_sentence[label] / counts[label] for label in (0, 1, 2)]
    assert 0.2 < shares[1] < 0.98 and max(shares) - min(shares) < 0.03, shares  # cut sometimes, alike


def test_single_sentence_documents_give_ignored_sso():
    ds = dataset(make_corpus([[7], [5], [9]]))
    for g in range(6):
        s = ds[g]
        assert int(s["sso_label"]) == IGNORE
        assert (s["token_type_ids"] == 0).all() and (s["input_ids"] == SEP).sum() == 1
        assert (s["mlm_labels"] != IGNORE).sum() >= 1


def test_long_sentences_pair_with_a_neighbour_cut_alike():
    """Sentences of 30 tokens with 37 to fill: A and B are one sentence each, both cut from the tail the same
    way whatever the label; which side keeps the odd token is drawn, so which segment is longer tells nothing,
    and the boundary is drawn over the whole document, so a sentence is as often A as B."""
    docs = [[30] * int(n) for n in np.random.default_rng(3).integers(2, 6, size=60)]
    corpus = make_corpus(docs)
    ds = dataset(corpus)
    assert ds.stats()["single_unit_chunks"] == ds.num_chunks
    lay = Layout(corpus)
    sent_end = dict(zip(corpus.sent_offsets[:-1].tolist(), corpus.sent_offsets[1:].tolist()))
    counts, cut_first, a_longer = {0: 0, 1: 0, 2: 0}, {0: 0, 1: 0, 2: 0}, {0: 0, 1: 0, 2: 0}
    first_of_doc = {"A": 0, "B": 0}  # label 1: is a document's first sentence in A or in B
    doc_starts = set(corpus.sent_offsets[corpus.doc_offsets[:-1]].tolist())
    for g in range(6 * len(ds)):
        s = ds[g]
        label = int(s["sso_label"])
        a, b = segments(s)
        assert b is not None and len(a) + len(b) == ds.max_tokens and consecutive(a) and consecutive(b)
        assert a[0] in lay.sent_start and b[0] in lay.sent_start
        if label == 1:
            assert b[0] == sent_end[a[0]]  # B is the sentence after A's
            first_of_doc["A"] += a[0] in doc_starts
            first_of_doc["B"] += b[0] in doc_starts
        elif label == 2:
            assert a[0] == sent_end[b[0]]  # swapped
        else:
            assert lay.doc(a[0]) != lay.doc(b[0])
        counts[label] += 1
        cut_first[label] += a[-1] + 1 != sent_end[a[0]]
        a_longer[label] += len(a) > len(b)
    total = sum(counts.values())
    for label in (0, 1, 2):
        assert abs(counts[label] / total - 1 / 3) < 0.04, counts
        assert cut_first[label] / counts[label] > 0.99  # 30 + 30 > 37: both cut, under every label
        assert abs(a_longer[label] / counts[label] - 0.5) < 0.08, a_longer
    assert first_of_doc["B"] == 0 and first_of_doc["A"] > 0.2 * counts[1], first_of_doc


def test_one_document_corpus_falls_back_to_next_and_previous():
    ds = dataset(make_corpus([[5, 6, 7, 4, 5, 6, 3, 4]]), seq_len=64)
    labels = {int(ds[g]["sso_label"]) for g in range(60)}
    assert labels == {1, 2}


def test_sso_disabled_keeps_whole_chunk_as_one_segment():
    ds = dataset(make_corpus([[5, 6, 7], [4, 4]]), cfg=ObjectiveConfig(sso=False))
    for g in range(4):
        s = ds[g]
        a, b = segments(s)
        assert int(s["sso_label"]) == IGNORE and b is None and len(a) in (18, 8)


def chunks(ds):
    return [(int(f), int(e)) for f, e in zip(ds.chunk_first, ds.chunk_end)]


def test_long_sentences_are_cut_into_units():
    ds = dataset(make_corpus([[100, 5]]), seq_len=40)  # max_tokens 37
    assert (ds.unit_end - ds.unit_start).tolist() == [37, 37, 26, 5]
    assert chunks(ds) == [(0, 1), (1, 2), (2, 4)]
    assert ds.stats()["split_sentences"] == 2


def test_chunks_partition_each_document_within_the_budget():
    rng = np.random.default_rng(3)
    n_sents = 100_000
    lengths = rng.integers(1, 60, n_sents)
    sent_offsets = np.concatenate([[0], np.cumsum(lengths)])
    doc_offsets = np.unique(np.concatenate([[0], rng.integers(0, n_sents, 20_000), [n_sents]]))
    n = int(sent_offsets[-1])
    corpus = IndexedCorpus(np.zeros(n, np.int32), np.ones(n, np.uint8), sent_offsets, doc_offsets)
    ds = dataset(corpus, seq_len=128)
    first, end = ds.chunk_first, ds.chunk_end
    assert first[0] == 0 and end[-1] == len(ds.unit_start) and (first[1:] == end[:-1]).all()  # a partition
    assert (ds.unit_doc[first] == ds.unit_doc[end - 1]).all()  # never across documents
    assert (ds.unit_end[end - 1] - ds.unit_start[first] <= ds.max_tokens).all()
    st = ds.stats()
    assert st["num_chunks"] == len(first) and 0 < st["single_unit_chunks"] < len(first)


def test_samples_are_pure_functions_of_seed_and_index():
    corpus = random_corpus(1)
    ds, fresh, other_seed = dataset(corpus), dataset(corpus), dataset(corpus, seed=1)
    for g in (0, 5, 3 * len(ds) + 2, 17, 5):  # out of order and across epochs
        x, y = ds[g], fresh[g]
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert sorted(ds.epoch_permutation(4)) == list(range(len(ds)))  # an epoch visits every chunk once
    assert not np.array_equal(ds.epoch_permutation(0), ds.epoch_permutation(1))
    differs = [not np.array_equal(ds[g]["input_ids"], other_seed[g]["input_ids"]) for g in range(20)]
    assert sum(differs) > 10


def test_dataloader_workers_do_not_change_batches():
    ds = dataset(random_corpus(2))
    sampler = dict(micro_batch=4, grad_accum=2, world_size=1, rank=0, max_steps=4)

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=StepSampler(**sampler), num_workers=workers,
                                             collate_fn=ds.collate_fn)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 8
    for x, y in zip(serial, parallel):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_step_sampler_covers_each_global_batch_whatever_the_world_size():
    micro, accum = 3, 2
    for world in (1, 2, 4):
        gb = micro * accum * world
        per_rank = [list(StepSampler(micro_batch=micro, grad_accum=accum, world_size=world, rank=r, max_steps=5))
                    for r in range(world)]
        for t in range(5):
            step = [g for r in range(world) for batch in per_rank[r][t * accum : (t + 1) * accum] for g in batch]
            assert sorted(step) == list(range(t * gb, (t + 1) * gb))
        assert all(len(b) == micro for r in per_rank for b in r)
    s = StepSampler(micro_batch=2, grad_accum=2, world_size=2, rank=1, max_steps=1)
    assert list(s) == [[2, 3], [6, 7]] and len(s) == 2


def test_step_sampler_resume_is_the_tail_and_infinite_without_max_steps():
    kw = dict(micro_batch=2, grad_accum=3, world_size=2, rank=1)
    full = list(StepSampler(**kw, max_steps=10))
    assert list(StepSampler(**kw, start_step=4, max_steps=10)) == full[4 * 3 :]
    it = iter(StepSampler(**kw, start_step=4))
    assert [next(it) for _ in range(len(full) - 12)] == full[12:]
    with pytest.raises(TypeError):
        len(StepSampler(**kw))
    with pytest.raises(UserError, match="rank=2"):
        StepSampler(micro_batch=1, grad_accum=1, world_size=2, rank=2)


def test_eval_batches_split_a_fixed_set_evenly():
    n, micro, world = 23, 4, 3
    per_rank = [eval_batches(n, micro, world, r) for r in range(world)]
    flat = [g for r in per_rank for b in r for g in b]
    assert sorted(flat) == list(range(21))  # rounded down to a multiple of world_size
    assert len({len(r) for r in per_rank}) == 1  # every rank runs the same number of batches
    assert per_rank[1][0] == [1, 4, 7, 10]


def sample(n, sso=1):
    return {"input_ids": np.arange(10, 10 + n), "token_type_ids": np.ones(n, np.int64),
            "mlm_labels": np.full(n, 5), "wso_labels": np.full(n, 6), "sso_label": np.array(sso)}


def test_collate_pads_to_a_multiple_of_eight_capped():
    batch = collate([sample(5), sample(13, sso=IGNORE)], pad_id=PAD)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [5, 13]
    assert (batch["input_ids"][0, 5:] == PAD).all() and (batch["token_type_ids"][0, 5:] == 0).all()
    assert (batch["mlm_labels"][0, 5:] == IGNORE).all() and (batch["wso_labels"][1, 13:] == IGNORE).all()
    assert batch["mlm_labels"][0, :5].tolist() == [5] * 5
    assert batch["sso_labels"].tolist() == [1, IGNORE]
    assert collate([sample(13)], pad_id=PAD, max_len=14)["input_ids"].shape == (1, 14)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(seq_len=4), "seq_len=4"),
    (dict(seed=-1), "seed=-1"),
    (dict(cfg=ObjectiveConfig(mask_rate=2.0)), "mask_rate=2.0"),
])
def test_dataset_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(UserError) as e:
        dataset(random_corpus(), **kwargs)
    assert fragment in str(e.value)
