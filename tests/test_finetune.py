"""Fine-tuning end to end under the real `deepspeed` launcher (2 CPU ranks, ZeRO-3): token classification from a
stage-one checkpoint, pair classification from random init, generation from a stage-two checkpoint; exact resume;
the metric in results.json recomputed from predictions.jsonl; bad input refused with one line before any write."""
import hashlib
import json
import os
import random

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from synthetic import CITIES, NAMES, synthetic_documents
from test_config_keys import leaf_keys, reads  # noqa: F401 (reads: a fixture)

from pretrain.errors import UserError
from pretrain.finetune import setup
from pretrain.summary import render, summarize
from pretrain.tasks import metrics
from runs import DEEPSPEED_FINETUNE, FINETUNE_TINY, PYTHON, REPO, launch, rows

STEPS = ["train.max_steps=20", "train.log_every=1", "train.eval_every=10", "train.save_every=5", "train.keep_last=1"]
SIZES = {"train": 160, "valid": 21, "test": 19}  # valid and test not multiples of 2 ranks x 4: padding slots


def _tagged(sentence: str) -> tuple[list[str], list[str]]:
    tags = ["O"] * len(sentence)
    for words, kind in ((NAMES, "PER"), (CITIES, "LOC")):
        for w in words:
            start = sentence.find(w)
            while start >= 0:
                tags[start : start + len(w)] = [f"B-{kind}"] + [f"I-{kind}"] * (len(w) - 1)
                start = sentence.find(w, start + 1)
    return list(sentence), tags


def _write(root, name: str, rows_of) -> str:
    d = root / name
    d.mkdir()
    for split, n in SIZES.items():
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_of(split, n))
    return str(d)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, str]:
    """Tiny task directories in the synthetic corpus's language: NER over names and cities, sentence pairs (do
    they share a name?), single sentences (naming a city?) and generation (a sentence -> the first name in it)."""
    root = tmp_path_factory.mktemp("tasks")
    sentences = [s for doc in synthetic_documents(400, seed=7) for p in doc for s in p]
    rng = random.Random(0)

    def ner(split, n):
        return [dict(zip(("tokens", "tags"), _tagged(s))) for s in rng.sample(sentences, n)]

    def pairs(split, n):
        out = []
        for _ in range(n):
            a, b = rng.sample(sentences, 2)
            same = any(x in a and x in b for x in NAMES)
            out.append({"sentence1": a, "sentence2": b, "label": int(same)})
        return out

    def generation(split, n):
        picked = [s for s in sentences if any(x in s for x in NAMES)]
        return [{"src": s, "tgt": min((s.find(x), x) for x in NAMES if x in s)[1]} for s in rng.sample(picked, n)]

    def single(split, n):
        return [{"sentence": s, "label": "city" if any(c in s for c in CITIES) else "none"} for s in rng.sample(sentences, n)]

    return {"ner": _write(root, "ner", ner), "pair": _write(root, "pair", pairs), "gen": _write(root, "gen", generation),
            "cls": _write(root, "cls", single)}  # fmt: skip


def _args(task: str, data_dir: str, run_dir, *extra: str) -> list[str]:
    return FINETUNE_TINY + STEPS + [f"task={task}", f"data.dir={data_dir}", f"run.dir={run_dir}", *extra]


def _read(run_dir, name: str):
    with open(os.path.join(run_dir, name), encoding="utf-8") as f:
        return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def _check_results(run_dir, select: str, higher: bool) -> dict:
    """results.json: picked on valid, tested once; its figures are those of predictions.jsonl."""
    results = _read(run_dir, "results.json")
    valid = rows(str(run_dir), "valid")
    assert [r["step"] for r in valid] == [10, 20]
    best = max(valid, key=lambda r: (r[select] if higher else -r[select], -r["step"]))
    assert results["best_step"] == best["step"] and results["valid"][select] == best[select]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step{best['step']}"))  # kept beside the last
    test_rows = rows(str(run_dir), "test")
    assert len(test_rows) == 1 and test_rows[0]["step"] == best["step"]
    assert {k: v for k, v in test_rows[0].items() if k not in ("step", "split")} == results["test"]
    return results


@pytest.fixture(scope="module")
def ner_run(tasks, stage_one, tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("ner") / "straight"
    launch(DEEPSPEED_FINETUNE, _args("ner", tasks["ner"], run, f"init_from={stage_one['two_ranks']}"))
    return str(run)


@pytest.mark.e2e
def test_ner_from_stage_one(ner_run, tasks, stage_one):
    results = _check_results(ner_run, "f1", True)
    predictions = _read(ner_run, "predictions.jsonl")
    test = [json.loads(line) for line in open(os.path.join(tasks["ner"], "test.jsonl"), encoding="utf-8")]
    assert [p["tokens"] for p in predictions] == [t["tokens"] for t in test]  # every example once, in order
    assert [p["reference"] for p in predictions] == [t["tags"] for t in test]
    assert results["test"] == metrics.entity_f1([p["reference"] for p in predictions], [p["prediction"] for p in predictions])
    assert results["test_examples"] == SIZES["test"]
    info = _read(ner_run, "run.json")
    assert info["initialized_from"] == os.path.join(stage_one["two_ranks"], "checkpoints", "step6")
    assert info["init_tensors"] == {"carried": {"encoder": 29}, "fresh": {"classifier": 2}}
    assert info["task"]["labels"] == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    train = rows(ner_run, "train")
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    shown = render(summarize(ner_run))  # pretrain.summary prints the test figures
    assert f"test ({SIZES['test']} examples, the checkpoint of step {results['best_step']}" in shown
    assert f"f1 {results['test']['f1']:.2f}" in shown
    train_file = results["data_files"]["train"]
    assert f"data train: {train_file['path']} sha256 {train_file['sha256'][:16]}" in shown  # which copy of the data


@pytest.mark.e2e
def test_finetune_resume_is_exact(ner_run, tasks, stage_one, tmp_path):
    run = tmp_path / "resumed"
    args = _args("ner", tasks["ner"], run, f"init_from={stage_one['two_ranks']}")
    launch(DEEPSPEED_FINETUNE, args + ["train.exit_at_step=10"])
    assert not os.path.exists(run / "results.json")  # stopped early: no test yet
    launch(DEEPSPEED_FINETUNE, args)
    drop = ("tokens_per_s", "step_time_s")  # timings differ
    same = lambda d: [{k: v for k, v in r.items() if k not in drop} for r in _read(d, "metrics.jsonl")]  # noqa: E731
    assert same(str(run)) == same(ner_run)  # train losses, valid metrics and the test row, bitwise
    assert _read(str(run), "predictions.jsonl") == _read(ner_run, "predictions.jsonl")


@pytest.mark.e2e
def test_pair_classification_from_random_init(tasks, prepared, tmp_path):
    run = tmp_path / "pair"
    launch(DEEPSPEED_FINETUNE, _args("pair_classification", tasks["pair"], run, f"vocab={prepared}/vocab.txt"))
    results = _check_results(run, "accuracy", True)
    predictions = _read(run, "predictions.jsonl")
    assert {p["prediction"] for p in predictions} <= {"0", "1"} and results["initialized_from"] is None
    assert results["test"] == metrics.accuracy_and_macro_f1([p["reference"] for p in predictions],
                                                            [p["prediction"] for p in predictions])  # fmt: skip
    assert _read(run, "run.json")["task"]["labels"] == ["0", "1"]
    # which copy of the data: every file read, with its sha256
    for split in ("train", "valid", "test"):
        entry, path = results["data_files"][split], os.path.join(tasks["pair"], f"{split}.jsonl")
        assert entry["path"] == path and entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.e2e
def test_generation_from_stage_two(tasks, palm_run, tmp_path):
    run = tmp_path / "gen"
    proc = launch(DEEPSPEED_FINETUNE, _args("generation", tasks["gen"], run, f"init_from={palm_run}",
                                            "task.src_max_len=12", "task.decoding.max_new_tokens=6"))  # fmt: skip
    results = _check_results(run, "lm_loss", False)
    predictions = _read(run, "predictions.jsonl")
    assert len(predictions) == SIZES["test"] and all({"src", "tgt", "reference", "prediction"} <= set(p) for p in predictions)
    assert results["test"] == metrics.generation_scores([p["reference"] for p in predictions],
                                                        [p["prediction"] for p in predictions])  # fmt: skip
    assert set(results["test"]) == {"bleu4", "rouge_l"} and results["decoding"]["no_repeat_ngram_size"] == 3
    assert results["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:")
    # sources past task.src_max_len are cut and counted, once, by rank 0
    assert results["truncated"]["test"] > 0
    assert proc.stderr.count(f"test.jsonl: {results['truncated']['test']} of {SIZES['test']} examples longer than "
                             "task.src_max_len, truncated") == 1  # fmt: skip
    assert _read(run, "run.json")["init_tensors"]["fresh"] == {}  # the whole PALM is carried


@pytest.mark.e2e
def test_plain_python_single_rank(tasks, prepared, tmp_path):
    run = tmp_path / "one_rank"
    launch(PYTHON[:2] + ["pretrain.finetune"], FINETUNE_TINY + [
        "task=pair_classification", f"data.dir={tasks['pair']}", f"run.dir={run}", f"vocab={prepared}/vocab.txt",
        "train.max_steps=4", "train.eval_every=2", "train.log_every=1"])  # fmt: skip
    results = _read(str(run), "results.json")
    assert results["best_step"] in (2, 4) and results["test_examples"] == SIZES["test"]
    assert _read(str(run), "run.json")["world_size"] == 1


TASK_DATA = {"classification": "cls", "pair_classification": "pair", "ner": "ner", "generation": "gen"}


@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_every_key_is_read(tasks, prepared, tmp_path, task, reads):
    """conf/finetune.yaml with each conf/task/ option: the setup reads every key (and writes nothing)."""
    names = os.listdir(os.path.join(REPO, "conf", "task"))  # conf/task/clue/, qg/: tests/test_clue.py, test_qg.py
    assert set(TASK_DATA) == {n[: -len(".yaml")] for n in names if n.endswith(".yaml") and n[0] != "_"}
    cfg = _compose([f"task={task}", f"data.dir={tasks[TASK_DATA[task]]}", f"run.dir={tmp_path / 'run'}",
                    f"vocab={prepared}/vocab.txt"])  # fmt: skip
    keys = leaf_keys(OmegaConf.to_container(cfg))
    reads.clear()
    setup(cfg, world_size=2)
    assert not keys - reads, f"keys of task={task} that pretrain.finetune never reads: {sorted(keys - reads)}"
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("pretrained_pooler", [True, False])
def test_classifier_takes_the_encoder_and_the_sentence_heads_pooler(tasks, stage_one, tmp_path, pretrained_pooler):
    cfg = _compose(_args("classification", tasks["cls"], tmp_path / "run", f"init_from={stage_one['two_ranks']}",
                         f"task.pretrained_pooler={pretrained_pooler}"))  # fmt: skip
    init = setup(cfg, world_size=2).init
    pooler = {"pooler.weight": "sentence_head.pooler.weight", "pooler.bias": "sentence_head.pooler.bias"}
    assert {k: v for k, v in init.mapping.items() if k.startswith("pooler.")} == (pooler if pretrained_pooler else {})
    assert all(init.mapping[n] == n for n in init.mapping if n.startswith("encoder."))
    assert set(init.fresh) == {"classifier.weight", "classifier.bias"} | (set() if pretrained_pooler else set(pooler))


@pytest.mark.e2e
def test_init_from_a_transformers_export(tasks, stage_one, tmp_path):
    """init_from=hf:<dir>: our export of stage one gives the classifier its encoder and pooler."""
    import subprocess
    import sys

    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "pretrain.export", f"run.dir={stage_one['two_ranks']}", f"out={out}"], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    with pytest.raises(UserError, match="no vocab.txt beside it"):
        setup(_compose(_args("classification", tasks["cls"], tmp_path / "run", f"init_from=hf:{out}")), 2)
    vocab = f"vocab={stage_one['two_ranks']}/vocab.txt"  # checked against the export's tokenizer.json
    init = setup(_compose(_args("classification", tasks["cls"], tmp_path / "run", f"init_from=hf:{out}", vocab)), 2).init
    assert init.mapping["pooler.weight"] == "sentence_head.pooler.weight"
    assert sum(n.startswith("encoder.") for n in init.mapping) == 29 and set(init.fresh) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(UserError, match="a generation task starts from a stage-two"):
        setup(_compose(_args("generation", tasks["gen"], tmp_path / "run", f"init_from=hf:{out}", vocab)), 2)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose("finetune", overrides=overrides)


@pytest.mark.e2e
@pytest.mark.parametrize("task, extra, message", [
    ("pair", ["task.labels=[a,b]"], r"train.jsonl:1: label '[01]' is not in the label list \(a, b\)"),
    ("pair", ["task.fields.text_b=nope"], r"train.jsonl:1: no field 'nope' \(task.fields.text_b\)"),
    ("ner", ["task=classification"], r"train.jsonl:1: no field 'sentence'"),
    ("gen", ["init_from=STAGE_ONE"], r"a stage-one \(structbert\) checkpoint; a generation task needs a stage-two"),
    ("ner", ["init_from=null"], r"init_from=null \(random init\) needs vocab="),
    ("ner", ["model.layers=3"], r"the checkpoint has 2 encoder layers, model.layers=3"),
    ("gen", ["task.decoding.strategy=nope"], r"task.decoding: strategy='nope'"),
])  # fmt: skip
def test_bad_settings_fail_before_anything_is_written(tasks, stage_one, palm_run, tmp_path, task, extra, message):
    kind = {"pair": "pair_classification", "ner": "ner", "gen": "generation"}[task]
    init = palm_run if task == "gen" else stage_one["two_ranks"]
    extra = [e.replace("STAGE_ONE", stage_one["two_ranks"]) for e in extra]
    cfg = _compose(_args(kind, tasks[task], tmp_path / "run", f"init_from={init}") + extra)
    with pytest.raises(UserError, match=message):
        setup(cfg, world_size=2)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.e2e
def test_a_vocab_other_than_the_checkpoints_is_refused(tasks, stage_one, tmp_path):
    lines = open(os.path.join(stage_one["two_ranks"], "vocab.txt"), encoding="utf-8").read().splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]  # two ids swapped: the same tokens, other meanings
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = _compose(_args("ner", tasks["ner"], tmp_path / "run", f"init_from={stage_one['two_ranks']}",
                         f"vocab={tmp_path / 'vocab.txt'}"))  # fmt: skip
    with pytest.raises(UserError, match=r"vocab=.* differs from .*vocab.txt, the vocab init_from=.* was trained with"):
        setup(cfg, world_size=2)


@pytest.mark.e2e
def test_empty_file_exits_2_with_one_line(tasks, stage_one, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(open(os.path.join(tasks["ner"], f"{split}.jsonl")).read() if split != "valid" else "")
    proc = launch(PYTHON[:2] + ["pretrain.finetune"],
                  _args("ner", str(data), tmp_path / "run", f"init_from={stage_one['two_ranks']}"), expect_rc=2)  # fmt: skip
    assert proc.stderr.strip() == f"pretrain.finetune: error: {data}/valid.jsonl: no examples (an empty file)"
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("epochs, world, steps", [(2, 2, 40), (0.5, 1, 20), (1, 3, 14), (10, 1, 400)])  # 160 examples
def test_epochs_set_the_steps(tasks, prepared, tmp_path, epochs, world, steps):
    """train.epochs: the steps follow from the train split's size and the global batch (micro 4 x ranks), and the
    learning-rate schedule spans them; train.exit_at_step is checked against them (400 > the default 300)."""
    cfg = _compose(FINETUNE_TINY + ["task=pair_classification", f"data.dir={tasks['pair']}", f"run.dir={tmp_path}/r",
                                    f"vocab={prepared}/vocab.txt", f"train.epochs={epochs}",
                                    f"train.exit_at_step={steps - 1 if steps > 1 else 1}"])  # fmt: skip
    run = setup(cfg, world_size=world)
    assert run.settings.max_steps == steps == -(-epochs * SIZES["train"] // (4 * world))
    assert run.ds_config["scheduler"]["params"]["total_num_steps"] == steps
    with pytest.raises(UserError, match=r"^train.epochs=0: must be a number > 0"):
        setup(_compose(FINETUNE_TINY + ["task=pair_classification", f"data.dir={tasks['pair']}", f"run.dir={tmp_path}/r",
                                        f"vocab={prepared}/vocab.txt", "train.epochs=0"]), world_size=2)  # fmt: skip
