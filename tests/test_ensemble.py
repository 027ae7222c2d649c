"""Blend weights: non-negative, per column, never worse than the best member on the data they fit."""
from __future__ import annotations

import numpy as np
import pandas as pd

from nucleic.data import TARGETS
from nucleic.ensemble import apply_weights, fit_weights, oof_scores


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


def test_nested_blend_scores_each_fold_with_weights_from_the_others():
    from nucleic.ensemble import nested_blend

    rng = np.random.default_rng(2)
    ids = [f"r{i // 10}_{i % 10}" for i in range(600)]
    truth = pd.DataFrame(rng.normal(size=(600, 5)), columns=TARGETS, index=pd.Index(ids, name="id_seqpos"))
    members = {"a": truth + rng.normal(0, 0.5, size=truth.shape), "noise": pd.DataFrame(
        rng.normal(size=truth.shape), columns=TARGETS, index=truth.index)}
    folds = pd.Series([int(k[1:].split("_")[0]) % 3 for k in ids], index=truth.index)
    nested = nested_blend(truth, members, folds)
    in_sample = apply_weights({m: f.reset_index() for m, f in members.items()},
                              fit_weights(truth, members)).set_index("id_seqpos")
    assert list(nested.index) == ids
    # fold 0's rows use exactly the weights fitted on folds 1 and 2
    others = truth.index[folds.to_numpy() != 0]
    w = fit_weights(truth.loc[others], members)
    row = ids[0]
    expected = sum(w["reactivity"][m] * members[m].loc[row, "reactivity"] for m in members)
    assert abs(nested.loc[row, "reactivity"] - expected) < 1e-12
    assert not np.allclose(nested.to_numpy(), in_sample.loc[ids].to_numpy())
