"""How well the SSO label can be told from layout alone, without reading a token.

A multinomial logistic regression is fitted on layout features of stage-one samples: the lengths of A and B
(binned, and their joint bins: the token-type pattern), whether the sequence is full, whether A and B end (and
B starts) where a sentence does, and the lengths of the documents A and B come from. Its held-out accuracy
near 1/3 means the three labels share one geometry; above it, the label leaks through layout.

    python tests/sso_layout.py <prepared dir> [seq_len ...]     # the demo corpus: python tests/sso_layout.py data/demo/prepared 64 128 512
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from pretrain.labels import IGNORE

LENGTH_BINS = 8


def _quantile_bins(x: np.ndarray, n: int) -> np.ndarray:
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n + 1)[1:-1]))
    return np.searchsorted(edges, x, side="right")


def _one_hot(codes: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(codes, return_inverse=True)
    return np.eye(inverse.max() + 1)[inverse]


def layout_features(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the first n samples that have an SSO label (indices 0, 1, 2, ...)."""
    corpus = ds.corpus
    doc_len = np.diff(corpus.doc_token_offsets)
    boundary = corpus.is_sentence_boundary  # A and B are inside the corpus: their ends are never 0, starts never the last

    rows, labels, g = [], [], 0
    while len(rows) < n:
        a, b, label = ds.sample_spans(g)
        g += 1
        if label == IGNORE:
            continue
        la, lb = a[1] - a[0], b[1] - b[0]
        rows.append((la, lb, la + lb == ds.max_tokens, boundary(a[1]), boundary(b[1]), boundary(b[0]),
                     doc_len[corpus.document_of(a[0])], doc_len[corpus.document_of(b[0])]))
        labels.append(label)
    r = np.array(rows, dtype=np.float64)
    la_bin, lb_bin = _quantile_bins(r[:, 0], LENGTH_BINS), _quantile_bins(r[:, 1], LENGTH_BINS)
    columns = [_one_hot(la_bin), _one_hot(lb_bin), _one_hot(la_bin * LENGTH_BINS + lb_bin),
               _one_hot(np.sign(r[:, 0] - r[:, 1])), r[:, 2:6],
               _one_hot(_quantile_bins(np.log(r[:, 6]), LENGTH_BINS)),
               _one_hot(_quantile_bins(np.log(r[:, 7]), LENGTH_BINS))]
    return np.hstack(columns), np.array(labels)


def held_out_accuracy(x: np.ndarray, y: np.ndarray, train_share: float = 0.6) -> float:
    """Fit a lightly regularised multinomial logistic regression on the first train_share, score the rest."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    n = int(len(y) * train_share)
    linear = torch.nn.Linear(x.shape[1], 3).double()
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x[:n]), y[:n]) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(x[n:]).argmax(-1) == y[n:]).double().mean())


def main(prepared: str, seq_lens: list[int], n: int = 6000) -> None:
    from pretrain.data.indexed import IndexedCorpus
    from pretrain.data.masking import ObjectiveConfig
    from pretrain.data.structbert import StructBertDataset

    corpus = IndexedCorpus.open(f"{prepared}/train")
    for seq_len in seq_lens:
        ds = StructBertDataset(corpus, seq_len=seq_len, seed=1234, cfg=ObjectiveConfig(), cls_id=1, sep_id=2,
                               mask_id=3, pad_id=0, random_ids=np.arange(100, 200))
        x, y = layout_features(ds, n)
        pair = y > 0
        held_out = y[int(len(y) * 0.6) :]
        print(f"seq_len {seq_len}: layout classifier held-out accuracy {held_out_accuracy(x, y):.3f} "
              f"on {n} samples (chance 0.333); random against the rest {held_out_accuracy(x, (y > 0).astype(int)):.3f} "
              f"(majority {max((held_out > 0).mean(), (held_out == 0).mean()):.3f}); next against previous "
              f"{held_out_accuracy(x[pair], y[pair] - 1):.3f} (chance 0.5)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]] or [64, 128, 512])
