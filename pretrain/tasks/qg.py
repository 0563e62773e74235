"""The question-generation sets PLUG reports (KBQG BLEU-4 66.30, DuReaderQG 49.20), read from their released files
into the generation task's examples ({"line", "src", "tgt"}: src a string, or segments the encoder input joins with
[SEP]).

- DuReaderQG (Baidu; PaddleNLP's `dureader_qg` files): train.json and dev.json, one JSON object a line with
  `context`, `answer`, `question` and `id`; the test set is not public, so dev.json is the test split (the figures
  published for it are dev figures). The input is PaddleNLP's UNIMO-text question-generation example's default
  (examples/question_generation/unimo-text, gen_utils.py, template 1): "答案：<answer>" [SEP] "上下文：<context>";
  the target is the question.
- KBQG (NLPCC 2016 KBQA: nlpcc-iccpol-2016.kbqa.training-data and .testing-data): each item is a `<question id=N>`,
  a `<triple id=N>` and an `<answer id=N>` line (a tab after the tag; the triple `subject ||| predicate ||| object`),
  then a line of 50 '='. The input is the triple line as it stands, as PLUG's released KBQG model takes it
  (ModelScope's nlp_plug_knowledge-based-question-generation card: '《鲁迅全集》 ||| 出版时间 ||| 1981年'); the
  target is the question. The training file is the train split, the testing file the test split.

Neither set has a valid split: every `valid_every`-th item of the training file (the 1st, the k+1-th, ...) is held
out as valid, which picks the checkpoint, so the test file is scored once and never chosen on.
"""
from __future__ import annotations

import re

from pretrain.errors import UserError
from pretrain.tasks.data import json_lines

KBQG_TAGS = ("question", "triple", "answer")
KBQG_SEPARATOR = "=" * 50
_TAGGED = re.compile(r"<(question|triple|answer) id=(\d+)>\t(.*)$")


def dureader_qg(path: str) -> list[dict]:
    out = []
    for lineno, record in json_lines(path):
        for name in ("context", "answer", "question"):
            if not isinstance(record.get(name), str):
                raise UserError(f"{path}:{lineno}: field {name!r} " + ("missing" if name not in record else "must be a string"))
        if not record["question"].strip():
            raise UserError(f"{path}:{lineno}: field 'question' is empty")
        out.append({"line": lineno, "src": ["答案：" + record["answer"], "上下文：" + record["context"]],
                    "tgt": record["question"]})  # fmt: skip
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def nlpcc_kbqa(path: str) -> list[dict]:
    """The items of an NLPCC KBQA file as (triple -> question) examples; "line" is the question's line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: the released files end lines with CRLF
            lines = [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    out, item = [], {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.strip() == KBQG_SEPARATOR:
            if set(item) != set(KBQG_TAGS):
                missing = [t for t in KBQG_TAGS if t not in item]
                raise UserError(f"{path}:{lineno}: an item without its <{missing[0]} id=N> line before the separator")
            out.append({"line": item["question"][0], "src": item["triple"][2], "tgt": item["question"][2]})
            item = {}
            continue
        m = _TAGGED.match(line)
        if m is None:
            raise UserError(f"{path}:{lineno}: expected '<question|triple|answer id=N>' then a tab, or a line of 50 '='")
        tag, number, text = m.group(1), int(m.group(2)), m.group(3).strip()
        if tag in item or (item and number != next(iter(item.values()))[1]):
            raise UserError(f"{path}:{lineno}: <{tag} id={number}> inside another item (a separator missing?)")
        if tag == "triple" and (len(parts := m.group(3).split("|||")) != 3 or not all(p.strip() for p in parts)):
            raise UserError(f"{path}:{lineno}: field 'triple' must be 'subject ||| predicate ||| object', none empty")
        if not text:
            raise UserError(f"{path}:{lineno}: field {tag!r} is empty")
        item[tag] = (lineno, number, text)
    if item:
        raise UserError(f"{path}: the last item has no separator line of 50 '=' after it")
    if not out:
        raise UserError(f"{path}: no items")
    return out


READERS = {"dureader_qg": dureader_qg, "nlpcc_kbqa": nlpcc_kbqa}


def held_out(examples: list[dict], every: int, path: str) -> tuple[list[dict], list[dict]]:
    """(train, valid): every `every`-th example held out as valid."""
    if every < 2:
        raise UserError(f"task.valid_every={every}: must be >= 2 (every k-th training item is held out as valid)")
    valid = examples[::every]
    train = [e for i, e in enumerate(examples) if i % every]
    if not train:
        raise UserError(f"{path}: too few items to hold out every {every}-th as valid")
    return train, valid
