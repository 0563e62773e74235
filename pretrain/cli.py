"""One way to read `key=value` command lines, for every command but the trainer (which is Hydra's):
pretrain.prepare, generate, plan and summary.

Values are YAML as in Hydra (`workers=2`, `json=true`, `src=[32,96]`), except for the keys a command names as
verbatim (paths: `input=data/*.txt` is not valid YAML). Keys a command names as repeated may be given several
times (a list). Unknown keys, bad values and arguments that are not key=value are one-line UserErrors; so are
missing required keys (MISSING in the schema). `-h` or `--help` prints the command's docstring.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import is_dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.errors import UserError

_ABSENT = object()  # what OmegaConf.select returns for a key the schema lacks


def parse(argv: list[str], schema, *, command: str, doc: str | None = None, verbatim: tuple[str, ...] = (),
          repeated: tuple[str, ...] = (), open_prefixes: tuple[str, ...] = ()) -> tuple[DictConfig, dict]:
    """(the settings, {prefix: {key: value}} of open_prefixes). `schema` is a dataclass (typed, MISSING marks a
    required key) or a dict of defaults (nested for dotted keys). Keys under an open prefix (e.g. `model.` in
    the planner) are not checked here: the command checks them against what it loads."""
    if doc is not None and any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        sys.exit(0)
    usage = f"python -m {command} --help"
    plain, literal, lists, extra = [], {}, {key: [] for key in repeated}, {p: {} for p in open_prefixes}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UserError(f"bad argument {arg}: expected key=value (see {usage})")
        prefix = next((p for p in open_prefixes if key.startswith(p)), None)
        if prefix is not None:
            extra[prefix][key[len(prefix):]] = _yaml_value(arg, value)
        elif key in repeated:
            lists[key].append(value)
        elif key in verbatim:
            literal[key] = value or None
        else:
            plain.append(arg)
    cfg = OmegaConf.structured(schema) if is_dataclass(schema) else OmegaConf.create(schema)
    OmegaConf.set_struct(cfg, True)
    leaves = sorted(_leaf_keys(OmegaConf.to_container(cfg)))
    known = ", ".join(leaves)
    try:
        for arg in plain:
            key = arg.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.7)  # as pretrain/overrides.py
                meant = f"; did you mean {near[0]}?" if near else ""
                raise UserError(f"bad argument {arg}: unknown key {key}{meant} (keys: {known})")
            cfg.merge_with(OmegaConf.from_dotlist([arg]))
        for key, value in {**literal, **lists}.items():
            OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as e:
        where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise UserError(f"bad argument {where}{str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing {' '.join(k + '=' for k in missing)} (see {usage})")
    return cfg, extra



def _yaml_value(arg: str, value: str):
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    except OmegaConfBaseException as e:
        raise UserError(f"bad argument {arg}: {str(e).splitlines()[0]}") from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out
