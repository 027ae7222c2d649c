#!/usr/bin/env python
"""What the mirtron random forest learns from: stage 12's forest under both of its protocols (the paper's
70/30 split, seed 2020, and the stage's stratified K-fold CV), once per feature set, from k-mers alone
to the stage's own set with the hairpin's ViennaRNA free energy (the structure input).

    python benchmarks/mirna_forest.py                         # cpu preset, every feature set below
    python benchmarks/mirna_forest.py --set mirna.rf.trees=1000

Seconds per variant on 2 cores; rows go to oof/mirna_forest.json and a table to stdout.
"""
import time

import numpy as np

from nucleic.config import Config, Paths, config_argparser, config_from_args
from nucleic.dna_data import read_mirna
from nucleic.dna_tasks import (
    cv_splits,
    feature_model_proba,
    fit_feature_model,
    per_fold_mean,
    stratified_split,
    stratified_subset,
    task_input,
)
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics

METRICS = ("accuracy", "mcc", "auc")
FEATURE_SETS = {  # name: (ends, globals), k-mer sizes from the preset
    "k-mers": (0, []),
    "k-mers + ends": (3, []),
    "k-mers + ends + length, GC": (3, ["length", "gc"]),
    "k-mers + length, GC, free energy": (0, ["length", "gc", "mfe"]),
    "k-mers + ends + length, GC, free energy (structure)": (3, ["length", "gc", "mfe"]),
}


def score_variant(cfg: Config, frame, ends: int, globals_: list[str]) -> dict:
    """The forest with these features under the paper protocol and the CV: {protocol: metrics}."""
    mc = cfg.mirna
    task_cfg = Config({**mc, "rf": {**mc.rf, "ends": ends, "globals": globals_}})
    labels, sequences = frame.label.to_numpy(), list(frame.sequence)
    train_idx, test_idx = stratified_split(np.arange(len(frame)), labels, 0.3, cfg.seed)
    paper = feature_model_proba(fit_feature_model(cfg, task_cfg, "rf", frame, train_idx), task_cfg.rf,
                                [sequences[i] for i in test_idx])
    folds, probabilities = np.zeros(len(frame), dtype=np.int64), np.zeros(len(frame))
    for fold, (fit_idx, held_idx) in enumerate(cv_splits(labels, mc.folds, cfg.seed)):
        forest = fit_feature_model(cfg, task_cfg, "rf", frame, fit_idx)
        folds[held_idx] = fold
        probabilities[held_idx] = feature_model_proba(forest, task_cfg.rf, [sequences[i] for i in held_idx])
    return {"paper_protocol": binary_classification_metrics(labels[test_idx], paper),
            "cv": per_fold_mean(labels, folds, probabilities)}


def main() -> None:
    args = config_argparser(__doc__).parse_args()  # --preset, --data-dir, --set as the stages take them
    cfg = config_from_args(args)
    frame = stratified_subset(read_mirna(task_input(cfg, "mirna")), cfg.mirna.max_rows, cfg.seed)
    rows = []
    print(f"mirtron forest, preset {args.preset} {' '.join(args.overrides)}: {len(frame)} hairpins, "
          f"k-mers {list(cfg.mirna.rf.ks)}, {cfg.mirna.rf.trees} trees")
    print(f"{'features':54s} {'70/30 acc / MCC / AUC':>24s} {f'{cfg.mirna.folds}-fold CV acc / MCC / AUC':>26s}   s")
    for name, (ends, globals_) in FEATURE_SETS.items():
        start = time.perf_counter()
        scores = score_variant(cfg, frame, ends, globals_)
        seconds = time.perf_counter() - start
        rows.append({"features": name, "ends": ends, "globals": globals_, "seconds": round(seconds, 1),
                     **{protocol: {m: round(found[m], 4) for m in METRICS} for protocol, found in scores.items()}})
        cells = ["/".join(f"{rows[-1][p][m]:.4f}" for m in METRICS) for p in ("paper_protocol", "cv")]
        print(f"{name:54s} {cells[0]:>24s} {cells[1]:>26s} {seconds:4.0f}")
    out = Paths(cfg).oof / "mirna_forest.json"
    write_json(out, {"preset": args.preset, "overrides": args.overrides, "n_sequences": len(frame),
                     "ks": list(cfg.mirna.rf.ks), "trees": cfg.mirna.rf.trees, "rows": rows})
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
