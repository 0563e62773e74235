"""The stages know themselves: the registry names each stage once (in its own module), and no module outside
pretrain/stages/ branches on a stage's name; readers of a run ask the stage its model.json names."""
import ast
import dataclasses
import json
import pathlib

import pytest

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.run_record import ModelRecord, read_model_record, stage_model_record
from pretrain.stages import STAGES, stage_class
from pretrain.stages.base import Stage
from pretrain.tasks.task import TASK_TYPES

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=40, hidden=8, layers=2, heads=2, ffn=16, max_positions=12, decoder_layers=1)


def test_registry_in_training_order_and_names_unknown_ones():
    assert list(STAGES) == ["structbert", "palm"]
    assert stage_class("palm").generates and not stage_class("structbert").generates
    with pytest.raises(UserError, match=r"^stage=bert: unknown stage \(known: structbert, palm\)$"):
        stage_class("bert")


def test_a_stage_that_lacks_a_hook_is_refused_when_built():
    """The interface is declared (Stage's abstract methods): a third stage that forgets one fails when it is built,
    naming what it lacks, not with an AttributeError mid-set-up."""

    class Partial(Stage):
        name, ordinal = "partial", "stage-three"

        def token_counts(self, batch):
            return 0, 0

    with pytest.raises(TypeError, match=r"abstract class Partial .*init_source.*train_flops") as refused:
        Partial(None)
    assert "token_counts" not in str(refused.value) and "\n" not in str(refused.value)
    for cls in STAGES.values():  # the stages there are whole
        assert not cls.__abstractmethods__, cls


def test_no_module_outside_the_stages_names_a_stage():
    """A string that is a stage's name (compared, passed, keyed) appears only in pretrain/stages/; an f-string
    that contains one (a cache entry's prefix, a message) is not a name."""
    names, found = set(STAGES), []
    for path in (ROOT / "pretrain").rglob("*.py"):
        if "stages" in path.relative_to(ROOT / "pretrain").parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        found += [f"{path.relative_to(ROOT)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in names and id(n) not in in_fstring]  # fmt: skip
    assert found == []


def _write(run, record: dict):
    run.mkdir(exist_ok=True)
    (run / "model.json").write_text(json.dumps({**record, **dataclasses.asdict(CFG)}))
    (run / "vocab.txt").write_text("[PAD]\n")


def test_model_json_records_stage_and_task_apart(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    for record in (ModelRecord("palm", None, CFG), ModelRecord("palm", "generation", CFG),
                   ModelRecord("structbert", "token_classification", CFG)):  # fmt: skip
        (tmp_path / "model.json").write_text(record.to_json())
        assert read_model_record(str(tmp_path)) == record
        saved = json.loads((tmp_path / "model.json").read_text())
        assert (saved["stage"], saved["task"]) == (record.stage, record.task)


def test_a_classifier_run_is_not_read_as_a_stage_model(tmp_path):
    _write(tmp_path / "gen", {"stage": "palm", "task": "generation"})
    assert stage_model_record(str(tmp_path / "gen"), "x").stage_class is STAGES["palm"]
    _write(tmp_path / "ner", {"stage": "structbert", "task": "token_classification"})
    with pytest.raises(UserError, match=r"a fine-tuned token_classification run; its model is the task's"):
        stage_model_record(str(tmp_path / "ner"), "pretrain.export")


def test_model_json_written_before_task_existed(tmp_path):
    """Fine-tuning runs wrote their task's type as the stage (generation as the stage it trains)."""
    _write(tmp_path / "old_cls", {"stage": "classification"})
    old = read_model_record(str(tmp_path / "old_cls"))
    assert (old.stage, old.task) == ("structbert", "classification")
    _write(tmp_path / "old_pre", {"stage": "palm"})
    old = read_model_record(str(tmp_path / "old_pre"))
    assert (old.stage, old.task) == ("palm", None)
    _write(tmp_path / "bad", {"stage": "bert", "task": None})
    with pytest.raises(UserError, match=r"^model.json stage=bert: unknown stage"):
        read_model_record(str(tmp_path / "bad")).stage_class


def test_every_task_builds_on_a_registered_stage():
    assert {kind: cls.stage for kind, cls in TASK_TYPES.items()} == {
        "classification": "structbert", "clue": "structbert", "token_classification": "structbert", "generation": "palm",
        "question_generation": "palm"}
    assert [kind for kind, cls in TASK_TYPES.items() if cls.keeps_stage_model] == ["generation", "question_generation"]


@pytest.mark.e2e  # a 2-rank run
def test_a_stage_with_an_objective_of_its_own_trains_from_outside_the_package(prepared, tmp_path):
    """docs/extending.md's path, taken by tests/toy_objective.py: a stage subclass with one more objective (its
    labels, head, loss and weight), registered by the user's own entry point, trains 5 steps on 2 ranks; the loop,
    the metrics and the checkpoints carry the new objective like the stage's own."""
    from pretrain.training import checkpoint
    from runs import TINY, launch, rows

    run = tmp_path / "run"
    launch(["deepspeed", "--num_gpus", "2", str(ROOT / "tests" / "toy_objective.py")],
           TINY + ["stage=structbert", "stage.name=toy", "+stage.loss_weights.parity=1.0", f"data.dir={prepared}",
                   f"run.dir={run}", "train.max_steps=5", "train.log_every=1", "train.eval_every=5"])  # fmt: skip
    train = rows(str(run), "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for r in train + rows(str(run), "valid"):
        assert r["parity_loss"] > 0 and 0 <= r["parity_acc"] <= 1
        parts = sum(r[f"{k}_loss"] for k in ("mlm", "wso", "sso", "parity"))
        assert abs(r["loss"] - parts) <= 1e-6 * parts  # every weight 1: the loss is the four objectives' sum
    assert json.loads((run / "model.json").read_text())["stage"] == "toy"
    shapes = checkpoint.recorded_shapes(checkpoint.find(str(run), "run.dir"), "run.dir")
    assert shapes["parity_head.weight"] == (2, 64)
