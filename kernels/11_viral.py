#!/usr/bin/env python
"""Stage 11: viral vs non-viral contigs; held-out experiment (and random split); NT, DanQ, ViraMiner CNN, k-mer
random forest, homology models (nucleotide and peptide); serves the blend chosen across experiments, and with
viral.run_context its stacker that scores a file of contigs as one sequencing run."""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("11_viral", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
