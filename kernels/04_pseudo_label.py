#!/usr/bin/env python
"""Stage 04: label the test set with an ensemble of Nucleic Transformers of different depths (per fold)."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("04_pseudo_label", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
