#!/usr/bin/env python
"""Stage 04: label the test set with an ensemble of Nucleic Transformers of different depths (per fold)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.semi_supervised import pseudo_label, pseudo_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("04_pseudo_label", __doc__, pseudo_key, pseudo_label, argv)


if __name__ == "__main__":
    sys.exit(main())
