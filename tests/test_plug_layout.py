"""PLUG's released layout (pretrain/plug/): shards written from our model are read back here by a reader
of the test's own, written from AliceMind's PLUG/ sources (mpu/layers.py's splits, model/modeling.py's names),
not by the module's merge; PLUG's tensor-parallel forward of attention and FFN, emulated rank by rank on the
shards, gives our modules' outputs; tp 1, 2 and 4 agree; a run's checkpoint exports through the command line.
Back through init_from=plug: every tensor is ours again, bad shard sets stop with one line, and stage two trains
from the shards on ZeRO-3. With PLUG_SRC=<AliceMind>/PLUG, AliceMind's own modules load the shards strictly and
give our logits."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tolerance import assert_close_fp32

from pretrain.errors import UserError
from pretrain.models.config import ModelConfig
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.plug.layout import plug_vocab_size
from pretrain.plug.write import plug_config, write_shards
from pretrain.stages import STAGES
from pretrain.training import checkpoint, partitions
from runs import REPO

CFG = ModelConfig(vocab_size=48, hidden=16, layers=2, heads=4, ffn=32, max_positions=24, decoder_layers=2,
                  dropout=0.0, attn_dropout=0.0)  # fmt: skip
TOKENS = 45  # the vocab's tokens: the model pads them to 48 rows, PLUG to a multiple of 128 x tp


@pytest.fixture(scope="module")
def palm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Palm(CFG)
    # random everywhere (LayerNorms and biases too), so that no mix-up can hide behind ones and zeros
    return {k: torch.randn(v.shape) for k, v in model.state_dict().items()}


def write(state, tmp_path, tp, stage="palm", cfg=CFG, dtype="fp32", tag="") -> list[dict[str, torch.Tensor]]:
    out = tmp_path / f"tp{tp}_{stage}_{dtype}{tag}"
    out.mkdir()
    paths = write_shards(state, cfg, STAGES[stage], TOKENS, str(out), tp, dtype)
    assert [os.path.basename(p) for p in paths] == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    assert all(s["mp_world_size"] == tp for s in shards)
    return [s["module"] for s in shards]


# ---- the test's own reader, from PLUG's sources -------------------------------------------------------------
def plug_split(name: str) -> tuple[int | None, int]:
    """(split dim, stride) of a PLUG parameter. VocabParallelEmbedding and the MLM bias (model_parallel, sized by
    the vocab partition): dim 0. ColumnParallelLinear (weight and bias): dim 0; query_key_value stride 3,
    cross_attention.key_value stride 2. RowParallelLinear: the weight's dim 1, its bias whole. The rest whole."""
    if name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder_weight", "cls.predictions.bias"):
        return 0, 1
    if re.search(r"\.query_key_value\.(weight|bias)$", name):
        return 0, 3
    if re.search(r"\.cross_attention\.key_value\.(weight|bias)$", name):
        return 0, 2
    if re.search(r"(\.cross_attention\.query|\.intermediate\.dense|decoder\.layer\.\d+\.intermediate)\.(weight|bias)$", name):
        return 0, 1
    if re.search(r"(\.attention\.output\.dense|\d+\.output\.dense|\.attention\.dense|\.cross_attention\.dense"
                 r"|decoder\.layer\.\d+\.output)\.weight$", name):  # fmt: skip
        return 1, 1
    return None, 1


def plug_merge(pieces: list[torch.Tensor], dim: int | None, stride: int) -> torch.Tensor:
    """Undo _initialize_affine_weight: the dim was cut into stride x tp chunks, rank r holding r, r + tp, ..."""
    if dim is None:
        for p in pieces[1:]:
            assert torch.equal(p, pieces[0]), "a replicated tensor differs between ranks"
        return pieces[0]
    tp = len(pieces)
    chunks = [None] * (stride * tp)
    for r, p in enumerate(pieces):
        for j, c in enumerate(p.chunk(stride, dim)):
            chunks[j * tp + r] = c
    return torch.cat(chunks, dim)


def merged(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    assert all(set(s) == set(shards[0]) for s in shards)
    return {name: plug_merge([s[name] for s in shards], *plug_split(name)) for name in shards[0]}


ENCODER_LAYER = {  # BertLayer (pre-LN) under PLUG's names -> ours
    "attention.LayerNorm": "attn_norm", "attention.self.query_key_value": "attn.qkv",
    "attention.output.dense": "attn.out", "LayerNorm": "ffn_norm", "intermediate.dense": "ffn.up",
    "output.dense": "ffn.down",
}  # fmt: skip
DECODER_LAYER = {  # DecodeLayer
    "input_layernorm": "self_attn_norm", "attention.query_key_value": "self_attn.qkv", "attention.dense": "self_attn.out",
    "post_attention_layernorm": "cross_attn_norm", "cross_attention.query": "cross_attn.q",
    "cross_attention.key_value": "cross_attn.kv", "cross_attention.dense": "cross_attn.out",
    "post_cross_attention_layernorm": "ffn_norm", "intermediate": "ffn.up", "output": "ffn.down",
}  # fmt: skip
FIXED = {
    "bert.embeddings.word_embeddings.weight": "encoder.embeddings.word.weight",
    "bert.embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "bert.embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type.weight",
    "bert.embeddings.LayerNorm.weight": None, "bert.embeddings.LayerNorm.bias": None,  # pre-LN: ours has none
    "bert.encoder.LayerNorm.weight": "encoder.final_norm.weight", "bert.encoder.LayerNorm.bias": "encoder.final_norm.bias",
    "bert.pooler.dense.weight": "sentence_head.pooler.weight", "bert.pooler.dense.bias": "sentence_head.pooler.bias",
    "cls.predictions.decoder_weight": "encoder.embeddings.word.weight", "cls.predictions.bias": "mlm_head.bias",
    "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm_head.norm.bias",
    "cls.seq_relationship.weight": "sentence_head.classifier.weight",
    "cls.seq_relationship.bias": "sentence_head.classifier.bias",
    "decoder.decoder.final_layernorm.weight": "decoder.final_norm.weight",
    "decoder.decoder.final_layernorm.bias": "decoder.final_norm.bias",
}  # fmt: skip


def our_name(plug: str) -> str | None:
    if plug in FIXED:
        return FIXED[plug]
    m = re.fullmatch(r"(bert\.encoder|decoder\.decoder)\.layer\.(\d+)\.(.+)\.(weight|bias)", plug)
    assert m, plug
    table, ours = (ENCODER_LAYER, "encoder") if m.group(1) == "bert.encoder" else (DECODER_LAYER, "decoder")
    return f"{ours}.layers.{m.group(2)}.{table[m.group(3)]}.{m.group(4)}"


def expected(state: dict[str, torch.Tensor], plug: str, rows: int) -> torch.Tensor:
    ours = our_name(plug)
    if ours is None:  # the identity LayerNorm
        return torch.ones(CFG.hidden) if plug.endswith("weight") else torch.zeros(CFG.hidden)
    t = state[ours]
    if ours in ("encoder.embeddings.word.weight", "mlm_head.bias"):  # padded with zero rows to PLUG's vocab
        t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return t


# ---- out ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
def test_every_tensor_is_where_plug_reads_it(palm_state, tmp_path, tp):
    shards = write(palm_state, tmp_path, tp)
    rows = -(-TOKENS // (128 * tp)) * (128 * tp)
    full = merged(shards)
    # PalmForPreTraining's state dict: embeddings 5, encoder 12 per layer + 2, pooler 2, cls 8, decoder 20 per
    # layer + 2; every one of our tensors in it (the word embedding twice: PLUG's tied alias)
    assert len(full) == 5 + 12 * CFG.layers + 2 + 2 + 8 + 20 * CFG.decoder_layers + 2
    assert sorted(n for n in map(our_name, full) if n) == sorted(list(palm_state) + ["encoder.embeddings.word.weight"])
    for name, t in full.items():
        assert t.dtype == torch.float32 and torch.equal(t, expected(palm_state, name, rows)), name
    assert full["bert.embeddings.word_embeddings.weight"].shape == (rows, CFG.hidden)
    # the tied alias shares its storage with the embedding in each file
    for s in shards:
        assert s["cls.predictions.decoder_weight"].untyped_storage().data_ptr() == \
            s["bert.embeddings.word_embeddings.weight"].untyped_storage().data_ptr()  # fmt: skip


def test_the_vocab_is_padded_as_plug_pads_it():
    assert plug_vocab_size(21128, 8) == 21504  # bert-base-chinese at PLUG's 8 ranks
    assert plug_vocab_size(21128, 1) == 21248
    assert plug_vocab_size(1024, 8) == 1024


def test_tensor_parallel_degrees_agree(palm_state, tmp_path):
    """tp 1, 2 and 4 hold the same model: merged, every tensor equal (the vocab rows padded alike)."""
    one, two, four = (merged(write(palm_state, tmp_path, tp)) for tp in (1, 2, 4))
    assert set(one) == set(two) == set(four)
    for name in one:
        a, b, c = one[name], two[name], four[name]
        n = min(a.shape[0], b.shape[0], c.shape[0])  # PLUG's vocab rows: 128, 256, 512
        assert torch.equal(a[:n], b[:n]) and torch.equal(b[:n], c[:n]), name
        assert a[n:].abs().sum() == b[n:].abs().sum() == c[n:].abs().sum() == 0, name
    # tp=1: the files hold our tensors as they are, under PLUG's names
    for name, t in write(palm_state, tmp_path, 1, tag="_again")[0].items():
        assert torch.equal(t, expected(palm_state, name, 128)), name


def test_fp16_keeps_the_layernorms_fp32(palm_state, tmp_path):
    shards = write(palm_state, tmp_path, 2, dtype="fp16")
    for name, t in shards[0].items():
        assert t.dtype == (torch.float32 if "layernorm" in name.lower() else torch.float16), name
    full = merged(shards)
    for name, t in full.items():
        want = expected(palm_state, name, 256)
        assert torch.equal(t.float(), want if t.dtype == torch.float32 else want.half().float()), name


def test_plugs_parallel_forward_on_the_shards_is_ours(tmp_path):
    """PLUG's forward, rank by rank as mpu/transformer.py runs it (each rank's heads from its [Q_r; K_r; V_r] or
    [K_r; V_r], the row-parallel products summed, their bias added once), on the shards, gives what our
    modules give: encoder self-attention, decoder causal self-attention, cross-attention and FFN."""
    torch.manual_seed(1)
    model = Palm(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    tp, d = 2, CFG.hidden // CFG.heads
    shards = write(model.state_dict(), tmp_path, tp)
    x, memory = torch.randn(2, 5, CFG.hidden), torch.randn(2, 7, CFG.hidden)

    def heads(t):  # [B, T, np * d] -> [B, np, T, d]
        return t.view(t.shape[0], t.shape[1], -1, d).transpose(1, 2)

    def attention(q_in, kv_in, causal, dense, qkv=None, q=None, kv=None):
        out = 0
        for s in shards:
            if qkv is not None:  # fused: rank r's [Q_r; K_r; V_r]
                qr, kr, vr = (q_in @ s[f"{qkv}.weight"].T + s[f"{qkv}.bias"]).chunk(3, -1)
            else:  # rank r's Q_r, and [K_r; V_r]
                qr = q_in @ s[f"{q}.weight"].T + s[f"{q}.bias"]
                kr, vr = (kv_in @ s[f"{kv}.weight"].T + s[f"{kv}.bias"]).chunk(2, -1)
            scores = heads(qr) @ heads(kr).transpose(-1, -2) / d**0.5
            if causal:
                scores = scores.masked_fill(~torch.ones(qr.shape[1], kr.shape[1], dtype=torch.bool).tril(), float("-inf"))
            ctx = (scores.softmax(-1) @ heads(vr)).transpose(1, 2).reshape(qr.shape[0], qr.shape[1], -1)
            out = out + ctx @ s[f"{dense}.weight"].T  # row-parallel: the ranks' partial products summed
        return out + shards[0][f"{dense}.bias"]  # and its (whole) bias added once

    def ffn(up, down):
        out = sum(torch.nn.functional.gelu(x @ s[f"{up}.weight"].T + s[f"{up}.bias"]) @ s[f"{down}.weight"].T for s in shards)
        return out + shards[0][f"{down}.bias"]

    with torch.no_grad():
        enc, dec = model.encoder.layers[1], model.decoder.layers[1]
        e, g = "bert.encoder.layer.1.", "decoder.decoder.layer.1."
        pairs = [
            (enc.attn(x, None), attention(x, x, False, f"{e}attention.output.dense", qkv=f"{e}attention.self.query_key_value")),
            (dec.self_attn(x), attention(x, x, True, f"{g}attention.dense", qkv=f"{g}attention.query_key_value")),
            (dec.cross_attn(x, memory, None, None, False)[0],
             attention(x, memory, False, f"{g}cross_attention.dense", q=f"{g}cross_attention.query", kv=f"{g}cross_attention.key_value")),
            (enc.ffn(x), ffn(f"{e}intermediate.dense", f"{e}output.dense")),
            (dec.ffn(x), ffn(f"{g}intermediate", f"{g}output")),
        ]  # fmt: skip
    for i, (ours, theirs) in enumerate(pairs):
        assert_close_fp32(ours, theirs, CFG.ffn, f"module {i}")  # PLUG's formulas vs ours: other orders


def test_a_stage_one_model_writes_the_encoder_keys(tmp_path):
    """Stage one: BertForPreTraining's names (PLUG's encoder and heads), no decoder."""
    state = {k: torch.randn(v.shape) for k, v in StructBert(CFG).state_dict().items()}
    full = merged(write(state, tmp_path, 2, stage="structbert"))
    assert not any(n.startswith("decoder.") for n in full)
    for name, t in full.items():
        assert torch.equal(t, expected(state, name, 256)), name


def test_what_plug_cannot_hold_is_refused(palm_state, tmp_path):
    import dataclasses

    for cfg, tp, message in [
        (CFG, 3, "tp=3 does not divide model.heads=4"),
        (dataclasses.replace(CFG, heads=8, ffn=36), 8, "tp=8 does not divide model.ffn=36"),
        (dataclasses.replace(CFG, copy=True), 2, "model.copy=true"),
        (dataclasses.replace(CFG, pre_ln=False), 2, "PLUG's decoder is pre-LN"),
        (CFG, 0, "tp=0: must be an integer >= 1"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            write_shards(palm_state, cfg, STAGES["palm"], TOKENS, str(tmp_path), tp)
    with pytest.raises(UserError, match="has decoder.layers.0.self_attn.qkv.weight, which PLUG's layout has no place for"):
        write_shards(palm_state, CFG, STAGES["structbert"], TOKENS, str(tmp_path), 2)
    with pytest.raises(UserError, match="beyond fp16's range"):
        big = {**palm_state, "mlm_head.dense.weight": palm_state["mlm_head.dense.weight"] * 1e6}
        write_shards(big, CFG, STAGES["palm"], TOKENS, str(tmp_path), 2, "fp16")
    assert os.listdir(tmp_path) == []


@pytest.mark.e2e
def test_the_export_command_refuses_with_one_line(tmp_path):
    """Checked from model.json before any checkpoint is looked for: one line, exit 2, nothing written."""
    run = tmp_path / "run"
    run.mkdir()
    import dataclasses

    (run / "model.json").write_text(json.dumps({"stage": "palm", **dataclasses.asdict(CFG)}))
    (run / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(TOKENS)) + "\n")
    for args, message in [
        (["tp=3"], "tp=3 does not divide model.heads=4"),
        (["dtype=bf16"], "dtype=bf16: must be fp16 or fp32"),
        (["format=onnx"], "format=onnx: must be hf or plug"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "pretrain.export", f"run.dir={run}", f"out={tmp_path / 'out'}",
                               "format=plug" if "format=onnx" not in args else "check=false", *args],
                              cwd=REPO, capture_output=True, text=True)  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ---- in: init_from=plug:<dir> ------------------------------------------------------------------------------------
VOCAB = [f"t{i}" for i in range(TOKENS)]


def plug_dir(state, tmp_path, tp, name, cfg=CFG, stage="palm", dtype="fp32", config=True) -> str:
    """A directory as PLUG's users hold it: the shards, config.json, vocab.txt."""
    out = tmp_path / name
    out.mkdir()
    write_shards(state, cfg, STAGES[stage], TOKENS, str(out), tp, dtype)
    if config:
        (out / "config.json").write_text(json.dumps(plug_config(cfg, STAGES[stage], TOKENS, tp, dtype, "test")))
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(out)


def vocab_file(tmp_path) -> str:
    path = tmp_path / "data_vocab.txt"
    if not path.exists():
        path.write_text("\n".join(VOCAB) + "\n")
    return str(path)


def read_into(model: torch.nn.Module, init_from_arg: str, cfg: ModelConfig, vocab: str | None, **kwargs):
    """init_from's own path: the source checked against the model's shapes, then loaded (rank 0, no ZeRO here)."""
    from pretrain import init_sources
    from pretrain.training import init_from

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if kwargs:
        source = init_sources.finetune_source(init_from_arg, shapes, cfg, vocab, **kwargs)
    else:
        source = init_sources.init_source(init_from_arg, shapes, cfg, vocab)
    init_from.load_into(model, source, rank=0)
    return source


@pytest.mark.parametrize("tp, dtype", [(2, "fp32"), (4, "fp16")])
def test_shards_come_back_into_our_model_exactly(palm_state, tmp_path, tp, dtype):
    """Written, then read back through init_from=plug: every tensor ours again (PLUG's padding rows cut), in fp16
    as fp16 rounds it (the LayerNorms exact)."""
    path = plug_dir(palm_state, tmp_path, tp, "plug", dtype=dtype)
    model = Palm(CFG)
    source = read_into(model, f"plug:{path}", CFG, vocab_file(tmp_path))
    assert source.fresh == () and len(source.mapping) == len(palm_state)
    for name, p in model.state_dict().items():
        want = palm_state[name]
        if dtype == "fp16" and "norm" not in name:
            want = want.half().float()
        assert torch.equal(p, want), name
    assert "carried encoder 29, mlm_head 5, decoder 42, sentence_head 4; fresh none" in source.describe()


def test_a_stage_one_model_and_a_stage_two_without_plugs_decoder(palm_state, tmp_path):
    """Stage one from the full shards takes the encoder and its heads; stage two from encoder-only shards (a
    stage-one export) starts its decoder fresh, or from the top encoder layers with decoder_init=encoder_top."""
    import dataclasses

    full = plug_dir(palm_state, tmp_path, 2, "full")
    one = StructBert(CFG)
    read_into(one, f"plug:{full}", CFG, vocab_file(tmp_path))
    for name, p in one.state_dict().items():
        assert torch.equal(p, palm_state[name]), name
    encoder_only = plug_dir({k: v for k, v in palm_state.items() if not k.startswith("decoder.")}, tmp_path, 2,
                            "encoder_only", stage="structbert")  # fmt: skip
    fresh = read_into(Palm(CFG), f"plug:{encoder_only}", CFG, vocab_file(tmp_path))
    assert all(n.startswith("decoder.") for n in fresh.fresh) and len(fresh.fresh) == 42
    top = dataclasses.replace(CFG, decoder_init="encoder_top")
    model = Palm(top)
    read_into(model, f"plug:{encoder_only}", top, vocab_file(tmp_path))
    assert torch.equal(model.decoder.layers[1].ffn.down.weight, palm_state["encoder.layers.1.ffn.down.weight"])
    with pytest.raises(UserError, match="encoder-only shards"):  # fine-tuning a generation task
        read_into(Palm(CFG), f"plug:{encoder_only}", CFG, vocab_file(tmp_path), needs_stage_two=True)
    from pretrain.init_sources import run_vocab  # what pretrain.finetune checks the task's vocab against

    assert run_vocab(f"plug:{full}") == os.path.join(full, "vocab.txt")


def test_a_larger_vocab_keeps_its_extra_rows_fresh(palm_state, tmp_path):
    """A model whose vocab is padded past PLUG's rows (here 264 > 256) takes PLUG's rows; the rest keep their init."""
    import dataclasses

    path = plug_dir(palm_state, tmp_path, 2, "plug")
    big = dataclasses.replace(CFG, vocab_size=264)
    model = Palm(big)
    before = model.encoder.embeddings.word.weight[256:].clone()
    read_into(model, f"plug:{path}", big, vocab_file(tmp_path))
    word = model.encoder.embeddings.word.weight
    assert torch.equal(word[:48], palm_state["encoder.embeddings.word.weight"]) and word[48:256].abs().sum() == 0
    assert torch.equal(word[256:], before)


def test_an_extended_vocab_keeps_plugs_rows_and_starts_each_new_token_from_its_pieces(palm_state, tmp_path):
    """Data prepared with a vocab that pretrain.vocab base= extended from PLUG's: PLUG's tokens keep their rows (the
    embedding and the MLM head's bias), each new token starts at the mean of the rows of the pieces that stood for it
    (a new character: [UNK]'s), and the padding rows past the data's vocab keep their fresh init."""
    import dataclasses

    from pretrain.data.tokenizer import SPECIAL_TOKENS

    path = plug_dir(palm_state, tmp_path, 2, "plug")
    theirs = SPECIAL_TOKENS + list("我们的是") + ["hello", "##s"] + [f"t{i}" for i in range(TOKENS - 11)]
    (tmp_path / "plug" / "vocab.txt").write_text("".join(t + "\n" for t in theirs), encoding="utf-8")
    new = ["我们", "鑫", "##的", "hellos", "##是们"]
    (tmp_path / "ext.txt").write_text("".join(t + "\n" for t in theirs + new), encoding="utf-8")
    big = dataclasses.replace(CFG, vocab_size=56)  # 50 tokens, padded to a multiple of 8
    model = Palm(big)
    fresh = model.encoder.embeddings.word.weight[50:].clone()
    source = read_into(model, f"plug:{path}", big, str(tmp_path / "ext.txt"))
    assert "5 new token rows from their pieces" in source.describe()
    unk, wo, men, de, shi, hello, s = (theirs.index(t) for t in ("[UNK]", "我", "们", "的", "是", "hello", "##s"))
    pieces = [(wo, men), (unk,), (de,), (hello, s), (shi, men)]  # theirs has no ##的: the piece as a word
    for ours, want in ((model.encoder.embeddings.word.weight, palm_state["encoder.embeddings.word.weight"]),
                       (model.mlm_head.bias, palm_state["mlm_head.bias"])):  # fmt: skip
        assert torch.equal(ours[:45], want[:45])
        for row, ids in enumerate(pieces, start=45):
            assert torch.equal(ours[row], want[list(ids)].mean(0)), (row, ids)
    assert torch.equal(model.encoder.embeddings.word.weight[50:], fresh)
    # a vocab that is not theirs followed by new tokens is refused, extension or not
    (tmp_path / "other.txt").write_text("".join(t + "\n" for t in theirs[:-1] + new), encoding="utf-8")
    with pytest.raises(UserError, match="first at id 44.*not an extension of it"):
        read_into(Palm(big), f"plug:{path}", big, str(tmp_path / "other.txt"))


def test_bad_shard_sets_are_one_line(palm_state, tmp_path):
    import dataclasses
    import shutil

    good = plug_dir(palm_state, tmp_path, 4, "good")
    vocab = vocab_file(tmp_path)

    def fails(path, message, cfg=CFG, vocab_path=vocab):
        with pytest.raises(UserError) as e:
            read_into(Palm(cfg), f"plug:{path}", cfg, vocab_path)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    def variant(name, change, base=good):
        path = tmp_path / name
        shutil.copytree(base, path)
        change(path)
        return path

    fails(tmp_path / "none", "no such directory")
    fails(variant("no_rank_1", lambda p: (p / "mp_rank_01_model_states.pt").unlink()),
          "mp_rank_01_model_states.pt is missing (3 of 4 ranks there)")  # fmt: skip
    fails(variant("no_rank_3", lambda p: (p / "mp_rank_03_model_states.pt").unlink()),
          "was written for 4 tensor-parallel ranks, the directory holds 3")  # fmt: skip
    two = plug_dir(palm_state, tmp_path, 2, "two")
    fails(variant("mixed", lambda p: shutil.copy(os.path.join(two, "mp_rank_01_model_states.pt"), p)),
          "mp_rank_01_model_states.pt was written for 2 tensor-parallel ranks, the directory holds 4")  # fmt: skip
    # files without DeepSpeed's mp_world_size (PLUG's may lack it): the pieces' shapes give mixed sets away
    bare = tmp_path / "bare"
    bare.mkdir()
    for r in range(4):
        saved = torch.load(os.path.join(good, f"mp_rank_0{r}_model_states.pt"), weights_only=True)
        torch.save({"module": saved["module"]}, bare / f"mp_rank_0{r}_model_states.pt")
    shutil.copy(os.path.join(good, "vocab.txt"), bare)

    def rank_1_of_two(p):
        torch.save({"module": torch.load(os.path.join(two, "mp_rank_01_model_states.pt"), weights_only=True)["module"]},
                   p / "mp_rank_01_model_states.pt")  # fmt: skip

    fails(variant("bare_mixed", rank_1_of_two, bare),
          "query_key_value.weight is [24, 16] in mp_rank_01_model_states.pt, [12, 16] in mp_rank_00_model_states.pt")
    # ranks 0..2 of 4, and nothing that says how many there were: their pieces do not add up
    fails(variant("bare_3_of_4", lambda p: (p / "mp_rank_03_model_states.pt").unlink(), bare),
          "query_key_value merges to 36 rows over 3 ranks, not 3 x hidden 16")
    wide = dataclasses.replace(CFG, hidden=32)
    other = plug_dir({k: torch.randn(v.shape) for k, v in Palm(wide).state_dict().items()}, tmp_path, 2, "wide", wide)
    fails(other, "config.json has hidden_size=32, model.hidden=16")
    (tmp_path / "wide" / "config.json").unlink()
    fails(other, "the shards' hidden size is 32, model.hidden=16")
    fails(good, "config.json has num_hidden_layers=2, model.layers=3", dataclasses.replace(CFG, layers=3))
    fails(bare, "the shards have 2 encoder layers, model.layers=3", dataclasses.replace(CFG, layers=3))
    fails(good, "the shards have 2 decoder layers, model.decoder_layers=1", dataclasses.replace(CFG, decoder_layers=1))
    fails(good, "the shards are pre-LN; set model.pre_ln=true", dataclasses.replace(CFG, pre_ln=False))
    changed = tmp_path / "changed_vocab.txt"
    changed.write_text("\n".join(VOCAB[:7] + ["x"] + VOCAB[8:]) + "\n")
    fails(good, "its vocab differs from the data's (45 vs 45 tokens; first at id 7), and the data's is not an extension",
          vocab_path=str(changed))  # fmt: skip
    fails(variant("no_vocab", lambda p: (p / "vocab.txt").unlink()), "no vocab.txt beside the shards")

    def trained_embedding_norm(p):  # as PLUG's released weights have it
        for r in range(4):
            f = p / f"mp_rank_0{r}_model_states.pt"
            saved = torch.load(f, weights_only=True)
            saved["module"]["bert.embeddings.LayerNorm.weight"] = torch.full((16,), 0.5)
            torch.save(saved, f)

    fails(variant("embedding_norm", trained_embedding_norm), "its bert.embeddings.LayerNorm.weight is not the identity")
    fails(tmp_path / "embedding_norm", "set model.embedding_norm=true, as model=plug has")


EMBEDDING_NORM = ModelConfig(**{**CFG.__dict__, "embedding_norm": True})  # PLUG's released model: pre-LN, and a
# LayerNorm on the embeddings


@pytest.mark.parametrize("stage", ["structbert", "palm"])
def test_an_embedding_norm_goes_out_and_comes_back(tmp_path, stage):
    """model.embedding_norm=true: our embedding LayerNorm is PLUG's bert.embeddings.LayerNorm in the shards (read
    by the test's own reader), and init_from=plug: gives every tensor back, that one included."""
    torch.manual_seed(0)
    model = (Palm if stage == "palm" else StructBert)(EMBEDDING_NORM)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
    assert "encoder.embeddings.norm.weight" in state
    full = merged(write(state, tmp_path, 2, stage=stage, cfg=EMBEDDING_NORM))

    def ours(plug: str) -> str | None:  # the test's names, the embedding LayerNorm now ours
        return "encoder.embeddings.norm." + plug.rsplit(".", 1)[1] if plug.startswith("bert.embeddings.LayerNorm.") \
            else our_name(plug)  # fmt: skip

    assert sorted(map(ours, full)) == sorted(list(state) + ["encoder.embeddings.word.weight"])  # every one, once
    for name, t in full.items():
        assert torch.equal(t, state[ours(name)] if ours(name).startswith("encoder.embeddings.norm.") else
                           expected(state, name, 256)), name  # fmt: skip
    path = plug_dir(state, tmp_path, 2, "plug", cfg=EMBEDDING_NORM, stage=stage)
    back = (Palm if stage == "palm" else StructBert)(EMBEDDING_NORM)
    source = read_into(back, f"plug:{path}", EMBEDDING_NORM, vocab_file(tmp_path))
    assert source.fresh == () and set(back.state_dict()) == set(state)
    for name, p in back.state_dict().items():
        assert torch.equal(p, state[name]), name
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["pretrain_export"]["embedding_layernorm"] == "ours"
    # the same shards into a model without the switch: the embedding LayerNorm has nowhere to go, as config.json
    # says; without config.json (as PLUG's own shards may come), because it is not the identity
    without = (Palm if stage == "palm" else StructBert)(CFG)
    with pytest.raises(UserError, match=r"^init_from=plug:\S+: config.json says the shards were exported from a model"
                                        r" with an embedding LayerNorm; set model.embedding_norm=true$"):  # fmt: skip
        read_into(without, f"plug:{path}", CFG, vocab_file(tmp_path))
    os.unlink(os.path.join(path, "config.json"))
    with pytest.raises(UserError, match="its bert.embeddings.LayerNorm.weight is not the identity"):
        read_into(without, f"plug:{path}", CFG, vocab_file(tmp_path))


def test_shards_of_a_model_without_an_embedding_norm_are_not_read_with_one(palm_state, tmp_path):
    """Our export of a model without one holds the identity LayerNorm, which a model with the switch would still
    apply (a LayerNorm at weight 1 and bias 0 normalises): refused, config.json saying what the model had."""
    path = plug_dir(palm_state, tmp_path, 2, "plug")
    with pytest.raises(UserError, match=r"^init_from=plug:\S+: config.json says the shards were exported from a model"
                                        r" without an embedding LayerNorm; set model.embedding_norm=false$"):  # fmt: skip
        read_into(Palm(EMBEDDING_NORM), f"plug:{path}", EMBEDDING_NORM, vocab_file(tmp_path))


def test_plugs_trained_embedding_norm_is_read_with_the_switch(palm_state, tmp_path):
    """Shards as PLUG's released ones hold it (a trained embedding LayerNorm), refused without model.embedding_norm
    (test_bad_shard_sets_are_one_line), are read with it: that LayerNorm and every other tensor."""
    path = plug_dir(palm_state, tmp_path, 2, "plug", config=False)  # PLUG's own: no record of our export
    trained = {"weight": torch.linspace(0.5, 1.5, CFG.hidden), "bias": torch.linspace(-0.1, 0.1, CFG.hidden)}
    for r in range(2):
        f = os.path.join(path, f"mp_rank_0{r}_model_states.pt")
        saved = torch.load(f, weights_only=True)
        for p, t in trained.items():
            saved["module"][f"bert.embeddings.LayerNorm.{p}"] = t
        torch.save(saved, f)
    model = Palm(EMBEDDING_NORM)
    source = read_into(model, f"plug:{path}", EMBEDDING_NORM, vocab_file(tmp_path))
    assert source.fresh == () and "carried encoder 31" in source.describe()
    for name, p in model.state_dict().items():
        want = trained[name.rsplit(".", 1)[1]] if name.startswith("encoder.embeddings.norm.") else palm_state[name]
        assert torch.equal(p, want), name


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["structbert", "palm"])
def test_a_missing_rank_stops_the_trainer_with_one_line(palm_state, prepared, tmp_path, stage):
    from runs import PALM, PYTHON, TINY, launch

    path = plug_dir(palm_state, tmp_path, 2, "plug")
    os.unlink(os.path.join(path, "mp_rank_00_model_states.pt"))
    args = (PALM if stage == "palm" else TINY) + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", f"init_from=plug:{path}"]
    proc = launch(PYTHON, args, expect_rc=2)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("pretrain.train: error:")]
    assert len(lines) == 1 and "mp_rank_00_model_states.pt is missing (1 of 2 ranks there)" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


# ---- through a real checkpoint --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def palm_plug(prepared, tmp_path_factory):
    """A stage-two run (one rank, 2 steps, from random weights) and its export in PLUG's layout, 2 ranks, fp32."""
    from runs import PALM, PYTHON, launch

    root = tmp_path_factory.mktemp("plug_export")
    run, out = root / "run", root / "plug"
    launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2", "train.save_every=2"])
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", f"run.dir={run}", f"out={out}", "format=plug",
                           "tp=2", "dtype=fp32"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "replicated 0.0e+00" in proc.stdout and "column 0.0e+00" in proc.stdout, proc.stdout
    return str(run), str(out)


@pytest.mark.e2e
def test_a_run_exports_to_plugs_files(palm_plug):
    from pretrain.data.tokenizer import read_vocab
    from pretrain.training import checkpoint

    run, out = palm_plug
    assert sorted(os.listdir(out)) == ["config.json", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "vocab.txt"]
    state = partitions.consolidate(checkpoint.find(run, "run.dir"))
    tokens = len(read_vocab(os.path.join(run, "vocab.txt")))
    full = merged([torch.load(os.path.join(out, f"mp_rank_0{r}_model_states.pt"), weights_only=True)["module"] for r in range(2)])
    rows = -(-tokens // 256) * 256
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == rows and config["dec_hidden_layers"] == 2 and config["pre_ln"] is True
    assert full["bert.embeddings.word_embeddings.weight"].shape[0] == rows
    for name, t in full.items():
        ours = our_name(name)
        if ours is None:
            continue
        want = state[ours]
        if ours in ("encoder.embeddings.word.weight", "mlm_head.bias"):  # ours padded to 8, PLUG's to 256 rows
            want = torch.cat([want, want.new_zeros(rows - want.shape[0], *want.shape[1:])])
        assert torch.equal(t, want), name


@pytest.mark.e2e
@pytest.mark.skipif(not os.environ.get("PLUG_SRC"), reason="PLUG_SRC=<AliceMind checkout>/PLUG runs PLUG's own modules")
@pytest.mark.parametrize("embedding_norm", [False, True], ids=["no_embedding_norm", "embedding_norm"])
def test_plugs_own_modules_load_the_shards_and_give_our_logits(tmp_path, embedding_norm):
    """The strongest check: AliceMind's PLUG code itself, over 2 tensor-parallel ranks (tests/plug_reference.py).
    With model.embedding_norm=true, PLUG's forward as it is, its embedding LayerNorm included."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "plug_reference.py"), os.environ["PLUG_SRC"],
                           str(tmp_path)] + (["embedding_norm"] if embedding_norm else []),
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diffs["keys_per_rank"] == 83  # PalmForPreTraining's whole state dict at 2 + 2 layers, loaded strictly
    assert diffs["mlm_max_diff"] < 1e-5 and diffs["decoder_max_diff"] < 1e-5 and diffs["mlm_padding_rows_max"] == 0.0


@pytest.mark.e2e
def test_the_export_reads_back_into_our_model_exactly(palm_plug):
    """format=plug, then init_from=plug: into the run's own model: every tensor the checkpoint's (vocab cut back)."""
    from pretrain.run_record import read_model_record

    run, out = palm_plug
    cfg = read_model_record(run).cfg
    model = Palm(cfg)
    source = read_into(model, f"plug:{out}", cfg, os.path.join(run, "vocab.txt"))
    assert source.fresh == ()
    state = partitions.consolidate(checkpoint.find(run, "run.dir"))
    assert set(model.state_dict()) == set(state)
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name]), name


@pytest.mark.e2e
def test_stage_two_trains_from_plugs_shards_on_zero3(palm_plug, prepared, tmp_path):
    """Two ranks under ZeRO-3: the shards are merged on rank 0 and set one gathered parameter at a time."""
    from runs import DEEPSPEED, PALM, launch

    _, out = palm_plug
    new = tmp_path / "continued"
    launch(DEEPSPEED, PALM + [f"data.dir={prepared}", f"run.dir={new}", "train.max_steps=1", f"init_from=plug:{out}"])
    info = json.load(open(new / "run.json"))
    assert info["initialized_from"] == f"plug:{out}"
    assert info["init_tensors"] == {"carried": {"encoder": 29, "mlm_head": 5, "decoder": 42, "sentence_head": 4}, "fresh": {}}
