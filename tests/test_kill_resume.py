"""SIGKILL in every stage that writes, then resume; damaged artifacts redone piece by piece.

Each stage of a finished smoke workspace is rerun with --force and killed right after (or in the middle
of) one of its artifact writes (tests/kill_after_writes.py). Then: the stage is not counted as done,
no earlier artifact is partial or changed, and a plain rerun resumes (training stages from their
last epoch) and ends with outputs equal to the uninterrupted run's. Stages 01 and 03 have their own
kill tests (test_fold_stage.py, test_training.py).
"""
from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from conftest import REPO, isolated, relocated_copy, run_script

pytestmark = pytest.mark.slow  # a smoke pipeline, then a stage run twice per case

PRETRAIN_ON = ("--set", "pretrain.enabled=true", "--set", "pretrain.epochs=2")

# stage: (kill after this artifact write, options, what the resumed run says, what was being written)
KILLS = {
    "02_pretrain": (2, PRETRAIN_ON, "pretrain: resuming at epoch 1", "after epoch 1's last.pt"),
    "04_pseudo_label": (4, (), None, "after fold 0's pseudo-labels"),
    "05_semi_supervised": (21, (), "fold 1: resuming at epoch 1", "fold 1, phase 1, after epoch 1"),
    "06_predict": (2, (), None, "after fold 1's test predictions"),
    "07_ensemble": (2, (), None, "between the submission and ensemble.json"),
    "10_promoter": ("promoter/nt/fold1/last.pt", (), "fold 1: resuming at epoch 1", "CV fold 1 after epoch 1"),
    "11_viral": (7, (), "experiment_danq: resuming at epoch 1", "DanQ after its only epoch, before its result"),
    "12_mirna": ("cv_cnn/fold1/last.pt", (), "fold 1: resuming at epoch 1", "CNN CV fold 1 after epoch 1"),
}
IN_WRITE = {"06_predict": 2, "10_promoter": 4}  # killed inside a write: its temporary file is left behind

VOLATILE = {"wall_time_s", "elapsed_s", "finished", "seconds", "data_dir"}  # timings; how it was invoked


def kernel(stage: str) -> str:
    return str(REPO / "kernels" / f"{stage}.py")


def stable(value, roots: tuple[str, ...]):
    """A JSON document without its timings, paths inside the workspace (or the one it was copied from)
    relative to it."""
    if isinstance(value, dict):
        return {k: stable(v, roots) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<workspace>")
    return value


def results(workspace) -> dict:
    """What a user reads: CSVs byte for byte, JSON reports without timings, final model weights."""
    found = {}
    for path in sorted(workspace.rglob("*")):
        relative = str(path.relative_to(workspace))
        if path.suffix == ".csv" and "input" not in path.parts:
            found[relative] = path.read_bytes()
        elif path.suffix == ".json" and "manifests" not in path.parts and "input" not in path.parts:
            found[relative] = stable(json.loads(path.read_text()), (str(workspace), COPIED_FROM[str(workspace)]))
        elif path.name == "model.pt" or (path.suffix == ".pt" and path.parent.name == "pretrain"):
            weights = torch.load(path, weights_only=True)["model"]
            found[relative] = {k: v.numpy().tobytes() for k, v in weights.items()}
    return found


def stage_run(workspace, stage, *options, kill_at: int | str | None = None, in_write: bool = False):
    command = [sys.executable]
    if kill_at is not None:
        command += [str(REPO / "tests" / "kill_after_writes.py"), *["--in-write"] * in_write, str(kill_at)]
    return run_script(command + [kernel(stage), "--preset", "smoke", *isolated(workspace), *options], timeout=600)


COPIED_FROM: dict[str, str] = {}


@pytest.fixture
def workspace(smoke_run, tmp_path):
    COPIED_FROM[str(tmp_path / "ws")] = str(smoke_run[0])
    return relocated_copy(smoke_run[0], tmp_path / "ws")


def killed_and_resumed(workspace, stage, kill_at, options, in_write=False):
    if stage == "02_pretrain":  # the smoke preset skips pretraining: make the uninterrupted result first
        assert stage_run(workspace, stage, *options).returncode == 0
    before = results(workspace)
    killed = stage_run(workspace, stage, "--force", *options, kill_at=kill_at, in_write=in_write)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (workspace / "work" / "smoke" / "manifests" / f"{stage}.json").exists(), "a killed stage is not done"
    assert "Traceback" not in killed.stderr
    now = results(workspace)
    changed = [name for name in now if name in before and now[name] != before[name]]
    assert not changed, f"killed mid-way, yet these differ from the finished run: {changed}"
    resumed = stage_run(workspace, stage, *options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return before, resumed


@pytest.mark.parametrize("stage", sorted(KILLS))
def test_a_stage_killed_mid_way_resumes_to_the_finished_run(stage, workspace):
    kill_at, options, says, _ = KILLS[stage]
    before, resumed = killed_and_resumed(workspace, stage, kill_at, options)
    if says:
        assert says in resumed.stdout, resumed.stdout[-3000:]
    assert results(workspace) == before


@pytest.mark.parametrize("stage", sorted(IN_WRITE))
def test_a_kill_inside_a_write_leaves_only_a_temporary_file_that_the_resume_clears(stage, workspace):
    before, _ = killed_and_resumed(workspace, stage, IN_WRITE[stage], (), in_write=True)
    assert results(workspace) == before
    assert not list(workspace.rglob("*.tmp")), "the resumed run rewrote the piece and cleared its temporary file"


def flip_a_byte(path, at: float = 0.6) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_damaged_fold_model_is_redone_from_its_last_checkpoint_alone(workspace):
    """A bit flip inside fold 1's model.pt: stage 03 names it, rebuilds just that file from the fold's
    last.pt and top/ checkpoints (no retraining), and the other folds' files are untouched."""
    before = results(workspace)
    folds = workspace / "work" / "smoke" / "models" / "nt"
    untouched = {p: p.stat().st_mtime_ns for p in folds.rglob("*") if p.is_file() and "fold1" not in p.parts}
    flip_a_byte(folds / "fold1" / "model.pt")
    result = stage_run(workspace, "03_train_folds")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{folds / 'fold1' / 'model.pt'}: damaged (member" in result.stdout
    assert "fold 1: resuming at epoch 3" in result.stdout and "fold 1 epoch" not in result.stdout
    assert results(workspace) == before
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


def test_a_damaged_cache_is_redone_alone(workspace):
    """A truncated CV-fold result of stage 10, found when the stage reruns: that fold alone is redone."""
    before = results(workspace)
    (workspace / "oof" / "promoter_metrics.json").unlink()
    cache = workspace / "work" / "smoke" / "promoter" / "nt" / "fold2.pkl"
    cache.write_bytes(cache.read_bytes()[:-50])
    result = stage_run(workspace, "10_promoter")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{cache}: damaged (checksum mismatch: truncated or altered): removed; redoing it" in result.stdout
    assert "fold 2: resuming at epoch 2" in result.stdout and "fold 1: resuming" not in result.stdout
    assert results(workspace) == before


def test_a_damaged_prepared_table_makes_stage_00_run_again(workspace, data_dir):
    before = results(workspace)
    prepared = workspace / "work" / "smoke" / "prepared" / "train.pkl"
    flip_a_byte(prepared, at=0.5)
    result = stage_run(workspace, "06_predict", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{prepared}: damaged (checksum mismatch" in result.stdout
    assert "upstream stage 00_prepare_input is missing or stale: running it first" in result.stdout
    assert results(workspace) == before
