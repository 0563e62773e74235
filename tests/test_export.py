"""pretrain.export: a stage-one run trained by 2 ranks under the real launcher, exported and loaded with
transformers' Auto classes, gives our hidden states, MLM logits and sentence logits; the tokenizer gives our ids."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pretrain.data.tokenizer import Tokenizer  # noqa: E402
from pretrain.models.config import ModelConfig  # noqa: E402
from pretrain.models.structbert import StructBert  # noqa: E402
from pretrain.training import checkpoint  # noqa: E402
from runs import DEEPSPEED, REPO, TINY, launch  # noqa: E402

EXPORT = [sys.executable, "-m", "pretrain.export"]


@pytest.fixture(scope="module", params=[True, False], ids=["pre_ln", "post_ln"])
def exported(request, prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, out = root / "run", root / "hf"
    launch(DEEPSPEED, TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=4", f"model.pre_ln={request.param}"])
    proc = subprocess.run(EXPORT + [f"run.dir={run}", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(run), str(out), request.param


def our_model(run):
    with open(os.path.join(run, "model.json")) as f:
        saved = json.load(f)
    assert saved.pop("stage") == "structbert"
    cfg = ModelConfig(**{**saved, "dropout": 0.0, "attn_dropout": 0.0})
    model = StructBert(cfg)
    model.load_state_dict(checkpoint.consolidate(checkpoint.find(run, "run.dir")), strict=True)
    return model.eval(), cfg


def test_auto_classes_load_it_and_give_our_outputs(exported):
    run, out, pre_ln = exported
    ours, cfg = our_model(run)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == ("megatron-bert" if pre_ln else "bert")
    g = torch.Generator().manual_seed(0)
    ids, types = torch.randint(5, cfg.vocab_size, (3, 24), generator=g), torch.randint(0, 2, (3, 24), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 17:], mask[2, 9:] = False, False
    with torch.no_grad():
        h = ours.encoder(ids, types, mask)
        expected = {"AutoModel": h, "AutoModelForMaskedLM": ours.mlm_head(h, ours.encoder.embeddings.word.weight),
                    "AutoModelForSequenceClassification": ours.sentence_head(h)}  # fmt: skip
        for name, want in expected.items():
            model, info = getattr(transformers, name).from_pretrained(out, output_loading_info=True)
            assert not info["missing_keys"] and not info["mismatched_keys"], info
            got = model.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask.long())
            got = got.last_hidden_state if name == "AutoModel" else got.logits
            where = mask if want.dim() == 3 else slice(None)
            assert (got - want)[where].abs().max() < 1e-4, name


def mixed_lines(n=300, seed=0):
    """Chinese from the corpus, Latin words with accents, digits, full-width forms, emoji, literal specials."""
    rng = np.random.default_rng(seed)
    pieces = ["越南总理", "今天在这里说", "Hello", "WORLD", "Café", "naïve", "12345", "３．１４", "ＡＢＣ", "😀", "🚀",
              "[MASK]", "[SEP]", "[cls]", "，", "。", "！", "？", "e-mail@x.com", "  ", "\t", "\u3000", "##ab", "x" * 120]
    return ["".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(n)]


def test_the_tokenizer_gives_our_ids(exported):
    run, out, _ = exported
    ours, theirs = Tokenizer(os.path.join(run, "vocab.txt")), transformers.AutoTokenizer.from_pretrained(out)
    for line in mixed_lines():
        assert theirs(line, add_special_tokens=False)["input_ids"] == ours.encode(line), line


def test_bad_input_is_one_line_and_leaves_nothing(exported, tmp_path):
    run, out, _ = exported

    def fails(args, message):
        proc = subprocess.run(EXPORT + args, cwd=REPO, capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr

    fails([f"run.dir={tmp_path}", f"out={tmp_path / 'x'}"], "no model.json")
    fails([f"run.dir={run}", f"out={out}"], "exists and is not empty")
    fails([f"run.dir={run}", f"out={tmp_path / 'y'}", "step=999"], "step999: no such directory")
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written beside out
