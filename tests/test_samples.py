"""pretrain.samples: the samples it writes are the trainer's (same dataset, seed, indices and step order), and
bad input is one line, exit 2, nothing written."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pretrain import samples
from pretrain.errors import UserError
from pretrain.labels import IGNORE
from pretrain.samples import compose_config
from pretrain.stages import build_stage
from runs import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes (pyproject.toml)

SAMPLES = [sys.executable, "-m", "pretrain.samples"]


def run_samples(args, expect_rc=0):
    proc = subprocess.run(SAMPLES + args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, proc.stderr
    return proc


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_structbert_samples_are_the_trainers(prepared, tmp_path):
    out = tmp_path / "s.jsonl"
    args = ["stage=structbert", f"data.dir={prepared}", "stage.seq_len=48", "train.micro_batch_size=4", "seed=7"]
    run_samples(args + ["n=10", "world_size=2", f"out={out}"])
    rows = read(out)
    # global batch 4 x 2 ranks: indices 0..7 are step 1, 8.. step 2
    assert [(r["index"], r["step"]) for r in rows] == [(g, 1 + g // 8) for g in range(10)]
    stage = build_stage(compose_config(args))
    data = stage.dataset(stage.corpora[0]["train"], stage.seed)
    for r in rows:
        s = data[r["index"]]
        assert r["input_ids"] == s["input_ids"].tolist() and r["token_type_ids"] == s["token_type_ids"].tolist()
        assert [t["position"] for t in r["mlm"]] == np.flatnonzero(s["mlm_labels"] != IGNORE).tolist()
        assert [t["id"] for t in r["wso"]] == s["wso_labels"][s["wso_labels"] != IGNORE].tolist()
        assert r["sso_label"] == int(s["sso_label"]) and r["sso"] in ("random", "next", "previous", None)
        assert len(r["tokens"]) == len(r["input_ids"]) and r["tokens"][0] == "[CLS]"
        a = r["a"]
        assert a["text"] and (r["b"] is None) == (r["sso"] is None)


def test_palm_samples_follow_the_grouped_step_order_and_the_mlm_switch(prepared, tmp_path):
    out = tmp_path / "p.jsonl"
    args = ["stage=palm", f"data.dir={prepared}", "stage.src_len=[8,40]", "stage.tgt_len=[8,24]",
            "train.micro_batch_size=4", "train.max_steps=4", "stage.mlm_fraction=0.5", "stage.group_steps=2"]
    run_samples(args + ["n=16", f"out={out}"])
    rows = read(out)
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert sorted(r["index"] for r in rows[:8]) == list(range(8))  # a pool of 2 steps, reordered by length
    assert [r["mlm_active"] for r in rows] == [True] * 8 + [False] * 8  # 0.5 x 4 steps x 4 samples
    stage = build_stage(compose_config(args))
    data = stage.dataset(stage.corpora[0]["train"], stage.seed, mlm_until=8)
    for r in rows:
        s = data[r["index"]]
        assert r["enc_input_ids"] == s["enc_input_ids"].tolist() and r["dec_input_ids"] == s["dec_input_ids"].tolist()
        assert [IGNORE if x is None else x for x in r["dec_labels"]] == s["dec_labels"].tolist()
        assert r["realised_lengths"] == [len(r["enc_input_ids"]), len(r["dec_input_ids"])]
        assert (r["dec_label_tokens"][-1] == "[SEP]") == r["ends_document"]
        assert bool(r["mlm"]) <= r["mlm_active"]


@pytest.mark.parametrize("args, message", [
    (["stage=structbert", "n=2"], "data.dir or data.dirs is required"),
    (["stage=nope", "data.dir=PREPARED", "n=2"], "stage=nope: no such option of stage (palm, structbert)"),
    (["stage=structbert", "data.dir=PREPARED", "n=0"], "n=0: must be an integer >= 1"),
    (["stage=structbert", "data.dir=PREPARED", "n=abc"], "n=abc: must be an integer >= 1"),
    (["stage=structbert", "data.dir=PREPARED", "train.lr=abc"], "train.lr=abc: must be a number"),
    (["stage=structbert", "data.dir=PREPARED", "+train.max_step=3"],
     "train.max_step: no such setting; did you mean train.max_steps?"),
    (["stage=structbert", "data.dir=PREPARED", "stage.seq_len=3"], "seq_len=3"),
    (["stage=structbert", "data.dir=/nonexistent"], "data.dir=/nonexistent: no such directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(prepared, tmp_path, args, message):
    out = tmp_path / "bad.jsonl"
    args = [a.replace("PREPARED", prepared) for a in args] + [f"out={out}"]
    if "n=abc" in args:  # one through the command: the one line and the exit status
        proc = run_samples(args, expect_rc=2)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("pretrain.samples: error:"), proc.stderr
    else:  # main checks all of these before it writes
        with pytest.raises(UserError) as refused:
            samples.main(args)
        assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists() and not (tmp_path / "bad.jsonl.tmp").exists()
