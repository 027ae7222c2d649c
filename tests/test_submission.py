"""The submission checker rejects every kind of bad file, naming the problem."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nucleic.data import TARGETS
from nucleic.submission import SubmissionError, check_submission, expected_ids, main

TEST = pd.DataFrame({"id": ["id_a", "id_b"], "seq_length": [3, 4]})


def good_frame() -> pd.DataFrame:
    ids = expected_ids(TEST)
    frame = pd.DataFrame(np.random.default_rng(0).random((len(ids), 5)), columns=TARGETS)
    frame.insert(0, "id_seqpos", ids)
    return frame


def write(tmp_path, frame) -> str:
    path = tmp_path / "sub.csv"
    frame.to_csv(path, index=False)
    return path


def test_expected_ids_cover_every_position():
    assert expected_ids(TEST) == ["id_a_0", "id_a_1", "id_a_2", "id_b_0", "id_b_1", "id_b_2", "id_b_3"]


def test_good_file_passes(tmp_path):
    assert check_submission(write(tmp_path, good_frame()), TEST) == 7


def _set(frame, row, column, value):
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


BAD = {
    "missing column": (lambda f: f.drop(columns="deg_50C"), "missing column(s) deg_50C"),
    "extra column": (lambda f: f.assign(extra=1), "unexpected column(s) extra"),
    "too few rows": (lambda f: f.iloc[:-1], "6 rows, expected 7; missing 1 id(s), e.g. id_b_3"),
    "too many rows": (lambda f: pd.concat([f, f.iloc[:1]]), "8 rows, expected 7"),
    "duplicate id": (lambda f: _set(f, 2, "id_seqpos", "id_b_0"), "row 5: duplicate id_seqpos 'id_b_0'"),
    "position past the end": (lambda f: _set(f, 2, "id_seqpos", "id_a_3"), "row 4: unknown id_seqpos 'id_a_3'"),
    "unknown id": (lambda f: _set(f, 0, "id_seqpos", "id_c_0"), "row 2: unknown id_seqpos 'id_c_0'"),
    "NaN": (lambda f: _set(f, 3, "reactivity", np.nan), "row 5: column 'reactivity' is not a finite number"),
    "inf": (lambda f: _set(f, 1, "deg_Mg_50C", np.inf), "row 3: column 'deg_Mg_50C' is not a finite number"),
    "text": (lambda f: _set(f, 6, "deg_pH10", "oops"), "row 8: column 'deg_pH10' is not a finite number ('oops')"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_rejected(case, tmp_path):
    mutate, message = BAD[case]
    with pytest.raises(SubmissionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_submission(write(tmp_path, mutate(good_frame())), TEST)


def test_unreadable_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(SubmissionError, match="cannot read as CSV"):
        check_submission(path, TEST)


def test_command_line_checker(tmp_path, capsys, test_rows):
    import json

    test_json = tmp_path / "test.json"
    test_json.write_text("".join(json.dumps(r) + "\n" for r in test_rows[:2]))
    ids = [f"{r['id']}_{p}" for r in test_rows[:2] for p in range(r["seq_length"])]
    frame = pd.DataFrame(np.zeros((len(ids), 5)), columns=TARGETS)
    frame.insert(0, "id_seqpos", ids)
    assert main([str(write(tmp_path, frame)), "--test", str(test_json)]) == 0
    assert "OK (214 rows)" in capsys.readouterr().out
    assert main([str(write(tmp_path, frame.iloc[1:])), "--test", str(test_json)]) == 2
    assert f"213 rows, expected 214; missing 1 id(s), e.g. {ids[0]}" in capsys.readouterr().err
    assert main([str(write(tmp_path, frame)), "--test", str(tmp_path / "nowhere.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"ERROR {tmp_path / 'nowhere.json'}: file not found: run stage 00 "
                                               "(prepare_input), or pass --test test.json")


@pytest.mark.parametrize("content, message", [
    (lambda frame: frame.to_csv(index=False, sep=";").encode(), "columns separated by ';'"),
    (lambda frame: __import__("gzip").compress(frame.to_csv(index=False).encode()), "gzip-compressed"),
    (lambda frame: frame.to_csv(index=False).encode("utf-16"), "UTF-16 text: save it as UTF-8"),
    (lambda frame: b"id_seqpos,reactivity\n\xff\xfe\x00oops", "not UTF-8 text"),
])
def test_files_that_are_not_comma_separated_utf8_get_one_line(content, message, tmp_path):
    path = tmp_path / "sub.csv"
    path.write_bytes(content(good_frame()))
    with pytest.raises(SubmissionError, match=message):
        check_submission(path, TEST)
