#!/usr/bin/env python
"""Stage 03: train the Nucleic Transformer on K folds; write OOF predictions, CV scores and figures."""
import sys

from nucleic.openvaccine import train_folds, train_key
from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("03_train_folds", __doc__, train_key, train_folds, argv,
                     upstream=("00_prepare_input", "01_fold_structures", "02_pretrain"))


if __name__ == "__main__":
    sys.exit(main())
