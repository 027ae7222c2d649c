#!/usr/bin/env python
"""Folding throughput: sequences/s per source (one core), then the whole train+test set x 12, cold and cached.

    python benchmarks/fold_benchmark.py                     # all 5,731 sequences, fresh temp store
    python benchmarks/fold_benchmark.py --store work/structures   # ...and keep the result for stage 01
    python benchmarks/fold_benchmark.py --skip-full         # per-source figures only (a minute)

Prints figures; asserts nothing.
"""
import argparse
import tempfile
import time
from pathlib import Path

from nucleic.config import load_config
from nucleic.data import load_split, locate_openvaccine
from nucleic.folding import make_source
from nucleic.structures import StructureStore, prediction_slots


def per_source_speed(cfg, sequences: list[str]) -> None:
    print(f"per-source throughput, 1 core, {len(sequences)} sequences (lengths {sorted({len(s) for s in sequences})}):")
    for slot in prediction_slots(cfg.fold):
        source = make_source(slot.source, cfg.fold)
        source.fold(sequences[:1], slot.temperature)  # warm-up (numba compile, parameter load)
        start = time.perf_counter()
        source.fold(sequences, slot.temperature)
        rate = len(sequences) / (time.perf_counter() - start)
        print(f"  {slot.name:32s} {rate:7.1f} seq/s")


def full_run(cfg, sequences: list[str], store_dir: Path, n_jobs: int) -> None:
    store = StructureStore(store_dir, cfg.fold)
    start = time.perf_counter()
    store.fold_all(sequences, meta={"benchmark": True}, n_jobs=n_jobs)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    pending = store.pending(sequences)
    check = time.perf_counter() - start
    start = time.perf_counter()
    store.load(sequences)
    load = time.perf_counter() - start
    size = sum(p.stat().st_size for p in store_dir.rglob("*.npz")) / 2**20
    print(f"full set: {len(sequences)} sequences x {len(store.slots)} predictions, n_jobs={n_jobs}")
    print(f"  cold fold          {cold:8.1f} s  ({len(sequences) * len(store.slots) / cold:.0f} folds/s)")
    print(f"  cached re-run      {check:8.1f} s  (pending units: {len(pending)})")
    print(f"  load all into RAM  {load:8.1f} s")
    print(f"  store size         {size:8.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sample", type=int, default=100, help="sequences for the per-source figures")
    parser.add_argument("--store", default=None, help="store folder for the full run (default: a temp dir)")
    parser.add_argument("--n-jobs", type=int, default=-1)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    cfg = load_config("cpu", data_dir=args.data_dir)
    sources = locate_openvaccine(Path(cfg.data_dir))
    sequences = sorted({s for split, src in sources.items() for s in load_split(src, split).sequence})
    by_length = sorted(sequences, key=lambda s: (len(s), s))
    half = args.sample // 2
    per_source_speed(cfg, by_length[:half] + by_length[-half:])
    if args.skip_full:
        return
    if args.store:
        full_run(cfg, sequences, Path(args.store), args.n_jobs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            full_run(cfg, sequences, Path(tmp), args.n_jobs)


if __name__ == "__main__":
    main()
