import os
import sys

import pytest

# tests/ is not a package; make its helper modules importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pretrain.prepare import PrepareConfig, prepare  # noqa: E402
from runs import DEEPSPEED, PALM, PYTHON, STEPS, TINY, launch  # noqa: E402
from synthetic import write_synthetic_corpus  # noqa: E402


@pytest.fixture
def zh_corpus(tmp_path) -> str:
    """Path of a 200-document synthetic Chinese .txt corpus (see tests/synthetic.py)."""
    path = tmp_path / "zh_corpus.txt"
    write_synthetic_corpus(path)
    return str(path)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> str:
    """A prepared 300-document synthetic corpus (5% held out), shared by the tests that train."""
    root = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(root / "corpus.txt", num_docs=300, seed=0)
    out = str(root / "prepared")
    prepare(PrepareConfig(input=str(root / "corpus.txt"), out=out, valid_fraction=0.05))
    return out


@pytest.fixture(scope="session")
def stage_one(prepared, tmp_path_factory) -> dict[str, str]:
    """Two stage-one runs: one written by 2 ranks, one by a single rank."""
    root = tmp_path_factory.mktemp("stage_one")
    common = TINY + [f"data.dir={prepared}", "train.max_steps=6", "train.save_every=3"]
    launch(DEEPSPEED, common + [f"run.dir={root / 'two_ranks'}"])
    launch(PYTHON, common + [f"run.dir={root / 'one_rank'}"])
    return {"two_ranks": str(root / "two_ranks"), "one_rank": str(root / "one_rank")}


@pytest.fixture(scope="session")
def palm_run(prepared, stage_one, tmp_path_factory) -> str:
    """Stage two from the 2-rank stage one (20 steps, checkpoints every 5)."""
    run = str(tmp_path_factory.mktemp("palm") / "straight")
    launch(DEEPSPEED, PALM + STEPS + [f"data.dir={prepared}", f"run.dir={run}", f"init_from={stage_one['two_ranks']}"])
    return run
