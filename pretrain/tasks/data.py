"""Labelled task files -> model inputs. A task file is JSON lines, one example a line; which field holds what is
the task config's `fields` (CLUE's names by default):

- classification: text_a (`sentence`, or `sentence1`), optional text_b (`sentence2`), label (a string, or a
  number read as its string) -> [CLS] a [SEP] (b [SEP]), token types 0 / 1, the label's index in the label list.
- token classification: tokens (a list of strings, e.g. characters) and tags (BIO, one per token) -> each token
  WordPiece-encoded on its own; its first piece carries its tag, the other pieces and the specials are ignored.
  A token with no piece (whitespace) or cut off by max_len is predicted "O".
- generation: src and tgt (strings) -> encoder [CLS] src [SEP]; decoder input [CLS] tgt, labels tgt [SEP].

Too long an input is cut (classification: the longer text first; token classification and generation: the end)
and counted: `Encoded.truncated`. Everything else that is wrong is a UserError naming the file and line.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.labels import IGNORE


@dataclass
class Encoded:
    """One split of a task: the model inputs of each example, the references the metrics compare against."""

    path: str
    samples: list[dict[str, np.ndarray]]
    references: list  # label strings, tag lists or target strings, one per example
    sources: list = field(default_factory=list)  # what predictions.jsonl shows beside each prediction
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.samples)


def checksum(path: str) -> str:
    """sha256 of a data file: which copy of a data set a result was computed on (CLUE's files differ by release,
    and copies of a benchmark circulate that differ from it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_lines(path: str, missing: str = "no such file"):
    """(line number, object) of each non-blank line of a JSON-lines file; a UserError naming the file and line for
    a line that is not a JSON object, and `missing` for a file that is not there."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {missing}")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is not line 1's text
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: a JSON object per line expected")
            yield lineno, record


def read_jsonl(path: str, fields: dict[str, str | None]) -> list[dict]:
    """The examples of `path` as {role: value} for the roles whose field name is not None."""
    out = []
    for lineno, record in json_lines(path):
        example = {"line": lineno}
        for role, name in fields.items():
            if name is None:
                continue
            if name not in record:
                raise UserError(f"{path}:{lineno}: no field {name!r} (task.fields.{role})")
            example[role] = record[name]
        out.append(example)
    if not out:
        raise UserError(f"{path}: no examples (an empty file)")
    return out


def _text(path: str, example: dict, role: str, fields: dict) -> str:
    value = example[role]
    if not isinstance(value, str):
        raise UserError(f"{path}:{example['line']}: field {fields[role]!r} must be a string, not {type(value).__name__}")
    return value


def _label(path: str, example: dict, fields: dict) -> str:
    value = example["label"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{path}:{example['line']}: field {fields['label']!r} must be a string or an integer")
    return str(value)


def label_list(path: str, examples: list[dict], fields: dict, given: list | None) -> list[str]:
    """The labels of a classification task: those given in the config, else the train file's, sorted."""
    if given is not None:
        labels = [str(x) for x in given]
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise UserError(f"task.labels={labels}: need at least 2 distinct labels")
        return labels
    labels = sorted({_label(path, e, fields) for e in examples})
    if len(labels) < 2:
        raise UserError(f"{path}: only the label {labels} occurs; a classifier needs at least 2")
    return labels


def tag_list(path: str, examples: list[dict], fields: dict, given: list | None) -> list[str]:
    """The BIO tags of a token classification task, "O" first: given in the config, else the train file's."""
    tags = [str(t) for t in given] if given is not None else sorted({t for e in examples for t in _tags(path, e, fields)})
    for t in tags:
        if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2):
            raise UserError(f"task.labels: {t!r} is not a BIO tag (O, B-<type>, I-<type>)")
    return ["O"] + [t for t in tags if t != "O"]


def _tags(path: str, example: dict, fields: dict) -> list[str]:
    tokens, tags = example["tokens"], example["tags"]
    where = f"{path}:{example['line']}"
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{where}: field {fields['tokens']!r} must be a list of strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise UserError(f"{where}: field {fields['tags']!r} must be a list of strings")
    if len(tags) != len(tokens):
        raise UserError(f"{where}: {len(tokens)} tokens and {len(tags)} tags")
    return tags


def _index(path: str, example: dict, value: str, index: dict[str, int], what: str) -> int:
    if value not in index:
        raise UserError(f"{path}:{example['line']}: {what} {value!r} is not in the label list ({', '.join(index)})")
    return index[value]


def encode_classification(path: str, examples: list[dict], fields: dict, tok: Tokenizer, labels: list[str],
                          max_len: int) -> Encoded:  # fmt: skip
    index = {label: i for i, label in enumerate(labels)}
    out = Encoded(path, [], [])
    for e in examples:
        a = tok.encode(_text(path, e, "text_a", fields))
        b = tok.encode(_text(path, e, "text_b", fields)) if "text_b" in e else None
        room = max_len - (3 if b is not None else 2)
        if len(a) + len(b or []) > room:
            out.truncated += 1
            while len(a) + len(b or []) > room:  # the longer one loses a token from its end
                if b is not None and len(b) > len(a):
                    b.pop()
                else:
                    a.pop()
        ids = [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b is not None else [])
        types = [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)
        label = _label(path, e, fields) if "label" in e else None  # None: an unlabelled (hidden) test set
        out.samples.append({"input_ids": np.array(ids), "token_type_ids": np.array(types),
                            "label": IGNORE if label is None else _index(path, e, label, index, "label")})  # fmt: skip
        out.references.append(label)
        out.sources.append({k: e[k] for k in ("text_a", "text_b") if k in e})
    return out


def encode_tagging(path: str, examples: list[dict], fields: dict, tok: Tokenizer, tags: list[str],
                   max_len: int) -> Encoded:  # fmt: skip
    index = {t: i for i, t in enumerate(tags)}
    out = Encoded(path, [], [])
    for e in examples:
        gold = _tags(path, e, fields)
        ids, labels, first = [tok.cls_id], [IGNORE], []
        cut = False
        for token, tag in zip(e["tokens"], gold):
            label = _index(path, e, tag, index, "tag")
            pieces = tok.encode(token)
            if len(ids) + len(pieces) > max_len - 1:
                cut = True
            if not pieces or cut:
                first.append(-1)
                continue
            first.append(len(ids))
            ids += pieces
            labels += [label] + [IGNORE] * (len(pieces) - 1)
        out.truncated += cut
        out.samples.append({"input_ids": np.array(ids + [tok.sep_id]), "labels": np.array(labels + [IGNORE]),
                            "first_piece": np.array(first, dtype=np.int64)})  # fmt: skip
        out.references.append(gold)
        out.sources.append({"tokens": e["tokens"]})
    return out


def encode_generation(path: str, examples: list[dict], fields: dict, tok: Tokenizer, src_max_len: int,
                      tgt_max_len: int) -> Encoded:  # fmt: skip
    out = Encoded(path, [], [])
    for e in examples:
        if isinstance(e["src"], list):  # segments, joined by [SEP] (tasks/qg.py: answer [SEP] context)
            src = [i for k, s in enumerate(e["src"]) for i in ([tok.sep_id] if k else []) + tok.encode(s)]
        else:
            src = tok.encode(_text(path, e, "src", fields))
        tgt = tok.encode(_text(path, e, "tgt", fields))
        if not tgt:
            raise UserError(f"{path}:{e['line']}: field {fields['tgt']!r} has no tokens")
        if len(src) > src_max_len - 2 or len(tgt) > tgt_max_len - 1:
            out.truncated += 1
            src, tgt = src[: src_max_len - 2], tgt[: tgt_max_len - 1]
        enc = np.array([tok.cls_id, *src, tok.sep_id])
        out.samples.append({"enc_input_ids": enc, "mlm_labels": np.full(len(enc), IGNORE),
                            "dec_input_ids": np.array([tok.cls_id, *tgt]), "dec_labels": np.array([*tgt, tok.sep_id])})
        out.references.append(e["tgt"])
        out.sources.append({"src": e["src"] if isinstance(e["src"], str) else " [SEP] ".join(e["src"])})
    return out
