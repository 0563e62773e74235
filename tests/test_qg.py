"""The question-generation sets in their released formats (pretrain/tasks/qg.py), written here in small:

- DuReaderQG as PaddleNLP's `dureader_qg` loader reads it (paddlenlp/datasets/dureader_qg.py): train.json and
  dev.json, one {"context", "answer", "question", "id"} a line;
- KBQG as NLPCC 2016 KBQA releases it (nanduan/NLPCC-KBQA, nlpcc2016.kbqa.test): CRLF lines, "<question id=N>",
  "<triple id=N>" and "<answer id=N>" each followed by a tab, the triple "s ||| p ||| o", then 50 '='.

The inputs built, the held-out valid split, bad files refused in one line naming the file and line, every key of
the configs read, and KBQG fine-tuned on 2 ranks from a stage-two run."""
import json
import os
import random

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from synthetic import CITIES, NAMES
from test_config_keys import leaf_keys, reads  # noqa: F401 (reads: a fixture)

from pretrain.errors import UserError
from pretrain.finetune import setup
from pretrain.tasks import data, qg
from runs import DEEPSPEED_FINETUNE, FINETUNE_TINY, REPO, launch

SEPARATOR = "=" * 50


def _items(n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(subject, predicate, object, question) in the synthetic corpus's words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, city = rng.choice(NAMES), rng.choice(CITIES)
        pred, question = rng.choice([("住在", f"{who}住在哪里？"), ("出生地", f"{who}是在哪里出生的？")])
        out.append((who, pred, city, question))
    return out


def write_kbqg(root) -> str:
    d = root / "kbqg"
    d.mkdir(parents=True)
    for name, n, seed in (("nlpcc-iccpol-2016.kbqa.training-data", 60, 0), ("nlpcc-iccpol-2016.kbqa.testing-data", 9, 1)):
        lines = []
        for i, (s, p, o, q) in enumerate(_items(n, seed), 1):
            lines += [f"<question id={i}>\t{q}", f"<triple id={i}>\t{s} ||| {p} ||| {o}", f"<answer id={i}>\t{o}", SEPARATOR]
        (d / name).write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    return str(d)


def write_dureader(root) -> str:
    d = root / "dureader"
    d.mkdir(parents=True)
    for name, n, seed in (("train.json", 60, 0), ("dev.json", 9, 1)):
        rows = [{"context": f"{s}今年{p}{o}，大家都知道。", "answer": o, "question": q, "id": i}
                for i, (s, p, o, q) in enumerate(_items(n, seed))]  # fmt: skip
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(d)


def _cfg(task: str, data_dir: str, run_dir, *extra: str):
    with initialize_config_dir(config_dir=f"{REPO}/conf", version_base=None):
        return compose("finetune", overrides=FINETUNE_TINY + [f"task=qg/{task}", f"data.dir={data_dir}",
                                                               f"run.dir={run_dir}", *extra])  # fmt: skip


def test_kbqg_reads_nlpccs_file_the_triple_as_input(tmp_path):
    path = os.path.join(write_kbqg(tmp_path), "nlpcc-iccpol-2016.kbqa.testing-data")
    examples = qg.nlpcc_kbqa(path)
    items = _items(9, 1)
    assert [e["src"] for e in examples] == [f"{s} ||| {p} ||| {o}" for s, p, o, _ in items]
    assert [e["tgt"] for e in examples] == [q for *_, q in items]
    assert [e["line"] for e in examples] == list(range(1, 4 * 9, 4))  # the question's line


def test_kbqg_takes_a_byte_order_mark_and_a_separator_with_trailing_blanks(tmp_path):
    path = os.path.join(write_kbqg(tmp_path), "nlpcc-iccpol-2016.kbqa.testing-data")
    before = qg.nlpcc_kbqa(path)
    _edit(path, lambda t: "\ufeff" + t.replace("=" * 50 + "\r\n", "=" * 50 + "  \r\n", 1))
    assert qg.nlpcc_kbqa(path) == before


def test_dureader_input_is_answer_sep_context(prepared, tmp_path):
    d = write_dureader(tmp_path)
    t = setup(_cfg("dureader", d, tmp_path / "run", f"vocab={prepared}/vocab.txt"), world_size=2).task
    first = json.loads(open(os.path.join(d, "dev.json"), encoding="utf-8").readline())
    enc = t.splits["test"].samples[0]["enc_input_ids"].tolist()
    tok = t.tok
    assert enc == [tok.cls_id, *tok.encode("答案：" + first["answer"]), tok.sep_id,
                   *tok.encode("上下文：" + first["context"]), tok.sep_id]  # fmt: skip
    assert t.splits["test"].references[0] == first["question"]
    # every 20th training item held out as valid (it picks the checkpoint); dev.json is the test split
    assert (len(t.splits["train"]), len(t.splits["valid"]), len(t.splits["test"])) == (57, 3, 9)
    assert set(t.data_files()) == {"train", "test"}


@pytest.mark.parametrize("task", ["dureader", "kbqg"])
def test_every_key_is_read(task, prepared, tmp_path, reads):
    d = write_dureader(tmp_path) if task == "dureader" else write_kbqg(tmp_path)
    cfg = _cfg(task, d, tmp_path / "run", f"vocab={prepared}/vocab.txt")
    keys = leaf_keys(OmegaConf.to_container(cfg))
    reads.clear()
    setup(cfg, world_size=2)
    assert not keys - reads, f"keys of task=qg/{task} that pretrain.finetune never reads: {sorted(keys - reads)}"


def _edit(path: str, edit) -> None:
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(edit(text))


@pytest.mark.parametrize("task, file, edit, message", [
    ("kbqg", "nlpcc-iccpol-2016.kbqa.training-data", lambda t: t.replace("<triple id=2>", "<tripel id=2>", 1),
     "training-data:6: expected '<question|triple|answer id=N>'"),
    ("kbqg", "nlpcc-iccpol-2016.kbqa.testing-data", lambda t: t.replace(" ||| ", " | ", 1),
     "testing-data:2: field 'triple' must be 'subject ||| predicate ||| object'"),
    ("kbqg", "nlpcc-iccpol-2016.kbqa.testing-data", lambda t: t.replace("=" * 50 + "\r\n", "", 1),
     "testing-data:4: <question id=2> inside another item"),
    ("kbqg", "nlpcc-iccpol-2016.kbqa.testing-data", lambda t: t[: t.rindex("=" * 50)],
     "testing-data: the last item has no separator line"),
    ("dureader", "train.json", lambda t: t.replace('"answer"', '"answr"', 1), "train.json:1: field 'answer' missing"),
    ("dureader", "dev.json", lambda t: t.replace('"question": "', '"question": 1, "x": "', 1),
     "dev.json:1: field 'question' must be a string"),
])  # fmt: skip
def test_a_bad_file_is_one_line_naming_file_and_line(task, file, edit, message, prepared, tmp_path):
    d = write_dureader(tmp_path) if task == "dureader" else write_kbqg(tmp_path)
    _edit(os.path.join(d, file), edit)
    with pytest.raises(UserError) as e:
        setup(_cfg(task, d, tmp_path / "run", f"vocab={prepared}/vocab.txt"), world_size=2)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e  # a 2-rank fine-tune from a stage-two run
def test_kbqg_fine_tunes_from_stage_two_and_scores_bleu(palm_run, tmp_path):
    d = write_kbqg(tmp_path / "data")
    run = tmp_path / "run"
    launch(DEEPSPEED_FINETUNE, FINETUNE_TINY + [
        "task=qg/kbqg", f"data.dir={d}", f"run.dir={run}", f"init_from={palm_run}", "train.max_steps=6",
        "train.log_every=1", "train.eval_every=3", "train.save_every=3", "task.decoding.num_beams=2",
        "task.decoding.max_new_tokens=12"])  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"bleu4", "rouge_l"} and results["test_examples"] == 9
    assert results["type"] == "question_generation" and results["bleu_signature"].startswith("nrefs:1|")
    predictions = [json.loads(line) for line in open(run / "predictions.jsonl", encoding="utf-8")]
    assert [p["src"] for p in predictions][:2] == [f"{s} ||| {p} ||| {o}" for s, p, o, _ in _items(2, 1)]
    path = results["data_files"]["test"]["path"]
    assert results["data_files"]["test"]["sha256"] == data.checksum(path) and path.endswith("testing-data")
