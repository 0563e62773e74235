"""The Hydra commands' command lines are held against conf/ before Hydra composes them (pretrain/overrides.py):
a key that no setting has, or a value of another type than its default's, is one line naming both."""
import pytest

from pretrain.errors import UserError
from pretrain.overrides import TYPES, check_command_line, config_groups, fits, group_options, kind, reference
from runs import PYTHON, launch

RUN = ["run.dir=/nonexistent/run", "data.dir=/nonexistent/data"]


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr=abc: must be a number"),
    ("train.lr='1e-3'", "train.lr='1e-3': must be a number"),  # quoted: a string, which the code would not convert
    ("train.max_steps=ten", "train.max_steps=ten: must be an integer"),
    ("train.max_steps=1.5", "train.max_steps=1.5: must be an integer"),
    ("seed=x", "seed=x: must be an integer"),
    ("train.elastic=yes", "train.elastic=yes: must be true or false"),
    ("train.elastic=1", "train.elastic=1: must be true or false"),
    ("train.global_batch_size=abc", "train.global_batch_size=abc: must be an integer or null"),  # null default: TYPES
    ("train.resume=null", "train.resume=null: must be a string"),
    ("dist.timeout_s=soon", "dist.timeout_s=soon: must be a number"),  # written as an integer in conf/: TYPES
    ("train.betas=[0.9,abc]", "train.betas=[0.9,abc]: must be a list of numbers"),
    ("train.betas=0.9", "train.betas=0.9: must be a list of numbers"),
    ("deepspeed.zero=3", "deepspeed.zero=3: must be a mapping {key: value, ...}"),
    ("deepspeed.zero={stage:two}", "deepspeed.zero.stage=two: must be an integer"),
    ("deepspeed.zero={stages:3}", "deepspeed.zero.stages: no such setting; did you mean deepspeed.zero.stage?"),
    ("+train.max_step=10", "train.max_step: no such setting; did you mean train.max_steps?"),
    ("train.max_step=10", "train.max_step: no such setting; did you mean train.max_steps?"),
    ("++train.max_step=10", "train.max_step: no such setting; did you mean train.max_steps?"),
    ("trian.lr=1", "trian.lr: no such setting; did you mean train.lr?"),
    ("modle=toy", "modle: no such setting; did you mean model?"),
    ("+colour=red", "colour: no such setting of pretrain.train (python -m pretrain.train --cfg job prints them all)"),
    ("+train.lr=1", "+train.lr=1: train.lr is a setting already: give train.lr=1 without the +"),
    ("~train.lr", "~train.lr: a setting cannot be removed (give train.lr=<value>)"),
    ("model=tiny", "model=tiny: no such option of model (base, large, plug, toy)"),
    ("data.dir=/a=b", "bad argument data.dir=/a=b: mismatched input '=' expecting <EOF>"),
    # settings that moved under stage.* (one pattern for every stage): the old name says where they went
    ("palm.src_len=[32,96]", "palm.src_len: moved to stage.src_len (every stage's own settings are under stage.*"),
    ("data.seq_len=64", "data.seq_len: moved to stage.seq_len (every stage's own settings are under stage.*"),
    ("stage.src_len=[32,96]", "stage.src_len: no such setting"),  # stage one's settings have no stage-two lengths
])  # fmt: skip
def test_a_bad_override_is_one_line_naming_it(override, message):
    with pytest.raises(UserError) as e:
        check_command_line(RUN + [override], "config", "pretrain.train")
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", [
    ["train.lr=1"], ["train.lr=1e-3"], ["train.global_batch_size=null"], ["train.global_batch_size=16"],
    ["train.peak_tflops=312"], ["model.unpad=true"], ["init_from=/some/run"], ["run.dir=2024"],
    ["stage=palm", "stage.src_len=[8,40]", "model=plug", "deepspeed=zero3_v100", "deepspeed.fp16.min_loss_scale=0.5"],
    ["model=plug", "model.vocab_size=null"],  # 21504 in model=plug, null (the prepared vocab's) in the others
    ["deepspeed.zero={stage:3,overlap_comm:true}"], ["data.dirs=[a,b]", "data.weights=[1,2.5]"],
    ["train.lr=${train.min_lr}"], ["hydra.verbose=true"],
])  # fmt: skip
def test_good_overrides_pass(overrides):
    check_command_line(RUN + overrides, "config", "pretrain.train")


def test_the_options_of_a_group_follow_the_config():
    """pretrain.finetune has task and no stage; a task must be chosen."""
    check_command_line(RUN + ["task=ner", "task.max_len=32"], "finetune", "pretrain.finetune")
    for argv, message in [(RUN, "task is required: add task=<classification|clue/afqmc|clue/cluewsc2020|clue/cmnli|clue/csl|clue/iflytek|clue/ocnli|clue/tnews|generation|ner|pair_classification|qg/dureader|qg/kbqg>"),
                          (RUN + ["task=ner", "stage=palm"], "stage: no such setting of pretrain.finetune"),
                          (RUN + ["task=ner", "+train.elastic=true"], "train.elastic: no such setting of pretrain.finetune"),
                          (RUN + ["task=ner", "task.max_len=long"], "task.max_len=long: must be an integer")]:  # fmt: skip
        with pytest.raises(UserError, match="^" + message.replace("|", r"\|").replace("(", r"\(")):
            check_command_line(argv, "finetune", "pretrain.finetune")


def test_hydra_flags_are_left_to_hydra():
    check_command_line(["--cfg", "job", "train.lr=abc"], "config", "pretrain.train")


def compositions():
    """Each option of each group of conf/'s two configs, the other groups at their defaults."""
    for name in ("config", "finetune"):
        groups = config_groups(name)
        for group in groups:
            for option in group_options(group):
                if name == "config" or group == "task":  # finetune's model and deepspeed: the trainer's files
                    yield name, {**groups, group: option}


def leaves(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def test_every_setting_has_a_type_and_its_default_has_it():
    """A null default says nothing of the type: TYPES must declare it (a new one fails here until it does); a
    declared type must hold for the default it declares, and TYPES names no key that conf/ lacks."""
    seen = set()
    for name, choices in compositions():
        for key, default in leaves(reference(name, choices)):
            seen.add(key)
            want = kind(key, default)
            assert want is not None, f"{key} (null in conf/{name}.yaml with {choices}) needs a type in TYPES"
            assert default is None or default == "???" or fits(default, want), (key, default, want)
    assert not set(TYPES) - seen, sorted(set(TYPES) - seen)


@pytest.mark.e2e
@pytest.mark.parametrize("command, args, message", [
    ("pretrain.train", ["train.lr=abc"], "train.lr=abc: must be a number"),
    ("pretrain.finetune", ["task=ner", "+train.max_step=10"], "train.max_step: no such setting; did you mean train.max_steps?"),
])  # fmt: skip
def test_through_the_command_line(tmp_path, command, args, message):
    proc = launch(PYTHON[:2] + [command], [f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path}"] + args, expect_rc=2)
    assert proc.stderr.strip() == f"{command}: error: {message}", proc.stderr
    assert not (tmp_path / "run").exists()
