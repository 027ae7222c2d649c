#!/usr/bin/env python
"""Stage 12: mirtron vs canonical pre-miRNA; paper 70/30 protocol and K-fold CV; NT, nucleotide CNN, DanQ."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("12_mirna", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
