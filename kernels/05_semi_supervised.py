#!/usr/bin/env python
"""Stage 05: train on pseudo-labels + the training fold at a flat LR, then finetune on ground truth with cosine."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.semi_supervised import semi_supervised, semi_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("05_semi_supervised", __doc__, semi_key, semi_supervised, argv)


if __name__ == "__main__":
    sys.exit(main())
