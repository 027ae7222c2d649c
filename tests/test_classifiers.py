"""Classifiers (NT, DanQ, CNN), the mutation noise, eq. 11, k-mer features, and a smoke stage 10."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import isolated, load_kernel

from nucleic.classify import balanced_pos_weight, encode_sequences, epoch_indices, kmer_frequencies, mutate
from nucleic.dna_tasks import box_frequencies, closest_box
from nucleic.models.classifiers import DanQ, NTClassifier, NucleotideCNN


@pytest.mark.parametrize("length", [81, 300, 164])
def test_forward_shapes_and_padding(length):
    tokens = torch.randint(1, 5, (3, length))
    tokens[2, length // 2:] = 0  # a shorter, padded sequence
    models = [NTClassifier(k=7, nlayer=2, d_model=32, nhead=4, dim_ff=64),
              DanQ(length, filters=16, lstm=8, dense=16), NucleotideCNN()]
    for model in models:
        assert model(tokens).shape == (3,)
    nt = models[0].eval()
    last = nt.attention_maps(tokens)[-1]
    assert last.shape == (3, 4, length - 6, length - 6)
    assert torch.all(last[2, :, :, length // 2 - 6:] == 0), "padded k-mers get no attention"


def test_padding_does_not_change_a_shorter_sequences_logit():
    """An unpadded batch skips the attention mask; the same sequence padded inside a longer batch is
    masked: both must give the same logit."""
    torch.manual_seed(0)
    nt = NTClassifier(k=5, nlayer=2, d_model=32, nhead=4, dim_ff=64).eval()
    short = torch.randint(1, 5, (1, 40))
    padded = torch.cat([short, torch.zeros(1, 20, dtype=torch.long)], dim=1)
    longer = torch.randint(1, 5, (1, 60))
    with torch.no_grad():
        alone = nt(short)
        in_batch = nt(torch.cat([padded, longer]))
    assert torch.allclose(alone, in_batch[:1], atol=1e-5)


def test_structure_input_biases_attention_and_survives_padding():
    """nt_bpp reads a pairing matrix: a different matrix changes the logit, zero-padding the sequence and
    its matrix does not, and leaving the matrix out is refused."""
    from nucleic.classify import build_classifier

    torch.manual_seed(0)
    nt = build_classifier("nt_bpp", {"k": 5, "nlayer": 2, "d_model": 32, "nhead": 4, "dim_ff": 64}, 40).eval()
    assert nt.structure
    nt.gamma.data.fill_(20.0)  # a trained scale: at initialisation the bias is small
    tokens = torch.randint(1, 5, (1, 40))
    stem = torch.zeros(1, 40, 40)
    for i in range(10):  # a 10-pair stem: i pairs with 39 - i
        stem[0, i, 39 - i] = stem[0, 39 - i, i] = 0.9
    padded_tokens = torch.cat([tokens, torch.zeros(1, 15, dtype=torch.long)], dim=1)
    padded_stem = torch.zeros(1, 55, 55)
    padded_stem[:, :40, :40] = stem
    longer = torch.randint(1, 5, (1, 55))
    with torch.no_grad():
        folded, unfolded = nt(tokens, stem), nt(tokens, torch.zeros(1, 40, 40))
        in_batch = nt(torch.cat([padded_tokens, longer]), torch.cat([padded_stem, torch.rand(1, 55, 55)]))
    assert (folded - unfolded).abs().item() > 1e-3
    assert torch.allclose(folded, in_batch[:1], atol=1e-5)
    with pytest.raises(ValueError, match="pairing matrices"):
        nt(tokens)


def test_pairing_probabilities_come_from_the_structure_store(tmp_path):
    from nucleic.config import load_config
    from nucleic.structures import pairing_probabilities

    cfg = load_config("smoke", [f"paths.structures={tmp_path / 'structures'}", "fold.n_jobs=1"])
    hairpin = "GGGGAAACCCC"
    pairs = pairing_probabilities(cfg, [hairpin, hairpin.replace("U", "T") + "A"], 14)
    assert pairs.shape == (2, 14, 14) and pairs.dtype == torch.float16
    assert torch.allclose(pairs[0], pairs[0].T) and float(pairs[0, 0, 10]) > 0.3  # G1 pairs with C11
    assert float(pairs[0, 11:].abs().sum()) == 0  # padding
    assert list((tmp_path / "structures").iterdir())[0].name == "vienna_turner2004_37C"
    again = pairing_probabilities(cfg, [hairpin], 14)  # read back from the store
    assert torch.equal(again[0], pairs[0])


def test_attn_dropout_is_separate_from_dropout():
    torch.manual_seed(0)
    tokens = torch.randint(1, 5, (2, 50))
    quiet = NTClassifier(k=5, nlayer=1, d_model=32, nhead=4, dim_ff=64, dropout=0.0, attn_dropout=0.0).train()
    assert torch.equal(quiet(tokens), quiet(tokens)), "no dropout anywhere: training forward is deterministic"
    noisy = NTClassifier(k=5, nlayer=1, d_model=32, nhead=4, dim_ff=64, dropout=0.0, attn_dropout=0.5).train()
    assert not torch.equal(noisy(tokens), noisy(tokens)), "attention dropout alone makes it stochastic"
    default = NTClassifier(k=5, nlayer=1, d_model=32, nhead=4, dim_ff=64, dropout=0.3)
    assert default.blocks[0].attention.dropout == 0.3, "attn_dropout defaults to dropout (paper)"


def test_undersampled_epochs_keep_every_positive_and_vary_the_negatives():
    labels = torch.zeros(1000)
    labels[::50] = 1  # 20 positives, 980 negatives (2 %, as the viral contigs)
    generator = torch.Generator().manual_seed(0)
    first, second = (epoch_indices(labels, 3, generator) for _ in range(2))
    for epoch in (first, second):
        assert len(epoch) == 80 and len(set(epoch.tolist())) == 80
        assert labels[epoch].sum() == 20, "every positive in every epoch"
        assert balanced_pos_weight(labels[epoch], "balanced") == 3.0
    assert set(first.tolist()) != set(second.tolist()), "negatives are drawn afresh each epoch"
    everything = epoch_indices(labels, None, generator)
    assert sorted(everything.tolist()) == list(range(1000))
    assert balanced_pos_weight(labels, "balanced") == 49.0 and balanced_pos_weight(labels, 2) == 2.0
    assert len(epoch_indices(labels, 100, generator)) == 1000, "capped at the negatives there are"


def test_mutation_count_stays_within_each_sequence():
    tokens = encode_sequences(["ACGTACGTAC", "ACG"])
    mutated = mutate(tokens.repeat(500, 1), 4, torch.Generator().manual_seed(0))
    assert torch.all(mutated[1::2, 3:] == 0), "padding is never mutated"
    changed = (mutated[0::2] != tokens[0]).sum(dim=1).float().mean().item()
    assert 2.3 < changed < 3.0  # 4 picks, 3/4 change, some picks collide
    assert torch.equal(tokens, encode_sequences(["ACGTACGTAC", "ACG"])), "input untouched"


def test_kmer_frequencies_sum_to_one_per_k():
    features = kmer_frequencies(["ACGTAC", "AAAA"], (1, 2))
    assert features.shape == (2, 4 + 16)
    assert features[:, :4].sum(axis=1) == pytest.approx([1, 1]) and features[1, 0] == 1.0


@pytest.mark.slow
def test_smoke_promoter_stage_writes_metrics_and_motifs(data_dir, tmp_path):
    workspace = tmp_path / "ws"
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "train.threads=1"]
    assert load_kernel("10_promoter").main(args) == 0  # alone on a fresh workspace: reads --data-dir
    assert not (workspace / "input").exists()
    metrics = json.loads((workspace / "oof" / "promoter_metrics.json").read_text())
    assert {"accuracy", "mcc", "sensitivity", "specificity", "per_fold", "model", "config"} <= set(metrics)
    assert len(metrics["per_fold"]) == 5 and metrics["model"] == "nt" and 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in metrics["per_fold"]]))
    motifs = pd.read_csv(workspace / "oof" / "promoter_motifs.csv")
    assert list(motifs.columns) == ["kmer", "count", "box", "mismatches"] and len(motifs.kmer[0]) == 7
    assert all(closest_box(k) == (b, m) for k, b, m in zip(motifs.kmer, motifs.box, motifs.mismatches))
    boxes = pd.read_csv(workspace / "oof" / "promoter_boxes.csv")
    assert set(boxes.box) == {"TATAAT", "TTGACA"} and (boxes.promoters.between(0, 1)).all()
    for figure in ("promoter_learning_curves.png", "promoter_confusion.png", "promoter_motifs.png",
                   "promoter_roc_pr.png"):
        assert (workspace / "figures" / figure).stat().st_size > 5_000


@pytest.fixture(scope="module")
def prepared_inputs(data_dir, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("dna")
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "train.threads=1"]
    assert load_kernel("00_prepare_input").main(args) == 0
    return workspace, args


@pytest.mark.slow
def test_smoke_viral_stage_reports_every_model_and_protocol(prepared_inputs):
    workspace, args = prepared_inputs
    assert load_kernel("11_viral").main(args) == 0
    metrics = json.loads((workspace / "oof" / "viral_metrics.json").read_text())
    assert metrics["auc"] == metrics["results"]["experiment/nt"]["auc"]
    assert sorted(metrics["results"]) == sorted(f"{p}/{m}" for p in ("experiment", "random_split")
                                                for m in ("nt", "danq", "rf"))
    assert metrics["results"]["experiment/nt"]["n_test"] == metrics["results"]["experiment/rf"]["n_test"]
    for figure in ("viral_roc_pr.png", "viral_learning_curves.png", "viral_confusion_nt.png"):
        assert (workspace / "figures" / figure).stat().st_size > 10_000


@pytest.mark.slow
def test_smoke_mirna_stage_reports_paper_protocol_and_cv(prepared_inputs):
    workspace, args = prepared_inputs
    assert load_kernel("12_mirna").main(args) == 0
    metrics = json.loads((workspace / "oof" / "mirna_metrics.json").read_text())
    assert set(metrics["models"]) == {"nt", "nt_bpp", "cnn", "danq"}
    best = metrics["models"][metrics["best_model"]]["paper_protocol"]
    assert metrics["mcc"] == best["mcc"] == max(m["paper_protocol"]["mcc"] for m in metrics["models"].values())
    for row in metrics["models"].values():
        assert set(row["cv"]) == {"sensitivity", "specificity", "f1", "mcc", "accuracy"}
    from nucleic.dna_data import read_mirna

    assert metrics["n_sequences"] == len(read_mirna(workspace / "input" / "mirna"))  # 1124 in the real bundle
    for kind in ("nt", "nt_bpp", "cnn", "danq"):
        assert (workspace / "figures" / f"mirna_learning_curves_{kind}.png").exists()
    assert (workspace / "figures" / "mirna_roc_pr.png").stat().st_size > 10_000


def test_attended_kmers_are_matched_to_the_known_boxes():
    assert closest_box("gTATAATc") == ("TATAAT", 0)
    assert closest_box("ATTGACG") == ("TTGACA", 1)
    assert closest_box("CCCCCCC")[1] >= 4
    sequences = ["TTGACAGGGGGGGGGGGGGGGGGTATAAT", "GGGGGGGGGGGGGGGGGGGGGGGGGGGGG", "tataatcccccc"]
    boxes = box_frequencies(sequences, np.array([1, 0, 1])).set_index(["box", "mismatches"])
    assert boxes.loc[("TATAAT", 0), "promoters"] == 1.0 and boxes.loc[("TATAAT", 0), "non_promoters"] == 0.0
    assert boxes.loc[("TTGACA", 0), "promoters"] == 0.5


def test_cached_fold_results_are_reused_only_under_the_same_settings(tmp_path):
    from nucleic.stage import claim_work_dir

    folder = tmp_path / "viral"
    key = {"viral": {"epochs": 4}, "seed": 1}
    (claim_work_dir(folder, key, force=False) / "experiment_nt.pkl").write_text("trained")
    assert (claim_work_dir(folder, key, force=False) / "experiment_nt.pkl").exists(), "same settings: resumed"
    changed = {"viral": {"epochs": 30}, "seed": 1}
    assert not (claim_work_dir(folder, changed, force=False) / "experiment_nt.pkl").exists(), "new settings: afresh"
    (folder / "experiment_nt.pkl").write_text("trained")
    assert not (claim_work_dir(folder, changed, force=True) / "experiment_nt.pkl").exists(), "--force: afresh"
