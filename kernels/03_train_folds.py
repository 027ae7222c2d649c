#!/usr/bin/env python
"""Stage 03: train the Nucleic Transformer on K folds; write OOF predictions, CV scores and figures."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("03_train_folds", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
