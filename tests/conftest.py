import contextlib
import os
import shutil
import sys

import pytest
from filelock import FileLock

# tests/ is not a package; make its helper modules importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import write_synthetic_corpus  # noqa: E402

from pretrain.prepare import PrepareConfig, prepare  # noqa: E402
from runs import DEEPSPEED, PALM, PYTHON, STEPS, TINY, launch  # noqa: E402


@pytest.fixture
def zh_corpus(tmp_path) -> str:
    """Path of a 200-document synthetic Chinese .txt corpus (see tests/synthetic.py)."""
    path = tmp_path / "zh_corpus.txt"
    write_synthetic_corpus(path)
    return str(path)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A directory for the session's runs, one for all of pytest-xdist's workers (make test runs two): each run
    is made once by whichever worker needs it first, while the other waits on its lock."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def made_once(root, name: str):
    """Yields (path, True) to the one caller that must make `path`, (path, False) to every later caller, across
    workers. What a failed maker left is removed first, so that it is made from scratch and not resumed."""
    path = root / name
    with FileLock(str(path) + ".lock"):
        done = root / f"{name}.done"
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            yield path, True
            done.touch()
        else:
            yield path, False


@pytest.fixture(scope="session")
def prepared(shared_dir) -> str:
    """A prepared 300-document synthetic corpus (5% held out), shared by the tests that train."""
    with made_once(shared_dir, "corpus") as (root, make):
        if make:
            write_synthetic_corpus(root / "corpus.txt", num_docs=300, seed=0)
            prepare(PrepareConfig(input=str(root / "corpus.txt"), out=str(root / "prepared"), valid_fraction=0.05))
    return str(root / "prepared")


@pytest.fixture(scope="session")
def stage_one(prepared, shared_dir) -> dict[str, str]:
    """Two stage-one runs: one written by 2 ranks, one by a single rank."""
    with made_once(shared_dir, "stage_one") as (root, make):
        if make:
            common = TINY + [f"data.dir={prepared}", "train.max_steps=6", "train.save_every=3"]
            launch(DEEPSPEED, common + [f"run.dir={root / 'two_ranks'}"])
            launch(PYTHON, common + [f"run.dir={root / 'one_rank'}"])
    return {"two_ranks": str(root / "two_ranks"), "one_rank": str(root / "one_rank")}


@pytest.fixture(scope="session")
def palm_run(prepared, stage_one, shared_dir) -> str:
    """Stage two from the 2-rank stage one (20 steps, checkpoints every 5)."""
    with made_once(shared_dir, "palm") as (root, make):
        if make:
            launch(DEEPSPEED, PALM + STEPS + [f"data.dir={prepared}", f"run.dir={root / 'straight'}",
                                              f"init_from={stage_one['two_ranks']}"])  # fmt: skip
    return str(root / "straight")


# The longest files (a serial run's seconds, 2026-12-07: 150 to 300 each) first: make test's two pytest-xdist
# workers take whole files (--dist loadfile, so a module's fixtures are made once) in collection order, and a
# long file left for last would keep one worker busy while the other idles.
LONGEST_FIRST = ("test_palm_train.py", "test_slurm.py", "test_export.py", "test_finetune.py", "test_run_guards.py",
                 "test_elastic.py", "test_gpu_check.py", "test_train.py", "test_integrity.py", "test_divergence.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept
