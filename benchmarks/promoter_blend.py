#!/usr/bin/env python
"""Does a blend pay on the promoter task? One fold of stage 10's split, each model trained as the stage
trains it (10 % of the fold's training rows choose the best epoch), then every model and every mean of
two or more scored on the held-out fold, beside its validation AUC (what the stage's rule would read).

    python benchmarks/promoter_blend.py                     # cpu preset, fold 0, nt cnn danq
    python benchmarks/promoter_blend.py --models nt danq --fold 2
    python benchmarks/promoter_blend.py --name avg5 --models nt --set promoter.average_top_k=5

Models train in their own folders under work/<preset>/ablations (resumable; a variant's --name keeps its
own folders); rows go to oof/promoter_blend[_<name>].json.
"""
import itertools
import time

import numpy as np

from nucleic.classify import encode_sequences, fit_classifier, model_settings, predict_proba
from nucleic.config import Paths, config_argparser, config_from_args
from nucleic.dna_tasks import choose_blend, cv_splits, promoter_frame, stratified_split, with_kind
from nucleic.engine import setup_device
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["nt", "cnn", "danq"])
    parser.add_argument("--name", default="blend", help="a variant's name: its own model folders and JSON")
    args = parser.parse_args()
    cfg = config_from_args(args)
    pc = cfg.promoter
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    tokens, labels = encode_sequences(list(frame.sequence)), frame.label.to_numpy()
    train_idx, test_idx = cv_splits(labels, pc.folds, cfg.seed)[args.fold]
    seed = cfg.seed + args.fold  # as stage 10's run_cv
    fit_idx, val_idx = stratified_split(train_idx, labels, pc.validation_fraction, seed)

    test_probs, val_probs, minutes = {}, {}, {}
    for kind in args.models:
        start, task_cfg = time.time(), with_kind(pc, kind)
        model, _ = fit_classifier(kind, model_settings(task_cfg, kind), task_cfg, tokens[fit_idx], labels[fit_idx],
                                  tokens[val_idx], labels[val_idx], seed, device, select_best=True, desc=kind,
                                  run_dir=Paths(cfg).run / "ablations" / f"promoter_{args.name}_{kind}_fold{args.fold}")
        test_probs[kind] = predict_proba(model, tokens[test_idx], device, 256)
        val_probs[kind] = predict_proba(model, tokens[val_idx], device, 256)
        minutes[kind] = round((time.time() - start) / 60, 1)

    rows = []
    print(f"\npromoter fold {args.fold}, preset {args.preset} {' '.join(args.overrides)}; minutes {minutes}")
    for size in range(1, len(args.models) + 1):
        for models in itertools.combinations(args.models, size):
            test = binary_classification_metrics(labels[test_idx], np.mean([test_probs[k] for k in models], axis=0))
            val = binary_classification_metrics(labels[val_idx], np.mean([val_probs[k] for k in models], axis=0))
            rows.append({"models": list(models), "validation_auc": round(val["auc"], 4),
                         **{m: round(test[m], 4) for m in ("accuracy", "mcc", "auc")}})
            print(f"{' + '.join(models):18s} held-out accuracy {test['accuracy']:.4f} MCC {test['mcc']:.4f} "
                  f"AUC {test['auc']:.4f} | validation AUC {val['auc']:.4f}")
    chosen, _ = choose_blend(labels[val_idx], val_probs)
    print(f"the stage's rule (best validation AUC) would serve: {' + '.join(chosen)}")
    suffix = "" if args.name == "blend" else f"_{args.name}"
    write_json(Paths(cfg).oof / f"promoter_blend{suffix}.json",
               {"preset": args.preset, "fold": args.fold, "settings": args.overrides, "minutes": minutes, "rows": rows,
                "rule_serves": list(chosen)})


if __name__ == "__main__":
    main()
