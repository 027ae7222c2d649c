"""Classification stages: cross-validated classifiers with metrics, OOF probabilities, figures and
attention motifs. Stage 10 (promoter) so far; stages 11 (viral) and 12 (mirna) reuse run_cv."""
from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .classify import encode_sequences, fit_classifier, predict_proba
from .config import Config, Paths
from .dna_data import read_promoter
from .io_utils import read_pickle, write_csv, write_json, write_pickle
from .metrics import binary_classification_metrics
from .stage import artifact_meta
from .train import configure_threads, resolve_device

SUMMARY_METRICS = ("accuracy", "mcc", "sensitivity", "specificity", "f1", "auc", "pr_auc")


def stratified_subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most `limit` rows with the class balance kept (smoke runs)."""
    if limit is None or limit >= len(frame):
        return frame.reset_index(drop=True)
    share = limit / len(frame)
    parts = [group.sample(max(1, round(len(group) * share)), random_state=seed) for _, group in frame.groupby("label")]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def run_cv(cfg: Config, task_cfg, frame: pd.DataFrame, work: Path, device) -> dict:
    """Stratified K-fold CV of task_cfg.model; fold results cached in `work` (resumable)."""
    from sklearn.model_selection import StratifiedKFold

    tokens = encode_sequences(list(frame.sequence))
    labels = frame.label.to_numpy()
    splitter = StratifiedKFold(task_cfg.folds, shuffle=True, random_state=cfg.seed)
    folds = np.zeros(len(frame), dtype=np.int64)
    probabilities = np.zeros(len(frame))
    per_fold, histories, motifs = [], [], collections.Counter()
    for fold, (train_idx, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        cache = work / f"fold{fold}.pkl"
        if not cache.exists():
            model, history = fit_classifier(task_cfg.model, task_cfg[task_cfg.model], task_cfg, tokens[train_idx],
                                            labels[train_idx], tokens[val_idx], labels[val_idx],
                                            cfg.seed + fold, device, desc=f"fold {fold}")
            probs = predict_proba(model, tokens[val_idx], device, 256)
            found = (attention_motifs(model, tokens[val_idx], labels[val_idx], probs, frame.sequence.iloc[val_idx])
                     if task_cfg.model == "nt" else {})
            write_pickle(cache, {"probs": probs, "history": history, "motifs": dict(found)})
        result = read_pickle(cache)
        folds[val_idx], probabilities[val_idx] = fold, result["probs"]
        per_fold.append({"fold": fold, **binary_classification_metrics(labels[val_idx], result["probs"])})
        histories.append(result["history"])
        motifs.update(result["motifs"])
    summary = {m: float(np.mean([f[m] for f in per_fold])) for m in SUMMARY_METRICS}
    return {"summary": summary, "per_fold": per_fold, "histories": histories, "motifs": motifs,
            "folds": folds, "probabilities": probabilities}


@torch.no_grad()
def attention_motifs(model, tokens: torch.Tensor, labels: np.ndarray, probs: np.ndarray,
                     sequences: pd.Series, top: int = 3) -> collections.Counter:
    """For correctly predicted positives, count the k-mers among the `top` most attended (column sums of
    the last attention map, over heads and queries), as paper Fig. 9."""
    chosen = np.flatnonzero((labels == 1) & (probs >= 0.5))
    counts = collections.Counter()
    for batch in np.array_split(chosen, max(1, len(chosen) // 64)):
        if not len(batch):
            continue
        attention = model.attention_maps(tokens[batch])[-1].sum(dim=(1, 2))  # (B, L-k+1)
        for row, index in enumerate(batch):
            sequence = sequences.iloc[index]
            for position in attention[row].topk(top).indices.tolist():
                counts[sequence[position:position + model.k]] += 1
    return counts


def promoter_key(cfg: Config) -> dict:
    path = Paths(cfg).input / "promoter" / "v9d3.csv"
    digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else None
    return {"promoter": dict(cfg.promoter), "seed": cfg.seed, "data_sha1": digest}


def promoter(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    from .plots import plot_classifier_learning_curves, plot_confusion, plot_motifs

    paths, pc = Paths(cfg), cfg.promoter
    configure_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    frame = stratified_subset(read_promoter(paths.input / "promoter" / "v9d3.csv"), pc.max_rows, cfg.seed)
    work = paths.run / "promoter" / pc.model
    if force and work.exists():
        import shutil
        shutil.rmtree(work)
    result = run_cv(cfg, pc, frame, work, device)
    oof = paths.oof / "promoter_oof.csv"
    write_csv(oof, pd.DataFrame({"id": frame.id, "label": frame.label, "probability": result["probabilities"],
                                 "fold": result["folds"]}))
    metrics = paths.oof / "promoter_metrics.json"
    write_json(metrics, {**result["summary"], "per_fold": result["per_fold"], "model": pc.model,
                         "n_sequences": len(frame), **artifact_meta(cfg)})
    figures = [paths.figures / "promoter_learning_curves.png", paths.figures / "promoter_confusion.png"]
    plot_classifier_learning_curves(figures[0], f"promoter ({pc.model})", result["histories"])
    plot_confusion(figures[1], f"promoter ({pc.model}), {pc.folds}-fold CV", frame.label.to_numpy(),
                   result["probabilities"])
    outputs = [oof, metrics, *figures]
    if result["motifs"]:
        motif_csv = paths.oof / "promoter_motifs.csv"
        table = pd.DataFrame(result["motifs"].most_common(), columns=["kmer", "count"])
        write_csv(motif_csv, table)
        motif_png = paths.figures / "promoter_motifs.png"
        plot_motifs(motif_png, "k-mers most attended in correctly predicted promoters", table.head(10))
        outputs += [motif_csv, motif_png]
    return outputs, {k: round(v, 4) for k, v in result["summary"].items() if k in ("accuracy", "mcc")}
