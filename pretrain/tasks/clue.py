"""CLUE's classification tasks read from their released directories as they are (CLUEbenchmark/CLUE: README and
baselines/models/classifier_utils.py are the reference for fields, label sets and inputs), and their test
predictions written in CLUE's submission format.

Each directory holds train.json (OCNLI: train.50k.json), dev.json and test.json, one JSON object a line; TNEWS and
IFLYTEK also labels.json ({"label": ..., "label_desc"/"label_des": ...} a line), the label set. Labels are strings
("108", "1", "entailment", "true"); test lines have no label and an integer "id". The inputs are built as CLUE's
baselines build them:

- AFQMC, OCNLI, CMNLI: [CLS] sentence1 [SEP] sentence2 [SEP]; the pairs CLUE left without a majority label ("-",
  in OCNLI's and CMNLI's labelled files) are skipped and counted.
- TNEWS, IFLYTEK: [CLS] sentence [SEP] (TNEWS' keywords are not used, as in every CLUE baseline).
- CSL: [CLS] the keywords joined by spaces [SEP] abst [SEP].
- CLUEWSC2020: one text with its two spans marked by characters, as CLUE's WSCProcessor does: the candidate
  (span1) between underscores, the pronoun (span2) between square brackets, e.g. "这时候放在_床_上...现在[它]突然响了";
  each span must stand at its index in the text.

A submission file (`<name>_predict.json`, CLUE 1.1's names for the tasks whose test set 1.1 replaced) holds one
{"id": <the test line's id>, "label": "<label>"} per line, in test.json's order: CLUE scores the labels line by line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from pretrain.errors import UserError
from pretrain.tasks.data import json_lines

NO_MAJORITY = "-"  # OCNLI's and CMNLI's label for a pair its annotators did not agree on: not an example


def _pair(record: dict) -> tuple[str, str]:
    return record["sentence1"], record["sentence2"]


def _sentence(record: dict) -> tuple[str, None]:
    return record["sentence"], None


def _csl(record: dict) -> tuple[str, str]:
    return " ".join(record["keyword"]), record["abst"]


def _wsc(record: dict) -> tuple[str, None]:
    """The text with span1 between underscores and span2 between brackets (CLUE's WSCProcessor: the left one first,
    the right one's index then shifted by the two marks)."""
    text, target = record["text"], record["target"]
    marks = sorted([(target["span1_index"], target["span1_text"], "_", "_"),
                    (target["span2_index"], target["span2_text"], "[", "]")], reverse=True)  # fmt: skip
    for index, span, left, right in marks:  # the right one first: the left one's index stays true
        text = text[:index] + left + span + right + text[index + len(span):]
    return text, None


@dataclass(frozen=True)
class ClueSpec:
    """What CLUE defines of one task: its files, the fields of a line, its labels and its submission file."""

    name: str
    fields: dict[str, type]  # the fields of a labelled line besides "label", with their JSON types
    text: Callable[[dict], tuple[str, str | None]]  # a line's (text_a, text_b)
    labels: tuple[str, ...] | None  # None: labels.json's
    submission: str
    train_file: str = "train.json"
    id_field: str | None = None  # the labelled files' id field, where they have one (test's is always "id")
    marks: str = ""  # characters the input adds, which the vocab must hold (an [UNK] would blur them)
    no_majority: bool = False  # its labelled files hold "-" lines (no majority label): skipped, not examples


SPECS = {s.name: s for s in (
    ClueSpec("afqmc", {"sentence1": str, "sentence2": str}, _pair, ("0", "1"), "afqmc_predict.json"),
    ClueSpec("tnews", {"sentence": str}, _sentence, None, "tnews11_predict.json"),
    ClueSpec("iflytek", {"sentence": str}, _sentence, None, "iflytek_predict.json"),
    ClueSpec("ocnli", {"sentence1": str, "sentence2": str}, _pair, ("entailment", "neutral", "contradiction"),
             "ocnli_50k_predict.json", train_file="train.50k.json", id_field="id", no_majority=True),
    ClueSpec("cmnli", {"sentence1": str, "sentence2": str}, _pair, ("entailment", "neutral", "contradiction"),
             "cmnli_predict.json", no_majority=True),
    ClueSpec("cluewsc2020", {"text": str, "target": dict}, _wsc, ("true", "false"), "cluewsc11_predict.json",
             id_field="idx", marks="_[]"),
    ClueSpec("csl", {"abst": str, "keyword": list}, _csl, ("0", "1"), "csl_predict.json", id_field="id"),
)}  # fmt: skip
FILES = {"valid": "dev.json", "test": "test.json"}


def spec(name: str) -> ClueSpec:
    if name not in SPECS:
        raise UserError(f"task.clue={name}: not a CLUE classification task ({', '.join(SPECS)})")
    return SPECS[name]


def check_marks(s: ClueSpec, encode: Callable[[str], list[int]], unk_id: int, vocab_path: str) -> None:
    """Refuse a vocab that would read one of the task's marks as [UNK] (WSC's two spans would look alike)."""
    for mark in s.marks:
        if encode(mark) == [unk_id]:
            raise UserError(f"task=clue/{s.name} marks its spans with _ and [ ] as CLUE's baselines do: vocab "
                            f"{vocab_path} has no token {mark!r} (it would read [UNK], and the two spans would look "
                            "alike): fine-tune a model whose vocab holds _ [ and ]")  # fmt: skip


def split_path(data_dir: str, s: ClueSpec, split: str) -> str:
    return os.path.join(data_dir, s.train_file if split == "train" else FILES[split])


def read_labels(data_dir: str, s: ClueSpec) -> list[str]:
    """The task's label set: CLUE's fixed one, or labels.json's, in its order."""
    if s.labels is not None:
        return list(s.labels)
    path = os.path.join(data_dir, "labels.json")
    labels = [str(_field(path, lineno, record, "label", (str, int))) for lineno, record in _records(path)]
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise UserError(f"{path}: need at least 2 distinct labels, one a line (has {labels})")
    return labels


def read_split(path: str, s: ClueSpec, split: str, labels: list[str]) -> tuple[list[dict], int]:
    """(examples, lines skipped): each example {"line", "id", "text_a", "text_b"?, "label"?} of a CLUE file; the
    test file's lines carry an id and no label. The skipped: labelled lines without a majority label ("-")."""
    labelled, known = split != "test", set(labels)
    out, skipped = [], 0
    for lineno, record in _records(path):
        for name, kind in s.fields.items():
            _field(path, lineno, record, name, kind)
        example = {"line": lineno}
        if labelled:
            label = str(_field(path, lineno, record, "label", (str, int)))
            if label == NO_MAJORITY and s.no_majority:
                skipped += 1
                continue
            if label not in known:
                raise UserError(f"{path}:{lineno}: field 'label' {label!r} is not one of the task's labels"
                                f" ({', '.join(labels)})")  # fmt: skip
            example["label"] = label
            example["id"] = record.get(s.id_field, len(out)) if s.id_field else len(out)
        else:
            example["id"] = _field(path, lineno, record, "id", (int,))
        if s.name == "cluewsc2020":
            _check_spans(path, lineno, record)
        a, b = s.text(record)
        example["text_a"] = a
        if b is not None:
            example["text_b"] = b
        out.append(example)
    if not out:
        raise UserError(f"{path}: no examples")
    return out, skipped


def _records(path: str):
    return json_lines(path, "no such file (a CLUE task directory holds its released files as they are)")


def _field(path: str, lineno: int, record: dict, name: str, kinds, parent: str = ""):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if name not in record:
        raise UserError(f"{path}:{lineno}: no field {parent + name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UserError(f"{path}:{lineno}: field {parent + name!r} must be {' or '.join(k.__name__ for k in kinds)},"
                        f" not {type(value).__name__}")  # fmt: skip
    if kinds == (list,) and not all(isinstance(v, str) for v in value):
        raise UserError(f"{path}:{lineno}: field {name!r} must be a list of strings")
    return value


def _check_spans(path: str, lineno: int, record: dict) -> None:
    text, target = record["text"], record["target"]
    for k in ("1", "2"):
        index = _field(path, lineno, target, f"span{k}_index", (int,), "target.")
        span = _field(path, lineno, target, f"span{k}_text", (str,), "target.")
        if index < 0 or not span or text[index : index + len(span)] != span:
            raise UserError(f"{path}:{lineno}: field 'target.span{k}_text' {span!r} is not at span{k}_index={index}"
                            f" of the text (it reads {text[index:index + len(span)]!r})")  # fmt: skip
    one = range(target["span1_index"], target["span1_index"] + len(target["span1_text"]))
    two = range(target["span2_index"], target["span2_index"] + len(target["span2_text"]))
    if set(one) & set(two):
        raise UserError(f"{path}:{lineno}: field 'target': the two spans overlap")


def submission(examples: list[dict], predictions: list[str]) -> str:
    """The submission file's text: {"id", "label"} a line, in the test file's order."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} test examples and {len(predictions)} predictions")
    return "".join(json.dumps({"id": e["id"], "label": p}, ensure_ascii=False) + "\n"
                   for e, p in zip(examples, predictions))  # fmt: skip
