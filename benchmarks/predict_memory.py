#!/usr/bin/env python
"""Resident memory of stage 06, fold after fold: it must stay flat. Runs the stage itself
(`kernels/06_predict.py --force`: every fold's test predictions again, and the submission, which come
out the same) and samples its RSS once a second.

    python benchmarks/predict_memory.py                                # cpu preset
    python benchmarks/predict_memory.py --set model.nlayer=4 --set train.epochs=50
    MALLOC_ARENA_MAX=1 python benchmarks/predict_memory.py             # glibc's heap under more pressure

Needs stages 00-03 of the preset. Before predict() wrote into buffers made before its loop, the stage grew
by 0.7-1.5 GB a minute from its second fold on (to 23 GB and swapping on a 24 GB machine), from its
first with MALLOC_ARENA_MAX=1; calling predict() the same way from a short script did not show it
(README, "Stage 06 memory").
"""
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from nucleic.config import config_argparser

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) // 1024 if found else 0


def follow_folds(stream, state: dict) -> None:
    """The fold the stage is predicting, from its progress bars ("test fold N"); its last line."""
    for line in iter(stream.readline, ""):
        for text in line.split("\r"):
            found = re.search(r"test fold (\d+)", text)
            if found:
                state["fold"] = int(found.group(1))
            if text.strip():
                state["last"] = text.strip()


def main() -> None:
    args, rest = config_argparser(__doc__).parse_known_args()
    if rest:
        raise SystemExit(f"unknown arguments: {rest}")
    command = [sys.executable, str(REPO / "kernels" / "06_predict.py"), "--force", "--preset", args.preset,
               *(["--data-dir", args.data_dir] if args.data_dir else []),
               *[arg for setting in args.overrides for arg in ("--set", setting)]]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"fold": None, "last": ""}
    threading.Thread(target=follow_folds, args=(proc.stdout, state), daemon=True).start()
    per_fold: dict = {}  # fold: (peak MB, seconds sampled)
    while proc.poll() is None:
        rss, fold = rss_mb(proc.pid), state["fold"]
        if fold is not None and rss:
            peak, seconds = per_fold.get(fold, (0, 0))
            per_fold[fold] = (max(peak, rss), seconds + 1)
        time.sleep(1)
    if proc.returncode:
        raise SystemExit(f"stage 06 failed (rc {proc.returncode}): {state['last']}")
    print(f"stage 06: {time.perf_counter() - start:.0f} s; {state['last']}")
    for fold, (peak, seconds) in sorted(per_fold.items()):
        print(f"fold {fold}: about {seconds} s, peak RSS {peak} MB")
    peaks = [peak for _, (peak, _) in sorted(per_fold.items())]
    if peaks:
        print(f"peak RSS of the last fold minus the first's: {peaks[-1] - peaks[0]:+d} MB")


if __name__ == "__main__":
    main()
