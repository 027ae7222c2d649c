"""Classification-task readers (real files and malformed rows) and the binary metrics."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from nucleic.dna_data import read_mirna, read_promoter, read_viral
from nucleic.metrics import binary_classification_metrics
from nucleic.stage import InputError


def test_real_files(real_data_dir):
    promoter = read_promoter(real_data_dir / "promoter" / "v9d3.csv")
    assert len(promoter) == 5720 and promoter.label.sum() == 2860
    assert set("".join(promoter.sequence)) == set("ACGT") and (promoter.sequence.str.len() == 81).all()
    viral = read_viral(real_data_dir / "viral")
    assert len(viral) == 25913 and viral.label.sum() == 519 and viral.group.nunique() == 7
    # the 300-bp segments of one assembled contig: seq<N>_<run tag>, then 1, 2... appended for the later ones
    assert viral.contig.nunique() == 21241 and (viral.groupby("contig").label.nunique() == 1).all()
    by_id = viral.set_index("id").contig
    assert by_id["seq7332_2013_E2_SCC"] == by_id["seq7332_2013_E2_SCC1"] != by_id["seq9228_2013_E2_SCC"]
    mirna = read_mirna(real_data_dir / "mirna")
    assert len(mirna) == 1124 and mirna.label.sum() == 216 + 201
    assert "U" not in "".join(mirna.sequence)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("seqs,labels,directions\nACGTN,1,1\n", "row 2: field 'seqs': character 'N' at position 4"),
    ("seqs,labels,directions\nACGT,2,1\n", "row 2: field 'labels': label '2' is not one of 0, 1"),
    ("seqs,labels,directions\nACGT,1\n", "row 2: 2 columns, expected 3"),
    ("seqs,label,directions\nACGT,1,1\n", "row 1: header must be seqs,labels,directions"),
    ("seqs,labels,directions\n,1,1\n", "row 2: field 'seqs': empty sequence"),
    ("seqs,labels,directions\n", "holds no rows"),
])
def test_promoter_reader_rejects_malformed_rows(tmp_path, text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_promoter(write(tmp_path / "v9d3.csv", text))


def test_viral_segments_of_one_contig_share_it_within_their_experiment_only(tmp_path):
    write(tmp_path / "viral" / "exp1_a.csv", "seq7_2011_A,ACGT,1\nseq7_2011_A1,ACGA,1\nseq8_2011_A,ACGG,0\nodd,AC,0\n")
    write(tmp_path / "viral" / "exp2_b.csv", "seq7_2012_B,ACGT,0\n")
    contigs = read_viral(tmp_path / "viral").contig.tolist()
    assert contigs == ["exp1_a:seq7", "exp1_a:seq7", "exp1_a:seq8", "exp1_a:odd", "exp2_b:seq7"]


def test_viral_and_mirna_readers_name_file_and_row(tmp_path):
    write(tmp_path / "viral" / "exp1_x.csv", "s1,ACGT,0\ns2,ACXT,1\n")
    with pytest.raises(InputError, match=r"exp1_x.csv: row 2: field 'sequence': character 'X' at position 2"):
        read_viral(tmp_path / "viral")
    write(tmp_path / "mirna" / "miRBase_set.csv", "a,ACGU,FALSE\nb,ACGU,maybe\n")
    write(tmp_path / "mirna" / "putative_mirtrons_set.csv", "c,ACGT,TRUE\n")
    with pytest.raises(InputError, match=r"miRBase_set.csv: row 2: field 'is_mirtron': label 'maybe'"):
        read_mirna(tmp_path / "mirna")
    with pytest.raises(InputError, match="no exp"):
        read_viral(tmp_path / "mirna")


def test_binary_metrics_match_scikit_learn_and_hand_counts():
    y_true = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    y_prob = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.1, 0.3, 0.8])
    m = binary_classification_metrics(y_true, y_prob)
    y_pred = (y_prob >= 0.5).astype(int)
    assert m["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == 0.75 and m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    assert m["f1"] == pytest.approx(0.75)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred)) == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(roc_auc_score(y_true, y_prob))
