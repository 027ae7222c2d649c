#!/usr/bin/env python
"""Viral contigs, leave one experiment out: for each of the bundle's sequencing experiments, train on
the others (10 % of them kept apart to choose the best epoch) and score the held-out one, as a user's
own sequencing run would be scored.

    python benchmarks/viral_loeo.py                       # cpu preset, models of viral.models
    python benchmarks/viral_loeo.py --models rf --preset smoke

Uses stage 11's training code and caches (work/<preset>/viral_loeo, resumable: a killed run goes on
where it stopped). Prints per-experiment and mean AUC-ROC / PR-AUC per model, plus the AUC of all
held-out predictions pooled, and writes them with each fit's minutes to oof/viral_loeo.json. An
experiment without a viral contig has no AUC; it still counts in the pooled figure.
"""
import argparse
import time

import numpy as np

from nucleic.config import Paths, load_config
from nucleic.dna_data import read_viral
from nucleic.dna_tasks import fit_and_score, stratified_split, stratified_subset, task_input, viral_key
from nucleic.engine import configure_threads, resolve_device
from nucleic.io_utils import write_json
from nucleic.metrics import binary_classification_metrics
from nucleic.stage import artifact_meta, claim_work_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--models", nargs="+", default=None, help="default: viral.models of the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.preset, overrides=args.set)
    vc = cfg.viral
    configure_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    frame = stratified_subset(read_viral(task_input(cfg, "viral")), vc.max_rows, cfg.seed)
    labels, groups = frame.label.to_numpy(), frame.group.to_numpy()
    work = claim_work_dir(Paths(cfg).run / "viral_loeo", viral_key(cfg), False)
    models = args.models or list(vc.models)

    rows, pooled = {}, {kind: np.zeros(len(frame)) for kind in models}
    for experiment in sorted(set(groups)):
        test_idx = np.flatnonzero(groups == experiment)
        train_idx, val_idx = stratified_split(np.flatnonzero(groups != experiment), labels, vc.validation_fraction, cfg.seed)
        for kind in models:
            start = time.time()
            result = fit_and_score(cfg, vc, kind, frame, train_idx, val_idx, test_idx,
                                   work / f"{experiment}_{kind}.pkl", device)
            pooled[kind][test_idx] = result["probs"]
            viral = int(labels[test_idx].sum())
            scores = result["metrics"] if viral else {"auc": None, "pr_auc": None}
            rows[f"{experiment}/{kind}"] = {"auc": scores["auc"], "pr_auc": scores["pr_auc"], "n_test": len(test_idx),
                                           "n_viral": viral, "minutes": round((time.time() - start) / 60, 1)}
            print(f"{experiment:22s} {kind:5s} n={len(test_idx):6d} viral={viral:4d} "
                  f"AUC {_show(scores['auc'])} PR-AUC {_show(scores['pr_auc'])}", flush=True)

    summary = {}
    for kind in models:
        mine = [r for key, r in rows.items() if key.endswith(f"/{kind}") and r["auc"] is not None]
        everything = binary_classification_metrics(labels, pooled[kind])
        summary[kind] = {"mean_auc": float(np.mean([r["auc"] for r in mine])),
                         "mean_pr_auc": float(np.mean([r["pr_auc"] for r in mine])),
                         "pooled_auc": everything["auc"], "pooled_pr_auc": everything["pr_auc"],
                         "experiments_scored": len(mine)}
        print(f"{kind:5s} mean over {len(mine)} experiments: AUC {summary[kind]['mean_auc']:.4f} "
              f"PR-AUC {summary[kind]['mean_pr_auc']:.4f}; pooled AUC {everything['auc']:.4f} "
              f"PR-AUC {everything['pr_auc']:.4f}")
    write_json(Paths(cfg).oof / "viral_loeo.json", {"results": rows, "summary": summary, "models": models,
                                                    **artifact_meta(cfg)})


def _show(value) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
