#!/usr/bin/env python
"""Viral contigs, leave one experiment out: for each of the bundle's sequencing experiments, train on
the others (10 % of them kept apart to choose the best epoch) and score the held-out one, as a user's
own sequencing run would be scored.

    python benchmarks/viral_loeo.py                       # cpu preset, models of viral.models
    python benchmarks/viral_loeo.py --models rf --preset smoke
    python benchmarks/viral_loeo.py --name kmer --models viraminer \\
        --set "viral.viraminer.kmer_branch={ks: [1,2,3,4,5], dense: 64}"

Figure: oof/figures/viral_loeo[_<name>].png (AUC per experiment and model, the 0.85 goal dashed).
Uses stage 11's training code and caches (work/<preset>/viral_loeo/<name>, resumable: a killed run goes on
where it stopped). Prints per-experiment and mean AUC-ROC / PR-AUC per model, plus the AUC of all
held-out predictions pooled, and writes them with each fit's minutes to oof/viral_loeo[_<name>].json (a
run with other --models than that file's stops before training unless --overwrite). An
experiment without a viral contig has no AUC; it still counts in the pooled figure. "served" is stage
11's rule applied inside each split (choose_served, viral.choose_on): the model or mean of models
(viral.blend) with the best AUC within each training experiment, averaged, on the training experiments
only (each scored by fits on the others, or the validation rows), scored on the held-out experiment.
With viral.run_context set, "served" is that blend stacked with the held-out experiment's run context
(fit_run_context: scored as one run), and "blend" the blend alone. With viral.contig_mean, "served" then
scores the segments of one contig together (classify.contig_mean), and "served_by_segment" each alone.
"fixed_blends": every mean of two or more models, the same for every experiment, with its mean AUC
(read after the fact: a ceiling, not a rule's score).
"""
import json
import time

import numpy as np

from nucleic.config import Paths, config_argparser, config_from_args
from nucleic.dna_data import read_viral
from nucleic.dna_tasks import (
    choose_served,
    fit_and_score,
    fit_run_context,
    grouped_auc,
    scores_where_given,
    served_mean,
    served_steps,
    stratified_split,
    stratified_subset,
    task_blend,
    task_input,
    viral_fits_key,
)
from nucleic.engine import setup_device
from nucleic.io_utils import write_json
from nucleic.plots import plot_grouped_scores
from nucleic.stage import artifact_meta, claim_work_dir


def main() -> None:
    parser = config_argparser(__doc__)  # --preset, --data-dir, --set as the stages take them
    parser.add_argument("--models", nargs="+", default=None, help="default: viral.models of the preset")
    parser.add_argument("--name", default="default", help="a variant's name: its own caches and JSON")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this name's JSON and figure even when they hold other models")
    args = parser.parse_args()
    cfg = config_from_args(args)
    vc = cfg.viral
    models = args.models or list(vc.models)
    suffix = "" if args.name == "default" else f"_{args.name}"
    report = Paths(cfg).oof / f"viral_loeo{suffix}.json"
    refuse_to_replace_other_models(report, models, args.overwrite)
    device = setup_device(cfg.train)
    frame = stratified_subset(read_viral(task_input(cfg, "viral")), vc.max_rows, cfg.seed)
    labels, groups = frame.label.to_numpy(), frame.group.to_numpy()
    work = claim_work_dir(Paths(cfg).run / "viral_loeo" / args.name, viral_fits_key(cfg), False)

    served_kinds = ["blend", "served_by_segment", "served"]
    rows, pooled = {}, {kind: np.zeros(len(frame)) for kind in [*models, *served_kinds]}
    blend = task_blend(vc)
    for experiment in sorted(set(groups)):
        test_idx = np.flatnonzero(groups == experiment)
        train_idx, val_idx = stratified_split(np.flatnonzero(groups != experiment), labels, vc.validation_fraction, cfg.seed)
        viral = int(labels[test_idx].sum())
        val_probs = {}
        for kind in models:
            start = time.time()
            result = fit_and_score(cfg, vc, kind, frame, train_idx, val_idx, test_idx,
                                   work / f"{experiment}_{kind}.pkl", device)
            val_probs[kind] = result["val_probs"]
            row = _row(labels[test_idx], result["probs"], round((time.time() - start) / 60, 1))
            pooled[kind][test_idx], rows[f"{experiment}/{kind}"] = result["probs"], row
            print(f"{experiment:22s} {kind:9s} n={len(test_idx):6d} viral={viral:4d} "
                  f"AUC {_show(row['auc'])} PR-AUC {_show(row['pr_auc'])} ({row['minutes']} min)", flush=True)
        served, chosen_auc = choose_served(cfg, vc, frame, train_idx, val_idx, val_probs,
                                           work / f"{experiment}_cross_experiment.pkl")
        if served is None:  # homology models only: none scores every contig
            continue
        stacker = fit_run_context(cfg, vc, frame, train_idx, val_idx, served, work / f"{experiment}_cross_experiment.pkl")
        steps = served_steps(vc, stacker, frame, test_idx, served_mean([pooled[kind][test_idx] for kind in served], blend))
        for kind, probs in steps.items():
            pooled[kind][test_idx], rows[f"{experiment}/{kind}"] = probs, _row(labels[test_idx], probs, 0.0)
        rows[f"{experiment}/served"].update(models=list(served), chosen_auc=chosen_auc)
        if stacker is not None:
            rows[f"{experiment}/served"].update(run_context=stacker.coefficients())
        print(f"{experiment:22s} served ({' + '.join(served)}): AUC {_show(rows[f'{experiment}/served']['auc'])}",
              flush=True)

    summary = {}
    for kind in [*models, *served_kinds]:
        mine = [r for key, r in rows.items() if key.endswith(f"/{kind}") and r["auc"] is not None]
        if not mine:
            continue
        everything = scores_where_given(labels, pooled[kind])  # a homology model: the contigs it scores
        summary[kind] = {"mean_auc": float(np.mean([r["auc"] for r in mine])),
                         "mean_pr_auc": float(np.mean([r["pr_auc"] for r in mine])),
                         "pooled_auc": everything["auc"], "pooled_pr_auc": everything["pr_auc"],
                         "experiments_scored": len(mine), **_coverage(everything)}
        print(f"{kind:9s} mean over {len(mine)} experiments: AUC {summary[kind]['mean_auc']:.4f} "
              f"PR-AUC {summary[kind]['mean_pr_auc']:.4f}; pooled AUC {everything['auc']:.4f} "
              f"PR-AUC {everything['pr_auc']:.4f}" + (f"; scores {everything['coverage']:.1%} of the contigs"
                                                     if "coverage" in everything else ""))
    blends = fixed_blends(models, pooled, labels, groups, blend)
    figure = Paths(cfg).figures / f"viral_loeo{suffix}.png"
    by_experiment = {key.split("/")[0]: {} for key in rows}
    for key, row in rows.items():
        experiment, kind = key.split("/")
        by_experiment[experiment][kind] = row["auc"]
    by_experiment["mean"] = {kind: s["mean_auc"] for kind, s in summary.items()}
    plot_grouped_scores(figure, "viral contigs, leave one experiment out (blank: no viral contig)", by_experiment,
                        "AUC-ROC on the held-out experiment", reference=0.85)
    write_json(report, {"results": rows, "summary": summary, "models": models,
                                                             "fixed_blends": blends, "blend": blend,
                                                             "settings": args.overrides,
                                                             **artifact_meta(cfg)})


def refuse_to_replace_other_models(report, models: list[str], overwrite: bool) -> None:
    """A second run under one --name with other --models would replace the first's JSON and figure (its
    fits stay cached under the name): stop before any training, unless --overwrite."""
    if overwrite or not report.exists():
        return
    saved = json.loads(report.read_text()).get("models")
    if saved is not None and saved != models:
        raise SystemExit(f"viral_loeo: {report} holds the models {' '.join(saved)}; this run's "
                         f"({' '.join(models)}) would replace it: give another --name, or --overwrite")


def fixed_blends(models: list[str], pooled: dict, labels: np.ndarray, groups: np.ndarray, blend: str) -> dict:
    """Every mean of two or more models (served_mean), the same one for every held-out experiment: its mean
    AUC over the experiments with a viral contig; a mean that leaves a contig without a probability (only
    homology models) is skipped. Read after the fact, so the best row is chosen on the held-out
    experiments themselves: a ceiling for a fixed blend, not a rule's score."""
    import itertools

    table = {}
    for size in range(2, len(models) + 1):
        for combination in itertools.combinations(models, size):
            mean = served_mean([pooled[kind] for kind in combination], blend)
            if not np.isnan(mean).any():
                table[" + ".join(combination)] = grouped_auc(labels, mean, groups)
    for name, auc in sorted(table.items(), key=lambda item: -item[1]):
        print(f"fixed blend {name:30s} mean AUC over the experiments with a viral contig {auc:.4f}")
    return table


def _row(labels: np.ndarray, probs: np.ndarray, minutes: float) -> dict:
    """AUC-ROC and PR-AUC of one held-out experiment (None without a viral contig or, for a homology
    model, without both classes among the contigs it scores, then also its coverage), its size, minutes."""
    scores = scores_where_given(labels, probs)
    return {"auc": _number(scores["auc"]), "pr_auc": _number(scores["pr_auc"]), "n_test": len(labels),
            "n_viral": int(labels.sum()), "minutes": minutes, **_coverage(scores)}


def _number(value: float) -> float | None:
    return None if np.isnan(value) else value


def _coverage(scores: dict) -> dict:
    return {"coverage": scores["coverage"]} if "coverage" in scores else {}


def _show(value) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
