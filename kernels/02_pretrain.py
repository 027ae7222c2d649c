#!/usr/bin/env python
"""Stage 02: pretrain the Nucleic Transformer to recover corrupted sequence, structure and loop tokens.

Runs when pretrain.enabled is true (else it records a skip); stage 03 then starts from its weights.
"""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("02_pretrain", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
