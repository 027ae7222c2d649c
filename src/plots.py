"""Figures written by the stages (PNG, matplotlib without a display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io_utils import atomic_path  # noqa: E402


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
