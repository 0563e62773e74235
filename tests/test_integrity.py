"""Checkpoint integrity (pretrain/training/integrity.py): every committed checkpoint records its files' sizes and
checksums; resume, export and generate verify before they read. Faults are injected into the real files of a real
2-rank stage-two run: flipped bits, a truncated partition, NaN weights, a checkpoint without a record."""
import os
import re
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain.training import integrity  # noqa: E402
from runs import DEEPSPEED, PALM, PYTHON, launch, rows  # noqa: E402

EXPORT = [sys.executable, "-m", "pretrain.export"]
GENERATE = [sys.executable, "-m", "pretrain.generate"]
GENERATE_2 = ["deepspeed", "--num_gpus", "2", "--module", "pretrain.generate"]
RUN = ["train.save_every=2", "train.keep_last=3", "train.log_every=1", "train.eval_every=100"]
PARTITION = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def one_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def flip_bits(path: str) -> None:
    with open(path, "r+b") as f:  # a few bytes in the middle: inside the partition's tensor data
        f.seek(os.path.getsize(path) // 2)
        data = bytearray(f.read(4))
        f.seek(-4, 1)
        f.write(bytes(b ^ 0x5A for b in data))


# -- the record, on files of our own (no process started) ---------------------------------------------------------


def test_the_record_names_a_changed_a_truncated_and_a_missing_file(tmp_path, capsys):
    tag_dir = tmp_path / "checkpoints" / "step4"
    tag_dir.mkdir(parents=True)
    for name, size in (("zero_pp_rank_0_mp_rank_00_optim_states.pt", 5000), ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 5000),
                       ("rng_rank0.pt", 100), ("rng_rank1.pt", 100)):  # fmt: skip
        (tag_dir / name).write_bytes(os.urandom(size))
    assert integrity.problems(str(tag_dir)) is None  # no record yet
    shares = [integrity.hash_share(str(tag_dir), r, 2) for r in (0, 1)]
    assert sorted(shares[1]) == ["rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # each rank its own
    assert integrity.write_manifest(str(tag_dir), {**shares[0], **shares[1]}) == 10200
    assert integrity.problems(str(tag_dir)) == [] and integrity.recorded_bytes(str(tag_dir)) == 10200

    flip_bits(str(tag_dir / "rng_rank0.pt"))
    with open(tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(3000)
    os.remove(tag_dir / "rng_rank1.pt")
    found = integrity.problems(str(tag_dir))
    assert len(found) == 3
    assert re.fullmatch(rf"{tag_dir}/rng_rank1\.pt: missing \(the record lists it, 100 bytes\)", found[0])
    assert found[1] == f"{tag_dir}/zero_pp_rank_1_mp_rank_00_optim_states.pt: 3000 bytes, 5000 recorded when the checkpoint was saved (truncated)"
    assert re.fullmatch(rf"{tag_dir}/rng_rank0\.pt: xxh3_64 checksum \w+, \w+ recorded when the checkpoint was saved"
                        r" \(its bytes changed: damaged\)", found[2])  # fmt: skip

    older = tmp_path / "checkpoints" / "step2"  # an older checkpoint without a record: intact as far as one can tell
    older.mkdir()
    with pytest.raises(integrity.UserError, match=rf"rng_rank1\.pt: missing .* \(and 2 more\); the newest intact "
                                                  rf"checkpoint is step2: train.resume={older}$"):  # fmt: skip
        integrity.check(str(tag_dir), "train.resume={dir}")
    err = capsys.readouterr().err
    assert err.count("no manifest.json") == 1 and "carries no record" in err
    integrity.check(str(older))  # verified once per process: said once
    assert capsys.readouterr().err == ""


# -- a real run ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def palm6(prepared, tmp_path_factory) -> str:
    """A 2-rank stage-two run of 6 steps with checkpoints at 2, 4 and 6, each with its record."""
    run = str(tmp_path_factory.mktemp("integrity") / "palm6")
    launch(DEEPSPEED, PALM + RUN + [f"data.dir={prepared}", f"run.dir={run}", "train.max_steps=6"])
    for step in (2, 4, 6):
        assert integrity.problems(os.path.join(run, "checkpoints", f"step{step}")) == []
    return run


def copy_run(run: str, to) -> str:
    shutil.copytree(run, str(to))
    return str(to)


@pytest.mark.e2e
def test_flipped_bits_resume_from_the_newest_intact_checkpoint(palm6, prepared, tmp_path):
    damaged, explicit = copy_run(palm6, tmp_path / "damaged"), copy_run(palm6, tmp_path / "explicit")
    partition = os.path.join(damaged, "checkpoints", "step6", PARTITION.format(1))
    flip_bits(partition)
    common = PALM + RUN + [f"data.dir={prepared}", "train.max_steps=8"]
    proc = launch(DEEPSPEED, common + [f"run.dir={damaged}"])
    said = [line for line in proc.stderr.splitlines() if "resuming from" in line]
    assert said == [f"pretrain.train: {partition}: xxh3_64 checksum {said[0].split('checksum ')[1].split(',')[0]},"
                    f" {said[0].split(', ')[1].split(' recorded')[0]} recorded when the checkpoint was saved (its bytes"
                    f" changed: damaged): resuming from {damaged}/checkpoints/step4, the newest intact checkpoint;"
                    " damaged step6 set aside as <tag>.damaged"], proc.stderr[-3000:]  # fmt: skip
    assert os.path.isfile(os.path.join(damaged, "checkpoints", "step6.damaged", PARTITION.format(1)))  # kept, not deleted
    assert integrity.problems(os.path.join(damaged, "checkpoints", "step6")) == []  # saved again, intact
    launch(DEEPSPEED, common + [f"run.dir={explicit}", f"train.resume={explicit}/checkpoints/step4"])
    losses = lambda run: [(r["step"], r["loss"]) for r in rows(run, "train") if r["step"] > 4]  # noqa: E731
    assert losses(damaged) == losses(explicit) and len(losses(damaged)) == 4  # bitwise: a resume is exact


@pytest.mark.e2e
def test_a_truncated_partition_is_refused_naming_the_newest_intact_step(palm6, prepared, tmp_path):
    run = copy_run(palm6, tmp_path / "run")
    partition = os.path.join(run, "checkpoints", "step6", PARTITION.format(0))
    size = os.path.getsize(partition)
    with open(partition, "r+b") as f:
        f.truncate(size // 2)
    truncated = f"{partition}: {size // 2} bytes, {size} recorded when the checkpoint was saved (truncated)"
    out = str(tmp_path / "hf")
    proc = launch(EXPORT, [f"run.dir={run}", f"out={out}", "check=false"], expect_rc=2)
    assert one_line(proc.stderr, "pretrain.export") == f"pretrain.export: error: {truncated}; the newest intact checkpoint is step4: step=4"
    assert not os.path.exists(out)
    proc = launch(GENERATE, [f"run.dir={run}", "prompt=你好", "max_new_tokens=4"], expect_rc=2)
    assert one_line(proc.stderr, "pretrain.generate") == (f"pretrain.generate: error: {truncated}; the newest intact"
                                                          f" checkpoint is step4: checkpoint={run}/checkpoints/step4")  # fmt: skip
    assert proc.stdout == ""
    proc = launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={run}", f"train.resume={run}/checkpoints/step6"], expect_rc=2)
    assert one_line(proc.stderr, "pretrain.train") == (f"pretrain.train: error: {truncated}; the newest intact"
                                                       f" checkpoint is step4: train.resume={run}/checkpoints/step4")  # fmt: skip
    fresh = str(tmp_path / "fresh")  # init_from reads it too
    proc = launch(PYTHON, PALM + [f"data.dir={prepared}", f"run.dir={fresh}", f"init_from={run}"], expect_rc=2)
    assert one_line(proc.stderr, "pretrain.train") == (f"pretrain.train: error: {truncated}; the newest intact"
                                                       f" checkpoint is step4: init_from={run}/checkpoints/step4")  # fmt: skip
    assert not os.path.exists(os.path.join(fresh, "checkpoints"))


@pytest.mark.e2e
def test_export_and_generate_refuse_non_finite_weights_and_write_nothing(palm6, tmp_path):
    run = copy_run(palm6, tmp_path / "run")
    tag_dir = os.path.join(run, "checkpoints", "step6")
    path = os.path.join(tag_dir, PARTITION.format(1))
    state = torch.load(path, weights_only=False)
    with torch.no_grad():
        state["optimizer_state_dict"]["fp32_flat_groups"][0][100] = float("nan")  # a weight of rank 1's partition
    torch.save(state, path)
    integrity.write_manifest(tag_dir, integrity.hash_share(tag_dir, 0, 1))  # as if the run had saved it so
    nonfinite = re.compile(rf"error: {tag_dir}: parameter [\w.]+ holds NaN or inf: the weights of step 6 are not finite")
    out = str(tmp_path / "hf")
    proc = launch(EXPORT, [f"run.dir={run}", f"out={out}"], expect_rc=2)
    assert nonfinite.search(one_line(proc.stderr, "pretrain.export")) and not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]  # nothing half-written beside it
    proc = launch(GENERATE_2, [f"run.dir={run}", "prompt=你好", "max_new_tokens=4"], expect_rc=2)
    assert nonfinite.search(one_line(proc.stderr, "pretrain.generate"))
    assert all(line.startswith("[") for line in proc.stdout.splitlines()), proc.stdout  # the launcher's log, no output
    # The earlier checkpoint is finite: the line's advice works.
    launch(EXPORT, [f"run.dir={run}", f"out={out}", "step=4", "check=false"])


@pytest.mark.e2e
def test_a_checkpoint_without_a_record_still_loads_with_one_line(palm6, tmp_path):
    run = copy_run(palm6, tmp_path / "run")
    os.remove(os.path.join(run, "checkpoints", "step6", integrity.MANIFEST))  # as written before the record existed
    proc = launch(EXPORT, [f"run.dir={run}", f"out={tmp_path / 'hf'}", "check=false"])
    said = [line for line in proc.stderr.splitlines() if "manifest" in line]
    assert said == [f"pretrain.export: {run}/checkpoints/step6: no manifest.json: a checkpoint written before checkpoints"
                    " recorded their files carries no record, so damage to its files cannot be detected"]  # fmt: skip
