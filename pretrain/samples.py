"""Write the first training samples of a run as the trainer builds them, one JSON object per line:

    python -m pretrain.samples stage=structbert data.dir=<dir> n=<N> out=<file.jsonl> [world_size=1] [from_step=1] [trainer keys]
    python -m pretrain.samples stage=palm data.dirs=[<dir>,<dir>] data.weights=[3,1] ...     # a blend, as the run trains on it

Any key=value of the trainer's config (stage.seq_len=, stage.src_len=[32,96], seed=, train.max_steps=, ...) applies as
it does to `pretrain.train`, so the samples are those of the run: the same seed, epochs, indices and step order
(the n first samples the steps consume, step by step, from step from_step=, 1 by default). world_size matters only where the global batch is
train.micro_batch_size x ranks: it decides which step a sample lands in and, in stage two, where masked LM stops.

Each line holds the global sample index and its step, the model's input as ids and as tokens, and the targets
with their positions, as the stage's `sample_row` writes them (pretrain/stages/: stage one's token types, MLM,
WSO and SSO targets, A and B as the corpus has them; stage two's encoder and decoder inputs, their targets, the
drawn and realised lengths, whether masked LM is active, the context and target as the corpus has them); in a blend,
also the source each sample comes from.
"""
from __future__ import annotations

import json
import os
import sys

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from pretrain.cli import parse
from pretrain.errors import UserError, exit_on_user_error
from pretrain.overrides import check_command_line
from pretrain.stages import build_stage
from pretrain.training.config import BatchGeometry, batch_geometry

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
OWN_KEYS = ("n", "out", "world_size", "from_step")


def compose_config(overrides: list[str]):
    """The trainer's config with these overrides (run.dir is not needed to build samples)."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("config", overrides=["run.dir=unused", *overrides])
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad argument: {str(e).splitlines()[0]}") from None


def step_order(stage, data, global_batch: int, n: int, from_step: int = 1) -> list[tuple[int, int]]:
    """(step, global index) of the first n samples from step `from_step` on, in the order the steps consume them:
    the stage's own sampler, one rank taking the whole global batch (a step's samples do not depend on the number
    of ranks)."""
    steps = -(-n // global_batch)
    sampler = stage.train_sampler(data, BatchGeometry(micro=global_batch, accum=1, world=1), rank=0,
                                  start_step=from_step - 1, max_steps=from_step - 1 + steps)  # fmt: skip
    return [(from_step + t, int(g)) for t, batch in enumerate(sampler) for g in batch][:n]


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    own = [a for a in argv if a.split("=", 1)[0] in OWN_KEYS]
    args, _ = parse(own, {"n": 16, "out": "???", "world_size": 1, "from_step": 1}, command="pretrain.samples", verbatim=("out",))
    for key in ("n", "world_size", "from_step"):
        if not isinstance(args[key], int) or isinstance(args[key], bool) or args[key] < 1:
            raise UserError(f"{key}={args[key]}: must be an integer >= 1")
    n, world, from_step = int(args.n), int(args.world_size), int(args.from_step)
    trainer = [a for a in argv if a.split("=", 1)[0] not in OWN_KEYS]
    check_command_line(trainer, "config", "pretrain.samples")  # the trainer's keys, held as the trainer holds them
    cfg = compose_config(trainer)
    stage = build_stage(cfg)
    geometry = batch_geometry(cfg.train, world)
    data = stage.train_dataset(geometry)
    order = step_order(stage, data, geometry.global_batch, n, from_step)
    tmp = f"{args.out}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # renamed when complete: never a half-written file
            for step, g in order:
                f.write(json.dumps({"index": g, "step": step, **stage.sample_row(data, g)}, ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"pretrain.samples: {len(order)} {stage.name} samples (steps {from_step}-{order[-1][0]}, global batch "
          f"{geometry.global_batch}) -> {args.out}")
    print("\n".join(stage.sample_overview(data, [g for _, g in order])))


if __name__ == "__main__":
    with exit_on_user_error("pretrain.samples"):
        main(sys.argv[1:])
