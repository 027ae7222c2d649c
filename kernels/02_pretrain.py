#!/usr/bin/env python
"""Stage 02: pretrain the Nucleic Transformer to recover corrupted sequence, structure and loop tokens.

Runs when pretrain.enabled is true (else it records a skip); stage 03 then starts from its weights.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.pretrain import pretrain_key, run_pretraining  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("02_pretrain", __doc__, pretrain_key, run_pretraining, argv)


if __name__ == "__main__":
    sys.exit(main())
