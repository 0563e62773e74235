"""The command lines of the Hydra commands (pretrain.train, pretrain.finetune), checked before Hydra composes them.

Each `key=value` is held against conf/: the key must be a setting that the config (with the group options the
command line picks) declares, and the value must have its default's type. What Hydra would do instead: a misspelled
key gets a suggestion to add it with `+`, after which it is accepted and nothing ever reads it; a value of the wrong
type (`train.lr=abc`) reaches the code and ends in a ValueError. Here each is one line and exit 2 (a UserError), for
instance `train.max_step: no such setting; did you mean train.max_steps?`.

A default of null does not show a type: TYPES declares those (tests/test_overrides.py checks that every null default
of conf/ is declared), and the numbers whose default happens to be written as an integer.
"""
from __future__ import annotations

import copy
import difflib
import functools
import os

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from pretrain.errors import UserError

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# The type of each setting whose default does not show it: a null default (and null is then a value it takes in
# every option of the groups: model.vocab_size is 21504 in model=plug), or a number written as an integer.
# Kinds: integer, number, bool, string, list of <kind>s, mapping; "or null" where null is a value.
TYPES = {
    "init_from": "string or null", "vocab": "string or null", "data.dir": "string or null",
    "data.dirs": "list of strings or null", "data.weights": "list of numbers or null",
    "train.global_batch_size": "integer or null", "train.exit_at_step": "integer or null",
    "train.peak_tflops": "number or null", "model.vocab_size": "integer or null", "model.unpad": "bool or null",
    "logger.wandb.name": "string or null", "task.labels": "list of strings or null",
    "task.fields.text_b": "string or null",
    "dist.timeout_s": "number", "deepspeed.fp16.min_loss_scale": "number",
    "deepspeed.zero.stage3_param_persistence_threshold": "string",  # a number or auto (training/memory.py checks)
    "deepspeed.zero.reduce_bucket_size": "string", "deepspeed.zero.stage3_prefetch_bucket_size": "string",
    "train.spike_sigmas": "number or null", "dist.watchdog_s": "number or null", "run.lock_lease_s": "number",
    "train.epochs": "number or null", "task.clue": "string",
}  # fmt: skip
_SAYS = {"integer": "an integer", "number": "a number", "bool": "true or false", "string": "a string",
         "mapping": "a mapping {key: value, ...}"}  # fmt: skip


def check_command_line(argv: list[str], config_name: str, command: str) -> None:
    """Raise a UserError for the first override of argv (Hydra's, `--local_rank` already removed) that names no
    setting of conf/<config_name>.yaml or gives a value of the wrong type. A command line with Hydra's own flags
    (`--cfg job`, `--help`, `-m`, `--config-name`, ...) is left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    parser = OverridesParser.create()
    parsed = []
    for arg in argv:
        try:
            parsed.append((arg, parser.parse_overrides([arg])[0]))
        except OverrideParseException as e:
            raise UserError(f"bad argument {arg}: {str(e).splitlines()[0]} (Hydra's override grammar: quote a value"
                            " that holds = or brackets, key='...')") from None  # fmt: skip
    groups = config_groups(config_name)
    choices = dict(groups)
    for arg, o in parsed:
        if o.key_or_group in groups and o.type == OverrideType.CHANGE and not o.is_sweep_override():
            options = group_options(o.key_or_group)
            if o.value() not in options:
                raise UserError(f"{arg}: no such option of {o.key_or_group} ({', '.join(options)})")
            choices[o.key_or_group] = o.value()
    for group, option in choices.items():
        if option == "???":
            raise UserError(f"{group} is required: add {group}=<{'|'.join(group_options(group))}>")
    defaults = reference(config_name, choices)
    defaults.update({group: None for group in groups if group not in defaults})  # what a misspelled key may mean
    for arg, o in parsed:
        key = o.key_or_group
        if key in groups or key.startswith(("hydra.", "hydra/")) or o.package is not None:
            continue
        default = _lookup(defaults, key)
        if default is _ABSENT:
            raise UserError(_unknown(key, defaults, command))
        if o.type == OverrideType.DEL:
            raise UserError(f"{arg}: a setting cannot be removed (give {key}=<value>)")
        if o.type == OverrideType.ADD:
            raise UserError(f"{arg}: {key} is a setting already: give {arg[1:]} without the +")
        if o.is_sweep_override():
            continue
        _check_value(key, o.value(), default, arg.split("=", 1)[1], defaults, command)


def config_groups(config_name: str) -> dict[str, str]:
    """{group: default option} of conf/<config_name>.yaml's defaults list (Hydra's own groups left out)."""
    return dict(_config_groups(config_name))


@functools.lru_cache(maxsize=8)
def _config_groups(config_name: str) -> dict[str, str]:
    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(os.path.join(CONF, f"{config_name}.yaml"))).get("defaults", []):
        if isinstance(entry, dict):
            (group, option), = entry.items()
            if " " not in group and not group.startswith("hydra"):
                out[group] = option
    return out


def group_options(group: str) -> list[str]:
    """The options of conf/<group>/, those of its folders as <folder>/<name> (task=clue/afqmc); a name starting
    with _ is a part the options include, not an option."""
    root = os.path.join(CONF, group)
    found = [os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names]
    return sorted(f[: -len(".yaml")] for f in found if f.endswith(".yaml") and not os.path.basename(f).startswith("_"))


def reference(config_name: str, choices: dict[str, str]) -> dict:
    """conf/<config_name>.yaml composed with the group options `choices` and nothing else: the declared settings
    and their defaults."""
    return copy.deepcopy(_composed(config_name, tuple(sorted(choices.items()))))


@functools.lru_cache(maxsize=64)  # the tests compose the same configs many times
def _composed(config_name: str, choices: tuple[tuple[str, str], ...]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name, overrides=[f"{g}={o}" for g, o in choices])
    return OmegaConf.to_container(cfg, resolve=False)


_ABSENT = object()


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


# Settings that moved when every stage's settings went under stage.* (stage two's were under palm.*, stage one's
# sample length was data.seq_len): a command line written before says where they are now.
MOVED = {**{f"palm.{k}": f"stage.{k}" for k in ("src_len", "tgt_len", "snap", "mlm_fraction", "group_steps")},
         "data.seq_len": "stage.seq_len"}  # fmt: skip


def _unknown(key: str, defaults: dict, command: str) -> str:
    """The line for a key that conf/ lacks, with the nearest setting: among its siblings where its parent exists
    (train.max_step: train.max_steps), else among all (trian.lr: train.lr)."""
    if key in MOVED:
        return f"{key}: moved to {MOVED[key]} (every stage's own settings are under stage.*, conf/stage/)"
    parent, _, name = key.rpartition(".")
    siblings = _lookup(defaults, parent) if parent else defaults
    if isinstance(siblings, dict):
        near = [f"{parent}.{n}" if parent else n for n in difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.7)]
    else:
        near = difflib.get_close_matches(key, _leaves(defaults), n=1, cutoff=0.7)
    if near:
        return f"{key}: no such setting; did you mean {near[0]}?"
    return f"{key}: no such setting of {command} (python -m {command} --cfg job prints them all)"


def kind(key: str, default) -> str | None:
    """What a value of setting `key` (default `default`) must be: integer, number, bool, string, mapping, or
    list of <kind>s, perhaps "or null" (TYPES); None when nothing says (a null default that TYPES lacks)."""
    if key in TYPES:
        return TYPES[key]
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    if isinstance(default, dict):
        return "mapping"
    if isinstance(default, list):
        inner = {kind(key, item) for item in default} - {None, "mapping"}
        return f"list of {inner.pop()}s" if len(inner) == 1 and not inner & {"list"} else "list"
    return None


def fits(value, want: str) -> bool:
    """Whether `value` (as Hydra parsed it) is of kind `want` (see kind)."""
    if want.endswith(" or null"):
        return value is None or fits(value, want.removesuffix(" or null"))
    if want.startswith("list"):
        inner = want[len("list of "): -1] if want != "list" else None
        return isinstance(value, list) and (inner is None or all(fits(v, inner) for v in value))
    if want == "bool":
        return isinstance(value, bool)
    if want == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if want == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want == "string":
        return isinstance(value, (str, int, float, bool))  # a path or a name may look like a number
    return isinstance(value, dict)  # mapping


def _check_value(key: str, value, default, raw: str, defaults: dict, command: str) -> None:
    if isinstance(value, str) and "${" in value:  # an interpolation: its value is known only once composed
        return
    want = kind(key, default)
    if want is None:
        return
    nullable = default is None or want.endswith(" or null")
    want = want.removesuffix(" or null")
    if value is None and nullable:
        return
    if not fits(value, want):
        says = _SAYS.get(want) or ("a " + want.replace("bool", "true or false"))
        raise UserError(f"{key}={raw}: must be {says}{' or null' if nullable else ''}")
    if want == "mapping":
        for sub, item in value.items():
            path = f"{key}.{sub}"
            if str(sub) not in default:
                raise UserError(_unknown(path, defaults, command))
            _check_value(path, item, default[str(sub)], _show(item), defaults, command)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
