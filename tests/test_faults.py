"""Fault injection: bad files, bad values, damaged caches and refused writes, against the stages, the
predict command and the submission checker. Every case must end in exit code 2 with exactly one line
`ERROR ...` naming the file (and row, record or field where there is one), never a traceback, and
leave no partial output behind. Files are generated per test from real rows.

(More cases live beside the code they exercise: test_prepare_input.py (row-level validation),
test_submission.py, test_config.py, test_predict.py, test_fold_stage.py, test_run_lock.py.)
"""
from __future__ import annotations

import errno
import gzip
import io
import json
import zipfile

import pytest
import torch
from conftest import isolated, load_kernel, write_json_lines

import nucleic.io_utils as io_utils
from nucleic import predict, submission

stage00 = load_kernel("00_prepare_input")
stage03 = load_kernel("03_train_folds")


def one_error_line(capsys, *expected: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def json_lines(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def kaggle_zip(train, test) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("train.json", json_lines(train))
        zf.writestr("test.json", json_lines(test))
    return buffer.getvalue()


# name: (file to write relative to the data folder, its bytes from (train rows, test rows), expected text)
DATA_FAULTS = {
    "gzip train": ("openvaccine/train.json", lambda tr, te: gzip.compress(json_lines(tr)),
                   ["train.json", "gzip-compressed: unpack it first"]),
    "UTF-16 test": ("openvaccine/test.json", lambda tr, te: json_lines(te).decode().encode("utf-16"),
                    ["test.json", "UTF-16 text: save it as UTF-8"]),
    "binary test": ("openvaccine/test.json", lambda tr, te: bytes(range(256)) * 4, ["test.json", "not UTF-8 text"]),
    "pretty JSON array": ("openvaccine/train.json", lambda tr, te: json.dumps(tr, indent=2).encode(),
                          ["train.json", "row 1", "a JSON array: expected JSON Lines"]),
    "CSV instead of JSON": ("openvaccine/train.json", lambda tr, te: b"id,sequence\nid_1,GGAAA\n",
                            ["train.json", "row 1", "invalid JSON", "one object per line"]),
    "a row that is a list": ("openvaccine/test.json", lambda tr, te: json_lines(te) + b"[1, 2, 3]\n",
                             ["test.json", "row 13", "a line must hold one JSON object"]),
    "empty train": ("openvaccine/train.json", lambda tr, te: b"", ["train.json", "file holds no rows"]),
    "blank lines only": ("openvaccine/test.json", lambda tr, te: b"\n\n  \n", ["test.json", "file holds no rows"]),
    "truncated line": ("openvaccine/train.json", lambda tr, te: json_lines(tr)[:-200],
                       ["train.json", "row 12", "invalid JSON"]),
    "NUL bytes": ("openvaccine/train.json", lambda tr, te: b"\x00" * 64, ["train.json"]),
}


@pytest.fixture
def rows(train_rows, test_rows):
    return train_rows, test_rows


@pytest.mark.parametrize("case", sorted(DATA_FAULTS))
def test_stage00_bad_files(case, rows, tmp_path, capsys):
    relative, content, expected = DATA_FAULTS[case]
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", rows[0])
    write_json_lines(data / "openvaccine" / "test.json", rows[1])
    (data / relative).write_bytes(content(*rows))
    code = stage00.main(["--preset", "smoke", "--data-dir", str(data), *isolated(tmp_path / "ws")])
    assert code == 2
    one_error_line(capsys, "[00_prepare_input]", *expected)
    assert not (tmp_path / "ws").exists(), "a failed stage 00 writes nothing"


@pytest.mark.parametrize("case", ["garbage", "truncated", "no test.json"])
def test_stage00_bad_kaggle_zip(case, rows, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = kaggle_zip(*rows)
    if case == "garbage":
        content, expected = b"PK\x03\x04 this is not really a zip", "not a readable zip archive"
    elif case == "truncated":
        content, expected = good[: len(good) // 2], "not a readable zip archive"
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("train.json", json_lines(rows[0]))
        content, expected = buffer.getvalue(), "zip has no test.json"
    (data / "stanford-covid-vaccine.zip").write_bytes(content)
    assert stage00.main(["--preset", "smoke", "--data-dir", str(data), *isolated(tmp_path / "ws")]) == 2
    one_error_line(capsys, "stanford-covid-vaccine.zip", expected)
    assert not (tmp_path / "ws").exists()


def test_stage00_only_one_split(rows, tmp_path, capsys):
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", rows[0])
    assert stage00.main(["--preset", "smoke", "--data-dir", str(data), *isolated(tmp_path / "ws")]) == 2
    one_error_line(capsys, "test.json", "file not found (train.json and test.json must sit together)")


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=abc", "config key 'train.epochs': expected an integer, got 'abc'"),
    ("train.folds=1", "config key 'train.folds': must be at least 2"),
    ("train.batch_size=0", "config key 'train.batch_size': must be at least 1"),
    ("model.nlayer=0", "config key 'model.nlayer': must be at least 1"),
    ("train.lr=fast", "config key 'train.lr': expected a number"),
    ("train.bf16=maybe", "config key 'train.bf16': expected true or false or auto"),
    ("pseudo.depths=3", "config key 'pseudo.depths': expected a list"),
    ("train.epocs=3", "unknown config key 'train.epocs'"),
    ("train.epochs", "override 'train.epochs' is not KEY=VALUE"),
    ("fold.n_jobs=two", "config key 'fold.n_jobs': expected an integer"),
])
def test_bad_config_values_stop_every_stage_before_it_touches_a_file(override, expected, tmp_path, capsys):
    assert stage03.main(["--preset", "smoke", *isolated(tmp_path / "ws"), "--force", "--set", override]) == 2
    one_error_line(capsys, "[03_train_folds]", expected)
    assert not (tmp_path / "ws").exists()


def test_unknown_preset(tmp_path, capsys):
    assert stage03.main(["--preset", "fast", *isolated(tmp_path / "ws")]) == 2
    one_error_line(capsys, "unknown preset 'fast'")


def test_a_refused_write_is_one_line_and_leaves_no_partial_file(rows, tmp_path, capsys, monkeypatch):
    """Disk full while stage 00 writes: one line, exit 2, no temporary or half-written file left."""
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", rows[0])
    write_json_lines(data / "openvaccine" / "test.json", rows[1])

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(io_utils.os, "replace", no_space)
    assert stage00.main(["--preset", "smoke", "--data-dir", str(data), *isolated(tmp_path / "ws")]) == 2
    one_error_line(capsys, "[00_prepare_input]", "cannot write: No space left on device")
    leftovers = [p for p in (tmp_path / "ws").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_a_damaged_manifest_means_the_stage_runs_again(rows, tmp_path, capsys):
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", rows[0])
    write_json_lines(data / "openvaccine" / "test.json", rows[1])
    args = ["--preset", "smoke", "--data-dir", str(data), *isolated(tmp_path / "ws")]
    assert stage00.main(args) == 0
    prepared = (tmp_path / "ws" / "work" / "smoke" / "prepared" / "train.pkl").read_bytes()
    manifest = tmp_path / "ws" / "work" / "smoke" / "manifests" / "00_prepare_input.json"
    manifest.write_text(manifest.read_text()[:40])
    capsys.readouterr()
    assert stage00.main(args) == 0
    out = capsys.readouterr().out
    assert "done in" in out and "skipped" not in out
    assert json.loads(manifest.read_text())["stage"] == "00_prepare_input"
    assert (tmp_path / "ws" / "work" / "smoke" / "prepared" / "train.pkl").read_bytes() == prepared


# ------------------------------------------------------------------------------------ predict command

PREDICT_INPUTS = {
    "gzip FASTA": (lambda: gzip.compress(b">a\nGGAAACC\n"), "gzip-compressed"),
    "UTF-16 FASTA": (lambda: ">a\nGGAAACC\n".encode("utf-16"), "UTF-16 text"),
    "binary": (lambda: bytes(range(200, 256)), "not UTF-8 text"),
    "empty file": (lambda: b"", "empty file: expected FASTA"),
    "CSV without a sequence column": (lambda: b"id,seq\na,GGAAA\n", "CSV with a 'sequence' column"),
    "semicolon CSV": (lambda: b"id;sequence\na;GGAAA\n", "CSV with a 'sequence' column"),
    "foreign letter": (lambda: b">bad\nGGAAXCC\n", "record 'bad': character 'X' at position 4"),
    "too short": (lambda: b">one\nG\n", "record 'one': 1 nt is shorter than the 2 nt this model needs"),
    "too long": (lambda: b">long\n" + b"A" * 501 + b"\n", "record 'long': 501 nt is longer than the 500 nt"),
    "empty record": (lambda: b">nothing\n\n>a\nGGAA\n", "record 'nothing': empty sequence"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_INPUTS))
def test_predict_bad_input(case, tmp_path, capsys):
    content, expected = PREDICT_INPUTS[case]
    source = tmp_path / "in.fa"
    source.write_bytes(content())
    out = tmp_path / "out.csv"
    code = predict.main(["openvaccine", "--input", str(source), "--output", str(out), "--preset", "smoke",
                         "--weights", str(tmp_path / "never_read.pt"), *isolated(tmp_path / "ws")])
    assert code == 2
    one_error_line(capsys, expected)
    assert not out.exists()


def checkpoint_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "foreign pickle", "no model key", "wrong shapes"])
def test_predict_bad_weights(case, tmp_path, capsys):
    from nucleic.config import load_config
    from nucleic.train import build_model

    weights = tmp_path / "w.pt"
    good = checkpoint_bytes({"model": build_model(load_config("smoke").model).state_dict()})
    contents = {
        "text": b"these are not weights",
        "truncated": good[: len(good) // 3],
        "foreign pickle": checkpoint_bytes({"model": {"x": torch.zeros(1)}, "fn": zipfile.ZipFile}),
        "no model key": checkpoint_bytes({"weights": torch.zeros(3)}),
        "wrong shapes": checkpoint_bytes({"model": build_model(load_config("cpu").model).state_dict()}),
    }
    if case in contents:
        weights.write_bytes(contents[case])
    expected = {"missing": "checkpoint not found", "no model key": "no 'model' weights",
                "wrong shapes": "weights do not fit the preset's model"}.get(case, "not a checkpoint of this project")
    source = tmp_path / "in.fa"
    source.write_text(">a\nGGAAACCUUCG\n")
    out = tmp_path / "out.csv"
    code = predict.main(["openvaccine", "--input", str(source), "--output", str(out), "--preset", "smoke",
                         "--weights", str(weights), *isolated(tmp_path / "ws")])
    assert code == 2
    one_error_line(capsys, str(weights), expected)
    assert not out.exists()
    assert not (tmp_path / "ws" / "structures").exists(), "weights are checked before anything is folded"


@pytest.mark.parametrize("case", ["missing file", "a folder"])
def test_predict_input_that_is_not_a_file(case, tmp_path, capsys):
    source = tmp_path / "in.fa"
    if case == "a folder":
        source.mkdir()
    code = predict.main(["promoter", "--input", str(source), "--output", str(tmp_path / "o.csv"),
                         "--preset", "smoke", "--weights", str(tmp_path / "w.pt")])
    assert code == 2
    one_error_line(capsys, str(source), "file not found" if case == "missing file" else "not a file")


def test_classifier_task_refuses_a_regression_checkpoint(tmp_path, capsys):
    weights = tmp_path / "nt.pt"
    weights.write_bytes(checkpoint_bytes({"model": {"w": torch.zeros(2)}}))
    source = tmp_path / "in.csv"
    source.write_text("id,sequence\na,ACGTACGT\n")
    code = predict.main(["promoter", "--input", str(source), "--output", str(tmp_path / "o.csv"),
                         "--preset", "smoke", "--weights", str(weights)])
    assert code == 2
    one_error_line(capsys, str(weights), "not a classifier checkpoint")


# ------------------------------------------------------------------------------------ submission checker

def test_checker_on_a_missing_submission(tmp_path, capsys, test_rows):
    test_json = write_json_lines(tmp_path / "test.json", test_rows[:2])
    assert submission.main([str(tmp_path / "nowhere.csv"), "--test", str(test_json)]) == 2
    one_error_line(capsys, "nowhere.csv", "file not found")


def test_checker_with_a_broken_test_file(tmp_path, capsys):
    test_json = tmp_path / "test.json"
    test_json.write_bytes(gzip.compress(b"{}"))
    sub = tmp_path / "s.csv"
    sub.write_text("id_seqpos,reactivity,deg_Mg_pH10,deg_pH10,deg_Mg_50C,deg_50C\n")
    assert submission.main([str(sub), "--test", str(test_json)]) == 2
    one_error_line(capsys, "test.json", "gzip-compressed")
