#!/usr/bin/env python
"""Peak memory of stage 02's input for N random sequences: pairing matrices held in memory (the other
stages' way) against read per sample from a pair file (stage 02's way), issue "scale out".

    python benchmarks/pair_memory.py                          # 5,000 and 50,000 sequences of 107 nt
    python benchmarks/pair_memory.py --sequences 2000 --slots 4

A synthetic structure store (random sparse symmetric matrices in stage 01's shard layout, 12 slots) is
written to a temporary folder (or --store). Each measurement runs in a fresh process, loads the tensors
as stage 02 does, collates 20 batches of 16, and prints its peak resident memory (ru_maxrss) and time.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from nucleic.config import load_config
from nucleic.dataset import collate, length_batches, load_rna_tensors
from nucleic.io_utils import write_npz
from nucleic.structures import META, StructureStore, sequence_key


def fold_settings(slots: int) -> dict:
    """The cpu preset's folding settings with slots / 2 sources at its 2 temperatures."""
    if slots % 2 or not 2 <= slots <= 12:
        raise SystemExit("--slots: an even number from 2 to 12")
    fold = dict(load_config("cpu").fold)
    fold["native_sources"] = list(fold["native_sources"])[:slots // 2]
    return fold


def random_sequences(n: int, length: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGU"), length)) for _ in range(n)]


def write_synthetic_store(root: Path, sequences: list[str], fold: dict) -> StructureStore:
    """Shards as stage 01 writes them: per sequence and slot a sparse symmetric float16 matrix (about L
    pairs, like a real base-pairing probability matrix past fold.bpp_min), a structure and loop types."""
    store = StructureStore(root, fold)
    rng = np.random.default_rng(1)
    by_bucket: dict[int, list[str]] = {}
    for sequence in sequences:
        by_bucket.setdefault(store.bucket(sequence_key(sequence)), []).append(sequence)
    for bucket, members in tqdm(sorted(by_bucket.items()), desc="synthetic store", unit="bucket"):
        for slot in store.slots:
            arrays = {META: np.array(json.dumps({"synthetic": True}))}
            for sequence in members:
                n = len(sequence)
                matrix = np.zeros((n, n), dtype=np.float16)
                i, j = rng.integers(0, n, n), rng.integers(0, n, n)
                matrix[i, j] = matrix[j, i] = rng.random(n).astype(np.float16)
                key = sequence_key(sequence)
                arrays[f"{key}.bpp"], arrays[f"{key}.structure"] = matrix, np.array("." * n)
                arrays[f"{key}.loop"] = np.array("E" * n)
            write_npz(store.shard_path(slot, bucket), arrays)
    return store


def measure(mode: str, store_root: str, n: int, length: int, slots: int) -> dict:
    """Runs in the child process: load as stage 02 does (mode memory | disk), collate 20 batches."""
    start = time.time()
    sequences = random_sequences(n, length)
    store = StructureStore(store_root, fold_settings(slots))
    frame = pd.DataFrame({"id": [f"seq{i}" for i in range(n)], "sequence": sequences, "seq_scored": length})
    pairs = Path(store_root) / "pairs" if mode == "disk" else None
    data = load_rna_tensors(frame, store, pairs_folder=pairs)
    loaded = time.time() - start
    rng = np.random.default_rng(0)
    for batch in length_batches(data.lengths, np.arange(n), 16, rng)[:20]:
        collate(data, batch, rng.integers(0, data.n_slots, len(batch)), torch.device("cpu"))
    return {"mode": mode, "sequences": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_s": round(loaded, 1), "total_s": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--length", type=int, default=107)
    parser.add_argument("--slots", type=int, default=12, help="structure predictions per sequence (even, <= 12)")
    parser.add_argument("--modes", nargs="+", default=["disk", "memory"], choices=["disk", "memory"])
    parser.add_argument("--store", help="folder for the synthetic store (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.store, int(args.child[1]), args.length, args.slots)))
        return
    rows = []
    for n in args.sequences:
        with tempfile.TemporaryDirectory(dir=args.store) as root:
            write_synthetic_store(Path(root), random_sequences(n, args.length), fold_settings(args.slots))
            for mode in args.modes:
                command = [sys.executable, __file__, "--child", mode, str(n), "--store", root,
                           "--length", str(args.length), "--slots", str(args.slots)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode:
                    rows.append({"mode": mode, "sequences": n, "error": result.stderr.strip().splitlines()[-1]})
                else:
                    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    matrices_gb = {n: n * args.slots * args.length ** 2 * 2 / 1e9 for n in args.sequences}
    print(f"\npeak resident memory, {args.slots} structure predictions x {args.length} nt per sequence")
    print(f"{'sequences':>10} {'matrices':>10} {'mode':>7} {'peak RSS':>10} {'load':>8} {'total':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['sequences']:>10} {matrices_gb[row['sequences']]:>8.1f}GB {row['mode']:>7} failed: {row['error']}")
            continue
        print(f"{row['sequences']:>10} {matrices_gb[row['sequences']]:>8.1f}GB {row['mode']:>7} "
              f"{row['peak_rss_mb'] / 1024:>8.2f}GB {row['load_s']:>7.1f}s {row['total_s']:>7.1f}s")


if __name__ == "__main__":
    main()
