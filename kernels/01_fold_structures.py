#!/usr/bin/env python
"""Stage 01: 12 structure predictions per RNA (6 folding sources x 37/50 C).

For every train and test sequence: base-pairing probability matrix, dot-bracket structure and
bpRNA-style loop types, stored in hash-keyed shards under work/structures/. Parallel over cores;
an interrupted run resumes without refolding finished shards.
"""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("01_fold_structures", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
