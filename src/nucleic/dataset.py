"""OpenVaccine tensors: every RNA with its 12 structure predictions, batched by length."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .engine import to_device
from .features import LOOP_TOKENS, SEQUENCE_TOKENS, STRUCTURE_TOKENS, pair_features, tokenize
from .structures import PairRow, StructureStore, pair_rows, sequence_key


@dataclass
class RNATensors:
    ids: list[str]
    sequence: list[np.ndarray]  # (L,) token ids
    structure: list[np.ndarray]  # (n_slots, L) token ids, one row per structure prediction
    loop: list[np.ndarray]  # (n_slots, L)
    bpp: list[np.ndarray] | list[PairRow]  # (n_slots, L, L) float16, in memory or read per sample
    seq_scored: np.ndarray
    targets: list[np.ndarray] | None = None  # (seq_scored, 5)
    errors: list[np.ndarray] | None = None
    signal_to_noise: np.ndarray | None = None
    sn_filter: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.sequence])

    @property
    def batch_groups(self) -> np.ndarray:
        """Key of rows that may share a training batch: same length and same number of labelled
        positions (pseudo-labelled test rows carry more of them than training rows of that length)."""
        return self.lengths * 4096 + np.asarray(self.seq_scored)

    @property
    def n_slots(self) -> int:
        return self.bpp[0].shape[0]


def load_rna_tensors(frame: pd.DataFrame, store: StructureStore, pairs_folder: Path | None = None) -> RNATensors:
    """The rows of `frame` with their structure predictions. pairs_folder: the pairing matrices stay on disk
    (a pair file there, read per sample), so memory does not grow with them (12 L^2 float16 per sequence)."""
    sequences = list(frame.sequence)
    if pairs_folder is None:
        records = store.load(sequences)
        bpp = [records[sequence_key(s)]["bpp"] for s in sequences]
    else:
        bpp, records = pair_rows(store, sequences, pairs_folder)
        records = records if records is not None else store.load(sequences, with_bpp=False)
    rows = [records[sequence_key(s)] for s in sequences]
    labelled = "targets" in frame
    return RNATensors(
        ids=list(frame.id),
        sequence=[tokenize(s, SEQUENCE_TOKENS) for s in frame.sequence],
        structure=[np.stack([tokenize(s, STRUCTURE_TOKENS) for s in r["structure"]]) for r in rows],
        loop=[np.stack([tokenize(s, LOOP_TOKENS) for s in r["loop"]]) for r in rows],
        bpp=bpp,
        seq_scored=frame.seq_scored.to_numpy(),
        targets=list(frame.targets) if labelled else None,
        errors=list(frame.errors) if labelled else None,
        signal_to_noise=frame.signal_to_noise.to_numpy() if labelled else None,
        sn_filter=frame.SN_filter.to_numpy() if labelled else None,
    )


def length_batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int,
                   rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Batches of equal-length sequences (no padding); shuffled within and across lengths when rng is given."""
    batches = []
    for length in np.unique(lengths[indices]):
        group = indices[lengths[indices] == length]
        if rng is not None:
            group = rng.permutation(group)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def token_inputs(data: RNATensors, indices: np.ndarray, slots: np.ndarray) -> dict[str, torch.Tensor]:
    """The token streams of samples `indices` (B, L) on the CPU, each with structure prediction `slots[i]`."""
    return {
        "sequence": torch.from_numpy(np.stack([data.sequence[i] for i in indices])),
        "structure": torch.from_numpy(np.stack([data.structure[i][s] for i, s in zip(indices, slots)])),
        "loop": torch.from_numpy(np.stack([data.loop[i][s] for i, s in zip(indices, slots)])),
    }


def use_channels_last(setting: bool | str, device: torch.device) -> bool:
    """A train.channels_last setting on `device`: true, false, or auto (on a CPU only)."""
    return setting is True or (setting == "auto" and device.type == "cpu")


def collate(data: RNATensors, indices: np.ndarray, slots: np.ndarray, device: torch.device,
            with_labels: bool = False, channels_last: bool | str = False) -> dict[str, torch.Tensor]:
    """Model inputs for samples `indices`, each with structure prediction `slots[i]`.

    channels_last (true, false, or auto: on a CPU only) lays the (B, 4, L, L) pair features out for
    faster 2-D convolutions on CPU; on a GPU it slows them (README, "On a GPU").
    """
    bpp = np.stack([data.bpp[i][s] for i, s in zip(indices, slots)])
    batch = {**token_inputs(data, indices, slots), "pair_features": torch.from_numpy(pair_features(bpp))}
    if with_labels:
        batch["targets"] = torch.from_numpy(np.stack([data.targets[i] for i in indices]))
        batch["errors"] = torch.from_numpy(np.stack([data.errors[i] for i in indices]))
    if use_channels_last(channels_last, device):
        batch["pair_features"] = batch["pair_features"].contiguous(memory_format=torch.channels_last)
    return {k: to_device(v, device) for k, v in batch.items()}
