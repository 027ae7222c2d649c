#!/usr/bin/env python
"""Stage 11: viral vs non-viral contigs; held-out experiment and random split; NT, DanQ, k-mer random forest."""
import sys

from nucleic.dna_tasks import viral, viral_key
from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("11_viral", __doc__, viral_key, viral, argv)


if __name__ == "__main__":
    sys.exit(main())
