#!/usr/bin/env python
"""One promoter CV fold under changed settings: the cheap way to measure a classifier change before
paying for all five folds of stage 10.

    python benchmarks/classifier_ablation.py --name e40 --set promoter.epochs=40
    python benchmarks/classifier_ablation.py --name d128 --set "promoter.nt={k: 7, nlayer: 3, d_model: 128}"

Trains fold --fold of stage 10's stratified split (the same rows as the stage) in its own folder
under work/<preset>/ablations (resumable), prints the held-out fold's accuracy / MCC / AUC for the
last epoch and the per-epoch curve, and appends a row to oof/classifier_ablations.json.
"""
import argparse
import json
import time

from nucleic.classify import encode_sequences, fit_classifier, predict_proba
from nucleic.config import Paths, load_config
from nucleic.dna_tasks import cv_splits, promoter_frame
from nucleic.engine import setup_device
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--name", required=True, help="the variant's folder and row name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.preset, overrides=args.set)
    pc = cfg.promoter
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    tokens, labels = encode_sequences(list(frame.sequence)), frame.label.to_numpy()
    train_idx, val_idx = cv_splits(labels, pc.folds, cfg.seed)[args.fold]

    start = time.time()
    run_dir = Paths(cfg).run / "ablations" / f"promoter_{args.name}_fold{args.fold}"
    model, history = fit_classifier(pc.model, pc[pc.model], pc, tokens[train_idx], labels[train_idx],
                                    tokens[val_idx], labels[val_idx], cfg.seed + args.fold, device,
                                    run_dir=run_dir, desc=args.name)
    minutes = (time.time() - start) / 60
    scores = binary_classification_metrics(labels[val_idx], predict_proba(model, tokens[val_idx], device, 256))
    curve = [round(h["val_accuracy"], 4) for h in history if "val_accuracy" in h]
    print(f"\npromoter fold {args.fold}, preset {args.preset}, {' '.join(args.set)}")
    print(f"accuracy {scores['accuracy']:.4f} MCC {scores['mcc']:.4f} AUC {scores['auc']:.4f}, {minutes:.1f} min")
    print("held-out accuracy per epoch:", curve)
    report = Paths(cfg).oof / "classifier_ablations.json"
    earlier = json.loads(report.read_text()) if report.exists() else []
    write_json(report, earlier + [{"task": "promoter", "preset": args.preset, "fold": args.fold, "name": args.name,
                                   "overrides": args.set, "minutes": round(minutes, 1),
                                   **{m: round(scores[m], 4) for m in ("accuracy", "mcc", "auc")},
                                   "accuracy_per_epoch": curve}])


if __name__ == "__main__":
    main()
