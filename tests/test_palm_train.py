"""Stage two end to end: PALM initialised from a real stage-one ZeRO-3 checkpoint under the real `deepspeed`
launcher, the masked-LM switch, exact resume, bad `init_from`, and generation from the checkpoint."""
import json
import os
import sys

import pytest
import torch

from pretrain import generate
from pretrain.errors import UserError
from runs import DEEPSPEED, PALM, PYTHON, REPO, STEPS, launch, rows, trainer_refusal

GENERATE = [sys.executable, "-m", "pretrain.generate"]


@pytest.mark.e2e
def test_stage_two_trains_from_stage_one_and_drops_mlm_for_the_last_tenth(palm_run, stage_one):
    train, valid = rows(palm_run, "train"), rows(palm_run, "valid")
    assert [r["step"] for r in train] == list(range(1, 21)) and [r["step"] for r in valid] == [10, 20]
    for key in ("loss", "lm_loss", "lm_acc", "lr", "grad_norm", "tokens_per_s", "padding"):
        assert all(r[key] is not None for r in train), key
    # 0.9 x 20 = 18 steps with masked LM on the encoder, then the decoder loss alone.
    assert [r["mlm_active"] for r in train] == [True] * 18 + [False] * 2
    assert all(r["mlm_loss"] is not None and r["mlm_acc"] is not None for r in train[:18])
    assert all(r["mlm_loss"] is None for r in train[18:])
    assert train[-1]["loss"] == pytest.approx(train[-1]["lm_loss"])
    assert valid[0]["mlm_loss"] is not None and valid[1]["mlm_loss"] is None
    assert all(r["lm_ppl"] > 1.0 for r in valid)
    assert 0.0 < train[0]["padding"] < 0.5
    info = json.load(open(os.path.join(palm_run, "run.json")))
    assert info["initialized_from"] == os.path.join(stage_one["two_ranks"], "checkpoints", "step6")
    carried, fresh = info["init_tensors"]["carried"], info["init_tensors"]["fresh"]
    assert set(carried) == {"encoder", "mlm_head", "sentence_head"} and set(fresh) == {"decoder"}
    assert info["world_size"] == 2 and all(p <= info["parameters"] // 2 + 64 for p in info["partition_numel_per_rank"])


@pytest.mark.e2e
def test_stage_two_resume_is_bitwise_exact_across_the_mlm_switch(prepared, stage_one, palm_run, tmp_path):
    run = str(tmp_path / "resumed")
    args = PALM + STEPS + [f"data.dir={prepared}", f"run.dir={run}", f"init_from={stage_one['two_ranks']}"]
    launch(DEEPSPEED, args + ["train.exit_at_step=10"])
    launch(DEEPSPEED, args)  # resumes at 10; the switch at 18 happens in the resumed run
    loss = lambda run_dir: {(r["step"], r["split"]): r["loss"] for r in rows(run_dir, "train") + rows(run_dir, "valid")}  # noqa: E731
    assert loss(run) == loss(palm_run)


@pytest.mark.e2e
@pytest.mark.parametrize("written_by, decoder_init", [("two_ranks", "random"), ("one_rank", "encoder_top")])
def test_stage_two_encoder_equals_stage_one_encoder(stage_one, tmp_path, written_by, decoder_init):
    out = tmp_path / "result.json"
    launch(["deepspeed", "--num_gpus", "2", os.path.join(REPO, "tests", "init_equality.py")],
           [stage_one[written_by], decoder_init, str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["encoder_max_diff"] <= 1e-5 and result["mlm_max_diff"] <= 1e-5, result
    assert result["sentence_max_diff"] <= 1e-5, result
    assert result["decoder_from_top_layer"] == (decoder_init == "encoder_top")


@pytest.mark.e2e
def test_stage_two_checkpoint_keeps_the_stage_one_sentence_head(palm_run, stage_one):
    """Issue 9, finding 5: carried into stage two, frozen there (no sentence objective), saved with the rest."""
    from pretrain.training.checkpoint import find
    from pretrain.training.partitions import consolidate

    two, one = consolidate(find(palm_run, "run.dir")), consolidate(find(stage_one["two_ranks"], "run.dir"))
    heads = [n for n in one if n.startswith("sentence_head.")]
    assert len(heads) == 4 and all(torch.equal(two[n], one[n]) for n in heads)
    assert not torch.equal(two["encoder.layers.0.attn.qkv.weight"], one["encoder.layers.0.attn.qkv.weight"])


@pytest.mark.e2e
def test_stage_two_from_random_weights(prepared, tmp_path):
    run = tmp_path / "random"
    launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=2", "train.log_every=1"])
    assert json.load(open(run / "run.json"))["initialized_from"] is None
    assert [r["step"] for r in rows(str(run), "train")] == [1, 2]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "override, message",
    [
        ("init_from=/nonexistent/run", "init_from=/nonexistent/run: no such directory"),
        ("model.hidden=32", "encoder.embeddings.word.weight is [{v}, 64] in the checkpoint, [{v}, 32] in this model"),
        ("model.layers=3", "the checkpoint has 2 encoder layers, model.layers=3"),
        ("model.max_positions=256", "model.max_positions=256 vs 512"),
        ("stage.src_len=[40,8]", "stage.src_len=[40, 8]"),
        ("model.decoder_init=top", "model.decoder_init=top: must be random or encoder_top"),
    ],
)
def test_bad_stage_two_settings_fail_with_one_line(prepared, stage_one, tmp_path, override, message):
    vocab = json.load(open(os.path.join(stage_one["one_rank"], "model.json")))["vocab_size"]
    run = tmp_path / "run"
    args = PALM + [f"data.dir={prepared}", f"run.dir={run}", f"init_from={stage_one['one_rank']}", override]
    if override.startswith("model.hidden="):  # one through the command: the one line and the exit status
        proc = launch(PYTHON, args, expect_rc=2)
        assert proc.stderr.strip().count("\n") == 0 and message.format(v=vocab) in proc.stderr, proc.stderr
    else:
        assert message.format(v=vocab) in trainer_refusal(args)
    assert not run.exists()


@pytest.mark.e2e
def test_init_from_a_stage_two_checkpoint_is_refused(prepared, palm_run, tmp_path):
    step20 = os.path.join(palm_run, "checkpoints", "step20")
    proc = launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", f"init_from={step20}"], expect_rc=2)
    assert "a stage-two (palm) checkpoint; stage two starts from a stage-one (structbert) one" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_resuming_a_stage_one_checkpoint_as_stage_two_is_refused(prepared, stage_one, tmp_path):
    step6 = os.path.join(stage_one["one_rank"], "checkpoints", "step6")
    run = tmp_path / "run"
    proc = launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={run}", f"train.resume={step6}"], expect_rc=2)
    assert proc.stderr.strip() == (f"pretrain.train: error: {step6}: a checkpoint of stage=structbert, this run has"
                                   " stage=palm (stage two starts from stage one with init_from=, in a new run.dir)")
    assert not run.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["strategy=greedy", "strategy=sample top_k=5 top_p=0.9 temperature=0.8", "strategy=beam num_beams=3",
                                      "strategy=beam num_beams=3 no_repeat_ngram_size=2 min_new_tokens=3",
                                      "strategy=greedy device=cpu precision=bf16"])
def test_generate_prints_a_continuation(palm_run, strategy):
    proc = launch(GENERATE, [f"run.dir={palm_run}", "prompt=小明住在北京，已经十年了。", "max_new_tokens=12", *strategy.split()])
    # one line: the continuation (empty if [SEP] comes first, as it may from a model trained for 20 steps)
    assert proc.stdout.count("\n") == 1, proc.stdout


@pytest.mark.e2e
def test_generate_prompts_file_and_left_truncation(palm_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("小明每天早上都去公园散步。\n\n" + "很" * 600 + "\n", encoding="utf-8")
    proc = launch(GENERATE, [f"run.dir={palm_run}", f"prompts_file={prompts}", "max_new_tokens=5", "echo=true"])
    assert proc.stdout.count("prompt: ") == 2 and proc.stdout.count("output: ") == 2
    assert "prompt 2: 600 tokens, truncated from the left to the last 510" in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (["strategy=nucleus"], "strategy"),
        (["prompt=x", "prompts_file=y"], "give exactly one of prompt=<text> or prompts_file=<file>"),
        (["colour=red"], "bad argument"),
        (["no_repeat_ngram_size=-2"], "no_repeat_ngram_size=-2: must be >= 0"),
        (["min_new_tokens=-1"], "min_new_tokens=-1: must be >= 0"),
        (["device=tpu"], "device=tpu: must be auto, cpu or cuda"),
        (["precision=fp8"], "precision=fp8: must be fp32, bf16, fp16"),
        (["batch_size=0"], "batch_size=0: must be an integer >= 1"),
        (["max_live_parameters=abc"], "max_live_parameters=abc: must be an integer >= 1"),
        (["max_new_tokens=1.5"], "max_new_tokens=1.5: must be an integer >= 1"),
        (["top_k=abc"], "top_k=abc: must be an integer"),
        (["temperature=hot"], "temperature=hot: must be a number"),
        *([] if torch.cuda.is_available() else [(["precision=fp16"], "precision=fp16 needs a GPU (on CPU: fp32 or bf16)"),
                                                (["device=cuda"], "device=cuda: no CUDA GPU here")]),
    ],
)
def test_generate_bad_arguments(palm_run, args, message):
    argv = [f"run.dir={palm_run}"] + (args if any(a.startswith("prompt") for a in args) else ["prompt=你好"] + args)
    if args == ["strategy=nucleus"]:  # one through the command: the one line and the exit status
        proc = launch(GENERATE, argv, expect_rc=2)
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    else:  # generate.main checks all of these before its ranks join
        with pytest.raises(UserError) as refused:
            generate.main(argv)
        assert message in str(refused.value) and "\n" not in str(refused.value)


GENERATE_2 = ["deepspeed", "--num_gpus", "2", "--module", "pretrain.generate"]
PROMPTS = ["小明住在北京，已经十年了。", "今天", "新华社北京十二月三十一日电，国家统计局今天发布了全年经济数据。", "他说：", "我们"]


def outputs(stdout: str) -> list[str]:
    """The prompt/output lines of echo=true (the launcher writes its own lines to stdout too)."""
    return [line for line in stdout.splitlines() if line.startswith(("prompt: ", "output: "))]


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["strategy=greedy", "strategy=beam num_beams=3",
                                      "strategy=sample top_k=8 temperature=1.3 seed=7"])  # fmt: skip
def test_generation_on_two_ranks_gives_one_rank_tokens(palm_run, tmp_path, strategy):
    """Five prompts in batches of two on 2 ranks under the real launcher (rank 0 gets two batches, rank 1 one and a
    dummy, so it steps on after its own are done): the outputs of one rank, in the prompts' order."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    args = [f"run.dir={palm_run}", f"prompts_file={prompts}", "max_new_tokens=10", "echo=true", "batch_size=2",
            *strategy.split()]  # fmt: skip
    one = launch(GENERATE, args)
    two = launch(GENERATE_2, args)
    assert outputs(two.stdout) == outputs(one.stdout)
    assert [line[len("prompt: "):] for line in outputs(one.stdout)[::2]] == PROMPTS
    assert "on 2 rank(s)" in two.stderr and "peak memory per rank (GiB): [" in two.stderr


@pytest.mark.e2e
def test_generate_refuses_a_stage_one_run(stage_one):
    proc = launch(GENERATE, [f"run.dir={stage_one['one_rank']}", "prompt=你好"], expect_rc=2)
    assert "a stage-one run; generation needs a stage-two (stage=palm) run" in proc.stderr


def test_model_copy_flag_is_read_from_the_config():
    # `m.copy` on an OmegaConf DictConfig is its copy() method, always truthy: the key must be read as m["copy"].
    from omegaconf import OmegaConf

    from pretrain.training.config import model_config

    toy = OmegaConf.load(os.path.join(REPO, "conf", "model", "toy.yaml"))
    assert model_config(toy, 100, 64).copy is False
    toy["copy"] = True
    assert model_config(toy, 100, 64).copy is True


@pytest.mark.e2e
def test_summary_prints_the_drawn_and_realised_lengths(palm_run):
    """Issue 9, finding 3: run.json records stage two's length histogram and pretrain.summary prints it."""
    h = json.load(open(os.path.join(palm_run, "run.json")))["train_data"]["length_histogram"]
    for side in ("encoder", "decoder"):
        assert sum(h[side]["drawn"]) == h["samples"] == sum(h[side]["realised"]) + h[side]["realised_below"]
    proc = launch([sys.executable, "-m", "pretrain.summary"], [f"run.dir={palm_run}"])
    assert f"lengths of the first {h['samples']} samples" in proc.stdout
    assert proc.stdout.count("drawn") == 2 and proc.stdout.count("realised") == 2


def test_init_from_a_checkpoint_of_the_other_embedding_norm_is_one_line(monkeypatch):
    """Two pre-LN models that differ in model.embedding_norm: carried by name, the checkpoint's embedding LayerNorm
    would be dropped (or the model's left fresh) without a word; refused, saying which setting the checkpoint has,
    for stage two from stage one and for fine-tuning alike."""
    import dataclasses

    from pretrain import init_sources
    from pretrain.errors import UserError
    from pretrain.models.config import ModelConfig
    from pretrain.models.palm import Palm
    from pretrain.models.structbert import StructBert
    from pretrain.training import checkpoint, init_from

    cfg = ModelConfig(vocab_size=40, hidden=8, layers=2, heads=2, ffn=16, max_positions=12, decoder_layers=1)
    with_norm = dataclasses.replace(cfg, embedding_norm=True)

    def shapes(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    for saved, wanted, message in [(with_norm, cfg, "the checkpoint has an embedding LayerNorm, this model has none; "
                                                    "set model.embedding_norm=true"),
                                   (cfg, with_norm, "the checkpoint has no embedding LayerNorm, this model has one; "
                                                    "set model.embedding_norm=false")]:  # fmt: skip
        monkeypatch.setattr(checkpoint, "recorded_shapes", lambda tag_dir, what, s=shapes(StructBert(saved)): s)
        with pytest.raises(UserError, match=f"^init_from=ckpt: {message}$"):
            init_from.check("ckpt", "ckpt", shapes(Palm(wanted)), wanted)
        monkeypatch.setattr(checkpoint, "find", lambda path, what: path)
        with pytest.raises(UserError, match=f"^init_from=ckpt: {message}$"):
            init_sources.finetune_source("ckpt", shapes(StructBert(wanted)), wanted, None, needs_stage_two=False)
    monkeypatch.setattr(checkpoint, "recorded_shapes", lambda tag_dir, what: shapes(StructBert(with_norm)))
    assert "encoder.embeddings.norm.weight" in init_from.check("ckpt", "ckpt", shapes(Palm(with_norm)), with_norm)
