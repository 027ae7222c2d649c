"""Stages 03 and 06 on the smoke preset: loss goes down, OOF is deterministic, a killed fold resumes to
the same result, the submission is complete and checked."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, copy_of, isolated, load_kernel

from nucleic.io_utils import read_pickle

pytestmark = pytest.mark.slow  # minute-long: a smoke pipeline per module


def train_command(workspace):
    return [sys.executable, str(REPO / "kernels" / "03_train_folds.py"), "--preset", "smoke",
            *isolated(workspace), "--set", "train.threads=1"]


def train(workspace, *settings: str, env: dict | None = None):
    sets = [arg for setting in settings for arg in ("--set", setting)]
    result = subprocess.run(train_command(workspace) + sets, cwd=REPO, capture_output=True, text=True,
                            env=None if env is None else {**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_workspace(folded_workspace, tmp_path_factory):
    workspace = copy_of(folded_workspace, tmp_path_factory.mktemp("trained") / "ws")
    train(workspace)
    return workspace


def test_training_lowers_the_loss_and_writes_oof(trained_workspace):
    fold_dir = trained_workspace / "work" / "smoke" / "models" / "nt"
    for fold in range(3):
        history = read_pickle(fold_dir / f"fold{fold}" / "result.pkl")["history"]
        assert len(history) == 3
        assert history[-1]["train_loss"] < history[0]["train_loss"]
    oof = pd.read_csv(trained_workspace / "oof" / "nt.csv")
    assert list(oof.columns) == ["id_seqpos", "reactivity", "deg_Mg_pH10", "deg_pH10", "deg_Mg_50C", "deg_50C"]
    assert len(oof) == 40 * 68 and oof.id_seqpos.str.endswith("_67").sum() == 40
    cv = json.loads((trained_workspace / "oof" / "nt_cv.json").read_text())
    assert 0 < cv["mcrmse_scored"] < 2 and len(cv["per_fold"]) == 3
    assert cv["n_scored_rows"] == sum(f["n_scored_rows"] for f in cv["per_fold"])
    assert cv["git_commit"] and cv["config"]["model"]["nlayer"] == 2
    folds = pd.read_csv(trained_workspace / "oof" / "folds.csv")
    assert len(folds) == 40 and sorted(folds.fold.unique()) == [0, 1, 2]
    for figure in ("nt_learning_curves.png", "nt_oof_error.png", "nt_attention.png"):
        assert (trained_workspace / "figures" / figure).stat().st_size > 10_000


def test_fold_model_is_the_average_of_its_best_epochs(trained_workspace):
    """smoke: average_top_k 2. top/ keeps the 2 best validated epochs; model.pt is their mean when that
    validates better than the best epoch alone, else best.pt's weights."""
    from nucleic.engine import average_weights

    for fold in range(3):
        fold_dir = trained_workspace / "work" / "smoke" / "models" / "nt" / f"fold{fold}"
        state = torch.load(fold_dir / "last.pt", weights_only=False)["state"]
        result = read_pickle(fold_dir / "result.pkl")
        ranked = sorted((h["mcrmse_scored"], h["epoch"]) for h in state["history"] if "mcrmse_scored" in h)
        assert [e for _, e in sorted(state["top"])] == [e for _, e in ranked[:2]]
        assert sorted(p.name for p in (fold_dir / "top").iterdir()) == sorted(f"epoch{e}.pt" for _, e in ranked[:2])
        model = torch.load(fold_dir / "model.pt", weights_only=True)["model"]
        if result["averaged_epochs"]:
            assert result["averaged_score"] < result["best_single_score"]
            expected = average_weights([fold_dir / "top" / f"epoch{e}.pt" for _, e in ranked[:2]], torch.device("cpu"))
        else:
            assert result["averaged_score"] >= result["best_single_score"]
            expected = torch.load(fold_dir / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(model[k], expected[k]) for k in expected)
    cv = json.loads((trained_workspace / "oof" / "nt_cv.json").read_text())
    assert all("averaged_epochs" in f and f["val_best_single"] > 0 for f in cv["per_fold"])


def test_validation_slots_spread_over_the_structures():
    from nucleic.config import load_config, with_settings
    from nucleic.train import validation_slots

    cfg = load_config("cpu")
    assert validation_slots(cfg.train, 12) == [0, 6, 11]
    assert validation_slots(with_settings(cfg, **{"train.val_structures": None}).train, 12) == list(range(12))
    assert validation_slots(with_settings(cfg, **{"train.val_structures": 20}).train, 12) == list(range(12))


def test_oof_is_deterministic_for_a_fixed_seed(folded_workspace, trained_workspace, tmp_path):
    again = copy_of(folded_workspace, tmp_path / "again")
    train(again)
    assert (again / "oof" / "nt.csv").read_bytes() == (trained_workspace / "oof" / "nt.csv").read_bytes()


@pytest.mark.parametrize("fast_path", ["train.channels_last=true", "train.bf16=true"])
def test_a_fast_path_keeps_the_oof_score(fast_path, folded_workspace, trained_workspace, tmp_path):
    """Speed settings change the arithmetic, not the model: OOF MCRMSE within 0.001 of plain fp32."""
    workspace = copy_of(folded_workspace, tmp_path / "fast")
    train(workspace, fast_path)
    plain, fast = (json.loads((w / "oof" / "nt_cv.json").read_text()) for w in (trained_workspace, workspace))
    assert fast["config"]["train"][fast_path.split("=")[0].split(".")[1]] is True
    assert abs(fast["mcrmse_scored"] - plain["mcrmse_scored"]) < 0.001, (fast["mcrmse_scored"], plain["mcrmse_scored"])


def test_compiled_inference_keeps_the_oof_score_and_follows_the_weights(trained_workspace):
    """train.compile_inference: fold 0's OOF rows predicted through torch.compile score within 0.001 of
    eager fp32; the compiled graph reads the live weights (a later load_state_dict, as training and the
    averaged checkpoint do, changes its output as it changes eager's), and nothing new is saved."""
    from nucleic.config import load_config, with_settings
    from nucleic.openvaccine import fold_indices, load_training_data
    from nucleic.train import build_model, predict, score_rows

    cfg = load_config("smoke", overrides=[f"paths.{k}={trained_workspace / k}" for k in ("input", "work",
                                                                                        "structures", "oof")])
    _, data, folds = load_training_data(cfg)
    rows = fold_indices(cfg, data, folds, 0)[1]
    rows = rows[data.sn_filter[rows] == 1]
    cpu, eager_tc = torch.device("cpu"), with_settings(cfg, **{"train.compile_inference": False}).train
    compiled_tc = with_settings(cfg, **{"train.compile_inference": True}).train
    fold_dir = trained_workspace / "work" / "smoke" / "models" / "nt"
    model = build_model(cfg.model)
    keys = set(model.state_dict())
    for checkpoint in ("fold0/model.pt", "fold1/model.pt"):  # the second: new weights, same compiled graph
        model.load_state_dict(torch.load(fold_dir / checkpoint, weights_only=True)["model"])
        eager = predict(model, data, rows, cpu, eager_tc)
        compiled = predict(model, data, rows, cpu, compiled_tc)
        assert all(np.allclose(compiled[i], eager[i], atol=1e-4) for i in rows), checkpoint
        scores = [score_rows(data, p, rows)["mcrmse_scored"] for p in (eager, compiled)]
        assert abs(scores[0] - scores[1]) < 0.001, (checkpoint, scores)
    assert "_compiled_for_inference" in model.__dict__ and set(model.state_dict()) == keys


def test_the_cpu_attention_kernel_keeps_the_oof_predictions(folded_workspace):
    """An NT with 16 heads (where the C++ kernel takes over at inference on a CPU) predicts fold 0's real
    OOF rows, eager and compiled, as with torch's attention: within 1e-4, MCRMSE within 0.001."""
    from nucleic.config import load_config, with_settings
    from nucleic.models import cpu_attention
    from nucleic.openvaccine import fold_indices, load_training_data
    from nucleic.train import build_model, predict, score_rows

    if not cpu_attention.available():
        pytest.skip("no C++ compiler for the CPU kernel")
    cfg = load_config("smoke", overrides=[f"paths.{k}={folded_workspace / k}" for k in ("input", "work", "structures",
                                                                                       "oof")])
    _, data, folds = load_training_data(cfg)
    rows = fold_indices(cfg, data, folds, 0)[1]
    torch.manual_seed(0)
    model = build_model(with_settings(cfg, **{"model.nhead": 16}).model)
    cpu, original = torch.device("cpu"), cpu_attention.biased_attention
    calls = []
    predictions = {}
    try:
        cpu_attention.biased_attention = lambda *args: calls.append(1) or original(*args)
        for compiled in (False, True):
            tc = with_settings(cfg, **{"train.compile_inference": compiled, "train.channels_last": True}).train
            predictions[compiled] = predict(model, data, rows, cpu, tc)
    finally:
        cpu_attention.biased_attention = original
    os.environ["NT_CPU_KERNEL"] = "0"
    try:
        plain = predict(model, data, rows, cpu, with_settings(cfg, **{"train.channels_last": True}).train)
    finally:
        del os.environ["NT_CPU_KERNEL"]
    assert calls  # the eager pass went through the kernel (the compiled one calls it from its graph)
    for fast in predictions.values():
        assert all(np.allclose(fast[i], plain[i], atol=1e-4) for i in rows)
        scores = [score_rows(data, p, rows)["mcrmse_scored"] for p in (plain, fast)]
        assert abs(scores[0] - scores[1]) < 0.001, scores


def test_the_cpu_attention_kernel_trains_like_torchs_attention(folded_workspace, tmp_path):
    """Stage 03 with 16 heads (the C++ kernel in training, validation and OOF) and without dropout (so
    the two runs draw the same random numbers): OOF MCRMSE within 0.001 of the same run through torch's
    attention (NT_CPU_KERNEL=0)."""
    from nucleic.models import cpu_attention

    if not cpu_attention.available():
        pytest.skip("no C++ compiler for the CPU kernel")
    scores, predictions = [], []
    for kernel in ("1", "0"):
        workspace = copy_of(folded_workspace, tmp_path / f"kernel{kernel}")
        train(workspace, "model.nhead=16", "model.dropout=0.0", env={"NT_CPU_KERNEL": kernel})
        scores.append(json.loads((workspace / "oof" / "nt_cv.json").read_text())["mcrmse_scored"])
        predictions.append((workspace / "oof" / "nt.csv").read_bytes())
    assert abs(scores[0] - scores[1]) < 0.001, scores
    assert predictions[0] != predictions[1]  # different arithmetic: the first run did go through the kernel


def test_predict_gives_every_row_its_own_length_and_its_alone_prediction(trained_workspace):
    """predict() over test rows of two lengths, several rows per batch: each row gets its (L, 5) mean
    over the structure predictions, or its (2, L, 5) mean and standard deviation, as when it is
    predicted alone (rows of a length share one output buffer: none gets another row's values)."""
    from nucleic.config import load_config, with_settings
    from nucleic.dataset import collate
    from nucleic.openvaccine import load_test_data
    from nucleic.train import build_model, predict

    cfg = load_config("smoke", overrides=[f"paths.{k}={trained_workspace / k}" for k in ("input", "work",
                                                                                        "structures", "oof")])
    tc = with_settings(cfg, **{"train.bf16": False, "train.channels_last": False}).train
    data, cpu = load_test_data(cfg), torch.device("cpu")
    rows = np.arange(len(data))[::-1]  # both lengths, not in length order
    assert len(set(data.lengths[rows])) == 2
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(trained_workspace / "work" / "smoke" / "models" / "nt" / "fold0" / "model.pt",
                                     weights_only=True)["model"])
    means = predict(model, data, rows, cpu, tc)
    moments = predict(model, data, rows, cpu, tc, moments=True)
    slots = np.arange(data.n_slots)
    with torch.inference_mode():
        for i in rows:
            alone = model(**collate(data, np.repeat(i, len(slots)), slots, cpu)).numpy()
            assert means[i].shape == alone.shape[1:] == (data.lengths[i], 5)
            assert moments[i].shape == (2, data.lengths[i], 5)
            np.testing.assert_allclose(means[i], alone.mean(axis=0), atol=1e-5)
            np.testing.assert_allclose(moments[i][0], alone.mean(axis=0), atol=1e-5)
            np.testing.assert_allclose(moments[i][1], alone.std(axis=0), atol=1e-5)


@pytest.mark.parametrize("settings", [(), ("model.nhead=16",)], ids=["smoke", "16 heads: the C++ attention kernel"])
def test_killed_fold_resumes_to_the_same_result(settings, folded_workspace, trained_workspace, tmp_path):
    """With 16 heads the attention trains through the C++ kernel, whose dropout masks come from seeds
    drawn from torch's generator: the resumed run must draw the same ones."""
    if settings:
        from nucleic.models import cpu_attention

        if not cpu_attention.available():
            pytest.skip("no C++ compiler for the CPU kernel")
        trained_workspace = copy_of(folded_workspace, tmp_path / "uninterrupted")
        train(trained_workspace, *settings)
    workspace = copy_of(folded_workspace, tmp_path / "killed")
    last = workspace / "work" / "smoke" / "models" / "nt" / "fold1" / "last.pt"
    sets = [arg for setting in settings for arg in ("--set", setting)]
    proc = subprocess.Popen(train_command(workspace) + sets, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch = torch.load(last, weights_only=False)["state"]["epoch"]
    assert epoch < 3, "the kill should land inside fold 1"
    result = train(workspace, *settings)
    assert f"fold 1: resuming at epoch {epoch}" in result.stdout
    assert (workspace / "oof" / "nt.csv").read_bytes() == (trained_workspace / "oof" / "nt.csv").read_bytes()


def test_folds_on_a_local_dask_cluster_give_the_same_oof(folded_workspace, trained_workspace, tmp_path):
    """cluster.address=local: each fold is one task on a LocalCluster of 2 single-threaded workers; the OOF
    file is byte-identical to the single-process run's."""
    workspace = copy_of(folded_workspace, tmp_path / "cluster")
    train(workspace, "cluster.address=local", "cluster.local_workers=2")
    assert (workspace / "oof" / "nt.csv").read_bytes() == (trained_workspace / "oof" / "nt.csv").read_bytes()


def test_only_folds_shares_then_a_plain_run_equal_one_full_run(folded_workspace, trained_workspace, tmp_path):
    """A job array's shares (train.only_folds) train their folds and complete nothing; the plain run after
    them trains nothing more and writes the full run's OOF."""
    workspace = copy_of(folded_workspace, tmp_path / "shares")
    folder, manifest = workspace / "work" / "smoke" / "models" / "nt", workspace / "work" / "smoke" / "manifests"
    train(workspace, "train.only_folds=[]")  # readies what the shares would write together
    assert (workspace / "oof" / "folds.csv").exists() and (folder / "settings.json").exists()
    assert not list(folder.glob("fold*"))
    train(workspace, "train.only_folds=[2, 0]")
    assert (folder / "fold0" / "model.pt").exists() and (folder / "fold2" / "model.pt").exists()
    assert not (folder / "fold1").exists()
    assert not (workspace / "oof" / "nt.csv").exists() and not (manifest / "03_train_folds.json").exists()
    train(workspace, "train.only_folds=[1]")
    assert not (workspace / "oof" / "nt.csv").exists()
    trained = {p: p.stat().st_mtime_ns for p in folder.glob("fold*/model.pt")}
    train(workspace)
    assert {p: p.stat().st_mtime_ns for p in folder.glob("fold*/model.pt")} == trained  # nothing retrained
    assert (workspace / "oof" / "nt.csv").read_bytes() == (trained_workspace / "oof" / "nt.csv").read_bytes()
    assert (manifest / "03_train_folds.json").exists()


def test_only_folds_outside_the_folds_is_one_clear_error(folded_workspace, tmp_path):
    workspace = copy_of(folded_workspace, tmp_path / "wrong")
    result = subprocess.run(train_command(workspace) + ["--set", "train.only_folds=[3]"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ERROR [03_train_folds] train.only_folds: must list fold numbers from 0 to 2, got [3]"]
    assert not (workspace / "work" / "smoke" / "models").exists()


def test_changed_settings_retrain_from_scratch(trained_workspace, tmp_path):
    workspace = copy_of(trained_workspace, tmp_path / "changed")
    folder = workspace / "work" / "smoke" / "models" / "nt"
    result = subprocess.run(train_command(workspace) + ["--set", "train.epochs=4"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "trained with other settings; retraining from scratch" in result.stdout
    assert "resuming" not in result.stdout
    assert json.loads((folder / "settings.json").read_text())["train"]["epochs"] == 4
    history = torch.load(folder / "fold0" / "last.pt", weights_only=False)["state"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def predicted_workspace(trained_workspace):
    kernel = load_kernel("06_predict")
    assert kernel.main(["--preset", "smoke", *isolated(trained_workspace), "--set", "train.threads=1"]) == 0
    return trained_workspace


def test_predict_writes_a_checked_submission(predicted_workspace):
    submission = pd.read_csv(predicted_workspace / "submissions" / "nt.csv")
    test = read_pickle(predicted_workspace / "work" / "smoke" / "prepared" / "test.pkl")
    assert len(submission) == test.seq_length.sum() == 10 * 107 + 10 * 130
    assert submission.iloc[:, 1:].notna().all().all()


def test_test_predictions_on_a_local_dask_cluster_give_the_same_submission(predicted_workspace, tmp_path):
    """Stage 06 with cluster.address=local: each fold's test predictions are one task; same CSV bytes."""
    workspace = copy_of(predicted_workspace, tmp_path / "cluster")
    for cache in (workspace / "work" / "smoke" / "models" / "nt").glob("fold*/test_moments.pkl"):
        cache.unlink()
    kernel = load_kernel("06_predict")
    assert kernel.main(["--preset", "smoke", *isolated(workspace), "--set", "train.threads=1", "--force",
                        "--set", "cluster.address=local", "--set", "cluster.local_workers=2"]) == 0
    assert len(list(workspace.glob("work/smoke/models/nt/fold*/test_moments.pkl"))) == 3
    submission = ("submissions", "nt.csv")
    assert workspace.joinpath(*submission).read_bytes() == predicted_workspace.joinpath(*submission).read_bytes()


def test_ensemble_blends_models_and_never_loses_to_the_best(predicted_workspace, tmp_path):
    workspace = copy_of(predicted_workspace, tmp_path / "blend")
    rng = np.random.default_rng(0)
    for kind in ("oof", "submissions"):  # a second, noisier model beside nt
        frame = pd.read_csv(workspace / kind / "nt.csv")
        frame.iloc[:, 1:] += rng.normal(0, 0.3, size=frame.iloc[:, 1:].shape)
        frame.to_csv(workspace / kind / "noisy.csv", index=False)
    # pseudo-labels off: stage 07 would otherwise first bring its upstream stages 04-05 up to date
    assert load_kernel("07_ensemble").main(["--preset", "smoke", *isolated(workspace),
                                            "--set", "pseudo.depths=[]"]) == 0
    report = json.loads((workspace / "oof" / "ensemble.json").read_text())
    assert sorted(report["members"]) == ["noisy", "nt"]
    best = min(m["mcrmse_scored"] for m in report["members"].values())
    assert report["blend"]["mcrmse_scored"] <= best + 1e-9
    assert all(w >= 0 for column in report["weights"].values() for w in column.values())
    assert report["weights"]["reactivity"]["nt"] > report["weights"]["reactivity"]["noisy"]
    blend = pd.read_csv(workspace / "oof" / "oof_ensemble.csv")
    assert len(blend) == len(pd.read_csv(workspace / "oof" / "nt.csv"))
    submission = pd.read_csv(workspace / "submissions" / "submission.csv")
    assert len(submission) == 10 * 107 + 10 * 130 and np.isfinite(submission.iloc[:, 1:].to_numpy()).all()


def test_bf16_setting_follows_the_device(monkeypatch):
    """train.bf16 = auto turns autocast on only where bf16 is native: emulated bf16 is ~10x slower than fp32."""
    from nucleic.engine import autocast, use_bf16

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert use_bf16(cpu, "auto") is native
        with autocast(cpu, "auto"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    assert use_bf16(cpu, True) is True and use_bf16(cpu, False) is False
    with pytest.raises(ValueError, match="bf16 must be true, false or auto"):
        use_bf16(cpu, "yes")
