"""Stage 07: blend every model that has both OOF predictions and a submission.

Per target column, non-negative weights minimise the OOF RMSE over SN_filter == 1 rows (non-negative
least squares), so the blend's OOF MCRMSE is never worse than its best member's: every member
alone is one of the candidate weightings. That in-sample score is optimistic; the report also gives
the nested score (each fold blended with weights fitted on the other folds), the honest estimate.
The submission uses the weights fitted on all rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from .config import Config, Paths
from .data import SCORED_TARGETS, TARGETS
from .io_utils import read_pickle, write_csv, write_json
from .metrics import columnwise_rmse
from .stage import InputError, artifact_meta
from .submission import ID_COLUMN, check_submission

ENSEMBLE_OOF = "oof_ensemble.csv"


def blend_members(paths: Paths) -> list[str]:
    """Models with oof/<model>.csv and submissions/<model>.csv, sorted by name."""
    reserved = {"folds", Path(ENSEMBLE_OOF).stem}
    oof = {p.stem for p in paths.oof.glob("*.csv")} - reserved
    return sorted(m for m in oof if (paths.submissions / f"{m}.csv").exists())


def scored_truth(train: pd.DataFrame) -> pd.DataFrame:
    """Labels of the SN_filter == 1 rows, one row per scored position, indexed by id_seqpos."""
    rows = train[train.SN_filter == 1]
    keys = [f"{rid}_{p}" for rid, n in zip(rows.id, rows.seq_scored) for p in range(n)]
    return pd.DataFrame(np.concatenate(list(rows.targets)), columns=TARGETS, index=pd.Index(keys, name=ID_COLUMN))


def fit_weights(truth: pd.DataFrame, members: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """{column: {model: weight >= 0}} minimising each column's RMSE."""
    weights = {}
    for column in TARGETS:
        design = np.column_stack([members[m].loc[truth.index, column].to_numpy() for m in members])
        solution, _ = nnls(design, truth[column].to_numpy())
        weights[column] = dict(zip(members, solution.tolist()))
    return weights


def apply_weights(frames: dict[str, pd.DataFrame], weights: dict[str, dict[str, float]]) -> pd.DataFrame:
    first = next(iter(frames.values()))
    blended = pd.DataFrame({ID_COLUMN: first[ID_COLUMN].to_numpy()})
    for column in TARGETS:
        blended[column] = sum(w * frames[m][column].to_numpy() for m, w in weights[column].items())
    return blended


def oof_scores(truth: pd.DataFrame, prediction: pd.DataFrame) -> dict:
    rmse = columnwise_rmse(truth[TARGETS].to_numpy(), prediction.loc[truth.index, TARGETS].to_numpy())
    per_column = dict(zip(TARGETS, rmse.tolist()))
    return {"mcrmse_scored": float(np.mean([per_column[c] for c in SCORED_TARGETS])),
            "mcrmse_all5": float(np.mean(rmse)), "rmse_per_column": per_column}


def nested_blend(truth: pd.DataFrame, members: dict[str, pd.DataFrame], fold_of_row: pd.Series) -> pd.DataFrame:
    """Honest blend OOF: each fold's rows get weights fitted on the other folds' rows only.
    fold_of_row maps each truth row (id_seqpos) to its fold."""
    blended = []
    for fold in np.unique(fold_of_row):
        held_out = truth.index[fold_of_row.to_numpy() == fold]
        fitted = fit_weights(truth.loc[truth.index.difference(held_out)], members)
        rows = {m: f.loc[held_out].reset_index() for m, f in members.items()}
        blended.append(apply_weights(rows, fitted).set_index(ID_COLUMN))
    return pd.concat(blended).loc[truth.index]


def _read_aligned(path: Path, ids: pd.Index | list[str]) -> pd.DataFrame:
    frame = pd.read_csv(path).set_index(ID_COLUMN)
    missing = pd.Index(ids).difference(frame.index)
    if len(missing):
        raise InputError(path, f"lacks {len(missing)} rows, e.g. {ID_COLUMN} '{missing[0]}'")
    return frame.loc[ids].reset_index()


def ensemble_key(cfg: Config) -> dict:
    paths = Paths(cfg)
    members = blend_members(paths)
    stamp = lambda p: [p.stat().st_size, p.stat().st_mtime_ns]
    return {"members": {m: [stamp(paths.oof / f"{m}.csv"), stamp(paths.submissions / f"{m}.csv")] for m in members}}


def ensemble(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    paths = Paths(cfg)
    models = blend_members(paths)
    if not models:
        raise InputError(paths.oof, "no model has both oof/<model>.csv and submissions/<model>.csv: "
                         "run stages 03 and 06 first")
    train = read_pickle(paths.prepared / "train.pkl")
    test = read_pickle(paths.prepared / "test.pkl")
    truth = scored_truth(train)
    oof_ids = [f"{rid}_{p}" for rid, n in zip(train.id, train.seq_scored) for p in range(n)]
    oofs = {m: _read_aligned(paths.oof / f"{m}.csv", oof_ids) for m in models}
    test_ids = pd.read_csv(paths.submissions / f"{models[0]}.csv")[ID_COLUMN]
    subs = {m: _read_aligned(paths.submissions / f"{m}.csv", test_ids) for m in models}
    indexed = {m: f.set_index(ID_COLUMN) for m, f in oofs.items()}
    weights = fit_weights(truth, indexed)
    blend_oof = apply_weights(oofs, weights)
    fold_of_id = pd.read_csv(paths.oof / "folds.csv").set_index("id").fold
    fold_of_row = fold_of_id.loc[[key.rsplit("_", 1)[0] for key in truth.index]]
    nested = nested_blend(truth, indexed, fold_of_row)
    report = {"members": {m: oof_scores(truth, indexed[m]) for m in models}, "weights": weights,
              "blend": oof_scores(truth, blend_oof.set_index(ID_COLUMN)),
              "blend_nested": {**oof_scores(truth, nested),
                               "note": "each fold's rows blended with weights fitted on the other folds "
                                       "(oof/folds.csv); 'blend' fits and scores on the same rows"},
              **artifact_meta(cfg)}
    oof_path, json_path = paths.oof / ENSEMBLE_OOF, paths.oof / "ensemble.json"
    submission = paths.submissions / "submission.csv"
    write_csv(oof_path, blend_oof)
    write_csv(submission, apply_weights(subs, weights))
    check_submission(submission, test)
    write_json(json_path, report)
    best = min(report["members"].values(), key=lambda s: s["mcrmse_scored"])["mcrmse_scored"]
    return [oof_path, json_path, submission], {"models": models, "blend_mcrmse_scored":
                                                round(report["blend"]["mcrmse_scored"], 5),
                                                "blend_nested_mcrmse_scored":
                                                round(report["blend_nested"]["mcrmse_scored"], 5),
                                                "best_member_mcrmse_scored": round(best, 5)}
