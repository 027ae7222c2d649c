#!/usr/bin/env python
"""Stage 00: find the raw data, validate every OpenVaccine row, copy it into input/, cache a normalized table.

Reads train.json/test.json from --data-dir / $NT_DATA_DIR (our bundle layout, an unzipped Kaggle
download, or stanford-covid-vaccine.zip). Any bad row stops the stage with one line naming file,
row and field, and nothing is written.
"""
import sys

from nucleic.stage import run_stage


def main(argv=None) -> int:
    return run_stage("00_prepare_input", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
