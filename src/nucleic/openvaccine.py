"""OpenVaccine stages built on the training loop: K-fold training with OOF scoring (stage 03) and test
prediction into a Kaggle submission (stage 06)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .cluster import map_units, unit_device
from .config import Config, Paths
from .data import SCORED_COLUMNS, TARGETS
from .dataset import RNATensors, load_rna_tensors
from .engine import read_checkpoint, setup_device
from .io_utils import read_cache, read_pickle, write_csv, write_json, write_pickle
from .metrics import columnwise_rmse
from .stage import InputError, artifact_meta, claim_work_dir
from .structures import StructureStore
from .submission import check_submission, predictions_frame
from .train import build_model, final_model_path, finished_fold, predict, score_rows, train_fold


def read_prepared(cfg: Config, split: str) -> pd.DataFrame:
    path = Paths(cfg).prepared / f"{split}.pkl"
    if not path.exists():
        raise InputError(path, "not found: run stage 00 (prepare_input) first")
    return read_pickle(path)


def ensure_folds(path: Path, ids: list[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold of every training row, made once (KFold, shuffled by seed) and shared by every model."""
    from sklearn.model_selection import KFold

    if path.exists():
        saved = pd.read_csv(path)
        if list(saved.id) != list(ids) or saved.fold.nunique() != n_folds:
            raise InputError(path, f"holds folds for other rows or another K (wanted K={n_folds} over "
                             f"{len(ids)} rows): move it away to make new folds")
        return saved.fold.to_numpy()
    folds = np.zeros(len(ids), dtype=np.int64)
    for fold, (_, val) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(ids)):
        folds[val] = fold
    write_csv(path, pd.DataFrame({"id": ids, "fold": folds}))
    return folds


def model_dir(cfg: Config) -> Path:
    return Paths(cfg).run / "models" / cfg.model.name


def training_settings(cfg: Config) -> dict:
    settings = {"model": dict(cfg.model), "seed": cfg.seed,
                "train": {k: v for k, v in dict(cfg.train).items()
                          if k not in ("device", "threads", "eval_batch_size", "channels_last", "only_folds",
                                       "compile_inference")},
                "fold": {k: v for k, v in dict(cfg.fold).items() if k != "n_jobs"}}
    if cfg.pretrain.enabled:
        settings["pretrain"] = dict(cfg.pretrain)
    return settings


def initial_weights(cfg: Config) -> Path | None:
    """Stage 02's encoder when pretraining is on, else train.init_weights (or nothing)."""
    if cfg.pretrain.enabled:
        from .pretrain import pretrain_checkpoint

        path = pretrain_checkpoint(cfg)
        if not path.exists():
            raise InputError(path, "not found: run stage 02 (pretrain) first, or set pretrain.enabled=false")
        return path
    return Path(cfg.train.init_weights) if cfg.train.init_weights else None


def _claim_model_dir(cfg: Config, force: bool, extra: dict | None = None) -> Path:
    """The model's checkpoint folder. Checkpoints made under other settings (training settings plus
    `extra`, e.g. semi.* and the pseudo-labels' hash) are removed: the model retrains from scratch."""
    return claim_work_dir(model_dir(cfg), {**training_settings(cfg), **(extra or {})}, force)


def train_key(cfg: Config) -> dict:
    prepared = Paths(cfg).prepared / "meta.json"
    return {**training_settings(cfg), "prepared": prepared.read_text() if prepared.exists() else None}


def load_training_data(cfg: Config):
    """(train table, its tensors, fold of every row) for the K-fold stages."""
    frame = read_prepared(cfg, "train")
    data = load_rna_tensors(frame, StructureStore(Paths(cfg).structures, cfg.fold))
    folds = ensure_folds(Paths(cfg).oof / "folds.csv", list(frame.id), cfg.train.folds, cfg.seed)
    return frame, data, folds


def fold_indices(cfg: Config, data, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows to train on (other folds, signal_to_noise > noise_filter) and the rows of this fold."""
    trainable = data.signal_to_noise > cfg.train.noise_filter
    return np.flatnonzero((folds != fold) & trainable), np.flatnonzero(folds == fold)


def selected_folds(cfg: Config) -> list[int]:
    """The folds this run trains: train.only_folds (a job array's share; [] trains none, only readies the
    files the shares write together: folds.csv, the model folder's stamp), else all of them."""
    chosen = cfg.train.only_folds
    if chosen is None:
        return list(range(cfg.train.folds))
    wrong = [f for f in chosen if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < cfg.train.folds]
    if wrong:
        raise InputError("train.only_folds", f"must list fold numbers from 0 to {cfg.train.folds - 1}, got {chosen!r}")
    return sorted(set(chosen))


def partial_run(cfg: Config, done: list[int]) -> tuple[list[Path], dict]:
    """What a train.only_folds run reports: no OOF files and no manifest (a plain run aggregates)."""
    return [], {"partial": True, "folds_trained": done,
                "next": "run the stage without train.only_folds to aggregate once every fold is trained"}


def train_fold_unit(cfg: Config, fold: int, init: Path | None, loaded: tuple | None = None) -> dict:
    """One (model, fold) of training: a unit of work, which on a cluster worker loads its own data."""
    fold_dir = model_dir(cfg) / f"fold{fold}"
    if loaded is None:
        finished = finished_fold(fold_dir)
        if finished is not None:
            return finished
        device = unit_device(cfg.train)
        _, data, folds = load_training_data(cfg)
    else:
        data, folds, device = loaded
    return train_fold(cfg, data, fold, *fold_indices(cfg, data, folds, fold), fold_dir, device, init)


def fold_units(cfg: Config, force: bool = False) -> list[tuple]:
    """The training units of one K-fold model, its folder claimed first (stale checkpoints removed)."""
    chosen = selected_folds(cfg)
    _claim_model_dir(cfg, force)
    init = initial_weights(cfg)
    return [(cfg, fold, init) for fold in chosen]


def train_folds(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    start = time.time()
    device = setup_device(cfg.train)
    frame, data, folds = load_training_data(cfg)
    units = fold_units(cfg, force)
    results = map_units(train_fold_unit, units, {"loaded": (data, folds, device)})
    if cfg.train.only_folds is not None:
        return partial_run(cfg, [fold for _, fold, _ in units])
    return write_training_outputs(cfg, data, frame, results, device, start)


def write_training_outputs(cfg: Config, data, frame: pd.DataFrame, results: list[dict], device,
                           start: float) -> tuple[list[Path], dict]:
    """OOF CSV, cv.json and figures of a finished K-fold model."""
    from .plots import plot_attention, plot_learning_curves, plot_oof_error

    paths, name = Paths(cfg), cfg.model.name
    oof = {i: p for r in results for i, p in r["oof"].items()}
    oof_csv = paths.oof / f"{name}.csv"
    write_csv(oof_csv, predictions_frame([data.ids[i] for i in range(len(frame))],
                                         [oof[i] for i in range(len(frame))], list(data.seq_scored[:len(frame)])))
    cv = cv_report(data, oof, results, frame)
    cv.update(model=name, wall_time_s=round(time.time() - start, 1), device=str(device), **artifact_meta(cfg))
    cv_json = paths.oof / f"{name}_cv.json"
    write_json(cv_json, cv)
    figures = [paths.figures / f"{name}_learning_curves.png", paths.figures / f"{name}_oof_error.png",
               paths.figures / f"{name}_attention.png"]
    plot_learning_curves(figures[0], name, [r["history"] for r in results])
    plot_oof_error(figures[1], name, data, oof, frame)
    model = build_model(cfg.model).to(device)
    fold0 = final_model_path(model_dir(cfg) / "fold0")
    model.load_state_dict(read_checkpoint(fold0, device)["model"])
    plot_attention(figures[2], model, data, int(results[0]["val_idx"][0]), device)
    summary = {"oof_mcrmse_scored": round(cv["mcrmse_scored"], 5), "oof_mcrmse_all5": round(cv["mcrmse_all5"], 5)}
    fold_files = [model_dir(cfg) / f"fold{r['fold']}" / name for r in results for name in ("model.pt", "result.pkl")]
    return [oof_csv, cv_json, paths.oof / "folds.csv", *figures, *fold_files], summary


def cv_report(data, oof: dict, results: list[dict], frame: pd.DataFrame) -> dict:
    """OOF MCRMSE on SN_filter == 1 rows: 3 scored columns and all 5, overall and per fold."""
    scored = np.flatnonzero(data.sn_filter[:len(frame)] == 1)
    truth = np.concatenate([data.targets[i] for i in scored])
    pred = np.concatenate([oof[i][:data.seq_scored[i]] for i in scored])
    per_fold = []
    for r in results:
        rows = np.asarray([i for i in r["val_idx"] if data.sn_filter[i] == 1])
        per_fold.append({"fold": r["fold"], "best_epoch": r["best_epoch"],
                         "averaged_epochs": r.get("averaged_epochs"), "n_scored_rows": len(rows),
                         "val_best_single": r.get("best_single_score"), "val_averaged": r.get("averaged_score"),
                         **score_rows(data, oof, rows)})
    overall = score_rows(data, oof, scored)
    return {**overall, "n_scored_rows": len(scored), "n_rows": len(data),
            "rmse_per_column": dict(zip(TARGETS, columnwise_rmse(truth, pred).round(5).tolist())),
            "scored_columns": [TARGETS[c] for c in SCORED_COLUMNS], "per_fold": per_fold}


def predict_key(cfg: Config) -> dict:
    cv = Paths(cfg).oof / f"{cfg.model.name}_cv.json"
    return {"cv": json.loads(cv.read_text()).get("git_commit") if cv.exists() else None,
            "settings": training_settings(cfg), "prepared": train_key(cfg)["prepared"]}


def test_moments_path(cfg: Config, fold: int) -> Path:
    return model_dir(cfg) / f"fold{fold}" / "test_moments.pkl"


def fold_test_moments(cfg: Config, fold: int, data, device, force: bool = False) -> dict[int, np.ndarray]:
    """{test index: (2, L, 5)}: mean and standard deviation over the 12 structure predictions of
    fold `fold`'s model, cached in its folder (test_moments_path)."""
    fold_dir, cache = model_dir(cfg) / f"fold{fold}", test_moments_path(cfg, fold)
    cached = None if force else read_cache(cache)
    if cached is not None:
        return cached
    model = build_model(cfg.model).to(device)
    model.load_state_dict(read_checkpoint(final_model_path(fold_dir), device)["model"])
    moments = predict(model, data, np.arange(len(data)), device, cfg.train, desc=f"test fold {fold}", moments=True)
    write_pickle(cache, moments)
    return moments


def load_test_data(cfg: Config) -> RNATensors:
    return load_rna_tensors(read_prepared(cfg, "test"), StructureStore(Paths(cfg).structures, cfg.fold))


def test_moments_unit(cfg: Config, fold: int, force: bool, loaded: tuple | None = None) -> dict[int, np.ndarray]:
    """fold_test_moments as a unit of work, which on a cluster worker loads the test set itself."""
    if loaded is None:
        cached = None if force else read_cache(test_moments_path(cfg, fold))
        if cached is not None:
            return cached
        device = unit_device(cfg.train)
        loaded = (load_test_data(cfg), device)
    return fold_test_moments(cfg, fold, *loaded, force)


def predict_test(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Average every fold's model.pt (its best checkpoint, or the average of its best ones) over the
    test set; write and check the submission."""
    paths, tc = Paths(cfg), cfg.train
    device = setup_device(tc)
    folder = model_dir(cfg)
    checkpoints = [final_model_path(folder / f"fold{f}") for f in range(tc.folds)]
    missing = [c for c in checkpoints if not c.exists()]
    if missing:
        raise InputError(missing[0], "not found: run stage 03 (train_folds) first")
    data = load_test_data(cfg)
    everything = np.arange(len(data))
    moments = map_units(test_moments_unit, [(cfg, fold, force) for fold in range(tc.folds)], {"loaded": (data, device)})
    fold_predictions = [{i: m[0] for i, m in fold.items()} for fold in moments]
    mean = [np.mean([p[i] for p in fold_predictions], axis=0) for i in everything]
    submission = paths.submissions / f"{cfg.model.name}.csv"
    write_csv(submission, predictions_frame(list(data.ids), mean, [len(s) for s in data.sequence]))
    rows = check_submission(submission, read_prepared(cfg, "test"))
    return [submission], {"rows": rows, "folds_averaged": len(checkpoints)}
