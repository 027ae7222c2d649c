#!/usr/bin/env python
"""Which semi-supervised recipe pays: trains stage 05's variants on one fold and prints their
validation MCRMSE next to the stage-03 model of that fold (issue: "pseudo-labelling that pays").

    python benchmarks/semi_variants.py --fold 0                      # cpu preset, variants a to e
    python benchmarks/semi_variants.py --fold 1 --variants a c --set semi.finetune_epochs=6

Variants (all start from semi.start, default here: the fold's stage-03 model):
  a  the paper's order: phase 1 on pseudo-labels + the training fold (flat LR), phase 2 on ground truth
  b  as a, with as many pseudo-labelled rows as training rows drawn into every phase-2 epoch
  c  control: the same epochs on ground truth only (no pseudo-labels)
  d  as a, but phase 2 starts from phase 1's last epoch (a: from phase 1's validated choice,
     which is the start itself whenever phase 1 validates worse)
  e  control of d: c with phase 2 from phase 1's last epoch

Needs stages 00-03 of the preset. Writes fold f's pseudo-labels (from the cached test predictions of
the fold-f teachers; with other pseudo.* settings than stage 04's, rerun stage 04 with --force
afterwards), trains each variant as model nt_v<variant> and appends the figures to
oof/semi_variants.json.
"""
import json
import time

import numpy as np

from nucleic.config import Paths, config_argparser, load_config, with_settings
from nucleic.engine import setup_device
from nucleic.io_utils import read_pickle, write_json, write_pickle
from nucleic.openvaccine import _claim_model_dir, load_test_data, load_training_data, model_dir
from nucleic.semi_supervised import fold_pseudo_labels, pseudo_label_path, semi_model, semi_stamp, semi_supervised_fold
from nucleic.train import score_rows

VARIANTS = {
    "a": {"semi.phase1_pseudo": True, "semi.phase2_pseudo_ratio": 0.0},
    "b": {"semi.phase1_pseudo": True, "semi.phase2_pseudo_ratio": 1.0},
    "c": {"semi.phase1_pseudo": False, "semi.phase2_pseudo_ratio": 0.0},
    "d": {"semi.phase1_pseudo": True, "semi.phase2_pseudo_ratio": 0.0, "semi.phase2_from": "last"},
    "e": {"semi.phase1_pseudo": False, "semi.phase2_pseudo_ratio": 0.0, "semi.phase2_from": "last"},
}


def fold_score(data, oof: dict, val_idx: np.ndarray) -> dict:
    scored = val_idx[data.sn_filter[val_idx] == 1]
    return {k: round(v, 5) for k, v in score_rows(data, oof, scored).items()}


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    cfg = load_config(args.preset, ["semi.start=supervised", *args.overrides], args.data_dir)
    device = setup_device(cfg.train)
    frame, data, folds = load_training_data(cfg)
    test = load_test_data(cfg)

    supervised = read_pickle(model_dir(cfg) / f"fold{args.fold}" / "result.pkl")
    rows = [{"variant": "stage 03", "fold": args.fold, **fold_score(data, supervised["oof"], supervised["val_idx"])}]
    start = time.time()  # teachers' test predictions are cached; the labels follow pseudo.* every run
    write_pickle(pseudo_label_path(cfg, args.fold), fold_pseudo_labels(cfg, args.fold, test, device))
    print(f"fold {args.fold} pseudo-labels: {time.time() - start:.0f}s", flush=True)
    for variant in args.variants:
        vcfg = with_settings(cfg, **VARIANTS[variant], **{"semi.tag": f"v{variant}"})
        semi = semi_model(vcfg)
        _claim_model_dir(semi, False, semi_stamp(vcfg))
        start = time.time()
        result = semi_supervised_fold(vcfg, semi, args.fold, data, test, folds, device)
        rows.append({"variant": variant, "fold": args.fold, **fold_score(data, result["oof"], result["val_idx"]),
                     "minutes": round((time.time() - start) / 60, 1), "settings": VARIANTS[variant],
                     "best_epoch": result["best_epoch"], "averaged_epochs": result["averaged_epochs"]})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nfold {args.fold}, preset {args.preset}, semi {dict(cfg.semi)}")
    print(f"{'variant':10s} {'MCRMSE (3 scored)':>18s} {'all 5':>8s} {'minutes':>8s}")
    for row in rows:
        print(f"{row['variant']:10s} {row['mcrmse_scored']:18.4f} {row['mcrmse_all5']:8.4f} {row.get('minutes', ''):>8}")
    report = Paths(cfg).oof / "semi_variants.json"
    earlier = json.loads(report.read_text()) if report.exists() else []
    write_json(report, earlier + [{"preset": args.preset, "overrides": args.overrides, "semi": dict(cfg.semi),
                                   "pseudo": dict(cfg.pseudo), "rows": rows}])


if __name__ == "__main__":
    main()
