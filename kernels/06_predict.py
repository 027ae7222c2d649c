#!/usr/bin/env python
"""Stage 06: predict the test set with every fold's best checkpoint; write and check the Kaggle submission."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.openvaccine import predict_test, predict_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("06_predict", __doc__, predict_key, predict_test, argv)


if __name__ == "__main__":
    sys.exit(main())
