#!/usr/bin/env python
"""Stage 02: pretrain the Nucleic Transformer to recover corrupted sequence, structure and loop tokens.

Runs when pretrain.enabled is true (else it records a skip); stage 03 then starts from its weights.
"""
import sys

from nucleic.pretrain import pretrain_key, run_pretraining
from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("02_pretrain", __doc__, pretrain_key, run_pretraining, argv,
                     upstream=("00_prepare_input", "01_fold_structures"))


if __name__ == "__main__":
    sys.exit(main())
