"""Checkpoints that cannot run code: a checkpoint file whose pickle names a callable outside the allow-list is
refused with one line (file and type) before anything unpickles it, by resume, export and our own reads alike;
the callable never runs. trust_checkpoint=true is the explicit opt-out."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pretrain.errors import UserError
from pretrain.training import checkpoint, integrity, partitions, safe_load
from runs import PYTHON, TINY, launch


class Payload:
    """Unpickling this runs `touch <marker>` (subprocess.call, which pickle may name by another module that
    holds it): what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


def poison(path: str, marker: str) -> None:
    torch.save({"state": Payload(marker), "weights": torch.ones(2)}, path)


@pytest.fixture(autouse=True)
def untrusted():
    safe_load.trust(False)
    yield
    safe_load.trust(False)


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker, path = str(tmp_path / "ran"), str(tmp_path / "evil.pt")
    poison(path, marker)
    with pytest.raises(UserError, match=rf"^{path}: holds [\w.]+\.call, a type outside the checkpoint allow-list:"
                                        r" refused, as loading it could run code \(trust_checkpoint=true loads it anyway\)$"):
        safe_load.load(path)
    with pytest.raises(UserError, match=r"holds [\w.]+\.call"):
        safe_load.check_dir(str(tmp_path))
    assert not os.path.exists(marker)
    with pytest.raises(UserError, match=r"junk.pt: not a readable checkpoint file \(\w+: damaged or truncated\); no older intact checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a zip")
        safe_load.check_file(str(tmp_path / "junk.pt"))
    safe_load.trust(True)  # the opt-out: the file is unpickled as it is, and so its callable runs
    assert torch.equal(safe_load.load(path)["weights"], torch.ones(2)) and os.path.exists(marker)


def test_trust_setting_must_be_a_boolean():
    assert safe_load.trust_setting(True) is True and safe_load.trust_setting(False) is False
    with pytest.raises(UserError, match=r"^trust_checkpoint=yes: must be true or false$"):
        safe_load.trust_setting("yes")


@pytest.mark.e2e
def test_our_checkpoints_pass_and_load_with_weights_only(stage_one):
    """Every file of a real 2-rank checkpoint is inside the allow-list, and our reads load them with weights_only."""
    tag_dir = checkpoint.find(stage_one["two_ranks"], "run.dir")
    safe_load.check_dir(tag_dir)
    rng = safe_load.load(os.path.join(tag_dir, "rng_rank1.pt"))
    assert rng["numpy"][0] == "MT19937" and rng["torch"].dtype == torch.uint8
    assert "param_shapes" in checkpoint.saved_state(tag_dir)
    assert partitions.consolidate(tag_dir)  # DeepSpeed's consolidation, after the vetting


def _poisoned_run(run_dir: str, tmp_path, file_glob: str) -> tuple[str, str]:
    copy, marker = str(tmp_path / "run"), str(tmp_path / "ran")
    shutil.copytree(run_dir, copy)
    tag_dir = checkpoint.find(copy, "run.dir")
    (target,) = glob.glob(os.path.join(tag_dir, file_glob))
    poison(target, marker)
    # From someone else, with a record that matches its files (integrity.py would refuse a file changed after it):
    # what is tested here is the vetting of the pickles.
    integrity.write_manifest(tag_dir, integrity.hash_share(tag_dir, 0, 1))
    return copy, marker


@pytest.mark.e2e
def test_resume_refuses_a_poisoned_checkpoint(stage_one, prepared, tmp_path):
    run, marker = _poisoned_run(stage_one["one_rank"], tmp_path, "rng_rank0.pt")
    args = TINY + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=8", "train.save_every=3"]
    proc = launch(PYTHON, args, expect_rc=2)
    assert proc.stderr.strip().count("\n") == 0 and "rng_rank0.pt: holds " in proc.stderr, proc.stderr
    assert not os.path.exists(marker)
    assert not glob.glob(os.path.join(run, "checkpoints", "step8"))  # nothing trained past the refusal


@pytest.mark.e2e
def test_export_refuses_a_poisoned_checkpoint_and_trust_opts_out(stage_one, tmp_path):
    run, marker = _poisoned_run(stage_one["one_rank"], tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    out = tmp_path / "hf"
    export = [sys.executable, "-m", "pretrain.export", f"run.dir={run}", f"out={out}"]
    proc = launch(export, [], expect_rc=2)
    assert proc.stderr.strip().count("\n") == 0 and "optim_states.pt: holds " in proc.stderr, proc.stderr
    assert not os.path.exists(marker) and not out.exists()
    bad = launch(export, ["trust_checkpoint=maybe"], expect_rc=2)
    assert "trust_checkpoint=maybe: must be true or false" in bad.stderr and not os.path.exists(marker)
