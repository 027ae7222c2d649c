"""run_all.sh: the smoke preset runs every stage (00 -> 07) end to end, resumes by skipping, stops at a
failing stage; the semi-supervised chain's files are complete and honest."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import relocated_copy, run_all, run_script

from nucleic.config import load_config
from nucleic.io_utils import read_pickle
from nucleic.structures import StructureStore

STAGES = ("00_prepare_input", "01_fold_structures", "02_pretrain", "03_train_folds", "04_pseudo_label",
          "05_semi_supervised", "06_predict", "07_ensemble", "10_promoter", "11_viral", "12_mirna")

pytestmark = pytest.mark.slow  # minute-long: a smoke pipeline per module


def status(stdout: str) -> dict[str, str]:
    summary = stdout.split("==> summary")[1]
    return {line.split()[0]: line.split()[1] for line in summary.splitlines() if line.strip()[:2].isdigit()}


def test_help_lists_stages_and_presets():
    result = run_script(["bash", "run_all.sh", "--help"])
    assert result.returncode == 0
    for word in (*STAGES, "smoke", "cpu", "paper", "--from", "--only"):
        assert word in result.stdout


def test_smoke_pipeline_runs_every_stage(smoke_run):
    workspace, result = smoke_run
    assert status(result.stdout) == {stage: "done" for stage in STAGES}
    for stage in STAGES:
        manifest = json.loads((workspace / "work" / "smoke" / "manifests" / f"{stage}.json").read_text())
        assert manifest["preset"] == "smoke" and manifest["git_commit"] and manifest["config"]["fold"]
        assert (workspace / "logs" / f"{stage}.log").exists()
    for stage in ("03_train_folds", "06_predict"):  # stage 04's other depth model, through the runner
        manifest = json.loads((workspace / "work" / "smoke" / "manifests" / f"{stage}.nt_k1.json").read_text())
        assert manifest["config"]["model"]["nlayer"] == 1 and manifest["outputs"]
    train = read_pickle(workspace / "work" / "smoke" / "prepared" / "train.pkl")
    test = read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    sequences = list(train.sequence) + list(test.sequence)
    cfg = load_config("smoke", overrides=[f"paths.structures={workspace / 'structures'}"])
    store = StructureStore(workspace / "structures", cfg.fold)
    assert store.pending(sequences) == [] and len(store.load(sequences)) == 60


def test_pseudo_labels_are_per_fold_teacher_moments(smoke_run):
    """Fold f's labels = mean and spread over the fold-f models of every depth x 12 structures, over the
    first 91 positions of every test row; nothing from another fold's model."""
    from nucleic.semi_supervised import combine_teachers

    workspace, _ = smoke_run
    test = read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    labels = pd.read_csv(workspace / "oof" / "pseudo_labels.csv")
    assert list(labels.id_seqpos) == [f"{i}_{p}" for i in test.id for p in range(91)]
    assert np.isfinite(labels.iloc[:, 1:].to_numpy()).all()
    report = json.loads((workspace / "oof" / "pseudo_labels.json").read_text())
    assert report["models"] == ["nt_k1", "nt"] and report["depths"] == [1, 2] and report["folds"] == 3
    models = workspace / "work" / "smoke" / "models"
    for fold in range(3):
        per_fold = read_pickle(workspace / "work" / "smoke" / "pseudo_labels" / f"fold{fold}.pkl")
        assert sorted(per_fold) == list(range(len(test)))
        assert all(per_fold[i].shape == (2, 91, 5) and (per_fold[i][1] > 0).all() for i in per_fold)
        teachers = [read_pickle(models / m / f"fold{fold}" / "test_moments.pkl") for m in ("nt_k1", "nt")]
        expected = combine_teachers(teachers, 91)
        assert all(np.allclose(per_fold[i], expected[i]) for i in per_fold)
        other = combine_teachers([read_pickle(models / m / f"fold{(fold + 1) % 3}" / "test_moments.pkl")
                                  for m in ("nt_k1", "nt")], 91)
        assert not np.allclose(per_fold[0], other[0])


def test_semi_supervised_model_has_oof_cv_and_submission(smoke_run):
    from nucleic.semi_supervised import pseudo_labels_hash

    workspace, _ = smoke_run
    oof = pd.read_csv(workspace / "oof" / "nt_semi.csv")
    assert len(oof) == 40 * 68, "OOF covers training rows only"
    cv = json.loads((workspace / "oof" / "nt_semi_cv.json").read_text())
    assert len(cv["per_fold"]) == 3 and cv["model"] == "nt_semi"
    assert len(pd.read_csv(workspace / "submissions" / "nt_semi.csv")) == 10 * 107 + 10 * 130
    stamp = json.loads((workspace / "work" / "smoke" / "models" / "nt_semi" / "settings.json").read_text())
    cfg = load_config("smoke", overrides=[f"paths.work={workspace / 'work'}"])
    assert stamp["semi"] == dict(cfg.semi) and stamp["pseudo_labels"] == pseudo_labels_hash(cfg) is not None


def test_final_blend_uses_every_model_and_beats_its_members(smoke_run):
    workspace, _ = smoke_run
    report = json.loads((workspace / "oof" / "ensemble.json").read_text())
    assert sorted(report["members"]) == ["nt", "nt_k1", "nt_semi"]
    best = min(m["mcrmse_scored"] for m in report["members"].values())
    assert report["blend"]["mcrmse_scored"] <= best + 1e-9
    assert len(pd.read_csv(workspace / "submissions" / "submission.csv")) == 10 * 107 + 10 * 130


def test_depth_models_and_semi_supervised_folds_on_a_local_dask_cluster(smoke_run, data_dir, tmp_path):
    """cluster.address=local: stage 04 trains its missing depth model's folds and predicts every depth x fold
    as tasks, stage 05 trains its folds as tasks; both agree with the single-process run (workers run one
    thread each, so the arithmetic may differ in the last bits)."""
    workspace = relocated_copy(smoke_run[0], tmp_path / "cluster")
    run = workspace / "work" / "smoke"
    shutil.rmtree(run / "models" / "nt_k1")
    for manifest in run.glob("manifests/0[345]_*nt_k1*.json"):
        manifest.unlink()
    on_cluster = ["--data-dir", str(data_dir), "--set", "cluster.address=local", "--set", "cluster.local_workers=2"]
    for stage in (["--only", "04", "--force"], ["--only", "05", "--force"]):
        result = run_all(workspace, *on_cluster, *stage)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(list(run.glob("models/nt_k1/fold*/model.pt"))) == 3
    for fold in range(3):
        labels, before = (read_pickle(w / "work" / "smoke" / "pseudo_labels" / f"fold{fold}.pkl")
                          for w in (workspace, smoke_run[0]))
        assert all(np.allclose(labels[i], before[i], atol=1e-3) for i in before)
    scores = [json.loads((w / "oof" / "nt_semi_cv.json").read_text())["mcrmse_scored"]
              for w in (workspace, smoke_run[0])]
    assert abs(scores[0] - scores[1]) < 1e-3, scores


def test_rerun_skips_and_resumes_only_what_is_missing(smoke_run, data_dir, tmp_path):
    workspace = relocated_copy(smoke_run[0], tmp_path / "rerun")
    again = run_all(workspace, "--data-dir", str(data_dir))
    assert again.returncode == 0 and status(again.stdout) == {stage: "skipped" for stage in STAGES}
    (workspace / "submissions" / "nt_semi.csv").unlink()
    (workspace / "submissions" / "submission.csv").unlink()
    resumed = run_all(workspace, "--data-dir", str(data_dir), "--from", "05")
    assert resumed.returncode == 0
    assert status(resumed.stdout) == {"05_semi_supervised": "done", "06_predict": "skipped", "07_ensemble": "done",
                                      "10_promoter": "skipped", "11_viral": "skipped", "12_mirna": "skipped"}
    assert (workspace / "submissions" / "submission.csv").exists()
    only = run_all(workspace, "--data-dir", str(data_dir), "--only", "fold_structures", "--force")
    assert only.returncode == 0 and status(only.stdout) == {"01_fold_structures": "done"}


def test_failing_stage_is_named_and_stops_the_run(tmp_path, data_dir):
    broken = tmp_path / "broken"
    (broken / "openvaccine").mkdir(parents=True)
    (broken / "openvaccine" / "train.json").write_text('{"id": "id_1", "sequence": \n')
    (broken / "openvaccine" / "test.json").write_bytes((data_dir / "openvaccine" / "test.json").read_bytes())
    for task in ("promoter", "viral", "mirna"):  # present, so nothing is fetched
        (broken / task).symlink_to(data_dir / task)
    result = run_all(tmp_path / "ws", "--data-dir", str(broken))
    assert result.returncode == 2
    assert "stage 00_prepare_input FAILED" in result.stderr
    assert "01_fold_structures" not in result.stdout


def test_unknown_stage_and_option_are_refused(tmp_path):
    assert run_all(tmp_path / "ws", "--only", "99").returncode == 2
    assert run_all(tmp_path / "ws", "--frobnicate").returncode == 2
