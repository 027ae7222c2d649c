"""Semi-supervised learning (paper 2.3.3, 3.3.2): stage 04 labels the test set with an ensemble of NT
depths, stage 05 trains on those pseudo-labels plus the training fold, then finetunes on ground truth.

Honest OOF: the pseudo-labels used while training fold f come only from the fold-f models of stage
04, which never saw fold f's labels, so fold f's OOF predictions stay out-of-fold.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import Config, Paths, with_settings
from .dataset import RNATensors, load_rna_tensors
from .io_utils import read_pickle, write_csv, write_json, write_pickle
from .openvaccine import (_claim_model_dir, fold_indices, initial_weights, load_training_data, model_dir,
                          predict_test, read_prepared, train_folds, training_settings, write_training_outputs)
from .stage import InputError, artifact_meta
from .structures import StructureStore
from .submission import predictions_frame
from .train import configure_threads, resolve_device, train_fold


def depth_models(cfg: Config) -> list[Config]:
    """One config per depth k = nlayer in pseudo.depths; the preset's own depth is stage 03's model."""
    return [with_settings(cfg, **{"model.nlayer": depth,
                                  "model.name": cfg.model.name if depth == cfg.model.nlayer
                                  else f"{cfg.model.name}_k{depth}"})
            for depth in cfg.pseudo.depths]


def pseudo_label_path(cfg: Config, fold: int) -> Path:
    return Paths(cfg).run / "pseudo_labels" / f"fold{fold}.pkl"


def pseudo_key(cfg: Config) -> dict:
    return {"models": [training_settings(m) for m in depth_models(cfg)], "prepared": _prepared_meta(cfg)}


def _prepared_meta(cfg: Config) -> str | None:
    meta = Paths(cfg).prepared / "meta.json"
    return meta.read_text() if meta.exists() else None


def pseudo_label(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Stage 04: train (or reuse) every depth model on the shared folds, predict the test set, and
    average per fold over models; each prediction is already the mean over the 12 structures."""
    models = depth_models(cfg)
    if not models:
        return [], {"skipped": "pseudo.depths is empty"}
    for model_cfg in models:
        train_folds(model_cfg, force=False)  # resumes; a finished model is only read back
        predict_test(model_cfg, force=False)
    test = read_prepared(cfg, "test")
    per_fold = []
    for fold in range(cfg.train.folds):
        predictions = [read_pickle(model_dir(m) / f"fold{fold}" / "test_pred.pkl") for m in models]
        mean = {i: np.mean([p[i] for p in predictions], axis=0) for i in range(len(test))}
        write_pickle(pseudo_label_path(cfg, fold), mean)
        per_fold.append(mean)
    paths = Paths(cfg)
    overall = [np.mean([f[i] for f in per_fold], axis=0) for i in range(len(test))]
    csv = paths.oof / "pseudo_labels.csv"
    write_csv(csv, predictions_frame(list(test.id), overall, list(test.seq_length)))
    report = paths.oof / "pseudo_labels.json"
    write_json(report, {"models": [m.model.name for m in models], "depths": list(cfg.pseudo.depths),
                        "folds": cfg.train.folds, "per_fold_files": [str(pseudo_label_path(cfg, f))
                                                                     for f in range(cfg.train.folds)],
                        "note": "fold f's file averages only the fold-f checkpoints of every model",
                        **artifact_meta(cfg)})
    return [csv, report, *[pseudo_label_path(cfg, f) for f in range(cfg.train.folds)]], \
        {"models": [m.model.name for m in models], "test_rows": len(test)}


def semi_model(cfg: Config) -> Config:
    return with_settings(cfg, **{"model.name": f"{cfg.model.name}_semi"})


def semi_key(cfg: Config) -> dict:
    return {"semi": dict(cfg.semi), **training_settings(semi_model(cfg)), "pseudo": pseudo_key(cfg)}


def with_pseudo_labels(train: RNATensors, test: RNATensors, labels: dict[int, np.ndarray]) -> RNATensors:
    """Train rows first, then every test row labelled over its scored window (error 0, never validated)."""
    n = len(test)
    pseudo_targets = [labels[i][:test.seq_scored[i]].astype(np.float32) for i in range(n)]
    return replace(
        train,
        ids=train.ids + test.ids, sequence=train.sequence + test.sequence,
        structure=train.structure + test.structure, loop=train.loop + test.loop, bpp=train.bpp + test.bpp,
        seq_scored=np.concatenate([train.seq_scored, test.seq_scored]),
        targets=train.targets + pseudo_targets, errors=train.errors + [np.zeros_like(t) for t in pseudo_targets],
        signal_to_noise=np.concatenate([train.signal_to_noise, np.full(n, np.inf)]),
        sn_filter=np.concatenate([train.sn_filter, np.zeros(n, dtype=train.sn_filter.dtype)]))


def semi_supervised(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Stage 05: per fold, pseudo-labels + training fold at a flat LR, then ground truth with cosine."""
    if not cfg.pseudo.depths:
        return [], {"skipped": "pseudo.depths is empty"}
    missing = [pseudo_label_path(cfg, f) for f in range(cfg.train.folds) if not pseudo_label_path(cfg, f).exists()]
    if missing:
        raise InputError(missing[0], "not found: run stage 04 (pseudo_label) first")
    start = time.time()
    configure_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    frame, data, folds = load_training_data(cfg)
    test = load_rna_tensors(read_prepared(cfg, "test"), StructureStore(Paths(cfg).structures, cfg.fold))
    semi = semi_model(cfg)
    folder = _claim_model_dir(semi, force)
    pseudo_phase = with_settings(semi, **{"train.epochs": cfg.semi.pseudo_epochs, "train.flat_fraction": 1.0})
    truth_phase = with_settings(semi, **{"train.epochs": cfg.semi.finetune_epochs, "train.flat_fraction": 0.0})
    results = []
    for fold in range(cfg.train.folds):
        combined = with_pseudo_labels(data, test, read_pickle(pseudo_label_path(cfg, fold)))
        train_idx, val_idx = fold_indices(cfg, data, folds, fold)
        pseudo_idx = np.arange(len(data), len(combined))
        first = folder / f"fold{fold}" / "pseudo_phase"
        train_fold(pseudo_phase, combined, fold, np.concatenate([train_idx, pseudo_idx]), val_idx, first, device,
                   initial_weights(cfg))
        results.append(train_fold(truth_phase, combined, fold, train_idx, val_idx, folder / f"fold{fold}", device,
                                  first / "best.pt"))
    outputs, summary = write_training_outputs(semi, data, frame, results, device, start)
    submission, predicted = predict_test(semi, force)
    return outputs + submission, {**summary, **predicted, "model": semi.model.name}
