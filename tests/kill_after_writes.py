"""Run a kernel and SIGKILL it at a reproducible point: right after its N-th atomic artifact write (the
rename of a `*.tmp` onto its target), or after the first write whose target path ends with SUFFIX (a
point that does not depend on how many improving epochs wrote best.pt before it), or, with --in-write,
in place of that rename, so the finished temporary file is left behind as by a kill mid-write. N=0
never kills and lists the writes.

usage: python tests/kill_after_writes.py [--in-write] N|SUFFIX kernels/NN_stage.py [stage options]
"""
from __future__ import annotations

import os
import runpy
import signal
import sys


def main() -> None:
    args = sys.argv[1:]
    in_write = args[0] == "--in-write"
    if in_write:
        args = args[1:]
    target, kernel, stage_args = args[0], args[1], args[2:]
    kill_at = int(target) if target.isdigit() else None
    rename = os.replace
    writes = 0

    def replace_then_maybe_die(src, dst, *rest, **options):
        nonlocal writes
        if not str(src).endswith(".tmp"):
            return rename(src, dst, *rest, **options)
        writes += 1
        if kill_at == 0:
            print(f"artifact write {writes}: {dst}", file=sys.stderr)
        hit = writes == kill_at if kill_at is not None else str(dst).endswith(target)
        if hit and in_write:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(src, dst, *rest, **options)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_maybe_die
    sys.argv = [kernel, *stage_args]
    runpy.run_path(kernel, run_name="__main__")


if __name__ == "__main__":
    main()
