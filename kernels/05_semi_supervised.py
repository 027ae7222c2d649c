#!/usr/bin/env python
"""Stage 05: train on pseudo-labels + the training fold at a flat LR, then finetune on ground truth with cosine."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("05_semi_supervised", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
