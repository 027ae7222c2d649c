"""run_all.sh: the smoke preset runs every stage end to end, resumes by skipping, stops at a failing stage."""
from __future__ import annotations

import json

import pandas as pd

from conftest import isolated, run_script
from src.config import load_config
from src.structures import StructureStore


def run_all(workspace, *args):
    return run_script(["bash", "run_all.sh", "--preset", "smoke", *isolated(workspace), *args],
                      env={"NT_LOG_DIR": str(workspace / "logs")}, timeout=900)


def test_help_lists_stages_and_presets():
    result = run_script(["bash", "run_all.sh", "--help"])
    assert result.returncode == 0
    for word in ("00_prepare_input", "01_fold_structures", "03_train_folds", "06_predict", "smoke", "cpu", "paper", "--from", "--only"):
        assert word in result.stdout


def test_smoke_pipeline_end_to_end_then_skips(data_dir, tmp_path):
    workspace = tmp_path / "ws"
    first = run_all(workspace, "--data-dir", str(data_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "00_prepare_input         done" in first.stdout
    assert "01_fold_structures       done" in first.stdout
    assert "03_train_folds           done" in first.stdout and "06_predict               done" in first.stdout
    assert "07_ensemble              done" in first.stdout
    assert (workspace / "oof" / "nt_cv.json").exists() and (workspace / "submissions" / "submission.csv").exists()
    for stage in ("00_prepare_input", "01_fold_structures", "02_pretrain", "03_train_folds", "06_predict",
                  "07_ensemble"):
        manifest = json.loads((workspace / "work" / "smoke" / "manifests" / f"{stage}.json").read_text())
        assert manifest["preset"] == "smoke" and manifest["git_commit"] and manifest["config"]["fold"]
        assert (workspace / "logs" / f"{stage}.log").exists()
    train = pd.read_pickle(workspace / "work" / "smoke" / "prepared" / "train.pkl")
    test = pd.read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    sequences = list(train.sequence) + list(test.sequence)
    cfg = load_config("smoke", overrides=[f"paths.structures={workspace / 'structures'}"])
    store = StructureStore(workspace / "structures", cfg.fold)
    assert store.pending(sequences) == [] and len(store.load(sequences)) == 60

    again = run_all(workspace, "--data-dir", str(data_dir))
    assert again.returncode == 0
    assert "00_prepare_input         skipped" in again.stdout
    assert "01_fold_structures       skipped" in again.stdout
    assert "03_train_folds           skipped" in again.stdout and "06_predict               skipped" in again.stdout
    assert "07_ensemble              skipped" in again.stdout

    only = run_all(workspace, "--data-dir", str(data_dir), "--only", "fold_structures", "--force")
    assert only.returncode == 0 and "00_prepare_input" not in only.stdout.split("summary")[1]


def test_failing_stage_is_named_and_stops_the_run(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = run_all(tmp_path / "ws", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "stage 00_prepare_input FAILED" in result.stderr
    assert "01_fold_structures" not in result.stdout


def test_unknown_stage_and_option_are_refused(tmp_path):
    assert run_all(tmp_path / "ws", "--only", "99").returncode == 2
    assert run_all(tmp_path / "ws", "--frobnicate").returncode == 2
