"""Kaggle submission files: writing and checking. Run as a checker:

    python -m nucleic.submission submissions/nt.csv [--test input/openvaccine/test.json]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .data import TARGETS
from .stage import InputError, read_text

ID_COLUMN = "id_seqpos"
COLUMNS = [ID_COLUMN] + TARGETS


class SubmissionError(ValueError):
    pass


def expected_ids(test: pd.DataFrame) -> list[str]:
    """Every position 0..seq_length-1 of every test sequence."""
    return [f"{rid}_{pos}" for rid, length in zip(test.id, test.seq_length) for pos in range(length)]


def predictions_frame(ids: list[str], predictions: list[np.ndarray], positions: list[int]) -> pd.DataFrame:
    """Rows `<id>_<pos>` for the first positions[i] positions of each prediction (L, 5)."""
    keys = [f"{rid}_{p}" for rid, n in zip(ids, positions) for p in range(n)]
    values = np.concatenate([pred[:n] for pred, n in zip(predictions, positions)])
    frame = pd.DataFrame(values, columns=TARGETS)
    frame.insert(0, ID_COLUMN, keys)
    return frame


def check_submission(path: str | Path, test: pd.DataFrame) -> int:
    """Raise SubmissionError naming the first problem; return the row count when the file is valid."""
    path = Path(path)
    try:
        frame = pd.read_csv(io.StringIO(read_text(path)))
    except InputError as err:
        raise SubmissionError(str(err)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SubmissionError(f"{path}: cannot read as CSV ({err})") from None
    if len(frame.columns) == 1 and ";" in frame.columns[0]:
        raise SubmissionError(f"{path}: columns separated by ';': a submission is comma-separated")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise SubmissionError(f"{path}: missing column(s) {', '.join(missing)}")
    extra = [c for c in frame.columns if c not in COLUMNS]
    if extra:
        raise SubmissionError(f"{path}: unexpected column(s) {', '.join(extra)}")
    want = expected_ids(test)
    if len(frame) != len(want):
        absent = [i for i in want if i not in set(frame[ID_COLUMN])]
        note = f"; missing {len(absent)} id(s), e.g. {', '.join(absent[:3])}" if absent else ""
        raise SubmissionError(f"{path}: {len(frame)} rows, expected {len(want)}{note}")
    duplicated = frame[ID_COLUMN][frame[ID_COLUMN].duplicated()]
    if len(duplicated):
        raise SubmissionError(f"{path}: row {duplicated.index[0] + 2}: duplicate {ID_COLUMN} '{duplicated.iloc[0]}'")
    unknown = ~frame[ID_COLUMN].isin(set(want))
    if unknown.any():
        row = int(np.argmax(unknown.to_numpy()))
        raise SubmissionError(f"{path}: row {row + 2}: unknown {ID_COLUMN} '{frame[ID_COLUMN].iloc[row]}'")
    for column in TARGETS:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            raise SubmissionError(f"{path}: row {row + 2}: column '{column}' is not a finite number "
                                  f"({frame[column].iloc[row]!r})")
    return len(frame)


def main(argv: list[str] | None = None) -> int:
    from .data import load_split

    parser = argparse.ArgumentParser(description="Check a Kaggle-format OpenVaccine submission CSV.")
    parser.add_argument("csv")
    parser.add_argument("--test", default="input/openvaccine/test.json", help="test.json the ids come from")
    args = parser.parse_args(argv)
    test = Path(args.test)
    try:
        if not test.exists():
            raise InputError(test, "file not found: run stage 00 (prepare_input), or pass --test test.json")
        rows = check_submission(args.csv, load_split((test, None), "test"))
    except (SubmissionError, InputError) as err:  # exit 2: the file (or its test set) is wrong; 1 is for bugs
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    print(f"{args.csv}: OK ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
