"""Issue 9, finding 1: the SSO label must not be readable from layout. A classifier on layout features alone
(tests/sso_layout.py) stays near chance on a corpus of varied documents and sentences."""
import numpy as np
import pytest
from sso_layout import held_out_accuracy, layout_features

from pretrain.data.indexed import corpus_from_documents
from pretrain.data.masking import ObjectiveConfig
from pretrain.data.structbert import StructBertDataset

PUNCT = 5  # a sentence ends with it (the classifier sees whether a segment ends where a sentence does)


def varied_corpus(seed=0, n_docs=1500):
    """Documents of 1 to ~80 sentences, sentences of 2 to ~400 tokens (log-normal), so that every length
    regime occurs at seq_len 64 to 512: single long sentences cut into pieces, one-chunk documents, long ones."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n_sents = int(np.clip(rng.lognormal(2.0, 1.0), 1, 80))
        doc = []
        for n in np.clip(rng.lognormal(3.0, 0.8, n_sents), 2, 400).astype(int):
            ids = list(rng.integers(100, 5000, n - 1)) + [PUNCT]
            doc.append((ids, [1] * n))
        docs.append(doc)
    return corpus_from_documents(docs)


@pytest.fixture(scope="module")
def corpus():
    return varied_corpus()


@pytest.mark.parametrize("seq_len", [64, 128, 512])
def test_layout_alone_does_not_tell_the_sso_label(corpus, seq_len):
    ds = StructBertDataset(corpus, seq_len=seq_len, seed=0, cfg=ObjectiveConfig(), cls_id=1, sep_id=2,
                           mask_id=3, pad_id=0, random_ids=np.arange(100, 200))
    x, y = layout_features(ds, 15000)
    assert abs(np.bincount(y) / len(y) - 1 / 3).max() < 0.03
    assert held_out_accuracy(x, y) <= 0.36
