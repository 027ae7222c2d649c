"""Stage 00: validation of real OpenVaccine rows, one clear error line per bad input, nothing written."""
from __future__ import annotations

import copy
import json
import zipfile

import pytest
from conftest import REPO, isolated, load_kernel, run_script, write_json_lines

from nucleic.io_utils import read_pickle

kernel = load_kernel("00_prepare_input")


def run_stage00(data_dir, workspace, *extra):
    return kernel.main(["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), *extra])


def set_field(split, row, field, value):
    def mutate(rows):
        rows[split][row][field] = value(rows[split][row]) if callable(value) else value
    return mutate


def delete_field(split, row, field):
    def mutate(rows):
        del rows[split][row][field]
    return mutate


def replace_char(text, pos, ch):
    return text[:pos] + ch + text[pos + 1:]


def duplicate_id(rows):
    rows["test"][4]["id"] = rows["test"][1]["id"]


BAD_CASES = {
    "missing column": (delete_field("train", 3, "deg_pH10"),
                       ["train.json", "row 4", "field 'deg_pH10'", "required column is missing"]),
    "alphabet": (set_field("train", 0, "sequence", lambda r: replace_char(r["sequence"], 5, "T")),
                 ["train.json", "row 1", "field 'sequence'", "'T' at position 5 is not one of 'ACGU'"]),
    "sequence length": (set_field("test", 2, "sequence", lambda r: r["sequence"][:-1]),
                        ["test.json", "row 3", "field 'sequence'", "length 106 != seq_length 107"]),
    "structure length": (set_field("train", 1, "structure", lambda r: r["structure"] + "."),
                         ["train.json", "row 2", "field 'structure'", "length 108 != seq_length 107"]),
    "loop letter": (set_field("test", 7, "predicted_loop_type", lambda r: replace_char(r["predicted_loop_type"], 0, "Q")),
                    ["test.json", "row 8", "field 'predicted_loop_type'", "'Q' at position 0"]),
    "unbalanced": (set_field("train", 2, "structure", lambda r: replace_char(r["structure"], r["structure"].index("("), ".")),
                   ["train.json", "row 3", "field 'structure'", "unbalanced dot-bracket: unmatched ')'"]),
    "seq_scored too large": (set_field("test", 0, "seq_scored", 108),
                             ["test.json", "row 1", "field 'seq_scored'", "must be an integer in 1..seq_length (107)"]),
    "seq_length type": (set_field("test", 9, "seq_length", "130"),
                        ["test.json", "row 10", "field 'seq_length'", "must be a positive integer"]),
    "label length": (set_field("train", 5, "reactivity", lambda r: r["reactivity"][:-1]),
                     ["train.json", "row 6", "field 'reactivity'", "has 67 values, expected seq_scored = 68"]),
    "error length": (set_field("train", 6, "deg_error_50C", lambda r: r["deg_error_50C"] + [0.1]),
                     ["train.json", "row 7", "field 'deg_error_50C'", "has 69 values"]),
    "NaN label": (set_field("train", 4, "deg_Mg_50C", lambda r: r["deg_Mg_50C"][:10] + [float("nan")] + r["deg_Mg_50C"][11:]),
                  ["train.json", "row 5", "field 'deg_Mg_50C'", "value nan at position 10 is not a finite number"]),
    "text label": (set_field("train", 8, "deg_Mg_pH10", lambda r: ["x"] + r["deg_Mg_pH10"][1:]),
                   ["train.json", "row 9", "field 'deg_Mg_pH10'", "value 'x' at position 0"]),
    "signal_to_noise": (set_field("train", 9, "signal_to_noise", None),
                        ["train.json", "row 10", "field 'signal_to_noise'", "not a finite number"]),
    "SN_filter": (set_field("train", 10, "SN_filter", 2), ["train.json", "row 11", "field 'SN_filter'", "must be 0 or 1"]),
    "duplicate id": (duplicate_id, ["test.json", "row 5", "field 'id'", "duplicate id (first seen in row 2)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_clear_line_and_writes_nothing(case, tmp_path, train_rows, test_rows, capsys):
    mutate, expected = BAD_CASES[case]
    rows = {"train": copy.deepcopy(train_rows), "test": copy.deepcopy(test_rows)}
    mutate(rows)
    data = tmp_path / "data"
    for split in ("train", "test"):
        write_json_lines(data / "openvaccine" / f"{split}.json", rows[split])
    workspace = tmp_path / "ws"
    assert run_stage00(data, workspace) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("ERROR [00_prepare_input] ")
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not workspace.exists(), "a failed stage 00 must write nothing"


def test_invalid_json_line(tmp_path, train_rows, test_rows, capsys):
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", train_rows)
    lines = [json.dumps(r) for r in test_rows]
    lines[3] = lines[3][:50]
    (data / "openvaccine" / "test.json").write_text("\n".join(lines) + "\n")
    assert run_stage00(data, tmp_path / "ws") == 2
    err = capsys.readouterr().err
    assert "test.json: row 4: invalid JSON" in err
    assert not (tmp_path / "ws").exists()


def test_empty_file(tmp_path, train_rows, capsys):
    data = tmp_path / "data"
    write_json_lines(data / "openvaccine" / "train.json", train_rows)
    (data / "openvaccine" / "test.json").write_text("\n")
    assert run_stage00(data, tmp_path / "ws") == 2
    assert "test.json: file holds no rows" in capsys.readouterr().err


def test_missing_data_names_the_layouts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_stage00(tmp_path / "empty", tmp_path / "ws") == 2
    err = capsys.readouterr().err
    assert "no OpenVaccine data" in err and "stanford-covid-vaccine.zip" in err


def test_good_input_is_copied_normalized_and_then_skipped(tiny_data_dir, tmp_path, train_rows, capsys):
    workspace = tmp_path / "ws"
    assert run_stage00(tiny_data_dir, workspace) == 0
    assert (workspace / "input" / "openvaccine" / "train.json").read_bytes() == \
        (tiny_data_dir / "openvaccine" / "train.json").read_bytes()
    train = read_pickle(workspace / "work" / "smoke" / "prepared" / "train.pkl")
    test = read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    assert len(train) == 12 and len(test) == 12
    assert sorted(test.seq_length.unique()) == [107, 130]
    first = train.iloc[0]
    assert first.targets.shape == (68, 5) and first.errors.shape == (68, 5)
    assert first.targets[3, 0] == pytest.approx(train_rows[0]["reactivity"][3])
    assert first.targets[3, 4] == pytest.approx(train_rows[0]["deg_50C"][3])
    manifest = json.loads((workspace / "work" / "smoke" / "manifests" / "00_prepare_input.json").read_text())
    assert manifest["config"]["data"]["max_train"] == 40 and manifest["git_commit"]
    capsys.readouterr()
    assert run_stage00(tiny_data_dir, workspace) == 0
    assert "skipped" in capsys.readouterr().out


def test_smoke_slice_of_real_data_keeps_both_test_lengths(data_dir, tmp_path):
    assert run_stage00(data_dir, tmp_path / "ws") == 0
    test = read_pickle(tmp_path / "ws" / "work" / "smoke" / "prepared" / "test.pkl")
    assert len(test) == 20 and test.seq_length.value_counts().to_dict() == {107: 10, 130: 10}


@pytest.mark.parametrize("layout", ["kaggle_zip", "kaggle_folder"])
def test_kaggle_layouts(layout, tiny_data_dir, tmp_path):
    data = tmp_path / layout
    data.mkdir()
    if layout == "kaggle_zip":
        with zipfile.ZipFile(data / "stanford-covid-vaccine.zip", "w") as zf:
            for split in ("train", "test"):
                zf.write(tiny_data_dir / "openvaccine" / f"{split}.json", f"{split}.json")
    else:
        (data / "stanford-covid-vaccine").symlink_to(tiny_data_dir / "openvaccine")
    assert run_stage00(data, tmp_path / "ws") == 0
    assert (tmp_path / "ws" / "input" / "openvaccine" / "test.json").read_bytes() == \
        (tiny_data_dir / "openvaccine" / "test.json").read_bytes()


def test_exit_code_and_stderr_of_the_script(tmp_path, train_rows, test_rows):
    data = tmp_path / "data"
    bad = copy.deepcopy(train_rows)
    bad[0]["sequence"] = "X" + bad[0]["sequence"][1:]
    write_json_lines(data / "openvaccine" / "train.json", bad)
    write_json_lines(data / "openvaccine" / "test.json", test_rows)
    result = run_script(["python3", str(REPO / "kernels" / "00_prepare_input.py"), "--preset", "smoke",
                         "--data-dir", str(data), *isolated(tmp_path / "ws")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"ERROR [00_prepare_input] {data / 'openvaccine' / 'train.json'}: row 1 (id {bad[0]['id']}): "
        "field 'sequence': character 'X' at position 0 is not one of 'ACGU'"]
    assert not (tmp_path / "ws").exists()
