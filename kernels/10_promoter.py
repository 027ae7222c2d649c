#!/usr/bin/env python
"""Stage 10: E. coli promoter classification, stratified 5-fold CV; metrics, OOF, attention motifs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.dna_tasks import promoter, promoter_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("10_promoter", __doc__, promoter_key, promoter, argv)


if __name__ == "__main__":
    sys.exit(main())
