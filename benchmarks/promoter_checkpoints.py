#!/usr/bin/env python
"""What averaging checkpoints bought stage 10: per CV fold, the held-out metrics of the best single
validation epoch (fold<f>/best.pt) beside those of the network the stage kept (the mean of the
promoter.average_top_k best epochs when it validated better, else that same best epoch). With
promoter.seeds >= 2, each side is the mean probability of the fold's networks (fold<f>_seed<m>).

    bash run_all.sh --only 10_promoter && python benchmarks/promoter_checkpoints.py

Reads the stage's fold folders (work/<preset>/promoter/<model>) and oof/promoter_metrics.json; writes
oof/promoter_checkpoints.json. Nothing is trained; the benchmark refuses fold folders stamped with other
settings than its own (pass the stage's --set overrides here too).
"""
import json
import sys

import numpy as np
import torch

from nucleic.classify import build_classifier, encode_sequences, load_classifier, model_settings, predict_proba
from nucleic.config import Paths, config_argparser, config_from_args
from nucleic.dna_tasks import cv_splits, network_members, promoter_frame, promoter_network_key
from nucleic.engine import read_checkpoint, setup_device
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics
from nucleic.stage import stamped_with

SHOWN = ("accuracy", "mcc", "auc")


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    args = parser.parse_args()
    cfg = config_from_args(args)
    pc, paths = cfg.promoter, Paths(cfg)
    work = paths.run / "promoter" / pc.model
    if not stamped_with(work, promoter_network_key(cfg)):
        sys.exit(f"{work}: stage 10's models were trained with other settings (or not at all); "
                 f"run `bash run_all.sh --only 10_promoter` with these settings first")
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    tokens, labels = encode_sequences(list(frame.sequence)), frame.label.to_numpy()
    stage = json.loads((paths.oof / "promoter_metrics.json").read_text())["models"][pc.model]  # the network's figures
    rows = []
    for fold, (_, test_idx) in enumerate(cv_splits(labels, pc.folds, cfg.seed)):
        best_probs, averaged = [], False
        for name in network_members(work, fold, pc):  # (with promoter.seeds >= 2, each network of the fold)
            best = build_classifier(pc.model, model_settings(pc, pc.model), tokens.shape[1]).to(device)
            best.load_state_dict(read_checkpoint(name / "best.pt", device)["model"])
            kept, _ = load_classifier(name.with_suffix(".pt"), device)
            averaged |= any(not torch.equal(a, b) for a, b in zip(best.state_dict().values(), kept.state_dict().values()))
            best_probs.append(predict_proba(best, tokens[test_idx], device, 256))
        single = binary_classification_metrics(labels[test_idx], np.mean(best_probs, axis=0))
        rows.append({"fold": fold, "averaged_kept": averaged, "best_epoch": {m: single[m] for m in SHOWN},
                     "stage": {m: stage["per_fold"][fold][m] for m in SHOWN}})
        print(f"fold {fold}: best epoch " + " ".join(f"{m} {single[m]:.4f}" for m in SHOWN) + " | stage's model "
              + " ".join(f"{m} {rows[-1]['stage'][m]:.4f}" for m in SHOWN) + ("" if averaged else " (the same)"))
    means = {side: {m: float(np.mean([r[side][m] for r in rows])) for m in SHOWN} for side in ("best_epoch", "stage")}
    for side, scores in means.items():
        print(f"mean over {len(rows)} folds, {side}: " + " ".join(f"{m} {v:.4f}" for m, v in scores.items()))
    write_json(paths.oof / "promoter_checkpoints.json", {"preset": args.preset, "average_top_k": pc.average_top_k,
                                                         "folds": rows, "mean": means, "settings": args.overrides})


if __name__ == "__main__":
    main()
