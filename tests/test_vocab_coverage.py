"""Vocabularies people bring (issue 28, 11 and 12): prepare reports how much of a corpus its vocab leaves [UNK] and
what for; pretrain.vocab extends a vocab with a corpus's most frequent missing tokens, the base unchanged."""
import json
import subprocess
import sys

import pytest

from pretrain.data.tokenizer import SPECIAL_TOKENS, Tokenizer, read_vocab
from pretrain.errors import UserError
from pretrain.prepare import PrepareConfig, prepare, unknown_warning
from runs import REPO

# a bert-base-chinese-like vocab: no curly quotes (bert-base-chinese has neither “ nor ”), no 鑫
BASE = SPECIAL_TOKENS + list("，。我你他们的是在有一个好今天北京上海说字") + ["hello", "##s"]
TEXT = ["“你好。”他们说。", "今天北京好。我在上海。", "“鑫”是一个字。他说hello。"]


@pytest.fixture
def base_vocab(tmp_path) -> str:
    path = tmp_path / "base.txt"
    path.write_text("".join(t + "\n" for t in BASE), encoding="utf-8")
    return str(path)


def test_prepare_counts_what_became_unk(tmp_path, base_vocab):
    (tmp_path / "c.txt").write_text("\n\n".join(TEXT * 3) + "\n", encoding="utf-8")
    meta = prepare(PrepareConfig(input=str(tmp_path / "c.txt"), out=str(tmp_path / "out"), vocab=base_vocab,
                                 valid_fraction=0.0))  # fmt: skip
    unknown = meta["unknown"]
    tok = Tokenizer(base_vocab)
    ids = [i for t in TEXT * 3 for i in tok.encode(t)]
    assert unknown["tokens"] == ids.count(tok.unk_id) == 3 * 5 and unknown["rate"] == pytest.approx(15 / len(ids))
    assert unknown["top"] == [["“", 6], ["”", 6], ["鑫", 3]]  # by count, then text
    with open(tmp_path / "out" / "meta.json", encoding="utf-8") as f:
        assert json.load(f)["unknown"] == unknown
    warning = unknown_warning(meta, base_vocab)
    assert warning.startswith(f"pretrain.prepare: warning: {unknown['rate']:.2%} of the tokens are [UNK] (above 0.1%) "
                              f"under vocab={base_vocab}, most often for '“”鑫'")


@pytest.mark.e2e
def test_the_cli_prints_the_share_and_warns_on_stderr(tmp_path, base_vocab):
    (tmp_path / "c.txt").write_text("\n\n".join(TEXT) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pretrain.prepare", f"input={tmp_path / 'c.txt'}",
                           f"out={tmp_path / 'out'}", f"vocab={base_vocab}"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "  [UNK]: 5 tokens" in proc.stdout and "most often for: “ 2 ” 2 鑫 1" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and "of the tokens are [UNK]" in proc.stderr


@pytest.mark.e2e
def test_an_extended_vocab_is_the_base_line_for_line_then_the_missing_tokens(tmp_path, base_vocab):
    (tmp_path / "c.txt").write_text("\n\n".join(TEXT * 3 + ["world world worlds。"]) + "\n", encoding="utf-8")
    out = tmp_path / "ext.txt"
    proc = subprocess.run([sys.executable, "-m", "pretrain.vocab", f"base={base_vocab}", f"input={tmp_path / 'c.txt'}",
                           "extra=6", f"out={out}"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{len(BASE) + 6} tokens ({base_vocab}'s and 6 added)" in proc.stdout
    base_bytes = open(base_vocab, "rb").read()
    assert open(out, "rb").read().startswith(base_bytes)
    # characters of the words that were [UNK] first, most frequent first, ties by the token: “ ” 6 each, then of
    # 3 each: the pieces of "world" (2) and "worlds" (1) and 鑫 ("hello"'s pieces are not wanted: it had no [UNK])
    assert read_vocab(str(out))[len(BASE):] == ["“", "”", "##d", "##l", "##o", "##r"]
    more = tmp_path / "more.txt"
    subprocess.run([sys.executable, "-m", "pretrain.vocab", f"base={base_vocab}", f"input={tmp_path / 'c.txt'}",
                    "extra=100", f"out={more}"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    added = read_vocab(str(more))[len(BASE):]
    assert added[-1] == "world" and "鑫" in added and "worlds" not in added  # whole words seen twice, after the characters
    tok = Tokenizer(str(more))
    assert tok.unk_id not in tok.encode("“鑫”world")


@pytest.mark.parametrize("args, message", [
    (["extra=3"], "extra=3: goes with base=<the vocab.txt to extend>"),
    (["base=BASE"], "extra=0: base= needs extra=<the number of tokens to add> (>= 1)"),
    (["base=NOPE", "extra=2"], "NOPE: cannot read vocab (No such file or directory)"),
])
def test_bad_extension_settings(tmp_path, base_vocab, args, message):
    from pretrain.vocab import VocabConfig, build

    (tmp_path / "c.txt").write_text("你好。\n", encoding="utf-8")
    kw = dict(a.split("=", 1) for a in args)
    kw = {k: (int(v) if k == "extra" else v.replace("BASE", base_vocab).replace("NOPE", str(tmp_path / "nope.txt")))
          for k, v in kw.items()}  # fmt: skip
    with pytest.raises(UserError) as refused:
        build(VocabConfig(input=str(tmp_path / "c.txt"), out=str(tmp_path / "v.txt"), **kw))
    assert str(refused.value).endswith(message.replace("NOPE", str(tmp_path / "nope.txt")))
    assert not (tmp_path / "v.txt").exists()


@pytest.mark.e2e  # the session's stage-one run
def test_stage_two_refuses_a_stage_one_run_of_another_vocab_of_the_same_padded_size(prepared, stage_one, tmp_path):
    """Stage two from a run directory checked only the shapes: data prepared with a vocab of the same padded size
    but other ids (here two tokens swapped) trained on ids that meant other tokens, silently."""
    from pretrain.prepare import PrepareConfig, prepare
    from runs import PALM, trainer_refusal

    vocab = read_vocab(f"{stage_one['two_ranks']}/vocab.txt")
    i, j = len(SPECIAL_TOKENS) + 10, len(SPECIAL_TOKENS) + 11
    vocab[i], vocab[j] = vocab[j], vocab[i]
    (tmp_path / "swapped.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    data = tmp_path / "data"
    prepare(PrepareConfig(input=f"{prepared}/../corpus.txt", out=str(data), vocab=str(tmp_path / "swapped.txt")))
    message = trainer_refusal(PALM + [f"data.dir={data}", f"run.dir={tmp_path / 'run'}", f"init_from={stage_one['two_ranks']}"])
    assert message == (f"init_from={stage_one['two_ranks']}: its vocab differs from the data's ({len(vocab)} vs {len(vocab)} "
                       f"tokens; first at id {i}), and the data's is not an extension of it; prepare the data with "
                       f"vocab={stage_one['two_ranks']}/vocab.txt or with one that pretrain.vocab base= extends from it")
