"""Initialisation from stage one, as training does it, checked from the inside.

    deepspeed --num_gpus 2 tests/init_equality.py <stage-one run.dir> <decoder_init> <out.json> [<init_from> <stage>]

Builds the stage-two model partitioned by ZeRO-3 over the launched ranks, initialises it from the stage-one
checkpoint with `init_from.load_into`, then gathers it and compares, on one fixed input, its encoder output
and MLM logits with those of the stage-one model rebuilt from the consolidated checkpoint. Writes the
largest differences (and, for encoder_top, whether the decoder got the top encoder layers) to out.json.
With <init_from> (e.g. hf:<export of that run>) the model is initialised from it instead, and <stage>
(structbert or palm) says which model is built: the round trip through a transformers export.
"""
import dataclasses
import json
import os
import sys

import torch

from pretrain import init_sources
from pretrain.models.palm import Palm
from pretrain.models.structbert import StructBert
from pretrain.run_record import read_model_record
from pretrain.training import checkpoint, distributed, init_from, partitions
from pretrain.training.engine import build_model


def main(run_dir: str, decoder_init: str, out_path: str, source_arg: str | None = None, stage: str = "palm") -> None:
    info = distributed.read_env()
    distributed.init(info, timeout_s=120)
    import deepspeed

    record = read_model_record(run_dir)
    assert record.stage == "structbert"
    one = record.cfg
    two = dataclasses.replace(one, decoder_layers=2, decoder_init=decoder_init, dropout=0.0, attn_dropout=0.0)
    ds_config = {"train_batch_size": info.world_size, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if stage == "structbert":
        two = dataclasses.replace(one, dropout=0.0, attn_dropout=0.0)
    make = (lambda: StructBert(two)) if stage == "structbert" else (lambda: Palm(two))
    model = build_model(make, ds_config, seed=99)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in make().named_parameters()}
    source = init_sources.init_source(source_arg or run_dir, shapes, two, os.path.join(run_dir, "vocab.txt"))
    init_from.load_into(model, source, info.rank)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, one.vocab_size, (2, 20), generator=g)
    types, mask = torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)
    mask[1, 15:] = False
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        if info.rank == 0:
            reference = StructBert(dataclasses.replace(one, dropout=0.0, attn_dropout=0.0))
            reference.load_state_dict(partitions.consolidate(checkpoint.find(run_dir, "run.dir")), strict=True)
            model.eval(), reference.eval()
            h2, h1 = model.encoder(ids, types, mask), reference.encoder(ids, types, mask)
            word2, word1 = model.encoder.embeddings.word.weight, reference.encoder.embeddings.word.weight
            result = {
                "encoder_max_diff": float((h2 - h1)[mask].abs().max()),
                "mlm_max_diff": float((model.mlm_head(h2, word2) - reference.mlm_head(h1, word1))[mask].abs().max()),
                "sentence_max_diff": float((model.sentence_head(h2) - reference.sentence_head(h1)).abs().max()),
                "decoder_from_top_layer": stage == "palm" and all(
                    torch.equal(model.decoder.layers[i].self_attn.qkv.weight, reference.encoder.layers[one.layers - 2 + i].attn.qkv.weight)
                    and torch.equal(model.decoder.layers[i].ffn.down.weight, reference.encoder.layers[one.layers - 2 + i].ffn.down.weight)
                    for i in range(2)
                ),
            }  # fmt: skip
            with open(out_path, "w") as f:
                json.dump(result, f)
    distributed.barrier()
    # Leave without tearing anything down: ranks aborted now and then at exit ("terminate called without an active
    # exception", rc 250, out.json already written), with the group's threads still alive, and as often once
    # destroy_process_group was called first. The trainers, which never destroy their group, have not been seen
    # to. Everything is on disk by now, so skip the interpreter's teardown.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    main(*sys.argv[1:6])
