"""conf/ and the code agree: every key of every composed config (each option of each group) is read by the
trainer's setup, and the setup reads no key that conf/ lacks (Hydra's struct mode raises on one). Every stage's
own settings are under stage.* (conf/stage/<name>.yaml), so no composition carries a key it leaves unread (stage
one's sample length used to be data.seq_len, which stage two composed and ignored)."""
import itertools
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pretrain.errors import UserError
from pretrain.train import setup
from runs import PYTHON, REPO, TINY, launch

CONF = os.path.join(REPO, "conf")


def options(group: str) -> list[str]:
    return sorted(name[: -len(".yaml")] for name in os.listdir(os.path.join(CONF, group)) if name.endswith(".yaml"))


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("config", overrides=overrides)


def leaf_keys(tree, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]}
    return set().union(*(leaf_keys(value, f"{prefix}{key}.") for key, value in tree.items()))


@pytest.fixture
def reads(monkeypatch) -> set[str]:
    """Dotted paths of every DictConfig key read (attribute, item or get) while the fixture is active."""
    seen: set[str] = set()
    original = DictConfig._get_impl  # the one method attribute access, item access and get() go through

    def recording(self, key, *args, **kwargs):
        seen.add(self._get_full_key(key))
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(DictConfig, "_get_impl", recording)
    return seen


@pytest.mark.parametrize("stage, hardware, model",
                         list(itertools.product(options("stage"), options("deepspeed"), options("model"))))
def test_every_key_is_read_and_none_is_missing(prepared, tmp_path, stage, hardware, model, reads):
    cfg = compose_config([f"stage={stage}", f"deepspeed={hardware}", f"model={model}", f"data.dir={prepared}",
                          f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    keys = leaf_keys(OmegaConf.to_container(cfg))
    reads.clear()
    setup(cfg, world_size=2)
    unread = keys - reads
    assert not unread, f"keys in conf/ that stage={stage} deepspeed={hardware} model={model} never reads: {sorted(unread)}"
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_a_key_that_a_group_lacks_is_a_one_line_error(prepared, tmp_path):
    """zero3_cpu has no fp16 loss-scaling block: asking it for fp16 used to end in a ConfigAttributeError."""
    cfg = compose_config([f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", "deepspeed.precision=fp16"])
    with pytest.raises(UserError, match=r"^deepspeed.precision=fp16: deepspeed=zero3_cpu has no fp16 loss-scaling"):
        setup(cfg, world_size=1)
    proc = launch(PYTHON, TINY + [f"data.dir={prepared}", f"run.dir={tmp_path / 'run'}", "deepspeed.precision=fp16"],
                  expect_rc=2)  # fmt: skip
    assert proc.stderr.strip().count("\n") == 0 and "deepspeed=zero3_cpu has no fp16" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_the_plug_job_trains_at_the_length_its_memory_plan_assumes(prepared, tmp_path):
    """launch/slurm/plug_27b.sbatch quotes a plan at seq_len=512 (PLUG's and StructBERT's length): the trainer
    must get that length from the job's own overrides, not the config's default of 128."""
    import re
    import shlex

    script = open(os.path.join(REPO, "launch", "slurm", "plug_27b.sbatch"), encoding="utf-8").read()
    planned = int(re.search(r"pretrain\.plan .*\bseq_len=(\d+)", script).group(1))
    launch_line = next(line for line in script.splitlines() if line.startswith("GPUS_PER_NODE=") and "exec bash" in line)
    overrides = [a for a in shlex.split(launch_line)[4:] if a != "$@"]  # after: GPUS_PER_NODE=.. exec bash "$TRAIN_SBATCH"
    assert overrides[:3] == ["stage=structbert", "model=plug", "deepspeed=zero3_v100"], overrides
    cfg = compose_config(overrides + [f"data.dir={prepared}", f"run.dir={tmp_path}"])
    assert planned == 512 and cfg.stage.seq_len == planned
