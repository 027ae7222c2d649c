"""Stage 01's store: 12 structure predictions per sequence, sharded by sequence hash.

Layout: <structures>/<slot>/<bucket>.npz where a slot is one source at one temperature
("contrafold_50C") and the bucket is the sequence hash modulo fold.buckets. A shard holds, per
sequence key, `<key>.bpp` (float16 L x L; values under fold.bpp_min stored as 0),
`<key>.structure` and `<key>.loop` (bpRNA-style loop types), plus `__meta__`. Shards are written
atomically and grow by merging, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from .folding import active_sources, make_source
from .io_utils import read_npz, write_npz
from .loop_types import loop_types

META = "__meta__"


def sequence_key(sequence: str) -> str:
    return hashlib.sha1(sequence.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Slot:
    source: str
    temperature: float

    @property
    def name(self) -> str:
        return f"{self.source}_{self.temperature:g}C"


def prediction_slots(fold_cfg) -> list[Slot]:
    """The structure predictions per sequence, sources major: 6 sources x 2 temperatures = 12."""
    return [Slot(s, float(t)) for s in active_sources(fold_cfg) for t in fold_cfg["temperatures"]]


class StructureStore:
    def __init__(self, root: str | Path, fold_cfg):
        self.root = Path(root)
        self.fold_cfg = dict(fold_cfg)
        self.slots = prediction_slots(fold_cfg)
        self.buckets = int(fold_cfg["buckets"])

    def bucket(self, key: str) -> int:
        return int(key, 16) % self.buckets

    def shard_path(self, slot: Slot, bucket: int) -> Path:
        return self.root / slot.name / f"{bucket:04d}.npz"

    def shard_keys(self, path: Path) -> set[str]:
        """Sequence keys a shard holds (reads only the zip directory); empty if absent or unreadable."""
        try:
            with zipfile.ZipFile(path) as zf:
                return {n[:-len(".bpp.npy")] for n in zf.namelist() if n.endswith(".bpp.npy")}
        except (OSError, zipfile.BadZipFile):
            return set()

    def pending(self, sequences: list[str], force: bool = False) -> list[tuple[Slot, int, dict[str, str]]]:
        """Work units (slot, bucket, {key: sequence}) still to fold."""
        by_bucket: dict[int, dict[str, str]] = {}
        for seq in sequences:
            key = sequence_key(seq)
            by_bucket.setdefault(self.bucket(key), {})[key] = seq
        units = []
        for bucket, wanted in sorted(by_bucket.items()):
            for slot in self.slots:
                done = set() if force else self.shard_keys(self.shard_path(slot, bucket))
                todo = {k: s for k, s in wanted.items() if k not in done}
                if todo:
                    units.append((slot, bucket, todo))
        return units

    def shard_paths(self, sequences: list[str]) -> list[Path]:
        buckets = sorted({self.bucket(sequence_key(s)) for s in sequences})
        return [self.shard_path(slot, b) for b in buckets for slot in self.slots]

    def load(self, sequences: list[str], with_bpp: bool = True) -> dict[str, dict]:
        """{key: {"bpp": (n_slots, L, L) float16, "structure": [...], "loop": [...]}} for each sequence
        (with_bpp=False: no "bpp", and the matrices are not read)."""
        keys = {sequence_key(s) for s in sequences}
        by_bucket: dict[int, set[str]] = {}
        for key in keys:
            by_bucket.setdefault(self.bucket(key), set()).add(key)
        out = {k: {"bpp": [], "structure": [], "loop": []} for k in keys}
        from .stage import InputError

        for bucket, bucket_keys in by_bucket.items():
            for slot in self.slots:
                path = self.shard_path(slot, bucket)
                if not path.exists():
                    raise InputError(path, "structure shard not found: run stage 01 (fold_structures)")
                try:
                    with np.load(path, allow_pickle=False) as shard:
                        for key in bucket_keys:
                            if f"{key}.bpp" not in shard.files:
                                raise InputError(path, f"lacks sequence {key}: run stage 01 (fold_structures)")
                            if with_bpp:
                                out[key]["bpp"].append(shard[f"{key}.bpp"])
                            out[key]["structure"].append(str(shard[f"{key}.structure"]))
                            out[key]["loop"].append(str(shard[f"{key}.loop"]))
                except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                    path.unlink(missing_ok=True)  # a cache entry: stage 01 refolds what is missing
                    raise InputError(path, f"damaged structure shard ({type(err).__name__}), removed: run stage 01 "
                                           "(fold_structures) again to refold it") from None
        for entry in out.values():
            if with_bpp:
                entry["bpp"] = np.stack(entry["bpp"])
            else:
                del entry["bpp"]
        return out

    def write_pair_file(self, sequences: list[str], path: Path) -> dict[str, dict]:
        """Every sequence's (n_slots, L, L) float16 matrices, one after another in `sequences` order, into
        one flat file (read back per sample: PairRow), written a bucket of shards at a time so that memory
        stays that of one bucket. Returns the rest of what it read, as load(with_bpp=False) would, so the
        shards are read once."""
        from .io_utils import atomic_path

        offsets = pair_offsets(sequences, len(self.slots))
        by_bucket: dict[int, list[int]] = {}
        for row, sequence in enumerate(sequences):
            by_bucket.setdefault(self.bucket(sequence_key(sequence)), []).append(row)
        records: dict[str, dict] = {}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.truncate(int(offsets[-1]))
            for rows in tqdm(by_bucket.values(), desc="pair file", unit="bucket", leave=False):
                found = self.load([sequences[r] for r in rows])
                for r in rows:
                    f.seek(int(offsets[r]))
                    f.write(np.ascontiguousarray(found[sequence_key(sequences[r])]["bpp"], dtype=np.float16).tobytes())
                for entry in found.values():
                    del entry["bpp"]
                records.update(found)
        return records

    def fold_unit(self, slot: Slot, bucket: int, todo: dict[str, str], meta: dict) -> tuple[str, int, float]:
        """Fold the missing sequences of one shard and write it back merged. Runs in a worker."""
        start = time.time()
        path = self.shard_path(slot, bucket)
        arrays = read_npz(path) if self.shard_keys(path) else {}
        source = make_source(slot.source, self.fold_cfg)
        keys = sorted(todo)
        for key, pred in zip(keys, source.fold([todo[k] for k in keys], slot.temperature)):
            bpp = np.where(pred.bpp >= self.fold_cfg["bpp_min"], pred.bpp, 0).astype(np.float16)
            arrays[f"{key}.bpp"] = bpp
            arrays[f"{key}.structure"] = np.array(pred.structure)
            arrays[f"{key}.loop"] = np.array(loop_types(pred.structure))
        shard_meta = {**meta, "slot": slot.name, "source_version": source.version(),
                      "decoding": source.decoding, "has_temperature": source.has_temperature}
        arrays[META] = np.array(json.dumps(shard_meta, sort_keys=True))
        write_npz(path, arrays)
        return slot.name, len(todo), time.time() - start

    def fold_all(self, sequences: list[str], meta: dict, n_jobs: int = -1, force: bool = False) -> dict:
        """Fold every (slot, sequence) not yet stored; returns per-slot sequences/s of this run."""
        for leftover in self.root.glob("*/.*.tmp"):  # from a run killed mid-write
            leftover.unlink(missing_ok=True)
        units = self.pending(sequences, force)
        stats: dict[str, list[float]] = {}
        if units:
            jobs = (delayed(self.fold_unit)(slot, bucket, todo, meta) for slot, bucket, todo in units)
            results = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(jobs)
            for slot_name, count, seconds in tqdm(results, total=len(units), desc="fold shards", unit="shard"):
                acc = stats.setdefault(slot_name, [0, 0.0])
                acc[0] += count
                acc[1] += seconds
        return {"units_folded": len(units),
                "seq_per_s_per_core": {k: round(n / max(s, 1e-9), 1) for k, (n, s) in sorted(stats.items())}}


def pair_offsets(sequences: list[str], n_slots: int) -> np.ndarray:
    """Byte offset of every sequence's matrices in a pair file, and the file's size last."""
    sizes = np.array([n_slots * len(s) ** 2 * 2 for s in sequences], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


@dataclass(frozen=True)
class PairRow:
    """One sequence's pairing matrices in a pair file, read from disk when indexed: `row[slot]` is the
    (L, L) float16 matrix of one structure prediction, exactly as stored."""
    path: str
    offset: int
    n_slots: int
    length: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n_slots, self.length, self.length

    def __getitem__(self, slot: int) -> np.ndarray:
        count = self.length * self.length
        matrix = np.fromfile(self.path, dtype=np.float16, count=count, offset=self.offset + int(slot) * count * 2)
        return matrix.reshape(self.length, self.length)


def pair_rows(store: StructureStore, sequences: list[str], folder: Path) -> tuple[list[PairRow], dict[str, dict] | None]:
    """The matrices of `sequences` as PairRows of one pair file in `folder`, written when missing (named by
    the sequences and the folding settings; files of other sequences are removed), and the structures read
    while writing it (None when the file was there already)."""
    digest = hashlib.sha1(json.dumps([sequences, store.fold_cfg], sort_keys=True, default=str).encode()).hexdigest()
    path = Path(folder) / f"{digest[:16]}.f16"
    offsets = pair_offsets(sequences, len(store.slots))
    records = None
    if not path.exists() or path.stat().st_size != offsets[-1]:
        for other in Path(folder).glob("*.f16"):
            other.unlink()
        records = store.write_pair_file(sequences, path)
    return [PairRow(str(path), int(offsets[i]), len(store.slots), len(s)) for i, s in enumerate(sequences)], records


# ---------------------------------------------------------------- stage 01

def prepared_sequences(cfg) -> tuple[list[str], dict[str, str]]:
    """Unique sequences of the prepared train + test tables, and one example id per split."""
    from .config import Paths
    from .io_utils import read_pickle
    from .stage import InputError

    paths = Paths(cfg)
    frames = {}
    for split in ("train", "test"):
        file = paths.prepared / f"{split}.pkl"
        if not file.exists():
            raise InputError(file, "not found: run stage 00 (prepare_input) first")
        frames[split] = read_pickle(file)
    sequences = sorted(set(frames["train"].sequence) | set(frames["test"].sequence))
    examples = {split: frame.iloc[0] for split, frame in frames.items() if len(frame)}
    return sequences, examples


def _fold_settings(cfg) -> dict:
    return {k: v for k, v in dict(cfg.fold).items() if k != "n_jobs"}


def fold_key(cfg) -> dict:
    sequences, _ = prepared_sequences(cfg)
    digest = hashlib.sha1("\n".join(sequences).encode()).hexdigest()
    return {"fold": _fold_settings(cfg), "sequences_sha1": digest}  # the folder's contents: structures_complete


def structures_complete(cfg) -> bool:
    """Every shard present and readable: a missing or truncated one makes stage 01 redo just that shard."""
    from .config import Paths

    sequences, _ = prepared_sequences(cfg)
    return not StructureStore(Paths(cfg).structures, cfg.fold).pending(sequences)


def fold_structures(cfg, force: bool = False) -> tuple[list[Path], dict]:
    from .config import Paths, git_commit
    from .plots import plot_structure_predictions

    paths = Paths(cfg)
    sequences, examples = prepared_sequences(cfg)
    store = StructureStore(paths.structures, cfg.fold)
    meta = {"git_commit": git_commit(), "fold": _fold_settings(cfg)}
    speed = store.fold_all(sequences, meta, n_jobs=cfg.fold.n_jobs, force=force)
    example = examples.get("test", examples.get("train"))
    figure = paths.figures / "01_structure_predictions.png"
    record = store.load([example.sequence])[sequence_key(example.sequence)]
    plot_structure_predictions(figure, example.id, example.sequence, [s.name for s in store.slots], record)
    summary = {"sequences": len(sequences), "slots": len(store.slots), **speed}
    return store.shard_paths(sequences) + [figure], summary


# ---------------------------------------------------------------- structure input of the classifiers

CLASSIFIER_SLOT = {"native_sources": ["vienna_turner2004"], "temperatures": [37]}


def pairing_probabilities(cfg, sequences: list[str], length: int):
    """(N, length, length) float16 base-pairing probabilities (ViennaRNA, Turner 2004, 37 C; T read as U),
    zero-padded: folded once into stage 01's store (paths.structures, the same slot as OpenVaccine's)
    and read from it afterwards."""
    import torch

    from .config import Paths, git_commit

    store = StructureStore(Paths(cfg).structures, {**dict(cfg.fold), "backend": "native", **CLASSIFIER_SLOT})
    rna = [s.upper().replace("T", "U") for s in sequences]
    meta = {"git_commit": git_commit(), "fold": _fold_settings(cfg)}
    store.fold_all(sorted(set(rna)), meta, n_jobs=cfg.fold.n_jobs)
    found = store.load(rna)
    out = torch.zeros(len(rna), length, length, dtype=torch.float16)
    for row, sequence in enumerate(rna):
        n = min(len(sequence), length)
        out[row, :n, :n] = torch.from_numpy(found[sequence_key(sequence)]["bpp"][0][:n, :n])
    return out
