"""Blend weights: non-negative, per column, never worse than the best member on the data they fit."""
from __future__ import annotations

import numpy as np
import pandas as pd

from src.data import TARGETS
from src.ensemble import apply_weights, fit_weights, oof_scores


def test_blend_beats_each_member_and_ignores_a_useless_one():
    rng = np.random.default_rng(1)
    ids = [f"id_{i}" for i in range(400)]
    truth = pd.DataFrame(rng.normal(size=(400, 5)), columns=TARGETS, index=pd.Index(ids, name="id_seqpos"))
    members = {
        "a": truth + rng.normal(0, 0.5, size=truth.shape),
        "b": truth + rng.normal(0, 0.5, size=truth.shape),
        "anti": -truth,  # anti-correlated: a non-negative blend must not use it
    }
    weights = fit_weights(truth, members)
    for column in TARGETS:
        assert weights[column]["anti"] == 0
        assert weights[column]["a"] > 0.3 and weights[column]["b"] > 0.3
    frames = {m: f.reset_index() for m, f in members.items()}
    blend = apply_weights(frames, weights).set_index("id_seqpos")
    blended = oof_scores(truth, blend)["mcrmse_all5"]
    assert blended < min(oof_scores(truth, m)["mcrmse_all5"] for m in members.values()) - 0.05
