#!/usr/bin/env python
"""Stage 10: E. coli promoter classification, stratified 5-fold CV; metrics, OOF, attention motifs."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("10_promoter", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
