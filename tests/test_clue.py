"""CLUE's classification tasks read from their released files (pretrain/tasks/clue.py; the format in
tests/clue_files.py): the inputs CLUE's baselines build, the label sets, the skipped no-majority pairs, the
submission file, and bad files refused in one line naming the file, the line and the field."""
import json
import os
import random

import pytest
from clue_files import IFLYTEK_LABELS, SIZES, TNEWS_LABELS, write_clue_task
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_config_keys import leaf_keys, reads  # noqa: F401 (reads: a fixture)

from pretrain.errors import UserError
from pretrain.finetune import setup
from pretrain.summary import render, summarize
from pretrain.tasks import clue, data
from runs import DEEPSPEED_FINETUNE, FINETUNE_TINY, REPO, launch

TASKS = ["afqmc", "tnews", "iflytek", "ocnli", "cmnli", "cluewsc2020", "csl"]


def _cfg(task: str, data_dir: str, run_dir, *extra: str):
    with initialize_config_dir(config_dir=f"{REPO}/conf", version_base=None):
        return compose("finetune", overrides=FINETUNE_TINY + [f"task=clue/{task}", f"data.dir={data_dir}",
                                                               f"run.dir={run_dir}", *extra])  # fmt: skip


def _lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def marked_vocab(prepared, tmp_path_factory) -> str:
    """The test corpus's vocab with the characters WSC's span marks need (its corpus has none of them)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text(open(f"{prepared}/vocab.txt", encoding="utf-8").read() + "_\n[\n]\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_reads_its_released_files(task, marked_vocab, tmp_path):
    d = write_clue_task(tmp_path, task)
    t = setup(_cfg(task, d, tmp_path / "run", f"vocab={marked_vocab}"), world_size=2).task
    expected = {"tnews": [k for k, _ in TNEWS_LABELS], "iflytek": [k for k, _ in IFLYTEK_LABELS],
                "ocnli": ["entailment", "neutral", "contradiction"], "cmnli": ["entailment", "neutral", "contradiction"],
                "cluewsc2020": ["true", "false"]}.get(task, ["0", "1"])  # fmt: skip
    assert t.labels == expected
    train_file = "train.50k.json" if task == "ocnli" else "train.json"
    raw = {s: _lines(f"{d}/{f}") for s, f in (("train", train_file), ("valid", "dev.json"), ("test", "test.json"))}
    for split, lines in raw.items():
        kept = [x for x in lines if x.get("label") != "-"]  # NLI's no-majority pairs, and only those, are skipped
        assert len(t.splits[split]) == len(kept) and t.skipped[split] == len(lines) - len(kept)
        assert t.splits[split].references == [x.get("label") for x in kept]
    if task in ("ocnli", "cmnli"):
        assert sum(t.skipped.values()) > 0
    assert [e["id"] for e in t.test_examples] == [x["id"] for x in raw["test"]]
    assert t.files_read["train"]["sha256"] == data.checksum(f"{d}/{train_file}")  # taken when read
    first = next(x for x in raw["train"] if x["label"] != "-")
    a, b = {"afqmc": ("sentence1", "sentence2"), "ocnli": ("sentence1", "sentence2"),
            "cmnli": ("sentence1", "sentence2")}.get(task, ("sentence", None))  # fmt: skip
    if task == "csl":
        text_a, text_b = " ".join(first["keyword"]), first["abst"]
    elif task == "cluewsc2020":
        text_a, text_b = clue._wsc(first)
    else:
        text_a, text_b = first[a], None if b is None else first[b]
    ids = [t.tok.cls_id, *t.tok.encode(text_a), t.tok.sep_id] + ([*t.tok.encode(text_b), t.tok.sep_id] if text_b else [])
    assert t.splits["train"].samples[0]["input_ids"].tolist() == ids and t.splits["train"].truncated == 0


@pytest.mark.parametrize("task", TASKS)
def test_every_key_is_read(task, marked_vocab, tmp_path, reads):
    """conf/task/clue/<task>.yaml: the setup reads every key (and writes nothing)."""
    assert sorted(TASKS) == sorted(n[: -len(".yaml")] for n in os.listdir(f"{REPO}/conf/task/clue") if n[0] != "_")
    cfg = _cfg(task, write_clue_task(tmp_path, task), tmp_path / "run", f"vocab={marked_vocab}")
    keys = leaf_keys(OmegaConf.to_container(cfg))
    reads.clear()
    setup(cfg, world_size=2)
    assert not keys - reads, f"keys of task=clue/{task} that pretrain.finetune never reads: {sorted(keys - reads)}"
    assert not (tmp_path / "run").exists()


def _baseline_wsc(text: str, target: dict) -> str:
    """CLUE's WSCProcessor._create_examples (baselines/models/classifier_utils.py), as written there: a character
    list, the left span marked first and the right one's positions shifted by the two marks."""
    chars = list(text)
    q_idx, q = target["span1_index"], target["span1_text"]
    p_idx, p = target["span2_index"], target["span2_text"]
    if p_idx > q_idx:
        chars.insert(q_idx, "_")
        chars.insert(q_idx + len(q) + 1, "_")
        chars.insert(p_idx + 2, "[")
        chars.insert(p_idx + len(p) + 2 + 1, "]")
    else:
        chars.insert(p_idx, "[")
        chars.insert(p_idx + len(p) + 1, "]")
        chars.insert(q_idx + 2, "_")
        chars.insert(q_idx + len(q) + 2 + 1, "_")
    return "".join(chars)


def test_wsc_spans_are_marked_as_clues_baseline_marks_them():
    text = "这时候放在床上枕头旁边的手机响了，我感到奇怪，因为欠费已被停机两个月，现在它突然响了。"
    target = {"span1_index": 5, "span1_text": "床", "span2_index": text.index("它"), "span2_text": "它"}
    assert clue._wsc({"text": text, "target": target})[0] == "这时候放在_床_上枕头旁边的手机响了，我感到奇怪，因为欠费已被停机两个月，现在[它]突然响了。"
    rng = random.Random(0)
    checked = 0
    while checked < 300:  # random texts and two spans that do not overlap, either order, adjacent ones included
        text = "".join(rng.choice("甲乙丙丁戊己庚辛") for _ in range(rng.randint(2, 30)))
        (i, m), (j, n) = [(rng.randrange(len(text)), rng.randint(1, 3)) for _ in range(2)]
        if i + m > len(text) or j + n > len(text) or not (i + m <= j or j + n <= i):
            continue
        target = {"span1_index": i, "span1_text": text[i : i + m], "span2_index": j, "span2_text": text[j : j + n]}
        checked += 1
        assert clue._wsc({"text": text, "target": target})[0] == _baseline_wsc(text, target), (text, target)


def test_the_submission_file_is_clues_format():
    examples = [{"id": 2415}, {"id": 2418}, {"id": 7}]
    text = clue.submission(examples, ["1", "0", "1"])
    assert text.splitlines() == ['{"id": 2415, "label": "1"}', '{"id": 2418, "label": "0"}', '{"id": 7, "label": "1"}']
    with pytest.raises(ValueError):
        clue.submission(examples, ["1"])


def _rewrite(path, edit) -> None:
    lines = _lines(path)
    edit(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)


@pytest.mark.parametrize("task, file, edit, message", [
    ("afqmc", "train.json", lambda ls: ls[2].pop("sentence2"), "train.json:3: no field 'sentence2'"),
    ("tnews", "dev.json", lambda ls: ls[4].update(label="999"),
     "dev.json:5: field 'label' '999' is not one of the task's labels (100, 102, 108)"),
    ("afqmc", "test.json", lambda ls: ls[6].pop("id"), "test.json:7: no field 'id'"),
    ("csl", "train.json", lambda ls: ls[0].update(keyword="a,b"), "train.json:1: field 'keyword' must be list, not str"),
    ("cluewsc2020", "dev.json", lambda ls: ls[1]["target"].update(span1_index=ls[1]["target"]["span1_index"] + 1),
     "dev.json:2: field 'target.span1_text'"),
    ("iflytek", "labels.json", lambda ls: ls.append(ls[0]), "labels.json: need at least 2 distinct labels"),
    ("ocnli", "train.50k.json", lambda ls: ls[0].update(label=2), "train.50k.json:1: field 'label' '2' is not one of"),
    ("afqmc", "dev.json", lambda ls: ls[0].update(label="-"), "dev.json:1: field 'label' '-' is not one of"),  # NLI's only
    ("cluewsc2020", "train.json", lambda ls: ls[3]["target"].update(span2_index=-1),
     "train.json:4: field 'target.span2_text'"),
])  # fmt: skip
def test_a_bad_file_is_one_line_naming_file_line_and_field(task, file, edit, message, marked_vocab, tmp_path):
    d = write_clue_task(tmp_path, task)
    _rewrite(f"{d}/{file}", edit)
    with pytest.raises(UserError) as e:
        setup(_cfg(task, d, tmp_path / "run", f"vocab={marked_vocab}"), world_size=2)
    assert message in str(e.value) and str(e.value).startswith(d) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_directory_without_its_files_and_labels_given_are_refused(prepared, tmp_path):
    d = write_clue_task(tmp_path, "ocnli")
    (tmp_path / "ocnli" / "train.50k.json").rename(tmp_path / "ocnli" / "train.json")
    with pytest.raises(UserError, match=r"train\.50k\.json: no such file"):
        setup(_cfg("ocnli", d, tmp_path / "run", f"vocab={prepared}/vocab.txt"), world_size=2)
    d = write_clue_task(tmp_path, "afqmc")
    with pytest.raises(UserError, match=r"^task.labels: CLUE's afqmc has its own \(0, 1\)"):
        setup(_cfg("afqmc", d, tmp_path / "run", f"vocab={prepared}/vocab.txt", "task.labels=[a,b]"), world_size=2)
    d = write_clue_task(tmp_path, "cluewsc2020")  # the test corpus's own vocab has no _ [ ]: WSC's marks would blur
    with pytest.raises(UserError, match=r"^task=clue/cluewsc2020 marks its spans with _ and \[ \] .* no token '_'"):
        setup(_cfg("cluewsc2020", d, tmp_path / "run", f"vocab={prepared}/vocab.txt"), world_size=2)


@pytest.mark.e2e  # a 2-rank fine-tune
def test_wsc_fine_tunes_and_writes_its_submission(marked_vocab, tmp_path):
    """The hardest input (the marked spans), 2 ranks, from random init (the test runs' vocab lacks the marks): dev
    picks the checkpoint, test.json's predictions land in CLUE 1.1's cluewsc11_predict.json in test.json's order,
    and results.json records each data file's sha256."""
    d = write_clue_task(tmp_path / "data", "cluewsc2020")
    run = tmp_path / "run"
    proc = launch(DEEPSPEED_FINETUNE, FINETUNE_TINY + [
        "task=clue/cluewsc2020", f"data.dir={d}", f"run.dir={run}", f"vocab={marked_vocab}",
        "train.max_steps=8", "train.log_every=1", "train.eval_every=4", "train.save_every=4"])  # fmt: skip
    submission = _lines(run / "cluewsc11_predict.json")
    test = _lines(f"{d}/test.json")
    assert [x["id"] for x in submission] == [x["id"] for x in test] and len(test) == SIZES["test"]
    assert all(set(x) == {"id", "label"} and x["label"] in ("true", "false") for x in submission)
    results = json.loads((run / "results.json").read_text())
    assert results["submission"] == str(run / "cluewsc11_predict.json") and results["test"] == {}
    assert 0 <= results["valid"]["accuracy"] <= 100 and "valid accuracy" in proc.stderr
    for name in ("train", "valid", "test"):
        path = results["data_files"][name]["path"]
        assert results["data_files"][name]["sha256"] == data.checksum(path) and path.startswith(d)
    assert not [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "test"]  # hidden labels
    shown = render(summarize(str(run)))
    assert f"valid accuracy {results['valid']['accuracy']:.2f}" in shown and "cluewsc11_predict.json" in shown
