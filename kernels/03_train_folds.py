#!/usr/bin/env python
"""Stage 03: train the Nucleic Transformer on K folds; write OOF predictions, CV scores and figures."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.openvaccine import train_folds, train_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("03_train_folds", __doc__, train_key, train_folds, argv)


if __name__ == "__main__":
    sys.exit(main())
