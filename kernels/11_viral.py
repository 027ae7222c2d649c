#!/usr/bin/env python
"""Stage 11: viral vs non-viral contigs; held-out experiment and random split; NT, DanQ, k-mer random forest."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.dna_tasks import viral, viral_key  # noqa: E402
from src.stage import run_stage  # noqa: E402


def main(argv=None) -> int:
    return run_stage("11_viral", __doc__, viral_key, viral, argv)


if __name__ == "__main__":
    sys.exit(main())
