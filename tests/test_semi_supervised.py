"""Pseudo-labels: teacher moments combine into one mean and spread, the spread weights the loss as
0.5 + exp(-25 std), mixed label lengths never share a batch, and changed semi settings retrain."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nucleic.config import load_config, with_settings
from nucleic.dataset import RNATensors, length_batches
from nucleic.losses import error_weights
from nucleic.openvaccine import _claim_model_dir, model_dir
from nucleic.semi_supervised import combine_teachers, with_pseudo_labels
from nucleic.train import epoch_rows


def test_teacher_moments_combine_into_the_spread_of_every_sample():
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(12, 130, 5)) for _ in range(3)]  # 3 teachers x 12 structure predictions
    moments = [{0: np.stack([s.mean(axis=0), s.std(axis=0)])} for s in samples]
    combined = combine_teachers(moments, 91)[0]
    everything = np.concatenate(samples)[:, :91]
    assert combined.shape == (2, 91, 5)
    assert np.allclose(combined[0], everything.mean(axis=0), atol=1e-5)
    assert np.allclose(combined[1], everything.std(axis=0), atol=1e-5)
    short = combine_teachers([{0: m[0][:, :, :107]} for m in moments], 91)  # 107-nt rows: 91 of 107
    assert short[0].shape == (2, 91, 5)


def rows(n: int, length: int, scored: int) -> RNATensors:
    return RNATensors(
        ids=[f"r{length}_{i}" for i in range(n)], sequence=[np.zeros(length, np.int64)] * n,
        structure=[np.zeros((1, length), np.int64)] * n, loop=[np.zeros((1, length), np.int64)] * n,
        bpp=[np.zeros((1, length, length), np.float16)] * n, seq_scored=np.full(n, scored),
        targets=[np.zeros((scored, 5), np.float32)] * n, errors=[np.zeros((scored, 5), np.float32)] * n,
        signal_to_noise=np.full(n, 5.0), sn_filter=np.ones(n, np.int64))


def test_pseudo_rows_weigh_by_their_spread_and_batch_apart():
    train, test = rows(6, 107, 68), rows(4, 107, 0)
    std = np.full((91, 5), 0.02, np.float32)
    labels = {i: np.stack([np.ones((91, 5), np.float32), std]) for i in range(4)}
    combined = with_pseudo_labels(train, test, labels, error_scale=25.0 / 5.0)
    assert len(combined) == 10 and list(combined.seq_scored) == [68] * 6 + [91] * 4
    weights = error_weights(torch.from_numpy(combined.errors[6]), 0.5, 5.0)
    assert torch.allclose(weights, torch.full((91, 5), 0.5 + np.exp(-25 * 0.02)))
    assert list(combined.sn_filter[6:]) == [0] * 4  # never validated on
    for batch in length_batches(combined.batch_groups, np.arange(10), 16, np.random.default_rng(0)):
        assert len({len(combined.targets[i]) for i in batch}) == 1


def test_each_epoch_draws_its_own_pseudo_rows():
    train_idx, pool = np.arange(10), np.arange(10, 50)
    first = epoch_rows(train_idx, (pool, 5), np.random.default_rng(1))
    second = epoch_rows(train_idx, (pool, 5), np.random.default_rng(2))
    assert len(first) == 15 and set(first[:10]) == set(train_idx) and set(first[10:]) <= set(pool)
    assert set(first[10:]) != set(second[10:])
    assert list(epoch_rows(train_idx, None, np.random.default_rng(1))) == list(train_idx)


def test_changed_semi_settings_retrain_from_scratch(tmp_path, capsys):
    cfg = with_settings(load_config("smoke"), **{"paths.work": str(tmp_path), "model.name": "nt_semi"})
    folder = _claim_model_dir(cfg, False, {"semi": {"finetune_epochs": 2}, "pseudo_labels": "abc"})
    (folder / "fold0").mkdir()
    assert _claim_model_dir(cfg, False, {"semi": {"finetune_epochs": 2}, "pseudo_labels": "abc"}) == folder
    assert (folder / "fold0").exists() and "retraining" not in capsys.readouterr().out
    _claim_model_dir(cfg, False, {"semi": {"finetune_epochs": 2}, "pseudo_labels": "abd"})
    assert not (folder / "fold0").exists() and "retraining from scratch" in capsys.readouterr().out
    assert json.loads((model_dir(cfg) / "settings.json").read_text())["pseudo_labels"] == "abd"


def test_phase_two_starts_where_semi_phase2_from_says(tmp_path):
    """best: phase 1's validated model.pt (the file stage 03 and the OOF use); last: its last epoch's
    checkpoint, which train_fold loads like any start (a "model" entry); anything else: one clear error."""
    from nucleic.semi_supervised import phase2_start
    from nucleic.stage import InputError

    cfg = load_config("smoke")
    assert cfg.semi.phase2_from == "best"
    assert phase2_start(cfg.semi, tmp_path) == tmp_path / "model.pt"
    assert phase2_start(with_settings(cfg, **{"semi.phase2_from": "last"}).semi, tmp_path) == tmp_path / "last.pt"
    with pytest.raises(InputError, match="must be best or last"):
        phase2_start(with_settings(cfg, **{"semi.phase2_from": "first"}).semi, tmp_path)
