"""Stage two's init_from reads each rank's partition of the stage-one checkpoint (no consolidated copy anywhere)
and gives the weights the consolidated checkpoint has, bit for bit, whatever the two world sizes."""
import json
import os

import pytest

from runs import REPO, launch

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)


@pytest.mark.parametrize("written_by, ranks, decoder_init", [("two_ranks", 3, "random"), ("one_rank", 2, "encoder_top")])
def test_init_from_copies_each_ranks_partition_bitwise(stage_one, tmp_path, written_by, ranks, decoder_init):
    out = tmp_path / "result.json"
    launch(["deepspeed", "--num_gpus", str(ranks), os.path.join(REPO, "tests", "init_partitions.py")],
           [stage_one[written_by], decoder_init, str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["compared"] > 0 and result["differ"] == [], result
    # no read of a whole parameter: at most one rank's partition of the largest (the word embeddings)
    assert result["largest_read"] <= result["largest_partition"] < result["largest_parameter"], result


def test_an_extended_vocab_grows_the_token_tables_in_each_ranks_partition(stage_one, tmp_path):
    """Data prepared with the stage-one run's vocab extended by pretrain.vocab base=: each of 3 ranks (partitions
    that end within a row) fills its partition of the word embedding and the MLM head's bias, the run's tokens row
    for row and each new token from its pieces' rows, without reading a whole table; everything else bit for bit
    as without the extension."""
    from pretrain.data.tokenizer import read_vocab

    run = stage_one["two_ranks"]
    theirs = read_vocab(f"{run}/vocab.txt")
    chars = [t for t in theirs if len(t) == 1 and "\u4e00" <= t <= "\u9fff"][-24:]
    new = ["鑫", "##鑫", "淼淼"] + [a + b for a, b in zip(chars[:12], chars[12:])]  # and words of their characters
    (tmp_path / "ext.txt").write_text("".join(t + "\n" for t in theirs + new), encoding="utf-8")
    out = tmp_path / "result.json"
    launch(["deepspeed", "--num_gpus", "3", os.path.join(REPO, "tests", "init_partitions.py")],
           [run, "random", str(out), str(tmp_path / "ext.txt")])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["compared"] > 0 and result["differ"] == [], result
    assert result["largest_read"] <= result["largest_partition"] < result["largest_parameter"], result
