#!/usr/bin/env python
"""Stage 12: mirtron vs canonical pre-miRNA; paper 70/30 protocol and K-fold CV; NT, nucleotide CNN, DanQ."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.dna_tasks import mirna, mirna_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("12_mirna", __doc__, mirna_key, mirna, argv)


if __name__ == "__main__":
    sys.exit(main())
