"""OpenVaccine ingest: locate the Kaggle files, validate every row, build a normalized table."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config, Paths
from .features import LOOP_TOKENS, SEQUENCE_TOKENS, STRUCTURE_TOKENS, check_letters
from .io_utils import copy_file, write_bytes, write_json, write_pickle
from .loop_types import pair_table
from .stage import InputError, artifact_meta, decode_text

TARGETS = ["reactivity", "deg_Mg_pH10", "deg_pH10", "deg_Mg_50C", "deg_50C"]
SCORED_TARGETS = ["reactivity", "deg_Mg_pH10", "deg_Mg_50C"]
SCORED_COLUMNS = [TARGETS.index(t) for t in SCORED_TARGETS]  # their positions among the 5 targets
ERRORS = ["reactivity_error", "deg_error_Mg_pH10", "deg_error_pH10", "deg_error_Mg_50C", "deg_error_50C"]
COMMON_FIELDS = ["id", "sequence", "structure", "predicted_loop_type", "seq_length", "seq_scored"]
TRAIN_FIELDS = COMMON_FIELDS + TARGETS + ERRORS + ["signal_to_noise", "SN_filter"]
KAGGLE_NAME = "stanford-covid-vaccine"
SPLITS = ("train", "test")


def locate_openvaccine(data_dir: Path) -> dict[str, tuple[Path, str | None]]:
    """Find train/test in any supported layout: {split: (file or zip, member or None)}.

    Layouts: <dir>/openvaccine/*.json (our bundle), <dir>/stanford-covid-vaccine/*.json (unzipped
    Kaggle download), <dir>/*.json, or <dir>/stanford-covid-vaccine.zip (Kaggle zip).
    """
    data_dir = Path(data_dir)
    for folder in (data_dir / "openvaccine", data_dir / KAGGLE_NAME, data_dir):
        if (folder / "train.json").exists() or (folder / "test.json").exists():
            found = {s: (folder / f"{s}.json", None) for s in SPLITS}
            for path, _ in found.values():
                if not path.exists():
                    raise InputError(path, "file not found (train.json and test.json must sit together)")
            return found
    archive = data_dir / f"{KAGGLE_NAME}.zip"
    if archive.exists():
        try:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise InputError(archive, f"not a readable zip archive ({err}): download it again") from None
        found = {}
        for split in SPLITS:
            member = next((n for n in names if n.rsplit("/", 1)[-1] == f"{split}.json"), None)
            if member is None:
                raise InputError(archive, f"zip has no {split}.json")
            found[split] = (archive, member)
        return found
    raise InputError(data_dir, "no OpenVaccine data: expected openvaccine/train.json, "
                     f"{KAGGLE_NAME}/train.json, train.json or {KAGGLE_NAME}.zip "
                     "(set --data-dir or NT_DATA_DIR, or fetch it: python -m nucleic.download openvaccine)")


def find_openvaccine(cfg: Config) -> dict[str, tuple[Path, str | None]]:
    """locate_openvaccine in the data folder, else in input/ (where the downloader writes)."""
    try:
        return locate_openvaccine(Path(cfg.data_dir))
    except InputError as not_there:
        fallback = Paths(cfg).input
        if fallback.resolve() == Path(cfg.data_dir).resolve():
            raise
        try:
            return locate_openvaccine(fallback)
        except InputError:
            raise not_there from None


def read_source_bytes(source: tuple[Path, str | None]) -> bytes:
    path, member = source
    if member is None:
        return Path(path).read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # e.g. a truncated download
        raise InputError(f"{path}:{member}", f"cannot unpack ({err}): download the archive again") from None


def source_name(source: tuple[Path, str | None]) -> str:
    path, member = source
    return str(path) if member is None else f"{path}:{member}"


def parse_json_lines(raw: bytes, file: str) -> list[dict]:
    records = []
    text = decode_text(raw, file)
    if text.lstrip().startswith("["):
        raise InputError(file, "a JSON array: expected JSON Lines, one object per line "
                               "(pandas: to_json(orient='records', lines=True))", row=1)
    for row, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(file, f"invalid JSON ({err.msg} at column {err.colno}); the format is JSON Lines, "
                                   "one object per line", row=row) from None
        if not isinstance(record, dict):
            raise InputError(file, "a line must hold one JSON object", row=row)
        record["_row"] = row
        records.append(record)
    if not records:
        raise InputError(file, "file holds no rows")
    return records


def _field_error(file: str, row: str, field: str, problem: str) -> InputError:
    return InputError(file, problem, row=row, field=field)


def validate_records(records: list[dict], file: str, split: str) -> None:
    required = TRAIN_FIELDS if split == "train" else COMMON_FIELDS
    seen_ids: dict[str, int] = {}
    for record in records:
        row = record["_row"]
        label = f"{row} (id {record.get('id', '?')})"
        fail = functools.partial(_field_error, file, label)
        for field in required:
            if field not in record:
                raise fail(field, "required column is missing")
        _validate_identity(record, seen_ids, fail)
        _validate_strings(record, fail)
        if split == "train":
            _validate_labels(record, fail)


def _validate_identity(record, seen_ids, fail):
    rid = record["id"]
    if not isinstance(rid, str) or not rid:
        raise fail("id", "must be a non-empty string")
    if rid in seen_ids:
        raise fail("id", f"duplicate id (first seen in row {seen_ids[rid]})")
    seen_ids[rid] = record["_row"]


def _validate_strings(record, fail):
    length, scored = record["seq_length"], record["seq_scored"]
    if not _is_int(length) or length <= 0:
        raise fail("seq_length", f"must be a positive integer, got {length!r}")
    if not _is_int(scored) or not 0 < scored <= length:
        raise fail("seq_scored", f"must be an integer in 1..seq_length ({length}), got {scored!r}")
    for field, alphabet in (("sequence", SEQUENCE_TOKENS), ("structure", STRUCTURE_TOKENS),
                            ("predicted_loop_type", LOOP_TOKENS)):
        text = record[field]
        if not isinstance(text, str):
            raise fail(field, "must be a string")
        if len(text) != length:
            raise fail(field, f"length {len(text)} != seq_length {length}")
        try:
            check_letters(text, alphabet)
        except ValueError as err:
            raise fail(field, str(err)) from None
    try:
        pair_table(record["structure"])
    except ValueError as err:
        raise fail("structure", str(err)) from None


def _validate_labels(record, fail):
    scored = record["seq_scored"]
    for field in TARGETS + ERRORS:
        values = record[field]
        if not isinstance(values, list):
            raise fail(field, "must be a list of numbers")
        if len(values) != scored:
            raise fail(field, f"has {len(values)} values, expected seq_scored = {scored}")
        bad = next((i for i, v in enumerate(values) if not _is_finite(v)), None)
        if bad is not None:
            raise fail(field, f"value {values[bad]!r} at position {bad} is not a finite number")
    if not _is_finite(record["signal_to_noise"]):
        raise fail("signal_to_noise", f"not a finite number: {record['signal_to_noise']!r}")
    if record["SN_filter"] not in (0, 1):
        raise fail("SN_filter", f"must be 0 or 1, got {record['SN_filter']!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def records_to_frame(records: list[dict], split: str) -> pd.DataFrame:
    """Normalized table: one row per RNA; labels as (seq_scored, 5) float32 arrays."""
    rows = []
    for r in records:
        row = {"id": r["id"], "sequence": r["sequence"], "structure": r["structure"],
               "loop": r["predicted_loop_type"], "seq_length": r["seq_length"],
               "seq_scored": r["seq_scored"]}
        if split == "train":
            row["targets"] = np.asarray([r[c] for c in TARGETS], dtype=np.float32).T
            row["errors"] = np.asarray([r[c] for c in ERRORS], dtype=np.float32).T
            row["signal_to_noise"] = float(r["signal_to_noise"])
            row["SN_filter"] = int(r["SN_filter"])
        rows.append(row)
    return pd.DataFrame(rows)


def load_split(source: tuple[Path, str | None], split: str) -> pd.DataFrame:
    """Read, validate and normalize one split; raises InputError naming file, row and field."""
    name = source_name(source)
    records = parse_json_lines(read_source_bytes(source), name)
    validate_records(records, name, split)
    return records_to_frame(records, split)


def take_slice(frame: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """First `limit` rows, split evenly across sequence lengths (so a slice of test keeps 107 and 130)."""
    if limit is None or limit >= len(frame):
        return frame.reset_index(drop=True)
    lengths = sorted(frame.seq_length.unique())
    per_length = max(1, limit // len(lengths))
    parts = [frame[frame.seq_length == n].head(per_length) for n in lengths]
    return pd.concat(parts).sort_index().head(limit).reset_index(drop=True)


# ---------------------------------------------------------------- stage 00

OTHER_TASKS = ("promoter", "viral", "mirna")  # copied as they are; validated by stages 10-12


def prepare_key(cfg: Config) -> dict:
    """What stage 00's outputs depend on: the raw files' content, the data settings, and the files of the
    classification folders it copies (names and sizes: a folder that appears later makes it redo)."""
    data_dir = Path(cfg.data_dir)
    sources = find_openvaccine(cfg)
    digests = {split: hashlib.sha1(read_source_bytes(src)).hexdigest() for split, src in sources.items()}
    tasks = {task: sorted([f.name, f.stat().st_size] for f in (data_dir / task).iterdir() if f.is_file())
             for task in OTHER_TASKS if (data_dir / task).is_dir()}
    return {"data": dict(cfg.data), "openvaccine_sha1": digests, "task_files": tasks}


def prepare_input(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    paths = Paths(cfg)
    data_dir = Path(cfg.data_dir)
    sources = find_openvaccine(cfg)
    frames = {split: load_split(src, split) for split, src in sources.items()}  # all checks first
    outputs = _copy_raw_inputs(sources, data_dir, paths.input)
    summary = {}
    for split, limit in (("train", cfg.data.max_train), ("test", cfg.data.max_test)):
        frame = take_slice(frames[split], limit)
        target = paths.prepared / f"{split}.pkl"
        write_pickle(target, frame)
        outputs.append(target)
        summary[split] = len(frame)
    meta = paths.prepared / "meta.json"
    write_json(meta, {**artifact_meta(cfg), "rows": summary,
                      "sources": {s: source_name(src) for s, src in sources.items()}})
    return outputs + [meta], summary


def _copy_raw_inputs(sources, data_dir: Path, input_dir: Path) -> list[Path]:
    """Mirror the raw files into input/ (nothing to do when they already live there)."""
    copied = []
    for split, source in sources.items():
        target = input_dir / "openvaccine" / f"{split}.json"
        if Path(source[0]).resolve() == target.resolve():
            continue
        if source[1] is None:
            copy_file(source[0], target)
        else:
            write_bytes(target, read_source_bytes(source))
        copied.append(target)
    for task in OTHER_TASKS:
        folder = data_dir / task
        if folder.is_dir() and folder.resolve() != (input_dir / task).resolve():
            for file in sorted(folder.iterdir()):
                if file.is_file():
                    copy_file(file, input_dir / task / file.name)
                    copied.append(input_dir / task / file.name)
    return copied
