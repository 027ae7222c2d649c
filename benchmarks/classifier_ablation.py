#!/usr/bin/env python
"""One promoter CV fold under changed settings: the cheap way to measure a classifier change before
paying for all five folds of stage 10.

    python benchmarks/classifier_ablation.py --name e40 --set promoter.epochs=40
    python benchmarks/classifier_ablation.py --name d128 --set "promoter.nt={k: 7, nlayer: 3, d_model: 128}"
    python benchmarks/classifier_ablation.py --name base --rule stage --seeds 3

Trains fold --fold of stage 10's stratified split (the same rows as the stage) in its own folder
under work/<preset>/ablations (resumable), prints the held-out fold's accuracy / MCC / AUC and the
per-epoch curve, and appends a row to oof/classifier_ablations.json.

--rule last (default): every training row, the last epoch; the curve is the held-out fold's accuracy.
--rule stage: stage 10's rule: promoter.validation_fraction of the training rows held back, the model
  of the best validation epoch (or the mean of the promoter.average_top_k best, where it validates
  better); the curve is the validation AUC.
--seeds N: N training seeds (the fold's seed + 1000 s, s = 0..N-1; the split stays). One fold's accuracy
  moves by about 0.01 from seed to seed (README, "Promoter"), so a change smaller than that needs seeds.
  Prints each seed, their mean and standard deviation, and the N seeds' mean probability as one model.
--torch-dropout: the NT's dropout through torch's own F.dropout instead of the packed random mask
  (nucleic_transformer.dropout, 7b9b30a): the same distribution from another random stream, so the two
  should agree within the seed spread (README, "Promoter"). Attention dropout (off in the cpu preset)
  keeps its own path.
"""
import json
import time

import numpy as np

from nucleic.classify import encode_sequences, fit_classifier, model_settings, predict_proba
from nucleic.config import Paths, config_argparser, config_from_args
from nucleic.dna_tasks import cv_splits, promoter_frame, stratified_split
from nucleic.engine import setup_device
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics

METRICS = ("accuracy", "mcc", "auc")
CURVES = {"last": "accuracy_per_epoch", "stage": "validation_auc_per_epoch"}  # what each rule watches
HISTORY_KEYS = {"last": "val_accuracy", "stage": "val_auc"}


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--name", required=True, help="the variant's folder and row name")
    parser.add_argument("--rule", choices=("last", "stage"), default="last")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--torch-dropout", action="store_true")
    args = parser.parse_args()
    if args.torch_dropout:
        use_torch_dropout()
    cfg = config_from_args(args)
    pc = cfg.promoter
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    tokens, labels = encode_sequences(list(frame.sequence)), frame.label.to_numpy()
    train_idx, test_idx = cv_splits(labels, pc.folds, cfg.seed)[args.fold]
    if args.rule == "stage":
        fit_idx, watch_idx = stratified_split(train_idx, labels, pc.validation_fraction, cfg.seed + args.fold)
    else:
        fit_idx, watch_idx = train_idx, test_idx

    variant = args.name + ("_stage" if args.rule == "stage" else "") + ("_torch_dropout" if args.torch_dropout else "")
    start, seeds = time.time(), []
    for s in range(args.seeds):
        run_dir = Paths(cfg).run / "ablations" / f"promoter_{variant}_fold{args.fold}{f'_seed{s}' if s else ''}"
        model, history = fit_classifier(pc.model, model_settings(pc, pc.model), pc, tokens[fit_idx], labels[fit_idx],
                                        tokens[watch_idx], labels[watch_idx], cfg.seed + args.fold + 1000 * s,
                                        device, run_dir=run_dir, desc=f"{args.name} seed {s}",
                                        select_best=args.rule == "stage")
        probs = predict_proba(model, tokens[test_idx], device, 256)
        seeds.append({"seed": s, "probs": probs, **scores_of(labels[test_idx], probs),
                      CURVES[args.rule]: [round(h[HISTORY_KEYS[args.rule]], 4) for h in history
                                          if HISTORY_KEYS[args.rule] in h]})
    minutes = (time.time() - start) / 60

    row = summarize(seeds, labels[test_idx])
    print(f"\npromoter fold {args.fold}, preset {args.preset}, rule {args.rule}, {' '.join(args.overrides)}")
    for seed in seeds:
        print(f"seed {seed['seed']}: " + " ".join(f"{m} {seed[m]:.4f}" for m in METRICS))
        print(f"  {CURVES[args.rule].replace('_', ' ')}:", seed[CURVES[args.rule]])
    if len(seeds) > 1:
        print("mean (sd): " + " ".join(f"{m} {row['mean'][m]:.4f} ({row['sd'][m]:.4f})" for m in METRICS))
        print(f"{len(seeds)} seeds as one model: " + " ".join(f"{m} {row['ensemble'][m]:.4f}" for m in METRICS))
    print(f"{minutes:.1f} min")
    report = Paths(cfg).oof / "classifier_ablations.json"
    earlier = json.loads(report.read_text()) if report.exists() else []
    write_json(report, earlier + [{"task": "promoter", "preset": args.preset, "fold": args.fold, "name": args.name,
                                   "rule": args.rule, "overrides": args.overrides, "torch_dropout": args.torch_dropout,
                                   "minutes": round(minutes, 1), **row}])


def use_torch_dropout() -> None:
    import torch.nn.functional as F

    from nucleic.models import nucleic_transformer

    nucleic_transformer.dropout = lambda x, p, training: F.dropout(x, p, training=training)


def scores_of(labels: np.ndarray, probs: np.ndarray) -> dict:
    scores = binary_classification_metrics(labels, probs)
    return {m: round(float(scores[m]), 4) for m in METRICS}


def summarize(seeds: list[dict], labels: np.ndarray) -> dict:
    """The report row: a single seed's figures at the top level (as before --seeds), with more seeds
    their mean, standard deviation and mean-probability ensemble."""
    per_seed = [{k: v for k, v in s.items() if k != "probs"} for s in seeds]
    if len(seeds) == 1:
        return {k: v for k, v in per_seed[0].items() if k != "seed"}
    return {"per_seed": per_seed,
            "mean": {m: round(float(np.mean([s[m] for s in seeds])), 4) for m in METRICS},
            "sd": {m: round(float(np.std([s[m] for s in seeds], ddof=1)), 4) for m in METRICS},
            "ensemble": scores_of(labels, np.mean([s["probs"] for s in seeds], axis=0))}


if __name__ == "__main__":
    main()
