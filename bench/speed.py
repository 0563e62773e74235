"""Speed against the peer library, side by side in one run: tokens/s of our models and of `transformers`' at
equal dimensions, on the same batches, in interleaved A/B rounds (the median of the per-round ratios, so that a
machine busy for a moment shifts both sides of a round alike).

    python bench/speed.py [--data data/demo/prepared] [--rounds 7] [--only stage1,stage2,encoder,loader,zero3]
        [--profile] [--json out.json]

Comparisons (fp32, hidden 256, 4 layers, 4 heads, FFN 1024; dropout 0.1 and attention dropout 0.1 on both sides):
  stage1   a training step (forward, backward, AdamW) of StructBert against BertForPreTraining (SDPA) on stage
           one's own batches (seq_len 128, 16 samples): whole-word MLM + WSO positions as BERT's MLM labels, the
           sentence label as its NSP label. At the demo's vocabulary and at PLUG's (21504).
  stage2   a training step of Palm (2 decoder layers) against BartForConditionalGeneration (SDPA, the same
           layers) on stage two's batches, lengths drawn from PLUG's [32, 512] on both sides: in the masked-LM
           phase (our encoder also predicts its masked tokens; BART has no such loss) and after it.
  encoder  inference (eval, no_grad) of our encoder against BertModel: on stage one's batches, and on
           sentences of the validation split batched as they come (padded to the longest of each batch).
  loader   samples/s of each stage's train DataLoader with 1 worker, against the samples/s its step consumes.
  zero3    a real 2-rank `deepspeed` ZeRO-3 run against a 1-rank run of half the global batch (the same
           per-rank work, one thread per rank): the engine's partitioning, gathering and gloo overhead.
  compile  (only when asked: --only compile) our stage-one step under torch.compile against the same model
           eager, the compilation's seconds reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pretrain.labels import IGNORE  # noqa: E402

DIMS = dict(hidden=256, layers=4, heads=4, ffn=1024, decoder_layers=2)
PLUG_VOCAB = 21504
MICRO = 16


def stage(name: str, data: str, *overrides: str):
    """A stage built from the repo's real config, as `pretrain.train` builds it."""
    from hydra import compose, initialize_config_dir

    from pretrain.stages import build_stage

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=[f"stage={name}", "model=toy", f"data.dir={data}", "run.dir=unused",
                                           f"train.micro_batch_size={MICRO}", *[f"model.{k}={v}" for k, v in DIMS.items()],
                                           *overrides])  # fmt: skip
    return build_stage(cfg), cfg


def train_iter(st, cfg, start_step: int = 0):
    """The stage's train batches on one rank from start_step, as `pretrain.train` reads them."""
    from pretrain.training.config import batch_geometry

    geometry = batch_geometry(cfg.train, 1)
    st.index(geometry)
    return iter(st.train_loader(geometry, 0, start_step))


def batches(st, cfg, count: int, every: int = 40) -> list[dict]:
    """The train batches of steps 0, every, 2 * every, ...: spread over the run, so that stage two's
    length-grouped pools (stage.group_steps=50) give different lengths and the padding is typical."""
    return [next(train_iter(st, cfg, i * every)) for i in range(count)]


def padding(inputs: list[dict], *masks: str) -> float:
    real = sum(int(x[m].sum()) for x in inputs for m in masks)
    return round(1 - real / sum(x[m].numel() for x in inputs for m in masks), 3)


def ab_rounds(ours: Callable, peer: Callable, rounds: int) -> dict:
    """Each side runs its whole work once per round, the order alternating; returns medians of per-round
    seconds and of the per-round speed ratio (peer time / our time)."""
    ours(), peer()  # warm-up: allocator, kernels, first-call work
    t_ours, t_peer = [], []
    for r in range(rounds):
        for side in ((ours, t_ours), (peer, t_peer))[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            side[0]()
            side[1].append(time.perf_counter() - start)
    return {"s_ours": statistics.median(t_ours), "s_peer": statistics.median(t_peer),
            "ratio": statistics.median(p / o for p, o in zip(t_peer, t_ours))}  # fmt: skip


def train_steps(model: torch.nn.Module, loss_of: Callable, inputs: list) -> Callable:
    """A closure that runs one optimizer step per input: forward, backward, AdamW (torch's, the same both sides)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def run():
        for x in inputs:
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def profile(name: str, fn: Callable, rows: int = 12) -> None:
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile() as prof:
        fn()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"\n  profile of {name}: {total / 1e3:.0f} ms")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.key:<40s} {e.self_cpu_time_total / 1e3:9.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%")


# --- stage one --------------------------------------------------------------------------------------------------


def stage1(data: str, rounds: int, prof: bool) -> list[dict]:
    from transformers import BertConfig, BertForPreTraining

    from pretrain.models.structbert import StructBert

    st, cfg = stage("structbert", data)
    inputs = batches(st, cfg, 3)
    out = []
    for vocab in (st.model_cfg.vocab_size, PLUG_VOCAB):
        torch.manual_seed(0)
        ours = StructBert(replace(st.model_cfg, vocab_size=vocab))
        peer = BertForPreTraining(bert_config(BertConfig, vocab))
        peer_inputs = [bert_pretraining_inputs(b) for b in inputs]
        a = train_steps(ours, lambda m, b: m(b, st.weights)[0], inputs)
        b = train_steps(peer, lambda m, x: m(**x).loss, peer_inputs)
        tokens = sum(int(x["attention_mask"].sum()) for x in inputs)
        r = row(f"stage one train step, vocab {vocab}", "BertForPreTraining", ab_rounds(a, b, rounds), tokens, MICRO * len(inputs))
        out.append({**r, "padding": padding(inputs, "attention_mask")})
        if prof and vocab != PLUG_VOCAB:
            profile("ours", a), profile("BertForPreTraining", b)
    return out


def bert_config(cls, vocab: int):
    return cls(vocab_size=vocab, hidden_size=DIMS["hidden"], num_hidden_layers=DIMS["layers"],
               num_attention_heads=DIMS["heads"], intermediate_size=DIMS["ffn"], max_position_embeddings=512,
               type_vocab_size=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
               attn_implementation="sdpa")  # fmt: skip


def bert_pretraining_inputs(b: dict) -> dict:
    """BERT's MLM labels at both our MLM and WSO positions (the same vocabulary predictions), NSP from SSO."""
    labels = torch.where(b["mlm_labels"] != IGNORE, b["mlm_labels"], b["wso_labels"])
    return {"input_ids": b["input_ids"], "token_type_ids": b["token_type_ids"],
            "attention_mask": b["attention_mask"].long(), "labels": labels,
            "next_sentence_label": b["sso_labels"].clamp(0, 1)}  # fmt: skip


# --- stage two --------------------------------------------------------------------------------------------------


def stage2(data: str, rounds: int, prof: bool) -> list[dict]:
    from transformers import BartConfig, BartForConditionalGeneration

    from pretrain.models.palm import Palm

    out = []
    for phase, fraction in (("masked-LM phase", 1.0), ("LM only", 0.0)):
        st, cfg = stage("palm", data, "model.max_positions=512", "stage.src_len=[32,512]", "stage.tgt_len=[32,512]",
                        f"stage.mlm_fraction={fraction}", "train.max_steps=100")  # fmt: skip
        inputs = batches(st, cfg, 3)
        vocab = st.model_cfg.vocab_size
        torch.manual_seed(0)
        ours = Palm(st.model_cfg)
        peer = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=DIMS["hidden"], encoder_layers=DIMS["layers"], decoder_layers=DIMS["decoder_layers"],
            encoder_attention_heads=DIMS["heads"], decoder_attention_heads=DIMS["heads"], encoder_ffn_dim=DIMS["ffn"],
            decoder_ffn_dim=DIMS["ffn"], max_position_embeddings=512, dropout=0.1, attention_dropout=0.1,
            activation_dropout=0.0, pad_token_id=0, attn_implementation="sdpa"))  # fmt: skip
        peer_inputs = [{"input_ids": b["enc_input_ids"], "attention_mask": b["enc_attention_mask"].long(),
                        "decoder_input_ids": b["dec_input_ids"], "decoder_attention_mask": b["dec_attention_mask"].long(),
                        "labels": b["dec_labels"]} for b in inputs]  # fmt: skip
        a = train_steps(ours, lambda m, b: m(b, st.weights)[0], inputs)
        b = train_steps(peer, lambda m, x: m(**x).loss, peer_inputs)
        tokens = sum(int(x["enc_attention_mask"].sum() + x["dec_attention_mask"].sum()) for x in inputs)
        r = row(f"stage two train step, {phase}", "BartForConditionalGeneration", ab_rounds(a, b, rounds), tokens, MICRO * len(inputs))
        out.append({**r, "padding": padding(inputs, "enc_attention_mask", "dec_attention_mask")})
        if prof and fraction == 1.0:
            profile("ours", a), profile("BartForConditionalGeneration", b)
    return out


def compiled(data: str, rounds: int, prof: bool) -> list[dict]:
    from pretrain.models.structbert import StructBert

    st, cfg = stage("structbert", data)
    inputs = batches(st, cfg, 3)
    torch.manual_seed(0)
    eager = StructBert(st.model_cfg)
    fast = torch.compile(eager)
    start = time.perf_counter()
    fast(inputs[0], st.weights)[0].backward()
    compile_s = time.perf_counter() - start
    a = train_steps(fast, lambda m, b: m(b, st.weights)[0], inputs)
    b = train_steps(eager, lambda m, b: m(b, st.weights)[0], inputs)
    tokens = sum(int(x["attention_mask"].sum()) for x in inputs)
    r = row("stage one train step under torch.compile", "the same model eager", ab_rounds(a, b, rounds), tokens,
            MICRO * len(inputs))  # fmt: skip
    return [{**r, "compile_s": round(compile_s, 1)}]


# --- encoder inference ------------------------------------------------------------------------------------------


def encoder(data: str, rounds: int, prof: bool) -> list[dict]:
    from transformers import BertConfig, BertModel

    from pretrain.models.layers import Encoder

    st, cfg = stage("structbert", data)
    workloads = {"stage one's batches (seq 128)": batches(st, cfg, 3), "validation sentences": sentences(st, 3)}
    torch.manual_seed(0)
    ours = Encoder(st.model_cfg).eval()
    peer = BertModel(bert_config(BertConfig, st.model_cfg.vocab_size), add_pooling_layer=False).eval()
    out = []
    for name, inputs in workloads.items():

        @torch.no_grad()
        def a(inputs=inputs):
            for b in inputs:
                ours(b["input_ids"], b["token_type_ids"], b["attention_mask"])

        @torch.no_grad()
        def b(inputs=inputs):
            for x in inputs:
                peer(input_ids=x["input_ids"], token_type_ids=x["token_type_ids"], attention_mask=x["attention_mask"].long())

        tokens = sum(int(x["attention_mask"].sum()) for x in inputs)
        r = row(f"encoder inference, {name}", "BertModel", ab_rounds(a, b, rounds), tokens, sum(len(x["input_ids"]) for x in inputs))
        out.append({**r, "padding": padding(inputs, "attention_mask")})
        if prof:
            profile(f"ours, {name}", a), profile(f"BertModel, {name}", b)
    return out


def sentences(st, count: int, batch: int = 32) -> list[dict]:
    """Batches of consecutive validation sentences, [CLS] sentence [SEP], padded to the longest in the batch."""
    corpus, tok = st.corpora[0]["valid"], st.tokenizer
    bounds = corpus.sent_offsets
    out = []
    for i in range(count):
        sents = [corpus.tokens[bounds[j] : bounds[j + 1]][:126] for j in range(i * batch, (i + 1) * batch)]
        width = max(len(s) for s in sents) + 2
        ids = torch.full((batch, width), tok.pad_id, dtype=torch.long)
        for r, s in enumerate(sents):
            ids[r, : len(s) + 2] = torch.tensor([tok.cls_id, *map(int, s), tok.sep_id])
        mask = torch.arange(width)[None] < torch.tensor([len(s) + 2 for s in sents])[:, None]
        out.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask})
    return out


# --- the data loader --------------------------------------------------------------------------------------------


def loader(data: str, rounds: int, consumed: dict[str, float]) -> list[dict]:
    """Samples/s of 1 worker (after its first batch), against a step's consumption (samples/s of ours above)."""
    out = []
    for name, over in (("stage1", ()), ("stage2", ("model.max_positions=512", "stage.src_len=[32,512]",
                                                   "stage.tgt_len=[32,512]"))):  # fmt: skip
        st, cfg = stage("structbert" if name == "stage1" else "palm", data, "data.num_workers=1", *over)
        it = train_iter(st, cfg)
        next(it)
        n, start = 0, time.perf_counter()
        for _ in range(50 * rounds):
            n += len(next(it)["attention_mask" if name == "stage1" else "enc_attention_mask"])
        rate = n / (time.perf_counter() - start)
        need = consumed.get(name)
        out.append({"what": f"data loader, {'stage one' if name == 'stage1' else 'stage two'}, 1 worker",
                    "samples_per_s": round(rate, 1), "step_samples_per_s": None if need is None else round(need, 2),
                    "ratio": None if need is None else round(rate / need, 1)})  # fmt: skip
    return out


# --- ZeRO-3 overhead --------------------------------------------------------------------------------------------


def zero3(data: str, rounds: int, steps: int = 30) -> list[dict]:
    """A real 2-rank ZeRO-3 stage-one run against a 1-rank one at half the global batch: each rank trains 8
    samples per step on one thread. The step times are the medians of metrics.jsonl's step_time_s (per window
    of 5 steps, the first window left out)."""
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for ranks in (1, 2) if r % 2 == 0 else (2, 1):
                run_dir = os.path.join(tmp, f"r{r}_{ranks}")
                cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29600 + r), "--module", "pretrain.train",
                       "stage=structbert", "model=toy", f"data.dir={data}", f"run.dir={run_dir}", "train.micro_batch_size=8",
                       f"train.max_steps={steps}", "train.log_every=5", "train.eval_every=100000", "train.save_every=100000",
                       "logger.progress=false", "logger.wandb.mode=disabled", *[f"model.{k}={v}" for k, v in DIMS.items()]]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f if '"train"' in line]
                times[ranks].append(statistics.median(row["step_time_s"] for row in rows[1:]))
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    return [{"what": "ZeRO-3 step, 2 ranks x 8 samples vs 1 rank x 8 (one thread per rank)", "s_1rank": round(t1, 4),
             "s_2ranks": round(t2, 4), "overhead": round(t2 / t1 - 1, 3)}]  # fmt: skip


def row(what: str, peer: str, timing: dict, tokens: int, samples: int) -> dict:
    return {"what": what, "peer": peer, "tokens_per_s_ours": round(tokens / timing["s_ours"]),
            "tokens_per_s_peer": round(tokens / timing["s_peer"]), "ratio": round(timing["ratio"], 3),
            "samples_per_s_ours": round(samples / timing["s_ours"], 2)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "data/demo/prepared"), help="a prepared corpus (make demo makes one)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", default="stage1,stage2,encoder,loader,zero3")
    p.add_argument("--profile", action="store_true", help="print where the time of each side goes")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.data, "meta.json")):
        sys.exit(f"bench/speed.py: --data {args.data}: no prepared corpus (meta.json) there; run make demo first")
    only = set(args.only.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds", flush=True)
    rows = []
    consumed = {}
    for name, fn in (("stage1", stage1), ("stage2", stage2), ("encoder", encoder), ("compile", compiled)):
        if name in only:
            for r in fn(args.data, args.rounds, args.profile):
                rows.append(r)
                consumed.setdefault(name, r["samples_per_s_ours"])  # the loader's comparison: the first row's
                print(json.dumps(r), flush=True)
    if "loader" in only:
        for r in loader(args.data, args.rounds, consumed):
            rows.append(r)
            print(json.dumps(r), flush=True)
    if "zero3" in only:
        for r in zero3(args.data, max(2, args.rounds // 3)):
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
