"""Readers for the classification tasks (promoter, viral, mirna): validated tables of
id, sequence (upper case, U written as T), label (0/1) and group (source file or experiment)."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pandas as pd

from .features import clean_sequence
from .stage import InputError, read_text

DNA_ALPHABET = "ACGT"


def _clean_sequence(raw: str, file, row, field: str) -> str:
    try:
        return clean_sequence(raw, DNA_ALPHABET)
    except ValueError as err:
        raise InputError(file, str(err), row=row, field=field) from None


def _rows(path: Path, n_columns: int, header: list[str] | None):
    """(row number, fields) of a CSV file, checking the header and the column count."""
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.reader(f)
        if header is not None:
            found = next(reader, None)
            if found != header:
                raise InputError(path, f"header must be {','.join(header)}, found {','.join(found or [])}", row=1)
        first = 2 if header is not None else 1
        for number, fields in enumerate(reader, start=first):
            if not fields:
                continue
            if len(fields) != n_columns:
                raise InputError(path, f"{len(fields)} columns, expected {n_columns}", row=number)
            yield number, fields


def _label(value: str, allowed: dict[str, int], file, row, field: str) -> int:
    key = value.strip()
    if key not in allowed:
        raise InputError(file, f"label {value!r} is not one of {', '.join(allowed)}", row=row, field=field)
    return allowed[key]


def read_promoter(path: str | Path) -> pd.DataFrame:
    """promoter/v9d3.csv: seqs,labels,directions (case carries no meaning)."""
    path = Path(path)
    rows = [{"id": f"promoter_{number - 2}", "sequence": _clean_sequence(seq, path, number, "seqs"),
             "label": _label(label, {"0": 0, "1": 1}, path, number, "labels"), "group": path.stem}
            for number, (seq, label, _direction) in _rows(path, 3, ["seqs", "labels", "directions"])]
    return _non_empty(rows, path)


def read_viral(folder: str | Path) -> pd.DataFrame:
    """viral/exp*.csv, no header: id,sequence,label; the group is the experiment (file name), and the
    contig the assembled contig a 300-bp segment was cut from (viral_contig)."""
    folder = Path(folder)
    files = sorted(folder.glob("exp*.csv"))
    if not files:
        raise InputError(folder, "no exp*.csv files")
    rows = [{"id": seq_id, "sequence": _clean_sequence(seq, file, number, "sequence"),
             "label": _label(label, {"0": 0, "1": 1}, file, number, "label"), "group": file.stem,
             "contig": viral_contig(seq_id, file.stem)}
            for file in files for number, (seq_id, seq, label) in _rows(file, 3, None)]
    return _non_empty(rows, folder)


_SEGMENT_ID = re.compile(r"seq(\d+)_")


def viral_contig(seq_id: str, experiment: str) -> str:
    """The contig of a ViraMiner segment: its ids read seq<N>_<run tag>, and the second, third... 300-bp
    segment of contig N in that run append 1, 2... to the tag (seq7332_2013_E2_SCC, seq7332_2013_E2_SCC1).
    Every contig's segments carry one label in the bundle (21,241 contigs, 25.6 % of segments in contigs
    of two or more). An id of another form is its own contig."""
    match = _SEGMENT_ID.match(seq_id)
    return f"{experiment}:seq{match.group(1)}" if match else f"{experiment}:{seq_id}"


MIRNA_FILES = ("miRBase_set.csv", "putative_mirtrons_set.csv")


def read_mirna(folder: str | Path) -> pd.DataFrame:
    """mirna/*.csv, no header: name,sequence,is_mirtron (TRUE/FALSE); U and T both read as U."""
    folder = Path(folder)
    rows = [{"id": name, "sequence": _clean_sequence(seq, folder / f, number, "sequence"),
             "label": _label(flag, {"TRUE": 1, "FALSE": 0}, folder / f, number, "is_mirtron"), "group": Path(f).stem}
            for f in MIRNA_FILES for number, (name, seq, flag) in _rows(folder / f, 3, None)]
    return _non_empty(rows, folder)


def _non_empty(rows: list[dict], where: Path) -> pd.DataFrame:
    if not rows:
        raise InputError(where, "holds no rows")
    return pd.DataFrame(rows)
