#!/usr/bin/env python
"""How much of stage 10's CV figure is overlap? v9d3.csv holds overlapping fragments (close transcription
starts of one region), so a random K-fold puts pieces of one region on both sides; the homology model and
the linear model's neighbour features read exactly that, and a large network can memorize it. This
benchmark keeps every group of overlapping sequences (linked by a shared k-mer, k = promoter.homology.k,
on either strand where promoter.homology.both_strands) inside one fold (stratified group K-fold) and runs
stage 10's models and served mean there.

    python benchmarks/promoter_overlap.py             # cpu preset: every model of stage 10
    python benchmarks/promoter_overlap.py --models linear homology

Prints, beside the stage's random-fold figures (oof/promoter_metrics.json, when there), each model's and
the served mean's accuracy / MCC / AUC under grouped folds, and how many rows share a k-mer with another;
folds cached under work/<preset>/promoter_grouped (resumable); rows to oof/promoter_overlap.json.
"""
import json
import time

import numpy as np

from nucleic.classify import reverse_complement
from nucleic.config import Paths, config_argparser, config_from_args
from nucleic.dna_tasks import mean_over_folds, per_fold_metrics, promoter_frame, promoter_models, run_cv, served_mean, with_kind
from nucleic.engine import setup_device
from nucleic.io_utils import write_json
from nucleic.stage import claim_work_dir

METRICS = ("accuracy", "mcc", "auc")


def overlap_groups(sequences: list[str], k: int, both_strands: bool = False) -> np.ndarray:
    """Each sequence's group: sequences sharing a k-mer (with both_strands, on either strand) are linked,
    groups are the linked components."""
    parent = list(range(len(sequences)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_holder = {}
    for row, sequence in enumerate(sequences):
        for strand in (sequence, reverse_complement(sequence)) if both_strands else (sequence,):
            for i in range(len(strand) - k + 1):
                holder = first_holder.setdefault(strand[i:i + k], row)
                parent[root(row)] = root(holder)
    return np.array([root(i) for i in range(len(sequences))])


def grouped_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list:
    from sklearn.model_selection import StratifiedGroupKFold

    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels, groups))


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--models", nargs="+", help="default: stage 10's models (promoter_models)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    pc, paths = cfg.promoter, Paths(cfg)
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    labels, sequences = frame.label.to_numpy(), list(frame.sequence)
    homology = pc.get("homology") or {}
    k, both_strands = int(homology.get("k") or 16), bool(homology.get("both_strands"))
    groups = overlap_groups(sequences, k, both_strands)
    _, group_of_row, group_sizes = np.unique(groups, return_inverse=True, return_counts=True)
    linked = group_sizes[group_of_row] > 1  # shares a k-mer with another row
    splits = grouped_splits(labels, groups, pc.folds, cfg.seed)
    start, results = time.time(), {}
    for kind in args.models or promoter_models(cfg):
        work = claim_work_dir(paths.run / "promoter_grouped" / kind, {"promoter": dict(pc), "seed": cfg.seed,
                                                                      "k": k, "kind": kind}, False)
        results[kind] = run_cv(cfg, with_kind(pc, kind), frame, work, device, splits=splits)
    folds = results[next(iter(results))]["folds"]
    rows = {kind: {m: r["summary"].get(m) for m in (*METRICS, "coverage")} for kind, r in results.items()}
    served = served_mean([r["probabilities"] for r in results.values()])
    rows["served: " + " + ".join(results)] = {m: v for m, v in mean_over_folds(per_fold_metrics(labels, folds, served)).items()
                                               if m in METRICS}
    stage_metrics = paths.oof / "promoter_metrics.json"
    random_folds = json.loads(stage_metrics.read_text()) if stage_metrics.exists() else None
    report = {"k": k, "both_strands": both_strands, "rows": len(labels), "groups": int(len(np.unique(groups))),
              "share_with_a_neighbour": {"promoters": float(linked[labels == 1].mean()),
                                         "non_promoters": float(linked[labels == 0].mean())},
              "grouped_folds": rows, "minutes": round((time.time() - start) / 60, 1),
              "random_folds_served": {m: random_folds[m] for m in METRICS} if random_folds else None}
    write_json(paths.oof / "promoter_overlap.json", report)
    print(f"\n{len(labels)} sequences in {report['groups']} groups linked by shared {k}-mers; with a neighbour: "
          f"{report['share_with_a_neighbour']['promoters']:.1%} of promoters, "
          f"{report['share_with_a_neighbour']['non_promoters']:.1%} of non-promoters")
    if random_folds:
        print("stage 10, random folds, served: " + " ".join(f"{m} {random_folds[m]:.4f}" for m in METRICS))
    for name, row in rows.items():
        print(f"grouped folds, {name}: " + " ".join(f"{m} {row[m]:.4f}" for m in METRICS if row.get(m) is not None)
              + (f" coverage {row['coverage']:.3f}" if row.get("coverage") is not None else ""))
    print(f"{report['minutes']} min")


if __name__ == "__main__":
    main()
