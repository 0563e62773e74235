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
