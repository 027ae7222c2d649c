"""Classifiers (NT, DanQ, CNN, ViraMiner), both strands, the k-mer branch, the served viral blend, the
mutation noise, eq. 11, k-mer features, and smoke stages 10-12."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import isolated, load_kernel

from nucleic.classify import (
    balanced_pos_weight,
    encode_sequences,
    epoch_indices,
    feature_spec,
    kmer_frequencies,
    mutate,
    sequence_features,
)
from nucleic.dna_tasks import (
    attention_motifs,
    box_frequencies,
    choose_blend,
    closest_box,
    feature_model_proba,
    fit_feature_model,
    grouped_auc,
    save_feature_model,
)
from nucleic.metrics import binary_classification_metrics
from nucleic.models.classifiers import (
    AMINO_ACIDS,
    BothStrands,
    DanQ,
    NTClassifier,
    NucleotideCNN,
    ViraMiner,
    reverse_complement,
)
from nucleic.predict import main as predict_main


@pytest.mark.parametrize("length", [81, 300, 164])
def test_forward_shapes_and_padding(length):
    tokens = torch.randint(1, 5, (3, length))
    tokens[2, length // 2:] = 0  # a shorter, padded sequence
    models = [NTClassifier(k=7, nlayer=2, d_model=32, nhead=4, dim_ff=64),
              DanQ(length, filters=16, lstm=8, dense=16), NucleotideCNN(), ViraMiner(16, dense=16)]
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


def test_forest_features_read_the_ends_length_gc_and_the_hairpins_free_energy():
    from nucleic.folding import ViennaSource

    hairpin, loose = "GGGGCGAAAGCCCCAG", "TAATAATAATAATAAT"
    spec = feature_spec({"ks": [1], "ends": 2, "globals": ["length", "gc", "mfe"]})
    assert ViennaSource("Andronescu2007").free_energies([hairpin])[0] == pytest.approx(-11.05, abs=1e-4)
    features = sequence_features([hairpin, loose, "ACG"], spec)  # after another energy set was loaded
    assert features.shape == (3, 4 + 2 * 2 * 4 + 1 + 1 + 2)
    ends = features[:, 4:20].reshape(3, 4, 4)  # first, second, last, second-to-last nucleotide, one-hot ACGT
    assert ends[0].argmax(axis=1).tolist() == [2, 2, 2, 0] and ends[0].sum() == 4
    assert features[:, 20].tolist() == [16, 16, 3] and features[0, 21] == pytest.approx(12 / 16)
    expected = -11.7  # kcal/mol, (((((....))))).. under Turner 2004 at 37 C (Andronescu 2007: -11.05)
    assert features[0, 22] == pytest.approx(expected, abs=1e-4)
    assert features[0, 23] == pytest.approx(expected / 16, abs=1e-5) and features[1, 22] > expected
    old_forest = feature_spec({"ks": [1, 2]})  # a forest saved before ends and globals: k-mers only
    np.testing.assert_array_equal(sequence_features([hairpin], old_forest), kmer_frequencies([hairpin], (1, 2)))
    with pytest.raises(ValueError, match="globals: unknown \\['mfe2'\\]"):
        feature_spec({"ks": [1], "globals": ["mfe2"]})


@pytest.mark.slow
def test_smoke_promoter_stage_writes_metrics_and_motifs(data_dir, tmp_path):
    workspace = tmp_path / "ws"
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "train.threads=1",
            "--set", "promoter.average_top_k=2", "--set", "promoter.seeds=2"]
    assert load_kernel("10_promoter").main(args) == 0  # alone on a fresh workspace: reads --data-dir
    assert not (workspace / "input").exists()
    metrics = json.loads((workspace / "oof" / "promoter_metrics.json").read_text())
    assert {"accuracy", "mcc", "sensitivity", "specificity", "per_fold", "model", "config"} <= set(metrics)
    assert len(metrics["per_fold"]) == 5 and metrics["model"] == "nt" and 0 <= metrics["accuracy"] <= 1
    assert metrics["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in metrics["per_fold"]]))
    # Served: per row, the mean of the network's, the linear model's and (where it has one) the homology
    # model's OOF probabilities, scored per fold
    assert metrics["served"] == ["nt", "linear", "homology"] and set(metrics["models"]) == {"nt", "linear", "homology"}
    oof = pd.read_csv(workspace / "oof" / "promoter_oof.csv")
    members = oof[["probability_nt", "probability_linear", "probability_homology"]]
    np.testing.assert_allclose(oof.probability, members.mean(axis=1, skipna=True), atol=2e-6)
    assert oof.probability_nt.notna().all() and oof.probability_linear.notna().all()
    assert metrics["models"]["linear"]["auc"] > 0.9, "the boxes the generated promoters carry are read"
    fold_rows = [oof[oof.fold == f] for f in range(5)]
    served = [binary_classification_metrics(rows.label.to_numpy(), rows.probability.to_numpy()) for rows in fold_rows]
    assert metrics["mcc"] == pytest.approx(np.mean([f["mcc"] for f in served]), abs=1e-3)
    assert sorted(p.name for p in (workspace / "work" / "smoke" / "promoter" / "linear").glob("fold*.joblib")) == [
        f"fold{f}.joblib" for f in range(5)]
    assert_two_networks_per_fold(workspace / "work" / "smoke" / "promoter" / "nt", oof)
    motifs = pd.read_csv(workspace / "oof" / "promoter_motifs.csv")
    assert list(motifs.columns) == ["kmer", "count", "box", "mismatches"] and len(motifs.kmer[0]) == 7
    assert all(closest_box(k) == (b, m) for k, b, m in zip(motifs.kmer, motifs.box, motifs.mismatches))
    boxes = pd.read_csv(workspace / "oof" / "promoter_boxes.csv")
    assert set(boxes.box) == {"TATAAT", "TTGACA"} and (boxes.promoters.between(0, 1)).all()
    for figure in ("promoter_learning_curves.png", "promoter_confusion.png", "promoter_motifs.png",
                   "promoter_roc_pr.png"):
        assert (workspace / "figures" / figure).stat().st_size > 5_000
    assert_checkpoint_report_matches_the_stage(data_dir, workspace, metrics)


def assert_two_networks_per_fold(work, oof):
    """promoter.seeds = 2: each fold trains two networks from other seeds, each saved, and the fold's OOF
    probability is their mean; the predict command's default weights are all ten."""
    from nucleic.config import load_config
    from nucleic.io_utils import read_cache
    from nucleic.predict import default_weights

    assert sorted(p.name for p in work.glob("fold*.pt")) == [f"fold{f}_seed{m}.pt" for f in range(5) for m in (0, 1)]
    for fold in range(5):
        members = [read_cache(work / f"fold{fold}_seed{m}.pkl")["probs"] for m in (0, 1)]
        assert not np.allclose(members[0], members[1]), "the two networks start from other seeds"
        np.testing.assert_allclose(oof.probability_nt[oof.fold == fold], np.mean(members, axis=0), atol=2e-6)
    cfg = load_config("smoke", ["promoter.seeds=2", "promoter.average_top_k=2", f"paths.work={work.parents[2]}"])
    assert sum(p.parent == work for p in default_weights(cfg, "promoter")) == 10


def assert_checkpoint_report_matches_the_stage(data_dir, workspace, metrics):
    """benchmarks/promoter_checkpoints.py: the stage's per-fold figures, and the best single epoch's, which
    equal them wherever the stage kept that epoch rather than the mean of the two best."""
    import sys

    from conftest import run_script

    proc = run_script([sys.executable, "benchmarks/promoter_checkpoints.py", "--preset", "smoke", "--set",
                       "promoter.average_top_k=2", "--set", "promoter.seeds=2", *isolated(workspace)],
                      env={"NT_DATA_DIR": str(data_dir)},
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((workspace / "oof" / "promoter_checkpoints.json").read_text())
    network = metrics["models"]["nt"]["per_fold"]
    assert [row["stage"]["accuracy"] for row in report["folds"]] == [f["accuracy"] for f in network]
    for row in report["folds"]:
        if not row["averaged_kept"]:
            assert row["best_epoch"] == pytest.approx(row["stage"])
        assert all(-1 <= v <= 1 for v in row["best_epoch"].values())

    # settings the stage did not train with: one line naming the folder, no report written over the last one
    proc = run_script([sys.executable, "benchmarks/promoter_checkpoints.py", "--preset", "smoke", "--set",
                       "promoter.average_top_k=3", "--set", "promoter.seeds=2", *isolated(workspace)],
                      env={"NT_DATA_DIR": str(data_dir)},
                      timeout=300)
    assert proc.returncode != 0 and "trained with other settings" in proc.stderr.strip().splitlines()[-1]
    assert json.loads((workspace / "oof" / "promoter_checkpoints.json").read_text()) == report


@pytest.fixture(scope="module")
def prepared_inputs(data_dir, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("dna")
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "train.threads=1"]
    assert load_kernel("00_prepare_input").main(args) == 0
    return workspace, args


@pytest.mark.slow
def test_smoke_viral_stage_reports_every_model_and_serves_the_chosen_one(prepared_inputs, data_dir, tmp_path, capsys):
    workspace, args = prepared_inputs
    assert load_kernel("11_viral").main(args) == 0
    metrics = json.loads((workspace / "oof" / "viral_metrics.json").read_text())
    assert metrics["auc"] == metrics["results"]["experiment/served"]["auc"]
    models = ("nt", "danq", "viraminer", "rf", "homology", "peptides")
    assert sorted(metrics["results"]) == sorted(f"{p}/{m}" for p in ("experiment", "random_split")
                                                for m in (*models, "blend", "served_by_segment", "served"))
    assert metrics["served"]["contig_mean"] is True  # then the segments of one contig are scored together
    assert metrics["results"]["experiment/nt"]["n_test"] == metrics["results"]["experiment/rf"]["n_test"]
    # the homology models abstain on contigs without a neighbour in another experiment: scored where they speak
    assert 0 <= metrics["results"]["experiment/homology"]["coverage"] < 1
    assert 0 <= metrics["results"]["experiment/peptides"]["coverage"] < 1
    for figure in ("viral_roc_pr.png", "viral_learning_curves.png", "viral_confusion.png"):
        assert (workspace / "figures" / figure).stat().st_size > 10_000
    served = metrics["served"]["models"]
    assert served and set(served) <= set(models) and set(served) - {"homology", "peptides"}  # one scores every contig
    from nucleic.dna_tasks import weights_suffix

    weights = [workspace / "work" / "smoke" / "viral" / f"serve_{k}{weights_suffix(k)}" for k in served]
    assert all(w.exists() for w in weights), "the served models are trained on every experiment"
    context = metrics["served"]["run_context"]  # the held-out experiment scored as one run, beside the blend alone
    assert context["min_run"] == 20 and len(context["coefficients"]) == 4 and Path(context["weights"]).exists()
    from nucleic.predict import load_feature_model

    served_stacker = load_feature_model(Path(context["weights"]))["estimator"]  # refitted with the held-out run
    assert context["fitted_on"] == "every experiment" and served_stacker.coefficients() == context["coefficients"]
    assert context["coefficients"] != context["coefficients_scoring_held_out"]
    assert metrics["results"]["experiment/blend"]["n_test"] == metrics["results"]["experiment/served"]["n_test"]
    contigs = pd.read_csv(data_dir / "viral" / "exp3_2013_H4.csv", header=None, names=["id", "sequence", "label"])
    source, few = tmp_path / "contigs.fa", tmp_path / "few.fa"
    source.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in contigs.head(300).itertuples()))
    few.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in contigs.head(4).itertuples()))
    outputs = {name: tmp_path / f"{name}.csv" for name in ("default", "given", "independent", "few", "few_alone")}
    for name, extra in (("default", []), ("given", ["--weights", *map(str, weights), context["weights"]]),
                        ("independent", ["--independent"])):
        assert predict_main(["viral", "--input", str(source), "--output", str(outputs[name]), *args[:2], *args[4:],
                             *extra]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(outputs["default"]), pd.read_csv(outputs["given"]))
    as_run, alone = pd.read_csv(outputs["default"]), pd.read_csv(outputs["independent"])
    assert (as_run.id == alone.id).all() and not np.allclose(as_run.probability, alone.probability)
    for name, extra in (("few", []), ("few_alone", ["--independent"])):  # under min_run: each contig alone
        assert predict_main(["viral", "--input", str(few), "--output", str(outputs[name]), *args[:2], *args[4:],
                             *extra]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(outputs["few"]), pd.read_csv(outputs["few_alone"]))
    np.testing.assert_allclose(pd.read_csv(outputs["few"]).probability, alone.probability[:4])
    # a CSV with a run column: each run scored as one (as its own file would be), a run under min_run alone
    runs = pd.DataFrame({"id": contigs.id[:300], "sequence": contigs.sequence[:300],
                         "run": ["a"] * 150 + ["b"] * 145 + ["c"] * 5})
    runs.to_csv(tmp_path / "runs.csv", index=False)
    runs[runs.run == "b"].drop(columns="run").to_csv(tmp_path / "run_b.csv", index=False)
    for name in ("runs", "run_b"):
        assert predict_main(["viral", "--input", str(tmp_path / f"{name}.csv"), "--output", str(tmp_path / f"{name}_out.csv"),
                             *args[:2], *args[4:]]) == 0
    by_run, run_b = pd.read_csv(tmp_path / "runs_out.csv"), pd.read_csv(tmp_path / "run_b_out.csv")
    assert list(by_run.columns) == ["id", "run", "probability"] and (by_run.run == runs.run).all()
    np.testing.assert_allclose(by_run.probability[by_run.run == "b"], run_b.probability)
    np.testing.assert_allclose(by_run.probability[by_run.run == "c"], alone.probability[295:])
    assert not np.allclose(by_run.probability[:150], as_run.probability[:150])
    assert "3 sequencing runs (the 'run' column); in the 1 of fewer than 20" in capsys.readouterr().out
    runs.loc[7, "run"] = " "
    runs.to_csv(tmp_path / "runs.csv", index=False)
    assert predict_main(["viral", "--input", str(tmp_path / "runs.csv"), "--output", str(tmp_path / "bad.csv"),
                         *args[:2], *args[4:]]) == 2
    assert f"runs.csv: row 9: record '{runs.id[7]}': field 'run': empty" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()
    # a contig column: after the run context, the segments of one contig (within one run) share their mean log-odds
    from nucleic.classify import contig_mean

    runs["run"] = ["a"] * 150 + ["b"] * 145 + ["c"] * 5
    runs["contig"] = [f"c{i // 3}" for i in range(150)] + [f"c{i // 2}" for i in range(150)]  # c0 in runs a and b
    runs.to_csv(tmp_path / "contigs.csv", index=False)
    runs.drop(columns="run").to_csv(tmp_path / "contigs_one_run.csv", index=False)
    for name, extra in (("contigs", []), ("contigs_one_run", []), ("contigs_alone", ["--independent"])):
        source_csv = tmp_path / ("contigs_one_run.csv" if name == "contigs_one_run" else "contigs.csv")
        assert predict_main(["viral", "--input", str(source_csv), "--output", str(tmp_path / f"{name}_out.csv"),
                             *args[:2], *args[4:], *extra]) == 0
    by_contig = pd.read_csv(tmp_path / "contigs_out.csv")
    assert list(by_contig.columns) == ["id", "run", "contig", "probability"]
    np.testing.assert_allclose(by_contig.probability,
                               contig_mean(by_run.probability.to_numpy(), runs.run + "/" + runs.contig), rtol=1e-4)
    one_run = pd.read_csv(tmp_path / "contigs_one_run_out.csv")
    np.testing.assert_allclose(one_run.probability, contig_mean(as_run.probability.to_numpy(), runs.contig), rtol=1e-4)
    assert not np.allclose(one_run.probability, as_run.probability)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "contigs_alone_out.csv").probability, alone.probability)
    printed = capsys.readouterr().out
    assert "each of 126 contigs scored together" in printed and "each of 75 contigs scored together" in printed
    runs.loc[4, "contig"] = ""
    runs.to_csv(tmp_path / "contigs.csv", index=False)
    assert predict_main(["viral", "--input", str(tmp_path / "contigs.csv"), "--output", str(tmp_path / "bad.csv"),
                         *args[:2], *args[4:]]) == 2
    assert f"contigs.csv: row 6: record '{runs.id[4]}': field 'contig': empty" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()
    copy = tmp_path / "serve_run_context_copy.joblib"  # two run contexts: which one? refused
    copy.write_bytes(Path(context["weights"]).read_bytes())
    capsys.readouterr()
    assert predict_main(["viral", "--input", str(source), "--output", str(tmp_path / "two.csv"), *args[:2], *args[4:],
                         "--weights", *map(str, weights), context["weights"], str(copy)]) == 2
    assert "serve_run_context_copy.joblib: a second run-context model" in capsys.readouterr().err
    assert not (tmp_path / "two.csv").exists()


@pytest.mark.slow
def test_smoke_mirna_stage_reports_paper_protocol_and_cv_and_serves_the_chosen_blend(prepared_inputs, tmp_path):
    workspace, args = prepared_inputs
    assert load_kernel("12_mirna").main(args) == 0
    metrics = json.loads((workspace / "oof" / "mirna_metrics.json").read_text())
    assert set(metrics["models"]) == {"nt", "nt_bpp", "cnn", "danq", "rf"}
    for row in [*metrics["models"].values(), metrics["served"]]:
        assert set(row["cv"]) == {"sensitivity", "specificity", "f1", "mcc", "accuracy"}
    from nucleic.dna_data import read_mirna
    from nucleic.dna_tasks import stratified_split, stratified_subset
    from nucleic.io_utils import read_cache
    from nucleic.metrics import binary_classification_metrics

    rows = read_mirna(workspace / "input" / "mirna")  # 1124 in the real bundle; the smoke preset takes 400
    assert metrics["n_sequences"] == min(400, len(rows))
    served, work = metrics["served"]["models"], workspace / "work" / "smoke" / "mirna"
    assert served and set(served) <= set(metrics["models"])
    frame = stratified_subset(rows, 400, 2020)
    labels = frame.label.to_numpy()
    _, test_idx = stratified_split(np.arange(len(frame)), labels, 0.3, 2020)
    served_probs = np.mean([read_cache(work / f"paper_{k}.pkl")["probs"] for k in served], axis=0)
    assert metrics["mcc"] == metrics["served"]["paper_protocol"]["mcc"] == pytest.approx(
        binary_classification_metrics(labels[test_idx], served_probs)["mcc"])
    source = tmp_path / "hairpins.fa"
    source.write_text("".join(f">h{i}\n{s}\n" for i, s in enumerate(frame.sequence.iloc[test_idx[:6]])))
    default, given = tmp_path / "default.csv", tmp_path / "given.csv"
    assert predict_main(["mirna", "--input", str(source), "--output", str(default), *args[:2], *args[4:]]) == 0
    assert predict_main(["mirna", "--input", str(source), "--output", str(given), *args[:2], *args[4:],
                         "--weights", *metrics["served"]["weights"]]) == 0
    predicted = pd.read_csv(default)
    pd.testing.assert_frame_equal(predicted, pd.read_csv(given))
    np.testing.assert_allclose(predicted.probability, served_probs[:6], atol=1e-4)
    forest = tmp_path / "forest.csv"  # the hairpin-feature forest, served or not, through the predict command
    assert predict_main(["mirna", "--input", str(source), "--output", str(forest), *args[:2], *args[4:],
                         "--weights", str(work / "paper_rf.joblib")]) == 0
    np.testing.assert_allclose(pd.read_csv(forest).probability, read_cache(work / "paper_rf.pkl")["probs"][:6])
    assert len(list((work / "cv_rf").glob("fold*.joblib"))) == 3
    for kind in ("nt", "nt_bpp", "cnn", "danq"):
        assert (workspace / "figures" / f"mirna_learning_curves_{kind}.png").exists()
    assert (workspace / "figures" / "mirna_confusion_rf.png").exists()
    assert (workspace / "figures" / "mirna_roc_pr.png").stat().st_size > 10_000


def test_attended_kmers_are_matched_to_the_known_boxes():
    assert closest_box("gTATAATc") == ("TATAAT", 0)
    assert closest_box("ATTGACG") == ("TTGACA", 1)
    assert closest_box("CCCCCCC")[1] >= 4
    sequences = ["TTGACAGGGGGGGGGGGGGGGGGTATAAT", "GGGGGGGGGGGGGGGGGGGGGGGGGGGGG", "tataatcccccc"]
    boxes = box_frequencies(sequences, np.array([1, 0, 1])).set_index(["box", "mismatches"])
    assert boxes.loc[("TATAAT", 0), "promoters"] == 1.0 and boxes.loc[("TATAAT", 0), "non_promoters"] == 0.0
    assert boxes.loc[("TTGACA", 0), "promoters"] == 0.5


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_motifs_count_top_kmers_of_correct_positives_on_the_models_device(device):
    from nucleic.classify import build_classifier

    torch.manual_seed(0)
    sequences = pd.Series(["ACGTTGACAACGTATAATGG", "TTTTTTTTTTTTTTTTTTTT", "GGGGCCCCAAAATTTTGGGG", "ACACACACACACACACACAC"])
    model = build_classifier("nt", {"k": 5, "nlayer": 1, "d_model": 16, "nhead": 2, "dim_ff": 32}, 20).to(device).eval()
    labels, probs = np.array([1, 1, 0, 1]), np.array([0.9, 0.8, 0.9, 0.2])  # rows 0 and 1: correct positives
    counts = attention_motifs(model, encode_sequences(list(sequences)), labels, probs, sequences, torch.device(device),
                              top=2)
    assert sum(counts.values()) == 4 and counts["TTTTT"] == 2
    assert all(len(kmer) == 5 and kmer in sequences[0] for kmer in counts if kmer != "TTTTT")


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


def test_reverse_complement_matches_the_other_strand_and_keeps_padding():
    sequences = ["ACGTTGCA", "AACCG", "GATTACA"]
    complement = {"A": "T", "C": "G", "G": "C", "T": "A"}
    expected = ["".join(complement[b] for b in reversed(s)) for s in sequences]
    tokens = encode_sequences(sequences)
    assert torch.equal(reverse_complement(tokens), encode_sequences(expected))
    assert torch.equal(reverse_complement(reverse_complement(tokens)), tokens)


def test_both_strands_gives_one_score_per_contig_whichever_strand_was_read():
    torch.manual_seed(0)
    model = BothStrands(ViraMiner(16, dense=16)).eval()
    tokens = torch.randint(1, 5, (4, 300))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(reverse_complement(tokens)))
        assert not torch.allclose(model.model(tokens), model.model(reverse_complement(tokens)))


def test_the_blend_is_chosen_on_validation_auc_and_prefers_fewer_models():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(450)]
    signal = labels + rng.normal(0, 1.0, 500)
    other = labels + rng.normal(0, 1.0, 500)  # independent errors: the mean of the two is better than either
    noise = rng.normal(0, 1.0, 500)
    chosen, auc = choose_blend(labels, {"a": signal, "b": other, "noise": noise})
    assert chosen == ("a", "b") and auc > max(choose_blend(labels, {"a": signal})[1],
                                              choose_blend(labels, {"b": other})[1])
    assert choose_blend(labels, {"a": signal, "copy": signal.copy()})[0] == ("a",)


def test_a_logit_blend_averages_log_odds_so_a_model_with_squeezed_probabilities_counts():
    from nucleic.config import ConfigError
    from nucleic.dna_tasks import BLEND_CLIP, served_mean

    def logit(p):
        return np.log(p / (1 - p))

    spread, squeezed, abstains = np.array([0.9, 0.2, 0.5]), np.array([0.0, 0.04, 0.01]), np.array([np.nan, 1.0, np.nan])
    mean_log_odds = [np.mean([logit(0.9), logit(BLEND_CLIP)]),
                     np.mean([logit(0.2), logit(0.04), logit(1 - BLEND_CLIP)]), np.mean([logit(0.5), logit(0.01)])]
    np.testing.assert_allclose(served_mean([spread, squeezed, abstains], "logit"), 1 / (1 + np.exp(-np.array(mean_log_odds))))
    assert np.isnan(served_mean([np.array([np.nan]), np.array([np.nan])], "logit")).all()
    np.testing.assert_array_equal(served_mean([squeezed], "logit"), squeezed)  # a model alone: as it is
    with pytest.raises(ConfigError, match="blend: expected one of probability, logit"):
        served_mean([spread], "rank")

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(100), np.zeros(900)]
    network = 1 / (1 + np.exp(-(labels + rng.normal(0, 1.0, 1000))))
    forest = 0.03 / (1 + np.exp(-2 * (labels + rng.normal(0, 1.0, 1000))))  # as informative, all below 0.03
    alone = grouped_auc(labels, network)
    assert grouped_auc(labels, served_mean([network, forest])) == pytest.approx(alone, abs=0.01), "the network decides"
    assert grouped_auc(labels, served_mean([network, forest], "logit")) > alone + 0.03
    assert choose_blend(labels, {"network": network, "forest": forest}, blend="logit")[0] == ("network", "forest")

    from nucleic.config import load_config
    from nucleic.dna_tasks import promoter_fits_key, promoter_key, promoter_network_key, viral_fits_key, viral_key

    def keys(*overrides):
        cfg = load_config("smoke", list(overrides))
        return (viral_key(cfg), promoter_key(cfg)), (viral_fits_key(cfg), promoter_fits_key(cfg), promoter_network_key(cfg))

    stages, fits = keys()
    other_blend = keys("viral.blend=probability", "promoter.blend=logit")
    assert other_blend[1] == fits, "no fit depends on the blend: the cached fits stay"
    assert keys("viral.choose_on=rows", "viral.models=[rf,peptides]")[1] == fits, "nor on the served rule or models"
    assert other_blend[0][0] != stages[0] and other_blend[0][1] != stages[1], "the stages rerun (from their caches)"
    assert keys("viral.rf.trees=3")[1] != fits


def test_the_viral_blend_is_chosen_on_each_experiment_as_fits_on_the_others_score_it(tmp_path):
    from nucleic.config import ConfigError, load_config
    from nucleic.dna_tasks import choose_served, cross_experiment_probs

    rng = np.random.default_rng(3)
    rows = 90
    labels = np.arange(rows) % 3 == 0
    sequences = ["".join(rng.choice(list("GGCCAT" if y else "AATTGC"), 60)) for y in labels]
    frame = pd.DataFrame({"sequence": sequences, "label": labels.astype(int), "group": np.arange(rows) // 30})
    cfg = load_config("smoke", ["viral.rf.trees=5"])
    train, val = np.arange(0, rows, 2), np.arange(1, rows, 2)
    cache = tmp_path / "cross.pkl"
    probs = cross_experiment_probs(cfg, cfg.viral, ["rf", "homology"], frame, np.arange(rows), cache)
    for group in range(3):  # each experiment as the forest fitted on the other two scores it
        mine = np.flatnonzero(frame.group == group)
        forest = fit_feature_model(cfg, cfg.viral, "rf", frame, np.flatnonzero(frame.group != group))
        expected = feature_model_proba(forest, feature_spec(cfg.viral.rf), [sequences[i] for i in mine])
        np.testing.assert_allclose(probs["rf"][mine], expected)
    assert np.isnan(probs["homology"]).all()  # random 60-mers share no 24-mer: no neighbour, no opinion
    assert grouped_auc(frame.label.to_numpy(), probs["rf"], frame.group.to_numpy()) > 0.9
    from nucleic.io_utils import read_pickle, write_pickle

    write_pickle(cache, {**read_pickle(cache), "rf": np.zeros(rows)})  # a cached kind is read, not refitted
    assert (cross_experiment_probs(cfg, cfg.viral, ["rf"], frame, np.arange(rows), cache)["rf"] == 0).all()

    flawless = {"nt": labels[val].astype(float), "rf": probs["rf"][val]}  # a network that knows these runs
    on_rows = load_config("smoke", ["viral.choose_on=rows", "viral.rf.trees=5"])
    assert choose_served(on_rows, on_rows.viral, frame, train, val, flawless, tmp_path / "a.pkl") == (("nt",), 1.0)
    assert not (tmp_path / "a.pkl").exists()
    served, auc = choose_served(cfg, cfg.viral, frame, train, val, flawless, tmp_path / "b.pkl")
    assert served == ("rf",) and auc > 0.9  # networks are no candidates: no fit per experiment
    pooled = load_config("smoke", ["viral.choose_on=pooled"])
    with pytest.raises(ConfigError, match="viral.choose_on"):
        choose_served(pooled, pooled.viral, frame, train, val, flawless, tmp_path / "c.pkl")
    with pytest.raises(ConfigError, match="needs a feature model"):
        choose_served(cfg, cfg.viral, frame, train, val, {"nt": flawless["nt"]}, tmp_path / "d.pkl")

    from nucleic.classify import RunContextStacker
    from nucleic.dna_tasks import fit_run_context

    # the run context is fitted on the served blend as the fits on the other experiments scored it
    stacker = fit_run_context(cfg, cfg.viral, frame, train, val, served, tmp_path / "b.pkl")
    expected = RunContextStacker(10, 0.5, 20, min_run=20).fit(read_pickle(tmp_path / "b.pkl")["rf"], sequences,
                                                             frame.group.to_numpy(), frame.label.to_numpy())
    assert stacker.settings() == expected.settings() and stacker.coefficients() == expected.coefficients()
    # the served one: refitted with a held-out experiment as one more run, as fits on the training rows score it
    held_labels = np.arange(30) % 2 == 0
    held = pd.DataFrame({"sequence": ["".join(rng.choice(list("GGCCAT" if y else "AATTGC"), 60)) for y in held_labels],
                         "label": held_labels.astype(int), "group": 3})
    with_held = pd.concat([frame, held], ignore_index=True)
    held_out, held_probs = np.arange(rows, rows + 30), np.linspace(0.01, 0.99, 30)
    served_stacker = fit_run_context(cfg, cfg.viral, with_held, train, val, served, tmp_path / "b.pkl",
                                     (held_out, held_probs))
    expected = RunContextStacker(10, 0.5, 20, min_run=20).fit(
        np.concatenate([read_pickle(tmp_path / "b.pkl")["rf"], held_probs]), list(with_held.sequence),
        with_held.group.to_numpy(), with_held.label.to_numpy())
    assert served_stacker.coefficients() == expected.coefficients() != stacker.coefficients()
    off = load_config("smoke", ["viral.run_context=null"])
    assert fit_run_context(off, off.viral, frame, train, val, served, tmp_path / "b.pkl") is None
    with pytest.raises(ConfigError, match="viral.run_context.*choose_on: experiments"):
        fit_run_context(on_rows, on_rows.viral, frame, train, val, ("nt",), tmp_path / "a.pkl")


def test_with_groups_the_blend_is_chosen_for_ranking_inside_each_group_not_for_telling_groups_apart():
    rng = np.random.default_rng(0)
    groups = np.r_[np.zeros(200), np.ones(800)]  # two sequencing runs, 50 % and 3 % positives
    labels = np.r_[rng.random(200) < 0.5, rng.random(800) < 0.03].astype(float)
    which_run = -groups  # names the run (high pooled AUC), ranks nothing inside one
    ranks = labels + rng.normal(0, 1.5, 1000)
    candidates = {"which_run": which_run, "ranks": ranks}
    assert grouped_auc(labels, which_run) > grouped_auc(labels, ranks)
    assert grouped_auc(labels, which_run, groups) == 0.5
    assert choose_blend(labels, candidates)[0] == ("which_run",)
    assert choose_blend(labels, candidates, groups)[0] == ("ranks",)  # the mean ranks the same inside a run: a tie
    with pytest.raises(ValueError, match="no group holds both classes"):
        grouped_auc(np.r_[np.ones(5), np.zeros(5)], ranks[:10], np.r_[np.zeros(5), np.ones(5)])


def test_position_and_box_features_read_aligned_promoters():
    spec = feature_spec({"ks": [1], "positions": 3, "boxes": [["tataat", 2, 10], ["TTGACA", 0, 8]]})
    features = sequence_features(["ACTATAATGG", "ACTTTACAGG", "AC"], spec)
    assert features.shape == (3, 4 + 3 * 4 + 2)
    positions = features[:, 4:16].reshape(3, 3, 4)
    assert positions[0].argmax(axis=1).tolist() == [0, 1, 3] and positions[2].sum() == 2  # past the end: zeros
    assert features[:, 16].tolist() == [0, 3, 6]  # a window the sequence does not reach counts as mismatches
    assert features[:, 17].tolist() == [4, 1, 6]
    assert feature_spec({"ks": [1]})["boxes"] == [] and feature_spec({"ks": [1]})["positions"] == 0


def overlapping_fragments(rng, regions: int, per_region: int, length: int = 40, step: int = 6) -> list[str]:
    """per_region fragments of `length` nt from each random region, each `step` nt further along."""
    out = []
    for _ in range(regions):
        region = "".join(rng.choice(list("ACGT"), length + step * per_region))
        out += [region[i * step:i * step + length] for i in range(per_region)]
    return out


def test_neighbours_are_the_labelled_sequences_sharing_a_kmer_never_a_row_itself():
    from nucleic.classify import SharedKmerNeighbours

    rng = np.random.default_rng(0)
    positives, negatives = overlapping_fragments(rng, 3, 3), overlapping_fragments(rng, 2, 2)
    loner = "".join(rng.choice(list("ACGT"), 40))
    index = SharedKmerNeighbours(positives + negatives, [1] * 9 + [0] * 4, k=16)
    counts = index.counts([positives[1], negatives[0], loner])
    # the middle fragment shares its 25 16-mers with itself and 19 with each of the other two of its region
    assert counts[0].tolist() == [3, 0, 25, 0] and counts[1].tolist() == [0, 2, 0, 25] and counts[2].tolist() == [0] * 4
    mixed = positives[0][20:] + negatives[0][:20]  # 5 16-mers from each: in all 3 positives, in 1 negative
    assert index.counts([mixed])[0].tolist() == [3, 1, 5, 5]
    np.testing.assert_allclose(index.proba([positives[1], negatives[0], loner, mixed]), [1, 0, np.nan, 0.75])
    # a training row is not its own neighbour; its region's others are
    assert index.counts([positives[1]], self_rows=[1])[0].tolist() == [2, 0, 19, 0]
    features = index.features([positives[1]])[0]
    np.testing.assert_allclose(features, [np.log(4), 0, 25, 0])
    import pickle

    copy = pickle.loads(pickle.dumps(index))  # pickles as its sequences and labels; the index is rebuilt
    assert copy._index is None and copy.counts([mixed]).tolist() == index.counts([mixed]).tolist()


def test_with_both_strands_a_fragment_read_from_the_other_strand_is_a_neighbour():
    import pickle

    from nucleic.classify import SharedKmerNeighbours, reverse_complement

    assert reverse_complement("AACGTTTGCN") == "NGCAAACGTT"
    rng = np.random.default_rng(1)
    positives, negatives = overlapping_fragments(rng, 2, 3), overlapping_fragments(rng, 1, 2)
    other_strand = reverse_complement(positives[1])  # the middle fragment of region 0, read from its other strand
    one, both = (SharedKmerNeighbours(positives + negatives, [1] * 6 + [0] * 2, k=16, both_strands=b) for b in (False, True))
    assert one.counts([other_strand])[0].tolist() == [0] * 4
    assert both.counts([other_strand])[0].tolist() == [3, 0, 25, 0]  # as the fragment itself finds them
    assert both.counts([positives[1]]).tolist() == one.counts([positives[1]]).tolist()  # same strand: unchanged
    np.testing.assert_allclose(both.proba([other_strand, reverse_complement(negatives[0])]), [1, 0])
    copy = pickle.loads(pickle.dumps(both))
    assert copy.both_strands and copy.counts([other_strand]).tolist() == both.counts([other_strand]).tolist()
    saved_before = {key: value for key, value in one.__getstate__().items() if key != "both_strands"}
    old = SharedKmerNeighbours.__new__(SharedKmerNeighbours)
    old.__setstate__(saved_before)  # a model pickled before both_strands existed reads one strand
    assert not old.both_strands and old.counts([other_strand])[0].tolist() == [0] * 4


def test_neighbours_skip_low_complexity_kmers_and_with_groups_come_from_the_other_groups_only():
    import pickle

    from nucleic.classify import SharedKmerNeighbours

    rng = np.random.default_rng(2)
    region = overlapping_fragments(rng, 1, 3)  # three overlapping fragments of one region
    tail = "A" * 30
    sequences = [region[0], region[1], "".join(rng.choice(list("ACGT"), 40)) + "G" + tail]
    labels, groups = [1, 1, 0], ["run1", "run2", "run1"]
    plain = SharedKmerNeighbours(sequences, labels, k=16, groups=groups)
    filtered = SharedKmerNeighbours(sequences, labels, k=16, max_base_share=0.6, groups=groups)
    query = "".join(rng.choice(list("ACGT"), 40)) + "C" + tail  # shares only the poly-A 16-mer with row 2
    assert plain.counts([query])[0].tolist() == [0, 1, 0, 1] and filtered.counts([query])[0].tolist() == [0] * 4
    # region[2] overlaps rows 0 (run1) and 1 (run2); as a run1 contig it may only use run2's
    assert filtered.counts([region[2]])[0, 0] == 2
    assert filtered.counts([region[2]], query_groups=["run1"])[0].tolist() == [1, 0, 19, 0]
    np.testing.assert_allclose(filtered.proba([region[2], region[2]], ["run1", "run3"]), [1, 1])
    assert filtered.proba([region[0]], ["run1"])[0] == 1  # row 1 is run2's
    assert np.isnan(SharedKmerNeighbours(sequences[:1], [1], k=16, groups=["run1"]).proba([region[1]], ["run1"])[0])
    copy = pickle.loads(pickle.dumps(filtered))
    assert copy.max_base_share == 0.6 and list(copy.groups) == groups
    with pytest.raises(ValueError, match="no groups"):
        SharedKmerNeighbours(sequences, labels, k=16).counts([query], query_groups=["run1"])


def brute_force_neighbour_counts(index, queries, self_rows=None, query_groups=None, kmers=None) -> np.ndarray:
    """SharedKmerNeighbours.counts from its definition: Python sets of k-mer strings (kmers(sequence): its
    nucleotide k-mers by default), every pair compared; a k-mer of more than max_holders rows links nothing."""
    from nucleic.classify import reverse_complement

    def nucleotide_kmers(sequence):
        found = {sequence[i:i + index.k] for i in range(len(sequence) - index.k + 1)}
        share = index.max_base_share
        return {x for x in found if share is None or max(x.count(b) for b in "ACGT") <= share * index.k}

    kmers = kmers or nucleotide_kmers
    rows = [kmers(sequence) for sequence in index.sequences]
    if index.max_holders is not None:
        holders = collections.Counter(kmer for row in rows for kmer in row)
        rows = [{kmer for kmer in row if holders[kmer] <= index.max_holders} for row in rows]
    out = np.zeros((len(queries), 4), dtype=np.float32)
    for q, query in enumerate(queries):
        mine = kmers(query) | (kmers(reverse_complement(query)) if index.both_strands else set())
        shared = {row: len(mine & theirs) for row, theirs in enumerate(rows) if mine & theirs}
        if self_rows is not None:
            shared.pop(self_rows[q], None)
        if query_groups is not None:
            shared = {row: n for row, n in shared.items() if index.groups[row] != query_groups[q]}
        for column, label in enumerate((1, 0)):
            found = [n for row, n in shared.items() if index.labels[row] == label]
            out[q, column], out[q, 2 + column] = len(found), max(found, default=0)
    return out


@pytest.mark.parametrize("k,both_strands,max_base_share,max_holders", [
    (6, False, None, None), (6, True, 0.6, 3), (8, True, None, None), (33, True, 0.5, 2), (4, False, 0.5, None)])
def test_neighbour_counts_from_integer_codes_equal_the_definition(k, both_strands, max_base_share, max_holders):
    """The index encodes k-mers of A, C, G, T as integers and keeps any other (N, lower case, U, k > 32) as
    strings; the counts must equal the set definition for every mix, with self rows and groups left out."""
    from nucleic.classify import SharedKmerNeighbours, reverse_complement

    rng = np.random.default_rng(5)
    letters = list("ACGT") * 6 + list("NacgU")
    base = ["".join(rng.choice(letters, rng.integers(5, 60))) for _ in range(40)]
    sequences = base + [s[rng.integers(0, 5):] + "".join(rng.choice(list("ACGT"), 5)) for s in base[:30]]
    sequences += ["A" * 30, "ACGT", "ACGTACGTAC" * 5]
    labels, groups = rng.integers(0, 2, len(sequences)), rng.integers(0, 3, len(sequences))
    index = SharedKmerNeighbours(sequences, labels, k, both_strands=both_strands, max_base_share=max_base_share,
                                 groups=groups, max_holders=max_holders)
    queries = sequences[:20] + [reverse_complement(s) for s in sequences[:10]] + ["GG", ""]
    got = index.counts(queries)
    assert got[:, :2].sum() > 0
    np.testing.assert_array_equal(got, brute_force_neighbour_counts(index, queries))
    own = np.arange(len(sequences))
    np.testing.assert_array_equal(index.counts(sequences, self_rows=own),
                                  brute_force_neighbour_counts(index, sequences, self_rows=own))
    np.testing.assert_array_equal(index.counts(sequences, query_groups=groups),
                                  brute_force_neighbour_counts(index, sequences, query_groups=groups))


def _reference_peptides(sequence: str, k: int, max_share: float | None) -> set[str]:
    """SharedPeptideNeighbours' k-mers written plainly: the k-amino-acid windows of the six translated frames
    that hold no stop (or N), none with more than max_share of one amino acid."""
    windows = {piece[i:i + k] for frame in _reference_six_frames(sequence) for piece in "".join(frame).split("*")
               for i in range(len(piece) - k + 1)}
    return {w for w in windows if "?" not in w and (max_share is None or max(map(w.count, w)) <= max_share * k)}


def random_gene(rng, codons: int) -> str:
    """A stop-free reading frame of random sense codons."""
    sense = [codon for codon, amino in TEXTBOOK_CODE.items() if amino != "*"]
    return "".join(rng.choice(sense, codons))


@pytest.mark.parametrize("k,max_base_share,max_holders", [(3, None, None), (5, 0.5, 4), (10, None, 2), (14, 0.5, None)])
def test_peptide_neighbours_are_those_sharing_a_window_of_the_six_translated_frames(k, max_base_share, max_holders):
    from nucleic.classify import SharedPeptideNeighbours, reverse_complement

    rng = np.random.default_rng(7)
    base = ["".join(rng.choice(list("ACGT"), rng.integers(0, 90))) for _ in range(30)] + ["GCTGCTGCTGCTGCTGCT"]
    genes = [random_gene(rng, 20) for _ in range(6)]
    sequences = base + [g[rng.integers(0, 9):] + "".join(rng.choice(list("ACGT"), 7)) for g in genes] + genes
    sequences += [reverse_complement(g[3:50]) for g in genes[:3]] + ["AC", "ACGTAAC"]
    labels, groups = rng.integers(0, 2, len(sequences)), rng.integers(0, 3, len(sequences))
    index = SharedPeptideNeighbours(sequences, labels, k, max_base_share, groups, max_holders)
    owners, codes, others = index._kmer_codes(sequences)
    assert others == [] and codes.dtype == np.uint64
    for row, sequence in enumerate(sequences):  # the integer codes, read back as letters
        mine = {"".join(AMINO_ACIDS[int(c) // 21 ** p % 21 - 1] for p in range(k - 1, -1, -1))
                for c in codes[owners == row]}
        assert mine == _reference_peptides(sequence, k, max_base_share), row

    def peptides(sequence):
        return _reference_peptides(sequence, k, max_base_share)

    np.testing.assert_array_equal(index.counts(sequences), brute_force_neighbour_counts(index, sequences, kmers=peptides))
    own = np.arange(len(sequences))
    assert index.counts(sequences, self_rows=own)[:, :2].sum() > 0  # rows find neighbours beyond themselves
    np.testing.assert_array_equal(index.counts(sequences, self_rows=own),
                                  brute_force_neighbour_counts(index, sequences, self_rows=own, kmers=peptides))
    np.testing.assert_array_equal(index.counts(sequences, query_groups=groups),
                                  brute_force_neighbour_counts(index, sequences, query_groups=groups, kmers=peptides))


def test_peptide_neighbours_link_a_gene_rewritten_in_other_codons_where_no_nucleotide_kmer_is_shared():
    import pickle

    from nucleic.classify import SharedKmerNeighbours, SharedPeptideNeighbours, reverse_complement

    rng = np.random.default_rng(8)
    synonyms = collections.defaultdict(list)
    for codon, amino in TEXTBOOK_CODE.items():
        synonyms[amino].append(codon)
    protein = rng.choice([a for a, codons in synonyms.items() if a != "*" and len(codons) > 1], 40)
    first, second = ([synonyms[a][i % len(synonyms[a])] for a in protein] for i in (0, 1))  # differ in every codon
    gene, rewritten = "".join(first), "".join(second)
    unrelated = random_gene(rng, 40)
    sequences, labels, groups = [gene, unrelated], [1, 0], ["run1", "run2"]
    nucleotides = SharedKmerNeighbours(sequences, labels, k=24, both_strands=True)
    peptides = SharedPeptideNeighbours(sequences, labels, k=10, max_base_share=0.5, groups=groups)
    query = reverse_complement(rewritten)  # the same protein, other codons, read from the other strand
    assert nucleotides.counts([query])[0].tolist() == [0, 0, 0, 0]
    assert peptides.counts([query])[0].tolist() == [1, 0, 31, 0]  # all 31 windows of 10 of the 40 amino acids
    np.testing.assert_allclose(peptides.proba([query, query, "ACGTACGTAC"], ["run2", "run1", "run2"]),
                               [1, np.nan, np.nan])  # as a run1 contig it has no neighbour in another run
    half = gene[:60] + random_gene(rng, 20)  # the protein's first 20 amino acids, then others
    crowded, shared = (SharedPeptideNeighbours([gene, half, unrelated], [1, 1, 0], k=10, max_holders=h) for h in (1, 2))
    assert shared.counts([query])[0].tolist() == [2, 0, 31, 0]
    assert crowded.counts([query])[0].tolist() == [1, 0, 20, 0]  # the 11 windows both hold link nothing
    copy = pickle.loads(pickle.dumps(crowded))
    assert type(copy) is SharedPeptideNeighbours and copy.max_holders == 1 and copy._index is None
    np.testing.assert_array_equal(copy.counts([query]), crowded.counts([query]))
    with pytest.raises(ValueError, match="peptide length k=15"):
        SharedPeptideNeighbours(sequences, labels, k=15)


def test_contig_mean_gives_each_segment_its_contigs_mean_log_odds_and_leaves_one_segment_contigs_alone():
    from nucleic.classify import contig_mean

    probs = np.array([0.9, 0.2, 1e-9, 0.5, 0.6, 0.999])
    contigs = ["a", "b", "a", "c", "b", "d"]
    logit = np.log(probs / (1 - probs))
    expected = 1 / (1 + np.exp(-np.array([(logit[0] + logit[2]) / 2, (logit[1] + logit[4]) / 2, (logit[0] + logit[2]) / 2,
                                          logit[3], (logit[1] + logit[4]) / 2, logit[5]])))
    np.testing.assert_allclose(contig_mean(probs, contigs), expected, rtol=1e-12)
    np.testing.assert_allclose(contig_mean(probs[[3, 5]], ["c", "d"]), probs[[3, 5]], rtol=1e-12)  # alone: unchanged
    order = np.array([5, 2, 0, 4, 1, 3])
    np.testing.assert_allclose(contig_mean(probs[order], [contigs[i] for i in order]), expected[order], rtol=1e-12)


def _reference_run_context(run: list[str], scores: np.ndarray, k: int, max_share, max_holders) -> np.ndarray:
    """run_context written plainly: each contig's neighbours are the run's other contigs sharing a peptide
    that at most max_holders contigs of the run hold; the columns z-scored within the run."""
    peptides = [_reference_peptides(s, k, max_share) for s in run]
    holders = collections.Counter(p for mine in peptides for p in mine)
    peptides = [{p for p in mine if max_holders is None or holders[p] <= max_holders} for mine in peptides]
    rows = []
    for i, mine in enumerate(peptides):
        linked = [j for j, theirs in enumerate(peptides) if j != i and mine & theirs]
        rows.append([np.log1p(len(linked)), max(max(scores[linked]) - scores[i], 0) if linked else 0,
                     np.mean(scores[linked]) - scores[i] if linked else 0])
    rows = np.array(rows)
    return (rows - rows.mean(0)) / (rows.std(0) + 1e-9)


def gene_pieces(rng, gene: str, pieces: int, length: int = 90) -> list[str]:
    """Overlapping reads of one gene, as a run holds several contigs of one virus (or human gene)."""
    return [gene[start:start + length] for start in rng.integers(0, len(gene) - length + 1, pieces)]


@pytest.mark.parametrize("k,max_share,max_holders", [(5, None, None), (10, 0.5, 3)])
def test_run_context_reads_the_runs_other_contigs_sharing_a_peptide_and_how_they_score(k, max_share, max_holders):
    from nucleic.classify import reverse_complement, run_context

    rng = np.random.default_rng(11)
    run = [piece for _ in range(3) for piece in gene_pieces(rng, random_gene(rng, 40), 4)]
    run += [reverse_complement(run[0]), "ACGTAC"] + ["".join(rng.choice(list("ACGT"), 90)) for _ in range(15)]
    scores = rng.normal(size=len(run))
    got = run_context(run, scores, k, max_share, max_holders)
    assert got.shape == (len(run), 3) and got[4:12, 0].min() > np.median(got[:, 0])  # genes 2 and 3's pieces link
    np.testing.assert_allclose(got, _reference_run_context(run, scores, k, max_share, max_holders), atol=1e-9)
    order = rng.permutation(len(run))  # the run's order does not matter
    np.testing.assert_allclose(run_context([run[i] for i in order], scores[order], k, max_share, max_holders),
                               got[order], atol=1e-9)


def synthetic_run(rng, size: int, viral_genes: int = 4, human_genes: int = 8, noise: float = 2.0):
    """A run of `size` contigs: a few viruses, each read 4 times (recurring), a few human genes read 3
    times, the rest human contigs read once; a blend's noisy probability of each."""
    viral = [p for _ in range(viral_genes) for p in gene_pieces(rng, random_gene(rng, 60), 4)]
    human = [p for _ in range(human_genes) for p in gene_pieces(rng, random_gene(rng, 60), 3)]
    human += ["".join(rng.choice(list("ACGT"), 90)) for _ in range(size - len(viral) - len(human))]
    labels = np.array([1] * len(viral) + [0] * len(human))
    probs = 1 / (1 + np.exp(-(labels * 1.5 - 3 + rng.normal(0, noise, size))))
    return viral + human, labels, probs


def test_the_run_context_stacker_learns_that_recurring_contigs_are_viral_and_leaves_small_runs_alone(tmp_path):
    import joblib
    from sklearn.metrics import roc_auc_score

    from nucleic.classify import RunContextStacker

    rng = np.random.default_rng(12)
    runs = [synthetic_run(rng, 150) for _ in range(5)]
    sequences = [s for run in runs[:4] for s in run[0]]
    labels, probs = (np.concatenate([run[i] for run in runs[:4]]) for i in (1, 2))
    names = np.repeat(np.arange(4), 150)
    stacker = RunContextStacker(k=10, max_base_share=0.5, max_holders=20, min_run=50).fit(probs, sequences, names, labels)
    weights = stacker.coefficients()
    assert weights["log-odds"] > 0 and weights["linked contigs"] > 0
    new_run, new_labels, new_probs = runs[4]
    stacked = stacker.proba(new_probs, new_run)
    assert roc_auc_score(new_labels, stacked) > roc_auc_score(new_labels, new_probs) + 0.05
    small = stacker.proba(new_probs[:40], new_run[:40])  # under min_run: the blend as it is
    np.testing.assert_array_equal(small, new_probs[:40])
    both = stacker.proba(np.concatenate([new_probs, probs[:150]]), new_run + sequences[:150],
                         np.repeat(["new", "old"], 150))  # each run scored within itself
    np.testing.assert_allclose(both, np.concatenate([stacked, stacker.proba(probs[:150], sequences[:150])]))
    joblib.dump(stacker, tmp_path / "stacker.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "stacker.joblib").proba(new_probs, new_run), stacked)
    with pytest.raises(ValueError, match="at least 500 contigs"):
        RunContextStacker(min_run=500).fit(probs, sequences, names, labels)

    # runs of 60, 150, 150 and 150 contigs: each run weighs the same in the fit, unless each_run_equal is off
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    kept = np.flatnonzero((names > 0) | (np.arange(600) < 60))
    uneven = ([sequences[i] for i in kept], names[kept], labels[kept], probs[kept])
    equal = RunContextStacker(min_run=50).fit(uneven[3], uneven[0], uneven[1], uneven[2])
    weights = equal.run_weights(uneven[1])
    assert weights.mean() == pytest.approx(1) and np.allclose([weights[uneven[1] == r].sum() for r in range(4)], 510 / 4)
    manual = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        equal.features(uneven[3], uneven[0], uneven[1]), uneven[2], logisticregression__sample_weight=weights)
    np.testing.assert_allclose(equal.model_[-1].coef_, manual[-1].coef_)
    per_contig = RunContextStacker(min_run=50, each_run_equal=False).fit(uneven[3], uneven[0], uneven[1], uneven[2])
    assert per_contig.run_weights(uneven[1]) is None and per_contig.coefficients() != equal.coefficients()
    del equal.__dict__["each_run_equal"]  # a stacker saved before the setting: fitted per contig
    joblib.dump(equal, tmp_path / "old.joblib")
    assert joblib.load(tmp_path / "old.joblib").settings()["each_run_equal"] is False


def test_a_blend_is_chosen_only_where_it_scores_every_row_so_a_homology_model_serves_beside_another():
    labels = np.array([0, 0, 0, 1, 0, 1, 0, 1])
    forest = np.array([0.1, 0.2, 0.6, 0.5, 0.3, 0.9, 0.7, 0.8])  # two negatives ranked above a positive
    homology = np.array([np.nan, np.nan, 0.0, 1.0, np.nan, np.nan, np.nan, np.nan])  # right where it speaks
    assert choose_blend(labels, {"rf": forest}) == (("rf",), pytest.approx(13 / 15))
    models, auc = choose_blend(labels, {"rf": forest, "homology": homology})
    assert models == ("rf", "homology") and auc == 1.0  # row 2 drops to 0.3, row 3 rises to 0.75
    assert choose_blend(labels, {"rf": np.full(8, 0.5), "homology": homology})[0] == ("rf", "homology")


def test_the_served_mean_leaves_out_a_model_without_an_opinion_and_a_homology_model_serves_through_predict(tmp_path):
    from nucleic.config import load_config
    from nucleic.dna_tasks import scores_where_given, served_mean

    np.testing.assert_allclose(served_mean([np.array([0.2, 0.4]), np.array([0.6, 0.8]), np.array([np.nan, 0.0])]),
                               [0.4, 0.4])
    scores = scores_where_given(np.array([1, 0, 1, 1]), np.array([0.9, 0.2, np.nan, np.nan]))
    assert scores["accuracy"] == 1.0 and scores["coverage"] == 0.5
    assert "coverage" not in scores_where_given(np.array([1, 0]), np.array([0.9, 0.2]))

    rng = np.random.default_rng(2)
    positives, negatives = overlapping_fragments(rng, 10, 4), overlapping_fragments(rng, 10, 4)
    frame = pd.DataFrame({"sequence": positives + negatives, "label": [1] * 40 + [0] * 40})
    train = np.array([i for i in range(80) if i % 4])  # one fragment per region held out
    cfg = load_config("smoke", ["promoter.linear={ks: [1, 2], C: 1.0, neighbours: 16}"])
    linear = fit_feature_model(cfg, cfg.promoter, "linear", frame, train)
    homology = fit_feature_model(cfg, cfg.promoter, "homology", frame, train)
    held_out = list(frame.sequence[::4])
    assert linear.neighbours_ is not None and linear.neighbours_.k == 16
    truth = frame.label.to_numpy()[::4]
    assert ((feature_model_proba(linear, feature_spec(cfg.promoter.linear), held_out) > 0.5) == truth).all(), \
        "random k-mers say nothing here: the overlaps with the training fragments decide"
    np.testing.assert_allclose(feature_model_proba(homology, feature_spec(cfg.promoter.homology), held_out), truth)
    paths = [tmp_path / "linear.joblib", tmp_path / "homology.joblib"]
    save_feature_model(paths[0], "linear", linear, feature_spec(cfg.promoter.linear))
    save_feature_model(paths[1], "homology", homology, feature_spec(cfg.promoter.homology))
    source, out = tmp_path / "in.fa", tmp_path / "out.csv"
    loner = "".join(rng.choice(list("ACGT"), 40))
    source.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(held_out + [loner])))
    assert predict_main(["promoter", "--input", str(source), "--output", str(out), "--preset", "smoke",
                         "--weights", *map(str, paths)]) == 0
    linear_probs = feature_model_proba(linear, feature_spec(cfg.promoter.linear), held_out + [loner])
    expected = linear_probs.copy()
    expected[:-1] = (expected[:-1] + truth) / 2  # the loner has no neighbour: the linear model alone
    np.testing.assert_allclose(pd.read_csv(out).probability.to_numpy(), expected, rtol=1e-5)
    assert predict_main(["promoter", "--input", str(source), "--output", str(out), "--preset", "smoke",
                         "--set", "promoter.blend=logit", "--weights", *map(str, paths)]) == 0
    expected = served_mean([linear_probs, np.r_[truth, np.nan]], "logit")  # the task's blend serves
    np.testing.assert_allclose(pd.read_csv(out).probability.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected[:-1], (linear_probs[:-1] + truth) / 2, atol=1e-3)


def test_a_saved_random_forest_predicts_through_the_predict_command(tmp_path, capsys):
    from nucleic.config import load_config

    rng = np.random.default_rng(1)
    sequences = ["".join(rng.choice(list("ACGT" if i % 4 else "AATT"), 60)) for i in range(80)]
    frame = pd.DataFrame({"sequence": sequences, "label": [int(i % 4 == 0) for i in range(80)]})
    cfg = load_config("smoke", ["viral.rf.trees=10", "viral.rf.canonical=true"])
    forest = fit_feature_model(cfg, cfg.viral, "rf", frame, np.arange(60))
    path = tmp_path / "serve_rf.joblib"
    save_feature_model(path, "rf", forest, feature_spec(cfg.viral.rf))
    source = tmp_path / "in.fa"
    source.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(sequences[60:])))
    out = tmp_path / "out.csv"
    assert predict_main(["viral", "--input", str(source), "--output", str(out), "--preset", "smoke",
                         "--weights", str(path)]) == 0
    expected = feature_model_proba(forest, feature_spec(cfg.viral.rf), sequences[60:])
    np.testing.assert_allclose(pd.read_csv(out).probability.to_numpy(), expected)
    assert expected[::4].mean() > expected.mean(), "the AT-rich class is told apart"
    from nucleic.classify import reverse_complement as reverse_complement_string

    flipped = tmp_path / "flipped.fa"  # canonical k-mers: the other strand of each contig scores the same
    flipped.write_text("".join(f">s{i}\n{reverse_complement_string(s)}\n" for i, s in enumerate(sequences[60:])))
    assert predict_main(["viral", "--input", str(flipped), "--output", str(tmp_path / "flipped.csv"), "--preset",
                         "smoke", "--weights", str(path)]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "flipped.csv").probability.to_numpy(), expected)
    linear = fit_feature_model(cfg, cfg.viral, "linear", frame, np.arange(60))  # viral.linear: canonical too
    save_feature_model(tmp_path / "serve_linear.joblib", "linear", linear, feature_spec(cfg.viral.linear))
    expected = feature_model_proba(linear, feature_spec(cfg.viral.linear), sequences[60:])
    assert expected[::4].mean() > expected.mean()
    for fasta in (source, flipped):
        assert predict_main(["viral", "--input", str(fasta), "--output", str(tmp_path / "linear.csv"), "--preset",
                             "smoke", "--weights", str(tmp_path / "serve_linear.joblib")]) == 0
        served = pd.read_csv(tmp_path / "linear.csv").probability.to_numpy()
        np.testing.assert_allclose(served, expected, atol=1e-6)  # the CSV keeps 6 decimals
    (tmp_path / "bad.joblib").write_bytes(b"not a forest")
    assert predict_main(["viral", "--input", str(source), "--output", str(tmp_path / "bad.csv"), "--preset",
                         "smoke", "--weights", str(tmp_path / "bad.joblib")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.joblib: not a model written by stages 10-12" in err[0]
    assert not (tmp_path / "bad.csv").exists()
    # A forest saved before linear models existed ({"kind": "rf", "ks", "forest"}: plain k-mers only) still serves
    import joblib

    plain_cfg = load_config("smoke", ["viral.rf.trees=10", "viral.rf.canonical=false", "viral.rf.coding=false"])
    plain_forest = fit_feature_model(plain_cfg, plain_cfg.viral, "rf", frame, np.arange(60))
    legacy = tmp_path / "legacy_rf.joblib"
    joblib.dump({"kind": "rf", "ks": list(cfg.viral.rf.ks), "forest": plain_forest}, legacy)
    assert predict_main(["viral", "--input", str(source), "--output", str(tmp_path / "legacy.csv"), "--preset",
                         "smoke", "--weights", str(legacy)]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "legacy.csv").probability.to_numpy(),
                               feature_model_proba(plain_forest, feature_spec(plain_cfg.viral.rf), sequences[60:]))


def test_the_kmer_branch_reads_the_random_forests_features():
    from nucleic.classify import build_classifier
    from nucleic.models.classifiers import kmer_profile

    sequences = ["ACGTACGGTTACAGG", "GGGCCA", "ATATATATAT"]
    tokens = encode_sequences(sequences)
    for k in (1, 2, 3):
        np.testing.assert_allclose(kmer_profile(tokens, k).numpy() / 4 ** k, kmer_frequencies(sequences, (k,)),
                                   atol=1e-6)
    torch.manual_seed(0)
    model = build_classifier("viraminer", {"filters": 8, "dense": 8, "both_strands": True,
                                           "kmer_branch": {"ks": [1, 2, 3], "dense": 8}}, tokens.shape[1]).eval()
    with torch.no_grad():
        before = model(tokens)
        model.model.branch[-1].bias += 1.0  # the branch's logit is added to the network's
        torch.testing.assert_close(model(tokens), before + 1.0)


def _pair_frequencies(sequence: str, k: int) -> dict[str, float]:
    """The definition: each k-mer's share of the windows plus its reverse complement's, keyed by the pair's
    alphabetically first member."""
    from nucleic.classify import reverse_complement as reverse_complement_string

    windows = [sequence[i:i + k] for i in range(len(sequence) - k + 1)]
    pairs = {}
    for kmer in windows:
        key = min(kmer, reverse_complement_string(kmer))
        pairs[key] = pairs.get(key, 0.0) + 1.0 / len(windows)
    return pairs


TEXTBOOK_CODE = {a + b + c: "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"[16 * i + 4 * j + m]
                 for i, a in enumerate("TCAG") for j, b in enumerate("TCAG") for m, c in enumerate("TCAG")}


def _reference_six_frames(sequence: str) -> list[list[str]]:
    """The six reading frames translated with a codon dictionary: per codon its amino acid, * a stop, ? an N."""
    from nucleic.classify import reverse_complement as reverse_complement_string

    return [[TEXTBOOK_CODE.get(strand[i:i + 3], "?") for i in range(offset, len(strand) - 2, 3)]
            for strand in (sequence, reverse_complement_string(sequence)) for offset in range(3)]


def _reference_coding_features(sequence: str) -> list[float]:
    """coding_features written plainly: translate six frames with a codon dictionary, split at stops."""
    from nucleic.models.classifiers import AMINO_ACIDS

    frames = _reference_six_frames(sequence)
    stretches = ["".join(frame).split("*") for frame in frames]
    longest = [max(len(piece) for piece in pieces) for pieces in stretches]
    open_share = sorted((n / len(frame) if frame else 0.0 for n, frame in zip(longest, frames)), reverse=True)
    stop_share = sorted(frame.count("*") / len(frame) if frame else 1.0 for frame in frames)
    tied = "".join(piece for pieces in stretches for piece in pieces if len(piece) == max(longest))
    counts = [tied.count(amino) for amino in AMINO_ACIDS]
    return [*open_share[:2], *stop_share[:2], sum(s >= 0.8 for s in open_share), sum(s >= 1 for s in open_share),
            *(np.array(counts) / max(sum(counts), 1))]


def test_coding_features_read_six_frames_alike_on_either_strand_and_find_a_gene():
    from nucleic.classify import coding_features
    from nucleic.classify import reverse_complement as reverse_complement_string
    from nucleic.models.classifiers import CODING_FEATURES, coding_profile

    rng = np.random.default_rng(3)
    sense = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]
    gene = "ATG" + "".join(rng.choice(sense, 99)) + "TAA"  # 100 codons without a stop, then one
    noise = ["".join(rng.choice(list("ACGT"), n)) for n in (300, 301, 302, 7, 2)]
    sequences = [gene, *noise, "ACGTAACGTTAGGCTAA"]
    features = coding_features(sequences)
    assert features.shape == (len(sequences), CODING_FEATURES)
    for row, sequence in enumerate(sequences):
        np.testing.assert_allclose(features[row], _reference_coding_features(sequence), atol=1e-6)
    np.testing.assert_array_equal(coding_features([reverse_complement_string(s) for s in sequences]), features)
    assert features[0, 0] == pytest.approx(100 / 101) and features[0, 2] == pytest.approx(1 / 101)
    assert features[0, 0] > features[1:4, 0].max(), "a gene runs longer without a stop than random DNA"
    assert features[5, :6].tolist() == [0, 0, 1, 1, 0, 0], "two bases hold no codon"
    with_n = encode_sequences(sequences[-1:])
    with_n[0, 4] = 0  # an N inside: its codon is no stop and codes for nothing, on either strand
    for tokens in (with_n, reverse_complement(with_n)):
        np.testing.assert_allclose(coding_profile(tokens)[0], _reference_coding_features("ACGTNACGTTAGGCTAA"), atol=1e-6)
    spec = feature_spec({"ks": [1], "coding": True})
    np.testing.assert_array_equal(sequence_features(sequences, spec)[:, 4:], features)
    assert feature_spec({"ks": [1]})["coding"] is False, "a forest saved before the setting reads no coding features"


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_canonical_kmer_frequencies_count_each_kmer_with_its_reverse_complement(k):
    import itertools

    from nucleic.classify import reverse_complement as reverse_complement_string

    rng = np.random.default_rng(k)
    sequences = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(3)] + ["ACGT", "AAAAAAAAT"]
    flipped = [reverse_complement_string(s) for s in sequences]
    canonical = kmer_frequencies(sequences, (k,), canonical=True)
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
    keys = sorted({min(m, reverse_complement_string(m)) for m in kmers})  # columns in the order of the smaller code
    assert canonical.shape == (len(sequences), len(keys)) == (len(sequences), (4 ** k + 4 ** (k // 2) * (k % 2 == 0)) // 2)
    for row, sequence in enumerate(sequences):
        expected = _pair_frequencies(sequence, k)
        np.testing.assert_allclose(canonical[row], [expected.get(key, 0.0) for key in keys], atol=1e-6)
    np.testing.assert_allclose(kmer_frequencies(flipped, (k,), canonical=True), canonical, atol=1e-6)
    plain = kmer_frequencies(sequences, (k,))
    assert not np.allclose(kmer_frequencies(flipped, (k,)), plain), "only the canonical ones ignore the strand"
    spec = feature_spec({"ks": [k], "canonical": True})
    np.testing.assert_array_equal(sequence_features(sequences, spec), canonical)
    assert feature_spec({"ks": [k]})["canonical"] is False, "a forest saved before the setting reads plain k-mers"


def test_a_canonical_kmer_branch_reads_both_strands_the_same_with_or_without_coding_features(tmp_path):
    from nucleic.classify import build_classifier

    tokens = encode_sequences(["ACGTACGGTTACAGGA", "GGGCCAGTT", "ATTTTTTTTC"])  # padding
    tokens[1, 6] = 0  # an N inside a sequence
    torch.manual_seed(0)
    settings = {"k": 3, "nlayer": 1, "d_model": 16, "nhead": 2, "dim_ff": 32, "dropout": 0.0,
                "kmer_branch": {"ks": [1, 2, 3], "dense": 8, "canonical": True}}
    model = build_classifier("nt", settings, tokens.shape[1]).eval()
    assert model.branch[0].in_features == 2 + 10 + 32
    flipped = reverse_complement(tokens)
    torch.testing.assert_close(model.profile(flipped), model.profile(tokens))
    plain = build_classifier("nt", {**settings, "kmer_branch": {"ks": [1, 2, 3], "dense": 8}}, tokens.shape[1])
    assert not torch.allclose(plain.profile(flipped), plain.profile(tokens))
    expected = np.concatenate([kmer_frequencies(["ACGTACGGTTACAGGA"], (k,), canonical=True)[0] * 4 ** k
                               for k in (1, 2, 3)])
    np.testing.assert_allclose(model.profile(tokens[:1])[0].numpy(), expected, atol=1e-5)
    from nucleic.classify import load_classifier, save_classifier

    save_classifier(tmp_path / "serve_nt.pt", "nt", settings, tokens.shape[1], model)
    loaded, _ = load_classifier(tmp_path / "serve_nt.pt", torch.device("cpu"))
    assert loaded.canonical  # the predict command rebuilds the canonical branch
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))
    from nucleic.classify import coding_features
    from nucleic.models.classifiers import CODING_FEATURES

    coding = {**settings, "kmer_branch": {"ks": [1, 2, 3], "dense": 8, "canonical": True, "coding": True}}
    model = build_classifier("nt", coding, tokens.shape[1]).eval()
    assert model.branch[0].in_features == 2 + 10 + 32 + CODING_FEATURES and not loaded.coding
    torch.testing.assert_close(model.profile(flipped), model.profile(tokens))
    np.testing.assert_allclose(model.profile(tokens[:1])[0, 44:].numpy(), coding_features(["ACGTACGGTTACAGGA"])[0])
    save_classifier(tmp_path / "serve_coding.pt", "nt", coding, tokens.shape[1], model)
    loaded, _ = load_classifier(tmp_path / "serve_coding.pt", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


@pytest.mark.slow
def test_viral_leave_one_experiment_out_benchmark_scores_every_experiment(data_dir, tmp_path):
    import sys

    from conftest import run_script

    proc = run_script([sys.executable, "benchmarks/viral_loeo.py", "--preset", "smoke", "--models", "viraminer", "rf",
                       "homology", *isolated(tmp_path)], env={"NT_DATA_DIR": str(data_dir)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "oof" / "viral_loeo.json").read_text())
    experiments = sorted(p.stem for p in (data_dir / "viral").glob("exp*.csv"))
    assert sorted({key.split("/")[0] for key in report["results"]}) == experiments
    for experiment in experiments:
        served = report["results"][f"{experiment}/served"]
        assert set(served["models"]) <= {"viraminer", "rf", "homology"} and served["models"] != ["homology"]
        if served["n_viral"]:
            assert 0 <= served["auc"] <= 1 and report["results"][f"{experiment}/rf"]["auc"] is not None
        # served: the blend stacked with the held-out run's context (smoke: runs of 20 contigs or more)
        assert set(served["run_context"]) == {"log-odds", "linked contigs", "best neighbour above",
                                              "neighbours' mean above"}
        assert report["results"][f"{experiment}/blend"]["n_test"] == served["n_test"]
        homology = report["results"][f"{experiment}/homology"]  # abstains without a neighbour in another run
        assert 0 <= homology["coverage"] < 1 and "coverage" not in report["results"][f"{experiment}/rf"]
    assert {"viraminer", "rf", "blend", "served"} <= set(report["summary"])
    assert set(report["fixed_blends"]) == {"viraminer + rf", "viraminer + homology", "rf + homology",
                                           "viraminer + rf + homology"}
    assert all(0 <= auc <= 1 for auc in report["fixed_blends"].values())
    assert (tmp_path / "figures" / "viral_loeo.png").stat().st_size > 10_000

    saved = (tmp_path / "oof" / "viral_loeo.json").read_bytes()  # other models under the same name: refused
    fewer = [sys.executable, "benchmarks/viral_loeo.py", "--preset", "smoke", "--models", "rf", *isolated(tmp_path)]
    proc = run_script(fewer, env={"NT_DATA_DIR": str(data_dir)}, timeout=900)
    assert proc.returncode != 0 and "viral_loeo.json holds the models viraminer rf homology" in proc.stderr
    assert "--overwrite" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert (tmp_path / "oof" / "viral_loeo.json").read_bytes() == saved
    proc = run_script([*fewer, "--overwrite"], env={"NT_DATA_DIR": str(data_dir)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "oof" / "viral_loeo.json").read_text())["models"] == ["rf"]


def test_promoter_blend_benchmark_scores_every_model_and_mean_and_names_the_rules_choice(data_dir, tmp_path):
    import sys

    from conftest import run_script

    proc = run_script([sys.executable, "benchmarks/promoter_blend.py", "--preset", "smoke", "--models", "cnn", "danq",
                       "--set", "promoter.danq={filters: 8, kernel: 8, pool: 4, lstm: 8, dense: 16}",
                       *isolated(tmp_path)], env={"NT_DATA_DIR": str(data_dir)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "oof" / "promoter_blend.json").read_text())
    assert [row["models"] for row in report["rows"]] == [["cnn"], ["danq"], ["cnn", "danq"]]
    best = max(row["validation_auc"] for row in report["rows"])
    chosen = next(row for row in report["rows"] if row["models"] == report["rule_serves"])
    assert chosen["validation_auc"] == best
    assert all(0 <= row[m] <= 1 for row in report["rows"] for m in ("accuracy", "auc", "validation_auc"))


def test_classifier_ablation_under_the_stage_rule_reports_every_seed_their_spread_and_their_ensemble(data_dir, tmp_path):
    import sys

    from conftest import run_script

    proc = run_script([sys.executable, "benchmarks/classifier_ablation.py", "--preset", "smoke", "--name", "seeds",
                       "--rule", "stage", "--seeds", "2", "--set", "promoter.epochs=2", *isolated(tmp_path)],
                      env={"NT_DATA_DIR": str(data_dir)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads((tmp_path / "oof" / "classifier_ablations.json").read_text())
    assert row["rule"] == "stage" and [s["seed"] for s in row["per_seed"]] == [0, 1]
    first, second = row["per_seed"]
    assert len(first["validation_auc_per_epoch"]) == 2
    ablations = tmp_path / "work" / "smoke" / "ablations"
    assert not same_weights(ablations / "promoter_seeds_stage_fold0", ablations / "promoter_seeds_stage_fold0_seed1")
    for m in ("accuracy", "mcc", "auc"):
        assert row["mean"][m] == pytest.approx((first[m] + second[m]) / 2, abs=1e-4)
        assert row["sd"][m] == pytest.approx(abs(first[m] - second[m]) / 2 ** 0.5, abs=1e-4)
    assert 0 <= row["ensemble"]["auc"] <= 1

    proc = run_script([sys.executable, "benchmarks/classifier_ablation.py", "--preset", "smoke", "--name", "seeds",
                       "--rule", "stage", "--torch-dropout", "--set", "promoter.epochs=2", *isolated(tmp_path)],
                      env={"NT_DATA_DIR": str(data_dir)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_row = json.loads((tmp_path / "oof" / "classifier_ablations.json").read_text())[-1]
    assert torch_row["torch_dropout"] and "per_seed" not in torch_row  # its own folder: trained, not resumed
    # the same seed, another dropout stream: another model
    assert not same_weights(ablations / "promoter_seeds_stage_fold0", ablations / "promoter_seeds_stage_torch_dropout_fold0")


def same_weights(run_a, run_b) -> bool:
    from nucleic.engine import read_checkpoint

    a, b = (read_checkpoint(run / "best.pt", torch.device("cpu"))["model"] for run in (run_a, run_b))
    return all(torch.equal(a[key], b[key]) for key in a)


def test_mirna_forest_benchmark_scores_each_feature_set_under_both_protocols(data_dir, tmp_path):
    import sys

    from conftest import run_script

    script = [sys.executable, "benchmarks/mirna_forest.py", "--preset", "smoke", *isolated(tmp_path)]
    refused = run_script([*script, "--force"])  # the stages' --force: a benchmark has nothing to redo
    assert refused.returncode == 2 and "unrecognized arguments: --force" in refused.stderr
    # --data-dir, as the stages take it, wins over $NT_DATA_DIR
    proc = run_script([*script, "--data-dir", str(data_dir)], env={"NT_DATA_DIR": str(tmp_path / "absent")},
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from nucleic.dna_data import read_mirna

    report = json.loads((tmp_path / "oof" / "mirna_forest.json").read_text())
    rows = {row["features"]: row for row in report["rows"]}
    assert report["n_sequences"] == min(400, len(read_mirna(data_dir / "mirna"))) and len(rows) == 5
    kmers, full = rows["k-mers"], rows["k-mers + ends + length, GC, free energy (structure)"]
    assert all(0 <= row[p][m] <= 1 for row in rows.values() for p in ("paper_protocol", "cv") for m in ("accuracy", "auc"))
    # the splice-site ends and the hairpin's globals carry what k-mer counts miss (0.45 against 0.84 CV MCC here)
    assert full["cv"]["mcc"] > kmers["cv"]["mcc"] + 0.2 and rows["k-mers + ends"]["cv"]["mcc"] > kmers["cv"]["mcc"]


def test_promoter_overlap_benchmark_keeps_each_group_of_overlapping_sequences_inside_one_fold(data_dir, tmp_path):
    import importlib.util
    import sys

    from conftest import REPO, run_script

    spec = importlib.util.spec_from_file_location("promoter_overlap", REPO / "benchmarks" / "promoter_overlap.py")
    overlap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overlap)
    rng = np.random.default_rng(3)
    sequences = overlapping_fragments(rng, 6, 3) + ["".join(rng.choice(list("ACGT"), 40)) for _ in range(6)]
    groups = overlap.overlap_groups(sequences, 16)
    assert [len(set(groups[r * 3:r * 3 + 3])) for r in range(6)] == [1] * 6 and len(set(groups)) == 12
    from nucleic.classify import reverse_complement

    flipped = sequences[:1] + [reverse_complement(s) for s in sequences[1:3]] + sequences[3:]  # region 0 on two strands
    assert len(set(overlap.overlap_groups(flipped, 16, both_strands=True)[:3])) == 1
    assert len(set(overlap.overlap_groups(flipped, 16)[:3])) == 2  # the two flipped fragments still share a strand
    labels = np.array([1] * 12 + [0] * 12)
    for train, held_out in overlap.grouped_splits(labels, groups, 3, 0):
        assert not set(groups[train]) & set(groups[held_out])

    proc = run_script([sys.executable, "benchmarks/promoter_overlap.py", "--preset", "smoke", "--models", "linear",
                       "homology", *isolated(tmp_path)], env={"NT_DATA_DIR": str(data_dir)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "oof" / "promoter_overlap.json").read_text())
    rows = report["grouped_folds"]
    # no held-out row has a training neighbour: the homology model never has an opinion, the mean is the linear model
    assert rows["homology"]["coverage"] == 0.0
    assert rows["served: linear + homology"]["accuracy"] == pytest.approx(rows["linear"]["accuracy"])
    assert 0 <= report["share_with_a_neighbour"]["promoters"] <= 1 and report["groups"] <= report["rows"]


def test_metrics_of_rows_holding_one_label_give_mcc_zero_without_a_warning():
    import warnings

    from sklearn.metrics import matthews_corrcoef

    from nucleic.metrics import binary_classification_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns of a single label in truth and prediction
        one_label = binary_classification_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert one_label["mcc"] == 0.0 and one_label["accuracy"] == 1.0 and np.isnan(one_label["auc"])
    truth, probs = [0, 1, 1, 0, 1], [0.2, 0.7, 0.4, 0.6, 0.9]
    assert binary_classification_metrics(truth, probs)["mcc"] == matthews_corrcoef(truth, np.array(probs) >= 0.5)


def test_a_classifier_with_a_kmer_branch_from_a_config_section_saves_and_loads_safely(tmp_path):
    from nucleic.classify import build_classifier, load_classifier, save_classifier
    from nucleic.config import Config

    settings = Config({"filters": 8, "dense": 8, "both_strands": True, "kmer_branch": {"ks": [1, 2], "dense": 4}})
    model = build_classifier("viraminer", settings, 60)
    save_classifier(tmp_path / "cnn.pt", "viraminer", settings, 60, model)  # settings nest a Config section
    loaded, length = load_classifier(tmp_path / "cnn.pt", torch.device("cpu"))  # weights_only: plain data only
    assert length == 60 and loaded.kind == "viraminer"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
