"""jieba-compatible segmenters against jieba: do they cut the text into the same words, and how fast are they?

    python bench/segmenters.py data/demo/raw [more inputs ...] [--max-mb 3]

The word boundaries decide whole-word masking, so a segmenter that stands in for jieba must cut as jieba does.
For each input (anything pretrain.prepare reads) and each candidate installed (rjieba: jieba-rs's binding;
jieba_fast_dat: a C++ port), it prints the share of paragraphs cut into exactly jieba's words, the share of
characters whose word-start flag agrees with jieba's, a few paragraphs that differ, and MB/s per core of each
(one process, after a warm-up; jieba's cut with its default HMM, as prepare runs it). Built-in, a small corpus of
what segmenters disagree on most: names, numbers and dates, Latin words mixed into Chinese.
"""
from __future__ import annotations

import argparse
import importlib
import time

import numpy as np

MIXED = [
    "2024年3月15日，张伟和李娜在上海浦东新区签署了价值12.5亿元的合同。",
    "iPhone 15 Pro的售价为7999元，比去年的iPhone 14贵了500元。",
    "欧阳娜娜、司马光和诸葛亮都是复姓；王小明则来自北京市海淀区中关村大街27号。",
    "COVID-19疫情期间，WHO建议保持1.5米的社交距离。",
    "他用Python 3.11写了一个基于PyTorch的BERT模型，准确率达到了93.7%。",
    "阿里巴巴达摩院于2021年发布了PLUG，参数量为270亿。",
    "《红楼梦》的作者是曹雪芹，书中林黛玉和贾宝玉的故事家喻户晓。",
    "从上海虹桥站出发的G7次列车将于08:30到达南京南站。",
]


def candidates() -> dict:
    """name -> cut function, for each candidate importable here."""
    found = {}
    for name, cut in (("rjieba", lambda m: m.cut), ("jieba_fast_dat", lambda m: m.lcut)):
        try:
            found[name] = cut(importlib.import_module(name))
        except ImportError:
            print(f"{name}: not installed (pip install {name.replace('_', '-')})")
    return found


def starts(words: list[str]) -> np.ndarray:
    flags = np.zeros(sum(map(len, words)), dtype=bool)
    flags[np.cumsum([0] + [len(w) for w in words[:-1]])] = True
    return flags


def throughput(cut, paragraphs: list[str], mb: float) -> float:
    for p in paragraphs[:200]:  # dictionaries load on first use
        cut(p)
    t = time.perf_counter()
    for p in paragraphs:
        cut(p)
    return mb / (time.perf_counter() - t)


def compare(name: str, paragraphs: list[str], jieba_cut, others: dict) -> None:
    mb = sum(len(p.encode()) for p in paragraphs) / 1e6
    reference = [jieba_cut(p) for p in paragraphs]
    chars = sum(len(p) for p in paragraphs)
    print(f"{name}: {len(paragraphs)} paragraphs, {mb:.2f} MB; jieba {throughput(jieba_cut, paragraphs, mb):.2f} MB/s")
    for other, cut in others.items():
        theirs = [cut(p) for p in paragraphs]
        same = sum(a == b for a, b in zip(reference, theirs))
        agree = sum(int((starts(a) == starts(b)).sum()) if len(starts(b)) == len(starts(a)) else 0
                    for a, b in zip(reference, theirs))  # fmt: skip
        print(f"  {other}: {throughput(cut, paragraphs, mb):.2f} MB/s; paragraphs cut exactly as jieba: "
              f"{same / len(paragraphs):.2%}; characters whose word start agrees: {agree / chars:.3%}")
        for a, b in [(a, b) for a, b in zip(reference, theirs) if a != b][:2]:
            print(f"    jieba: {' '.join(a)[:120]}\n    {other}: {' '.join(b)[:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--max-mb", type=float, default=3.0, help="read at most this much of each input")
    args = parser.parse_args()
    from pretrain.data.corpus import iter_input_files, iter_paragraphs
    from pretrain.data.tokenizer import jieba_segmenter

    jieba_cut, others = jieba_segmenter(), candidates()
    compare("names, numbers, mixed English (built in)", MIXED * 50, jieba_cut, others)
    for spec in args.inputs:
        paragraphs, size = [], 0
        for _, p in iter_paragraphs(iter_input_files(spec)):
            paragraphs.append(p)
            size += len(p.encode())
            if size > args.max_mb * 1e6:
                break
        compare(spec, paragraphs, jieba_cut, others)


if __name__ == "__main__":
    main()
