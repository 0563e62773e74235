"""The fine-tuning metrics on hand-made predictions (perfect = 100, known partial values computed by hand), and the
task files' encoding: labels, WordPiece alignment of tags, truncation, bad input."""
import math

import numpy as np
import pytest

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import UserError
from pretrain.labels import IGNORE
from pretrain.tasks import data, metrics


def test_accuracy_and_macro_f1():
    assert metrics.accuracy_and_macro_f1(["a", "b", "c"], ["a", "b", "c"]) == {"accuracy": 100.0, "macro_f1": 100.0}
    got = metrics.accuracy_and_macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    # a: tp 1, 2 gold, 1 predicted -> F1 2/3; b: tp 2, 2 gold, 3 predicted -> F1 4/5
    assert got["accuracy"] == 75.0 and got["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    # a label only predicted counts in the macro average with F1 0
    assert metrics.accuracy_and_macro_f1(["a", "a"], ["a", "z"])["macro_f1"] == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_entities_follow_conlleval():
    assert metrics.entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)}  # an I- after another type starts an entity
    assert metrics.entities(["O", "I-PER", "I-PER"]) == {("PER", 1, 2)}  # an I- after O starts one too
    assert metrics.entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}


def test_entity_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG"]]
    assert metrics.entity_f1(gold, gold) == {"precision": 100.0, "recall": 100.0, "f1": 100.0}
    # 3 gold entities; predicted: PER right, LOC missed, ORG with a wrong end, one spurious LOC
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    got = metrics.entity_f1(gold, pred)
    assert got["precision"] == pytest.approx(50.0) and got["recall"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3) * 100)
    assert metrics.entity_f1([["O"]], [["O"]])["f1"] == 0.0  # nothing to find, nothing found: no credit
    with pytest.raises(ValueError):
        metrics.entity_f1([["O", "O"]], [["O"]])


def test_bleu4_and_rouge_l():
    ref = ["今天天气很好", "他们一起吃了面条"]
    assert metrics.generation_scores(ref, ref) == {"bleu4": pytest.approx(100.0), "rouge_l": pytest.approx(100.0)}
    # zh tokenisation: one token a character. "今天天气" against "今天天气很好": every n-gram precision is 1,
    # the brevity penalty exp(1 - 6/4)
    got = metrics.generation_scores(["今天天气很好"], ["今天天气"])
    assert got["bleu4"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)
    # LCS 4 of 6 reference and 4 of 4 predicted characters: F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert got["rouge_l"] == pytest.approx(80.0)
    assert metrics.rouge_l("abcd", "a b x d") == pytest.approx(75.0 / 100)  # whitespace is not a character
    assert metrics.generation_scores(["今天"], ["明年"]) == {"bleu4": 0.0, "rouge_l": 0.0}


@pytest.fixture
def tok(prepared) -> Tokenizer:
    return Tokenizer(f"{prepared}/vocab.txt")


def test_tags_go_to_the_first_piece_and_cut_tokens_are_counted(tok):
    pieces = tok.encode("1234")
    assert len(pieces) > 1  # ASCII numbers split into '##' pieces in the synthetic vocab
    examples = [{"line": 1, "tokens": ["小", "明", " ", "1234"], "tags": ["B-PER", "I-PER", "O", "O"]}]
    tags = data.tag_list("t", examples, {"tokens": "tokens", "tags": "tags"}, None)
    assert tags == ["O", "B-PER", "I-PER"]
    e = data.encode_tagging("t", examples, {"tokens": "tokens", "tags": "tags"}, tok, tags, max_len=64)
    s = e.samples[0]
    assert s["input_ids"][0] == tok.cls_id and s["input_ids"][-1] == tok.sep_id
    assert s["first_piece"].tolist() == [1, 2, -1, 3]  # the blank token has no piece
    assert s["labels"].tolist() == [IGNORE, 1, 2, 0] + [IGNORE] * (len(pieces) - 1) + [IGNORE]
    assert e.truncated == 0
    cut = data.encode_tagging("t", examples, {"tokens": "tokens", "tags": "tags"}, tok, tags, max_len=4)
    assert cut.truncated == 1 and cut.samples[0]["first_piece"].tolist() == [1, 2, -1, -1]


def test_pairs_are_cut_longer_first_and_labels_read_as_strings(tok):
    fields = {"text_a": "sentence1", "text_b": "sentence2", "label": "label"}
    examples = [{"line": 1, "text_a": "小明住在北京", "text_b": "小红", "label": 1},
                {"line": 2, "text_a": "小红", "text_b": "小明住在北京", "label": 0}]  # fmt: skip
    labels = data.label_list("t", examples, fields, None)
    assert labels == ["0", "1"]
    e = data.encode_classification("t", examples, fields, tok, labels, max_len=8)
    assert e.truncated == 2 and [s["label"] for s in e.samples] == [1, 0]
    for s in e.samples:
        assert len(s["input_ids"]) == 8 and (s["input_ids"] == tok.sep_id).sum() == 2
        first_sep = int(np.flatnonzero(s["input_ids"] == tok.sep_id)[0])
        assert s["token_type_ids"].tolist() == [0] * (first_sep + 1) + [1] * (7 - first_sep)
    assert e.samples[0]["input_ids"][-3:-1].tolist() == tok.encode("小红")  # the shorter side keeps its tokens


def test_generation_samples_and_truncation(tok):
    fields = {"src": "src", "tgt": "tgt"}
    e = data.encode_generation("t", [{"line": 1, "src": "小明住在北京", "tgt": "小明"}], fields, tok, 6, 8)
    s = e.samples[0]
    assert e.truncated == 1 and s["enc_input_ids"].tolist() == [tok.cls_id, *tok.encode("小明住在北京")[:4], tok.sep_id]
    assert s["dec_input_ids"].tolist() == [tok.cls_id, *tok.encode("小明")]
    assert s["dec_labels"].tolist() == [*tok.encode("小明"), tok.sep_id]
    assert (s["mlm_labels"] == IGNORE).all()


@pytest.mark.parametrize("lines, fields, message", [
    ([], {"text_a": "sentence"}, "no examples (an empty file)"),
    (['{"sentence": "x"}', "{oops"], {"text_a": "sentence"}, ":2: invalid JSON"),
    (['{"text": "x"}'], {"text_a": "sentence"}, ":1: no field 'sentence' (task.fields.text_a)"),
    (['["x"]'], {"text_a": "sentence"}, ":1: a JSON object per line expected"),
])  # fmt: skip
def test_bad_task_files(tmp_path, lines, fields, message):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.read_jsonl(str(path), fields)


def test_bad_labels_and_tags(tok):
    f = {"text_a": "s", "text_b": None, "label": "label"}
    with pytest.raises(UserError, match=r"t:3: label 'c' is not in the label list \(a, b\)"):
        data.encode_classification("t", [{"line": 3, "text_a": "x", "label": "c"}], f, tok, ["a", "b"], 16)
    with pytest.raises(UserError, match="need at least 2 distinct labels"):
        data.label_list("t", [], f, ["a", "a"])
    tf = {"tokens": "tokens", "tags": "tags"}
    with pytest.raises(UserError, match="t:1: 2 tokens and 1 tags"):
        data.tag_list("t", [{"line": 1, "tokens": ["a", "b"], "tags": ["O"]}], tf, None)
    with pytest.raises(UserError, match="'PER' is not a BIO tag"):
        data.tag_list("t", [{"line": 1, "tokens": ["a"], "tags": ["PER"]}], tf, None)
    with pytest.raises(UserError, match="t:1: tag 'B-LOC' is not in the label list"):
        data.encode_tagging("t", [{"line": 1, "tokens": ["a"], "tags": ["B-LOC"]}], tf, tok, ["O", "B-PER"], 16)
    with pytest.raises(UserError, match="must be a string, not int"):
        data.encode_generation("t", [{"line": 1, "src": 3, "tgt": "x"}], {"src": "src", "tgt": "tgt"}, tok, 8, 8)

