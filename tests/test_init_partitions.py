"""Stage two's init_from reads each rank's partition of the stage-one checkpoint (no consolidated copy anywhere)
and gives the weights the consolidated checkpoint has, bit for bit, whatever the two world sizes."""
import json
import os

import pytest

from runs import REPO, launch

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)


@pytest.mark.parametrize("written_by, ranks, decoder_init, extended",
                         [("two_ranks", 3, "random", True), ("one_rank", 2, "encoder_top", False)])
def test_init_from_copies_each_ranks_partition_bitwise(stage_one, tmp_path, written_by, ranks, decoder_init, extended):
    """Each rank fills its own partition (3 ranks: partitions that end within a row), reading no whole parameter.
    extended: the data's vocab is the run's extended by pretrain.vocab base=, so the word embedding and the MLM
    head's bias keep the run's rows and each new token starts from its pieces' rows (init_partitions.expected)."""
    from pretrain.data.tokenizer import read_vocab

    vocab = []
    if extended:
        theirs = read_vocab(f"{stage_one[written_by]}/vocab.txt")
        chars = [t for t in theirs if len(t) == 1 and "\u4e00" <= t <= "\u9fff"][-24:]
        new = ["鑫", "##鑫", "淼淼"] + [a + b for a, b in zip(chars[:12], chars[12:])]  # and words of their characters
        (tmp_path / "ext.txt").write_text("".join(t + "\n" for t in theirs + new), encoding="utf-8")
        vocab = [str(tmp_path / "ext.txt")]
    out = tmp_path / "result.json"
    launch(["deepspeed", "--num_gpus", str(ranks), os.path.join(REPO, "tests", "init_partitions.py")],
           [stage_one[written_by], decoder_init, str(out)] + vocab)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["compared"] > 0 and result["differ"] == [], result
    # no read of a whole parameter: at most one rank's partition of the largest (the word embeddings)
    assert result["largest_read"] <= result["largest_partition"] < result["largest_parameter"], result
