"""Figures written by the stages (PNG, matplotlib without a display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from .io_utils import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_structure_predictions(path, seq_id: str, sequence: str, slot_names: list[str], record: dict) -> None:
    """One BPP heatmap per prediction slot (upper triangle), predicted pairs in red (lower triangle)."""
    from .loop_types import pair_table

    n = len(slot_names)
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name, bpp, structure in zip(axes.flat, slot_names, record["bpp"], record["structure"]):
        ax.imshow(np.triu(bpp.astype(np.float32)), cmap="viridis", vmin=0, vmax=1)
        partner = pair_table(structure)
        i = [p for p in range(len(partner)) if partner[p] > p]
        ax.scatter(i, [partner[p] for p in i], s=2, c="red", marker="s", linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{seq_id} ({len(sequence)} nt): base-pairing probabilities; red = predicted structure")
    save_figure(fig, path)


def plot_learning_curves(path, model_name: str, histories: list[list[dict]]) -> None:
    """Train loss and validation MCRMSE per epoch, one line per fold."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in enumerate(histories):
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], label=f"fold {fold}")
        validated = [h for h in history if "mcrmse_scored" in h]
        val_ax.plot([h["epoch"] for h in validated], [h["mcrmse_scored"] for h in validated], marker=".",
                    label=f"fold {fold}")
    loss_ax.set(title="training loss (error-weighted MSE)", xlabel="epoch", yscale="log")
    val_ax.set(title="validation MCRMSE (3 scored columns, SN_filter = 1)", xlabel="epoch")
    val_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(model_name)
    save_figure(fig, path)


def plot_oof_error(path, model_name: str, data, oof: dict, frame) -> None:
    """OOF RMSE (mean over the 3 scored columns) by position and by the competition's loop type."""
    from .data import SCORED_COLUMNS

    rows = [i for i in range(len(data)) if data.sn_filter[i] == 1]
    errors = [(oof[i][:data.seq_scored[i]] - data.targets[i])[:, SCORED_COLUMNS] ** 2 for i in rows]
    width = max(len(e) for e in errors)
    by_position = [np.sqrt(np.mean([e[p] for e in errors if len(e) > p], axis=0)).mean() for p in range(width)]
    loops = "".join(frame.loop.iloc[i][:data.seq_scored[i]] for i in rows)
    stacked = np.concatenate(errors)
    letters = sorted(set(loops))
    by_loop = [np.sqrt(stacked[np.array(list(loops)) == ch].mean(axis=0)).mean() for ch in letters]
    counts = [loops.count(ch) for ch in letters]
    fig, (pos_ax, loop_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    pos_ax.plot(range(width), by_position, marker=".")
    pos_ax.set(title="OOF RMSE by position", xlabel="position", ylabel="RMSE (mean of scored columns)")
    bars = loop_ax.bar(letters, by_loop, color="tab:orange")
    loop_ax.bar_label(bars, labels=[f"n={c}" for c in counts], fontsize=7)
    loop_ax.set(title="OOF RMSE by loop type", xlabel="loop type (bpRNA)")
    fig.suptitle(f"{model_name}: out-of-fold error, SN_filter = 1 rows")
    save_figure(fig, path)


def plot_attention(path, model, data, index: int, device) -> None:
    """Last-layer attention (mean over heads) of one sequence beside its mean BPP (paper Fig. 13)."""
    from .dataset import collate

    slots = np.arange(data.n_slots)
    inputs = collate(data, np.full(data.n_slots, index), slots, device)
    attention = model.attention_maps(**inputs)[-1].float().mean(dim=(0, 1)).cpu().numpy()
    pair = inputs["pair_features"][:, :2].mean(dim=0).cpu().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    for ax, image, title in zip(axes, [pair[0], pair[0] + pair[1], attention],
                                ["BPP (mean of structure predictions)", "BPP + 1/d",
                                 "attention, last layer (mean of heads and structures)"]):
        shown = ax.imshow(image, cmap="viridis")
        ax.set_title(title, fontsize=9)
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(f"{data.ids[index]}")
    save_figure(fig, path)


def plot_pretraining(path, model_name: str, history: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], marker=".")
    ax.set(title=f"{model_name}: pretraining reconstruction loss (sequence + structure + loop CE)",
           xlabel="epoch", ylabel="cross-entropy")
    save_figure(fig, path)


def plot_classifier_learning_curves(path, title: str, histories: list[list[dict]],
                                    names: list[str] | None = None) -> None:
    """Training loss and held-out AUC per epoch, one line per fold (or per named run)."""
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = names or [f"fold {fold}" for fold in range(len(histories))]
    for name, history in zip(names, histories):
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], label=name)
        auc_ax.plot(epochs, [h["val_auc"] for h in history], label=name)
    loss_ax.set(title="training loss (BCE)", xlabel="epoch")
    auc_ax.set(title="validation AUC-ROC", xlabel="epoch")
    auc_ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(path, title: str, labels, probabilities, threshold: float = 0.5) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay.from_predictions(labels, (np.asarray(probabilities) >= threshold).astype(int), ax=ax,
                                            colorbar=False)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_motifs(path, title: str, table, boxes) -> None:
    """Left: the most attended k-mers, coloured by how close each comes to a known box (table columns
    kmer, count, box, mismatches). Right: how often each known box occurs (exactly, or with one mismatch)
    in promoters and in non-promoters (`boxes` columns box, mismatches, promoters, non_promoters)."""
    fig, (kmer_ax, box_ax) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    colours = {0: "tab:red", 1: "tab:orange"}
    kmer_ax.bar(table["kmer"], table["count"],
                color=[colours.get(int(m), "tab:grey") for m in table["mismatches"]])
    for x, (box, mismatches) in enumerate(zip(table["box"], table["mismatches"])):
        if mismatches <= 1:
            kmer_ax.annotate(f"{box}\n{'exact' if mismatches == 0 else '1 off'}", (x, 0), ha="center",
                             va="bottom", fontsize=6, color="white")
    kmer_ax.set(title=title, ylabel="count among the 3 most attended k-mers")
    kmer_ax.tick_params(axis="x", rotation=45)
    kmer_ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in (*colours.values(), "tab:grey")],
                   labels=["holds a known box", "a box with 1 mismatch", "neither"], fontsize=7)
    labels = [f"{b} ({'exact' if m == 0 else '<= 1 mismatch'})" for b, m in zip(boxes["box"], boxes["mismatches"])]
    y = np.arange(len(labels))
    box_ax.barh(y - 0.2, boxes["promoters"], height=0.4, label="promoters", color="tab:green")
    box_ax.barh(y + 0.2, boxes["non_promoters"], height=0.4, label="non-promoters", color="tab:grey")
    box_ax.set_yticks(y, labels, fontsize=8)
    box_ax.set(title="sequences holding the -10 / -35 box", xlabel="share of sequences")
    box_ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_roc_pr(path, title: str, curves: dict) -> None:
    """ROC and precision-recall curves of every model side by side: {label: (y_true, y_probability)}."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 5))
    for label, (truth, probability) in curves.items():
        RocCurveDisplay.from_predictions(truth, probability, name=label, ax=roc_ax)
        PrecisionRecallDisplay.from_predictions(truth, probability, name=label, ax=pr_ax)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    truth = np.asarray(next(iter(curves.values()))[0])
    pr_ax.axhline(truth.mean(), color="grey", linestyle=":", linewidth=1)  # a random classifier's precision
    roc_ax.set_title("ROC", fontsize=10)
    pr_ax.set_title("precision-recall", fontsize=10)
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_grouped_scores(path, title: str, scores: dict[str, dict[str, float | None]], ylabel: str,
                        reference: float | None = None) -> None:
    """Bars per group (e.g. held-out experiment) and per model; None (no score) is left blank; an
    optional dashed reference line (e.g. a goal)."""
    groups = list(scores)
    models = list(dict.fromkeys(m for row in scores.values() for m in row))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups)), 4.0))
    for i, model in enumerate(models):
        values = [scores[g].get(model) for g in groups]
        x = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, [np.nan if v is None else v for v in values], width, label=model)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(models), 5))
    save_figure(fig, path)
