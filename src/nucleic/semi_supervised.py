"""Semi-supervised learning (paper 2.3.3, 3.3.2): stage 04 labels the test set with an ensemble of NT
depths, stage 05 trains on those pseudo-labels plus the training fold, then on ground truth.

Honest OOF: the pseudo-labels used while training fold f come only from the fold-f models of every
depth (the teachers), which never saw fold f's labels, so fold f's OOF predictions stay out-of-fold.

Each pseudo-label carries an uncertainty: the standard deviation of the teachers' predictions across
teachers x the 12 structure predictions. Positions are weighted by 0.5 + exp(-pseudo.uncertainty_beta
* std) (the reference solution's weighting), through the same error-weighted loss as the labels.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cluster import current_client, map_units, unit_device
from .config import Config, Paths, with_settings
from .dataset import RNATensors
from .engine import setup_device
from .io_utils import read_pickle, write_csv, write_json, write_pickle
from .openvaccine import (
    _claim_model_dir,
    fold_indices,
    fold_units,
    initial_weights,
    load_test_data,
    load_training_data,
    model_dir,
    partial_run,
    predict_key,
    predict_test,
    selected_folds,
    test_moments_unit,
    train_fold_unit,
    train_folds,
    train_key,
    training_settings,
    write_training_outputs,
)
from .stage import InputError, artifact_meta, ensure_stage, stage_needed
from .submission import predictions_frame
from .train import final_model_path, finished_fold, train_fold


def depth_models(cfg: Config) -> list[Config]:
    """One config per depth k = nlayer in pseudo.depths; the preset's own depth is stage 03's model."""
    return [with_settings(cfg, **{"model.nlayer": depth,
                                  "model.name": cfg.model.name if depth == cfg.model.nlayer
                                  else f"{cfg.model.name}_k{depth}"})
            for depth in cfg.pseudo.depths]


def model_stage(cfg: Config, model_cfg: Config, stage: str) -> str:
    """Manifest name of `stage`'s work for a depth model: the stage itself for the preset's own model."""
    return stage if model_cfg.model.name == cfg.model.name else f"{stage}.{model_cfg.model.name}"


def pseudo_label_path(cfg: Config, fold: int) -> Path:
    return Paths(cfg).run / "pseudo_labels" / f"fold{fold}.pkl"


def pseudo_key(cfg: Config) -> dict:
    return {"models": [training_settings(m) for m in depth_models(cfg)], "pseudo": dict(cfg.pseudo),
            "prepared": _prepared_meta(cfg)}


def _prepared_meta(cfg: Config) -> str | None:
    meta = Paths(cfg).prepared / "meta.json"
    return meta.read_text() if meta.exists() else None


def combine_teachers(moments: list[dict[int, np.ndarray]], positions: int) -> dict[int, np.ndarray]:
    """{index: (2, P, 5)}: mean and standard deviation over teachers x structure predictions of the
    first P = min(positions, L) positions, from each teacher's per-structure (mean, std)."""
    combined = {}
    for i in moments[0]:
        stacked = np.stack([m[i][:, :positions] for m in moments])  # (teachers, 2, P, 5)
        mean = stacked[:, 0].mean(axis=0)
        second = (stacked[:, 1] ** 2 + stacked[:, 0] ** 2).mean(axis=0)
        combined[i] = np.stack([mean, np.sqrt(np.maximum(second - mean ** 2, 0.0))]).astype(np.float32)
    return combined


def fold_pseudo_labels(cfg: Config, fold: int, test: RNATensors, device, force: bool = False) -> dict:
    """Fold f's pseudo-labels from the fold-f model of every depth (trained by stage 04 if missing)."""
    return pseudo_labels_of_folds(cfg, [fold], test, device, force)[0]


def pseudo_labels_of_folds(cfg: Config, folds: list[int], test: RNATensors, device, force: bool = False) -> list[dict]:
    """fold_pseudo_labels of each fold; every (depth model, fold) test prediction is one unit of work."""
    models = depth_models(cfg)
    units = [(model_cfg, fold, force) for fold in folds for model_cfg in models]
    moments = map_units(test_moments_unit, units, {"loaded": (test, device)})
    n = len(models)
    return [combine_teachers(moments[i * n:(i + 1) * n], cfg.pseudo.positions) for i in range(len(folds))]


def ensure_pretrained(cfg: Config, models: list[Config]) -> None:
    """Stage 02 for every other depth model when pretraining is on: each depth starts from its own
    pretrained encoder, as the preset's own model starts from stage 02's."""
    if not cfg.pretrain.enabled:
        return
    from .pretrain import pretrain_key, run_pretraining

    for model_cfg in models:
        if model_cfg.model.name != cfg.model.name:
            ensure_stage(model_cfg, model_stage(cfg, model_cfg, "02_pretrain"), pretrain_key, run_pretraining)


def pseudo_label(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Stage 04: train (or reuse) every depth model on the shared folds, then label the test set per fold."""
    models = depth_models(cfg)
    if not models:
        return [], {"skipped": "pseudo.depths is empty"}
    ensure_pretrained(cfg, models)
    if current_client() is not None:  # every depth x fold at once, rather than one depth model after another
        stale = [m for m in models if stage_needed(m, model_stage(cfg, m, "03_train_folds"), train_key)]
        map_units(train_fold_unit, [unit for m in stale for unit in fold_units(m)])
    for model_cfg in models:
        ensure_stage(model_cfg, model_stage(cfg, model_cfg, "03_train_folds"), train_key, train_folds)
    if cfg.train.only_folds is not None:
        return partial_run(cfg, selected_folds(cfg))
    device = setup_device(cfg.train)
    test = load_test_data(cfg)
    per_fold = pseudo_labels_of_folds(cfg, list(range(cfg.train.folds)), test, device, force)
    for fold, labels in enumerate(per_fold):
        write_pickle(pseudo_label_path(cfg, fold), labels)
    for model_cfg in models:  # every other depth also joins the blend (stage 07) with its own submission
        if model_cfg.model.name != cfg.model.name:  # (the preset's own model: stage 06)
            ensure_stage(model_cfg, model_stage(cfg, model_cfg, "06_predict"), predict_key, predict_test)
    paths = Paths(cfg)
    overall = [np.mean([f[i][0] for f in per_fold], axis=0) for i in range(len(test))]
    csv = paths.oof / "pseudo_labels.csv"
    write_csv(csv, predictions_frame(list(test.ids), overall, [len(p) for p in overall]))
    spread = np.concatenate([f[i][1].ravel() for f in per_fold for i in f])
    report = paths.oof / "pseudo_labels.json"
    write_json(report, {"models": [m.model.name for m in models], "depths": list(cfg.pseudo.depths),
                        "folds": cfg.train.folds, "positions": cfg.pseudo.positions,
                        "uncertainty_std": {"mean": float(spread.mean()), "median": float(np.median(spread)),
                                            "p90": float(np.quantile(spread, 0.9))},
                        "per_fold_files": [str(pseudo_label_path(cfg, f)) for f in range(cfg.train.folds)],
                        "note": "fold f's labels come only from the fold-f model of every depth",
                        **artifact_meta(cfg)})
    return [csv, report, *[pseudo_label_path(cfg, f) for f in range(cfg.train.folds)]], \
        {"models": [m.model.name for m in models], "test_rows": len(test)}


def semi_model(cfg: Config) -> Config:
    return with_settings(cfg, **{"model.name": f"{cfg.model.name}_{cfg.semi.tag}"})


def pseudo_labels_hash(cfg: Config) -> str | None:
    """Content hash of every fold's pseudo-label file (None until stage 04 wrote them all)."""
    digest = hashlib.sha256()
    for fold in range(cfg.train.folds):
        path = pseudo_label_path(cfg, fold)
        if not path.exists():
            return None
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def semi_stamp(cfg: Config) -> dict:
    """What stage 05's result depends on beyond the training settings."""
    return {"semi": dict(cfg.semi), "pseudo": dict(cfg.pseudo), "pseudo_labels": pseudo_labels_hash(cfg)}


def semi_key(cfg: Config) -> dict:
    return {**training_settings(semi_model(cfg)), **semi_stamp(cfg), "pseudo_models": pseudo_key(cfg)}


def with_pseudo_labels(train: RNATensors, test: RNATensors, labels: dict[int, np.ndarray],
                       error_scale: float) -> RNATensors:
    """Train rows first, then every test row labelled over its first P positions. The labels' spread
    becomes their `errors`, scaled so that the loss weight alpha + exp(-loss_beta * error) equals
    alpha + exp(-uncertainty_beta * std). Test rows are never validated (SN_filter 0)."""
    n = len(test)
    targets = [labels[i][0] for i in range(n)]
    errors = [labels[i][1] * error_scale for i in range(n)]
    return replace(
        train,
        ids=train.ids + test.ids, sequence=train.sequence + test.sequence,
        structure=train.structure + test.structure, loop=train.loop + test.loop, bpp=train.bpp + test.bpp,
        seq_scored=np.concatenate([train.seq_scored, [len(t) for t in targets]]),
        targets=train.targets + targets, errors=train.errors + errors,
        signal_to_noise=np.concatenate([train.signal_to_noise, np.full(n, np.inf)]),
        sn_filter=np.concatenate([train.sn_filter, np.zeros(n, dtype=train.sn_filter.dtype)]))


def semi_start(cfg: Config, fold: int) -> Path | None:
    """Phase 1's starting weights: semi.start = supervised (the fold's stage-03 model) or pretrained
    (stage 02's encoder / train.init_weights, as stage 03 starts)."""
    if cfg.semi.start == "supervised":
        path = final_model_path(model_dir(cfg) / f"fold{fold}")
        if not path.exists():
            raise InputError(path, "not found: run stage 03 (train_folds) first, or set semi.start=pretrained")
        return path
    if cfg.semi.start == "pretrained":
        return initial_weights(cfg)
    raise InputError("semi.start", f"must be supervised or pretrained, not {cfg.semi.start!r}")


def phase2_start(semi: Config, phase1_dir: Path) -> Path:
    """Phase 2's starting weights: phase 1's validated model (semi.phase2_from best; it can be phase 1's
    own start) or its last epoch (last: the paper's order, no validation between the phases)."""
    if semi.phase2_from == "best":
        return final_model_path(phase1_dir)
    if semi.phase2_from == "last":
        return phase1_dir / "last.pt"
    raise InputError("semi.phase2_from", f"must be best or last, not {semi.phase2_from!r}")


def semi_supervised_fold(cfg: Config, semi: Config, fold: int, data: RNATensors, test: RNATensors,
                         folds: np.ndarray, device) -> dict:
    """Phase 1: flat LR on the training fold (+ every pseudo-labelled row when semi.phase1_pseudo);
    phase 2: cosine annealing on the training fold (+ semi.phase2_pseudo_ratio x as many pseudo-labelled
    rows, drawn afresh each epoch). Returns phase 2's fold record."""
    s = cfg.semi
    error_scale = cfg.pseudo.uncertainty_beta / cfg.train.loss_beta
    combined = with_pseudo_labels(data, test, read_pickle(pseudo_label_path(cfg, fold)), error_scale)
    train_idx, val_idx = fold_indices(cfg, data, folds, fold)
    pseudo_idx = np.arange(len(data), len(combined))
    folder = model_dir(semi) / f"fold{fold}"
    phase1 = with_settings(semi, **{"train.epochs": s.pseudo_epochs, "train.flat_fraction": 1.0})
    phase2 = with_settings(semi, **{"train.epochs": s.finetune_epochs, "train.flat_fraction": 0.0})
    first = folder / "pseudo_phase"
    phase1_rows = np.concatenate([train_idx, pseudo_idx]) if s.phase1_pseudo else train_idx
    start, after_phase1 = semi_start(cfg, fold), phase2_start(s, first)  # a bad setting fails before training
    if s.pseudo_epochs > 0:
        train_fold(phase1, combined, fold, phase1_rows, val_idx, first, device, start)
        start = after_phase1
    sampled = (pseudo_idx, int(round(s.phase2_pseudo_ratio * len(train_idx)))) if s.phase2_pseudo_ratio else None
    return train_fold(phase2, combined, fold, train_idx, val_idx, folder, device, start, sampled=sampled)


def semi_fold_unit(cfg: Config, semi: Config, fold: int, loaded: tuple | None = None) -> dict:
    """One fold of stage 05 as a unit of work, which on a cluster worker loads its own data."""
    if loaded is None:
        finished = finished_fold(model_dir(semi) / f"fold{fold}")
        if finished is not None:
            return finished
        device = unit_device(cfg.train)
        _, data, folds = load_training_data(cfg)
        loaded = (data, load_test_data(cfg), folds, device)
    data, test, folds, device = loaded
    return semi_supervised_fold(cfg, semi, fold, data, test, folds, device)


def semi_supervised(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Stage 05: every fold through both phases, then OOF, figures and the submission."""
    if not cfg.pseudo.depths:
        return [], {"skipped": "pseudo.depths is empty"}
    missing = [pseudo_label_path(cfg, f) for f in range(cfg.train.folds) if not pseudo_label_path(cfg, f).exists()]
    if missing:
        raise InputError(missing[0], "not found: run stage 04 (pseudo_label) first")
    start = time.time()
    device = setup_device(cfg.train)
    frame, data, folds = load_training_data(cfg)
    test = load_test_data(cfg)
    semi = semi_model(cfg)
    _claim_model_dir(semi, force, semi_stamp(cfg))
    units = [(cfg, semi, fold) for fold in selected_folds(cfg)]
    results = map_units(semi_fold_unit, units, {"loaded": (data, test, folds, device)})
    if cfg.train.only_folds is not None:
        return partial_run(cfg, [fold for _, _, fold in units])
    outputs, summary = write_training_outputs(semi, data, frame, results, device, start)
    submission, predicted = predict_test(semi, force)
    return outputs + submission, {**summary, **predicted, "model": semi.model.name}
