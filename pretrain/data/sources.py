"""What a run trains on: one prepared corpus (`data.dir`) or several blended (`data.dirs`, `data.weights`).

PLUG mixed sources (news, novels, poems, Q&A) in set proportions. Here every source is a prepared directory
(sharded preparation writes one per shard) with the same vocab, and a global sample index g is dealt to a source
by a fixed pattern that repeats every PERIOD indices and gives each source its share of every period (a
largest-remainder rounding of the weights, interleaved by smallest running error, as Megatron's blending does);
the source's own dataset then maps its own running count to a sample. So a sample is still a pure function of
(seed, g), and exact resume, the world-size independence and the length grouping of stage two hold as they do
for one corpus.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.data.tokenizer import vocab_sha256
from pretrain.errors import UserError

PERIOD = 4096  # indices per repetition of the blend pattern: shares are exact per period, to 1/PERIOD of a weight
SOURCE_STREAM = 5  # seed-sequence tag of the sources' own seeds (spans.py and structbert.py use 1 to 4)


@dataclass(frozen=True)
class DataSource:
    name: str  # the directory's base name (made unique): the suffix of its valid rows, "valid/<name>"
    dir: str
    weight: float  # normalised: the sources' weights sum to 1
    meta: dict  # its meta.json
    seed: int  # the seed its datasets draw from: the run's for the first source, derived from it for the others


def load_data_meta(data_dir: str, key: str = "data.dir") -> dict:
    """The prepared corpus's meta.json, checked against the vocab.txt beside it."""
    if not os.path.isdir(data_dir):
        raise UserError(f"{key}={data_dir}: no such directory (prepare it with python -m pretrain.prepare)")
    meta_path, vocab_path = os.path.join(data_dir, "meta.json"), os.path.join(data_dir, "vocab.txt")
    for p in (meta_path, vocab_path):
        if not os.path.isfile(p):
            raise UserError(f"{key}={data_dir}: {os.path.basename(p)} missing (not a prepared corpus)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        expected_hash = meta["vocab_sha256"]
        int(meta["vocab_size"])  # present and a number
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})") from None
    actual_hash = vocab_sha256(vocab_path)
    if actual_hash != expected_hash:
        raise UserError(
            f"{vocab_path}: sha256 {actual_hash[:12]} does not match meta.json vocab_sha256 {expected_hash[:12]}"
            " (the corpus was prepared with another vocab)"
        )
    return meta


def read_sources(data, seed: int) -> list[DataSource]:
    """The sources `data.dir` or `data.dirs` / `data.weights` name, checked: one vocab across them, weights > 0."""
    single, many = data.get("dir"), data.get("dirs")
    if (single is None) == (many is None):
        raise UserError("data.dir or data.dirs is required, not both (data.dir=<prepared dir>, or "
                        "data.dirs=[<dir>,<dir>,...] to blend several)")  # fmt: skip
    if single is not None:
        if data.get("weights") is not None:
            raise UserError("data.weights: goes with data.dirs (one weight per directory), not data.dir")
        return [DataSource(os.path.basename(os.path.normpath(str(single))), str(single), 1.0, load_data_meta(str(single)), seed)]
    dirs = _expand([str(d) for d in many])
    if not dirs:
        raise UserError("data.dirs=[]: name at least one prepared directory")
    metas = [load_data_meta(d, f"data.dirs[{i}]") for i, d in enumerate(dirs)]
    for i, (d, meta) in enumerate(zip(dirs, metas)):
        if meta["vocab_sha256"] != metas[0]["vocab_sha256"]:
            raise UserError(f"data.dirs[{i}]={d}: prepared with another vocab than data.dirs[0]={dirs[0]} (sha256"
                            f" {meta['vocab_sha256'][:12]} vs {metas[0]['vocab_sha256'][:12]}): prepare every shard"
                            " with the same vocab=")  # fmt: skip
    weights = _weights(data.get("weights"), metas, dirs)
    names = _unique_names(dirs)
    seeds = [seed] + [int(np.random.SeedSequence([SOURCE_STREAM, seed, k]).generate_state(1)[0]) for k in range(1, len(dirs))]
    return [DataSource(n, d, w, m, s) for n, d, w, m, s in zip(names, dirs, weights, metas, seeds)]


def _expand(entries: list[str]) -> list[str]:
    """data.dirs with each glob (`prepared/shard-*`, the shards of a job array) replaced by its directories, in
    natural order (shard-2 before shard-10)."""
    out = []
    for i, entry in enumerate(entries):
        if not glob.has_magic(entry):
            out.append(entry)
            continue
        matches = [m for m in glob.glob(entry) if os.path.isdir(m)]
        if not matches:
            raise UserError(f"data.dirs[{i}]={entry}: matches no directory")
        out += sorted(matches, key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)])
    return out


def _weights(given, metas: list[dict], dirs: list[str]) -> list[float]:
    """Normalised weights: the given ones, or (null) each source's share of the train tokens, as if concatenated."""
    if given is None:
        raw = [float(m["splits"]["train"]["tokens"]) for m in metas]
    else:
        raw = list(given)
        if len(raw) != len(dirs):
            raise UserError(f"data.weights: {len(raw)} weights for {len(dirs)} data.dirs (one each)")
        for i, w in enumerate(raw):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w) or w <= 0:
                raise UserError(f"data.weights[{i}]={w}: must be a number > 0 (leave a source out rather than weigh it 0)")
    total = float(sum(raw))
    if total <= 0:
        raise UserError(f"data.dirs: no train tokens in {', '.join(dirs)}")
    return [float(w) / total for w in raw]


def _unique_names(dirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]


def blend_pattern(weights: list[float], period: int = PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source [period], its running count within the period [period], count per source [n]): each source gets the
    largest-remainder share of the period, and position r goes to the source furthest behind its share."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w * period
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]] += 1
    if (counts == 0).any():
        k = int(np.argmin(counts))
        raise UserError(f"data.weights: source {k}'s weight {w[k]:.2g} of the total is below 1/{period}; raise it")
    source, running = np.zeros(period, np.int64), np.zeros(period, np.int64)
    seen = np.zeros(len(w), np.int64)
    for r in range(period):
        k = int(np.argmax(counts * (r + 1) / period - seen))  # ties: the first source
        source[r], running[r] = k, seen[k]
        seen[k] += 1
    assert (seen == counts).all()
    return source, running, counts


class Blend:
    """The sources' pattern: which source a global index goes to, and as which of that source's samples."""

    def __init__(self, weights: list[float]):
        self.source, self.running, self.counts = blend_pattern(weights)
        # dealt[r, k]: how many of the pattern's first r positions go to source k
        self.dealt = np.zeros((PERIOD + 1, len(weights)), np.int64)
        np.cumsum(self.source[:, None] == np.arange(len(weights)), axis=0, out=self.dealt[1:])

    def locate(self, g: int) -> tuple[int, int]:
        """(source k, its own sample index j) of global index g."""
        period, r = divmod(int(g), PERIOD)
        k = int(self.source[r])
        return k, period * int(self.counts[k]) + int(self.running[r])

    def dealt_below(self, k: int, g: int) -> int:
        """How many of source k's samples the global indices below g take: its own index j is below that exactly
        when the global index it is dealt at is below g (a source's samples are dealt in their order). A boundary
        counted in global samples (stage two's masked-LM switch) is a source's own boundary through it."""
        period, r = divmod(int(g), PERIOD)
        return period * int(self.counts[k]) + int(self.dealt[r, k])


class BlendedDataset(torch.utils.data.Dataset):
    """Global index g -> sample `locate(g)[1]` of source `locate(g)[0]`'s dataset; len() is the sum of theirs."""

    def __init__(self, datasets: list, sources: list[DataSource], blend: Blend | None = None):
        self.datasets, self.sources = datasets, sources
        self.blend = blend or Blend([s.weight for s in sources])

    def locate(self, g: int) -> tuple[int, int]:
        return self.blend.locate(g)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, g: int):
        k, j = self.locate(g)
        return self.datasets[k][j]

    def lengths(self, g: int) -> tuple[int, int]:
        """Stage two's (encoder, decoder) lengths of sample g (for length grouping)."""
        k, j = self.locate(g)
        return self.datasets[k].lengths(j)

    @property
    def collate_fn(self):
        return self.datasets[0].collate_fn

    def stats(self) -> dict:
        return {"sources": {s.name: {"weight": s.weight, **d.stats()} for s, d in zip(self.sources, self.datasets)}}


def source_sample(data, g: int) -> tuple[object, int, str | None]:
    """(the dataset, its own index, the source's name or None) of global index g of one source's dataset or a
    blend: what `pretrain.samples` shows of a sample."""
    if isinstance(data, BlendedDataset):
        k, j = data.locate(g)
        return data.datasets[k], j, data.sources[k].name
    return data, int(g), None


def describe(sources: list[DataSource]) -> list[dict]:
    """What run.json records of each source: where, its weight, and meta.json's counts."""
    return [{"name": s.name, "dir": os.path.abspath(s.dir), "weight": s.weight, "seed": s.seed,
             "splits": s.meta.get("splits"), "shard": s.meta.get("shard")} for s in sources]  # fmt: skip
