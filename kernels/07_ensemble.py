#!/usr/bin/env python
"""Stage 07: blend every model with OOF predictions and a submission; write submissions/submission.csv.

Non-negative weights per target column minimise the OOF MCRMSE on SN_filter == 1 rows.
"""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("07_ensemble", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
