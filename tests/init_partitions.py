"""init_from from a stage-one checkpoint, checked from the inside: bitwise, and read in partitions.

    deepspeed --num_gpus M tests/init_partitions.py <stage-one run.dir> <decoder_init> <out.json> [<vocab.txt>]

Builds the stage-two model partitioned by ZeRO-3 over the M launched ranks and initialises it with
`init_from.load_into`, with DeepSpeed's consolidation disabled (it would hold a whole state dict) and every read of
the checkpoint recorded. Then gathers the model and writes to out.json the parameters that differ in any bit from the
consolidated checkpoint's (by the init mapping), and the largest read beside the largest partition of a rank.
"""
import dataclasses
import json
import os
import sys

import torch

from pretrain import init_sources
from pretrain.data.tokenizer import read_vocab
from pretrain.models.palm import Palm
from pretrain.run_record import read_model_record
from pretrain.training import checkpoint, distributed, init_from, partitions
from pretrain.training.engine import build_model


def main(run_dir: str, decoder_init: str, out_path: str, vocab: str | None = None) -> None:
    info = distributed.read_env()
    distributed.init(info, timeout_s=120)
    import deepspeed

    record = read_model_record(run_dir)
    assert record.stage == "structbert"
    cfg = dataclasses.replace(record.cfg, decoder_layers=2, decoder_init=decoder_init)
    if vocab is not None:
        cfg = dataclasses.replace(cfg, vocab_size=-(-len(read_vocab(vocab)) // 8) * 8)
    ds_config = {"train_batch_size": info.world_size, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = build_model(lambda: Palm(cfg), ds_config, seed=99)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Palm(cfg).named_parameters()}
    source = init_sources.init_source(run_dir, shapes, cfg, vocab or os.path.join(run_dir, "vocab.txt"))
    assert (source.extension is not None) == (vocab is not None)

    consolidate, read, reads = partitions.consolidate, partitions.PartitionReader.read, []

    def refuse(*args, **kwargs):
        raise AssertionError("init_from consolidated the checkpoint")

    def recording(self, name, start, end):
        reads.append(end - start)
        return read(self, name, start, end)

    partitions.consolidate, partitions.PartitionReader.read = refuse, recording
    fresh = {n: _gathered(p).clone() for n, p in model.named_parameters() if n in init_from.VOCAB_TABLES}
    init_from.load_into(model, source, info.rank)
    partitions.consolidate, partitions.PartitionReader.read = consolidate, read
    partition = max(-(-torch.Size(shapes[n]).numel() // info.world_size) for n in source.mapping)
    largest = max(distributed.gather_objects(max(reads)))

    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        if info.rank == 0:
            state = consolidate(checkpoint.find(run_dir, "run.dir"))
            params = dict(model.named_parameters())
            differ = [n for n, s in source.mapping.items() if not torch.equal(params[n], expected(source, n, state[s], fresh))]
            result = {"compared": len(source.mapping), "differ": differ, "largest_read": largest,
                      "largest_partition": partition, "largest_parameter": max(t.numel() for t in state.values())}  # fmt: skip
            with open(out_path, "w") as f:
                json.dump(result, f)
    distributed.barrier()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # as tests/init_equality.py: skip the process group's teardown, the result is on disk


def _gathered(param):
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.data.clone()


def expected(source, name: str, theirs: torch.Tensor, fresh: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `name` must hold: the checkpoint's tensor, or with an extended vocab the token table grown from it."""
    if source.extension is None or name not in init_from.VOCAB_TABLES:
        return theirs
    want, rows = fresh[name].clone(), source.extension.rows
    want[:rows] = theirs[:rows]
    for token, pieces in source.extension.pieces.items():
        want[token] = theirs[list(pieces)].mean(0)
    return want


if __name__ == "__main__":
    sys.argv = distributed.strip_local_rank(sys.argv)
    main(*sys.argv[1:5])
