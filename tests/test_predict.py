"""The predict command: round trips on a tiny FASTA for OpenVaccine and a classifier; bad records."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import isolated, load_kernel

from nucleic.io_utils import read_pickle
from nucleic.predict import main

pytestmark = pytest.mark.slow  # minute-long: a smoke pipeline per module


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Smoke OpenVaccine model (2 folds x 1 epoch) with its stage-06 submission, and smoke promoter classifiers."""
    workspace = tmp_path_factory.mktemp("predict")
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "train.threads=1",
            "--set", "train.folds=2", "--set", "train.epochs=1"]
    for stage in ("00_prepare_input", "01_fold_structures", "03_train_folds", "06_predict", "10_promoter"):
        assert load_kernel(stage).main(args) == 0, stage
    return workspace, args


def fasta(path, records):
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return path


def test_openvaccine_round_trip_any_length(trained, tmp_path, test_rows, capsys):
    workspace, args = trained
    records = [("public", test_rows[0]["sequence"]), ("odd", "GGAAAGCUCUAAUAACAGGAGACUAGGACUACGUAUUUCUAGG"),
               ("dna_letters", "GGAAACCTTTGGGAAACCC")]
    out = tmp_path / "out.csv"
    assert main(["openvaccine", "--input", str(fasta(tmp_path / "in.fa", records)), "--output", str(out),
                 *args[:2], *args[4:]]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 107 + 43 + 19
    assert frame.id_seqpos.iloc[0] == "public_0" and frame.id_seqpos.iloc[-1] == "dna_letters_18"
    assert list(frame.columns[1:]) == ["reactivity", "deg_Mg_pH10", "deg_pH10", "deg_Mg_50C", "deg_50C"]


def test_openvaccine_prediction_equals_stage_06_for_a_test_id(trained, tmp_path):
    workspace, args = trained
    test = read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    row = test.iloc[-1]
    out = tmp_path / "out.csv"
    assert main(["openvaccine", "--input", str(fasta(tmp_path / "in.fa", [(row.id, row.sequence)])),
                 "--output", str(out), *args[:2], *args[4:]]) == 0
    ours = pd.read_csv(out).set_index("id_seqpos")
    stage06 = pd.read_csv(workspace / "submissions" / "nt.csv").set_index("id_seqpos").loc[ours.index]
    assert len(ours) == len(row.sequence)
    # both CSVs are written with 6 significant digits, and the batches differ (one sequence here, two in
    # stage 06), so the last digit may round apart
    np.testing.assert_allclose(ours.to_numpy(), stage06.to_numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("records, message", [
    ([("bad", "GGAAXCC")], "record 'bad': character 'X' at position 4 is not one of 'ACGU'"),
    ([("long", "A" * 501)], "record 'long': 501 nt is longer than the 500 nt"),
    ([("empty", "")], "record 'empty': empty sequence"),
    ([("one", "G")], "record 'one': 1 nt is shorter than the 2 nt this model needs"),
])
def test_openvaccine_bad_records(trained, tmp_path, capsys, records, message):
    workspace, args = trained
    out = tmp_path / "out.csv"
    code = main(["openvaccine", "--input", str(fasta(tmp_path / "in.fa", records)), "--output", str(out),
                 *args[:2], *args[4:]])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("weights, message", [
    ("missing.pt", "missing.pt: checkpoint not found"),
    ("notes.pt", "notes.pt: not a checkpoint of this project"),
])
def test_bad_weights_are_one_line(trained, tmp_path, capsys, weights, message):
    workspace, args = trained
    (tmp_path / "notes.pt").write_text("these are not weights")
    code = main(["openvaccine", "--input", str(fasta(tmp_path / "in.fa", [("a", "GGAAACC")])),
                 "--output", str(tmp_path / "out.csv"), "--weights", str(tmp_path / weights), *args[:2], *args[4:]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("encode, message", [
    (lambda text: __import__("gzip").compress(text.encode()), "gzip-compressed: unpack it first"),
    (lambda text: text.encode("utf-16"), "UTF-16 text: save it as UTF-8"),
    (lambda text: b"\x00\x01\xff binary", "not UTF-8 text"),
])
def test_input_that_is_not_utf8_text_is_one_line(trained, tmp_path, capsys, encode, message):
    workspace, args = trained
    source = tmp_path / "in.fa"
    source.write_bytes(encode(">a\nGGAAACC\n"))
    code = main(["openvaccine", "--input", str(source), "--output", str(tmp_path / "out.csv"), *args[:2], *args[4:]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_classifier_round_trip_from_csv(trained, tmp_path, data_dir):
    workspace, args = trained
    promoters = pd.read_csv(data_dir / "promoter" / "v9d3.csv").head(5)
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": [f"p{i}" for i in range(5)], "sequence": promoters.seqs}).to_csv(source, index=False)
    out = tmp_path / "probs.csv"
    assert main(["promoter", "--input", str(source), "--output", str(out), *args[:2], *args[4:]]) == 0
    frame = pd.read_csv(out)
    assert list(frame.id) == [f"p{i}" for i in range(5)] and frame.probability.between(0, 1).all()
    # The stage's served mean: each kind's folds averaged (network, linear, homology), then the kinds that
    # have an opinion on the sequence
    from nucleic.config import load_config
    from nucleic.predict import default_weights

    cfg = load_config("smoke", args[5::2])  # the values of the fixture's --set pairs
    weights = default_weights(cfg, "promoter")
    assert [w.suffix for w in weights] == [".pt"] * 5 + [".joblib"] * 10
    assert [w.parent.name for w in weights[5:]] == ["linear"] * 5 + ["homology"] * 5
    alone = []
    for name, files in (("nt", weights[:5]), ("linear", weights[5:10]), ("homology", weights[10:])):
        path = tmp_path / f"{name}_only.csv"
        assert main(["promoter", "--input", str(source), "--output", str(path), *args[:2], *args[4:],
                     "--weights", *map(str, files)]) == 0
        alone.append(pd.read_csv(path).probability.to_numpy())
    assert not np.allclose(alone[0], frame.probability)
    np.testing.assert_allclose(frame.probability, np.nanmean(np.stack(alone), axis=0), atol=2e-6)


def test_missing_weights_name_the_stage(tmp_path, capsys):
    source = fasta(tmp_path / "in.fa", [("a", "ACGT")])
    code = main(["viral", "--input", str(source), "--output", str(tmp_path / "o.csv"), "--preset", "smoke",
                 *isolated(tmp_path / "nothing")])
    assert code == 2 and "run stage 11_viral" in capsys.readouterr().err


def test_predict_module_loads_the_classification_tasks_only_when_asked():
    code = "import sys, nucleic.predict; assert 'nucleic.dna_tasks' not in sys.modules, 'imported dna_tasks'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_suffix_rule_names_every_trained_classifier(tmp_path):
    from nucleic.dna_tasks import is_feature_model, served_weights

    assert served_weights(tmp_path, "rf") == tmp_path / "serve_rf.joblib" and is_feature_model(tmp_path / "serve_rf.joblib")
    assert served_weights(tmp_path, "nt") == tmp_path / "serve_nt.pt" and not is_feature_model(tmp_path / "serve_nt.pt")
