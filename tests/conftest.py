import os
import sys

import pytest

# tests/ is not a package; make its helper modules importable whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import write_synthetic_corpus  # noqa: E402


@pytest.fixture
def zh_corpus(tmp_path) -> str:
    """Path of a 200-document synthetic Chinese .txt corpus (see tests/synthetic.py)."""
    path = tmp_path / "zh_corpus.txt"
    write_synthetic_corpus(path)
    return str(path)
