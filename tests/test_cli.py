"""Every key=value command (all but the Hydra trainer) reads its arguments through pretrain.cli: the same
one-line errors, exit status 2, and -h/--help."""
import importlib
import subprocess
import sys

import pytest

from pretrain.errors import exit_on_user_error
from runs import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)

COMMANDS = ["pretrain.prepare", "pretrain.generate", "pretrain.plan", "pretrain.summary", "pretrain.export"]


def run(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", command, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def in_process(command: str, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        with exit_on_user_error(command):
            importlib.import_module(command).main(list(args))
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_the_same_errors_from_every_command(command, capsys):
    unknown = run(command, "colour=red")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.startswith(f"{command}: error: bad argument colour=red: unknown key colour (keys: ")
    assert unknown.stderr.count("\n") == 1, unknown.stderr
    # The rest in this process: the command's main under the same wrapper as its `python -m` entry.
    rc, stderr = in_process(command, capsys, "colour")
    assert rc == 2 and stderr == f"{command}: error: bad argument colour: expected key=value (see python -m {command} --help)\n"
    key, meant = {"pretrain.prepare": ("outt", "out"), "pretrain.plan": ("seq_lenn", "seq_len")}.get(command, ("run.dirr", "run.dir"))
    rc, stderr = in_process(command, capsys, f"{key}=1")
    assert rc == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"{command}: error: bad argument {key}=1: unknown key {key}; did you mean {meant}? (keys: ")
    helped = run(command, "--help")
    assert helped.returncode == 0 and f"python -m {command}" in helped.stdout and helped.stderr == ""
