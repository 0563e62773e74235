import os
import sys

import pytest

# tests/ is not a package; make its helper modules importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pretrain.prepare import PrepareConfig, prepare  # noqa: E402
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
