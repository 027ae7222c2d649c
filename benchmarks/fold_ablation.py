#!/usr/bin/env python
"""One stage-03 fold under changed settings, scored beside the preset's own stage-03 model on the
same fold: the cheap way to measure a change (an ablation row) before paying for every fold.

    python benchmarks/fold_ablation.py --name noclip --set train.grad_clip=0
    python benchmarks/fold_ablation.py --name colw --set "train.column_weights=[1,1,0.3,1,0.3]"
    python benchmarks/fold_ablation.py --name e30 --set train.epochs=30 --fold 1

Needs stages 00-03 of the preset (with pretraining on, the variant starts from stage 02's encoder,
so settings that change pretraining are not measured here). Trains model <model.name>_<name>'s fold
only (resumable), prints both validation MCRMSEs (SN_filter = 1 rows of the fold, 12 structures) and
appends them to oof/fold_ablations.json.
"""
import json
import time

from nucleic.config import Paths, config_argparser, config_from_args, load_config, with_settings
from nucleic.engine import setup_device
from nucleic.io_utils import read_pickle, write_json
from nucleic.openvaccine import _claim_model_dir, fold_indices, initial_weights, load_training_data, model_dir
from nucleic.train import score_rows, train_fold


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--name", required=True, help="suffix of the variant's model name")
    args = parser.parse_args()
    base = load_config(args.preset, data_dir=args.data_dir)
    variant = config_from_args(args)
    variant = with_settings(variant, **{"model.name": f"{base.model.name}_{args.name}"})
    device = setup_device(variant.train)
    _, data, folds = load_training_data(base)
    train_idx, val_idx = fold_indices(variant, data, folds, args.fold)
    scored = val_idx[data.sn_filter[val_idx] == 1]

    reference = read_pickle(model_dir(base) / f"fold{args.fold}" / "result.pkl")
    folder = _claim_model_dir(variant, False)
    start = time.time()
    start_weights = initial_weights(with_settings(variant, **{"model.name": base.model.name}))  # stage 02's
    result = train_fold(variant, data, args.fold, train_idx, val_idx, folder / f"fold{args.fold}", device,
                        start_weights)
    minutes = (time.time() - start) / 60
    rows = {"stage 03": score_rows(data, reference["oof"], scored), args.name: score_rows(data, result["oof"], scored)}
    print(f"\nfold {args.fold}, preset {args.preset}, {' '.join(args.overrides)}")
    for name, score in rows.items():
        print(f"{name:12s} MCRMSE {score['mcrmse_scored']:.4f} (all 5: {score['mcrmse_all5']:.4f})")
    print(f"variant: {minutes:.1f} min, best epoch {result['best_epoch']}, averaged epochs {result['averaged_epochs']}")
    report = Paths(base).oof / "fold_ablations.json"
    earlier = json.loads(report.read_text()) if report.exists() else []
    write_json(report, earlier + [{"preset": args.preset, "fold": args.fold, "name": args.name, "overrides": args.overrides,
                                   "scores": rows, "minutes": round(minutes, 1), "best_epoch": result["best_epoch"],
                                   "averaged_epochs": result["averaged_epochs"]}])


if __name__ == "__main__":
    main()
