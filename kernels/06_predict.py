#!/usr/bin/env python
"""Stage 06: predict the test set with every fold's best checkpoint; write and check the Kaggle submission."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("06_predict", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
