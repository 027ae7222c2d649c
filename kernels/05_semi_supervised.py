#!/usr/bin/env python
"""Stage 05: train on pseudo-labels + the training fold at a flat LR, then finetune on ground truth with cosine."""
import sys

from nucleic.semi_supervised import semi_key, semi_supervised
from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("05_semi_supervised", __doc__, semi_key, semi_supervised, argv,
                     upstream=("03_train_folds", "04_pseudo_label"))


if __name__ == "__main__":
    sys.exit(main())
