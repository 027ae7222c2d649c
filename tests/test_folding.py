"""Folding sources: BPP sanity, 12 distinct predictions, temperature behaviour, the arnie backend."""
from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest

from nucleic.config import load_config
from nucleic.features import covalent_distance_features, pair_features
from nucleic.folding import FoldingError, active_sources, make_source
from nucleic.loop_types import pair_table
from nucleic.structures import prediction_slots

FOLD_CFG = load_config("smoke").fold


@pytest.fixture(scope="module")
def sequences(test_rows):
    return [r["sequence"] for r in test_rows]  # six of 107 nt, six of 130 nt


@pytest.fixture(scope="module")
def predictions(sequences):
    """{slot name: [Prediction per sequence]} for the 12 default slots."""
    return {slot.name: make_source(slot.source, FOLD_CFG).fold(sequences, slot.temperature)
            for slot in prediction_slots(FOLD_CFG)}


def test_twelve_slots_from_six_sources():
    slots = prediction_slots(FOLD_CFG)
    assert len(slots) == 12 and len({s.source for s in slots}) == 6
    assert {s.temperature for s in slots} == {37.0, 50.0}


def test_bpp_matrices_are_probabilities(predictions, sequences):
    for name, preds in predictions.items():
        for seq, pred in zip(sequences, preds):
            bpp = pred.bpp
            assert bpp.shape == (len(seq), len(seq)), name
            assert np.allclose(bpp, bpp.T, atol=1e-6), f"{name}: not symmetric"
            assert bpp.min() >= 0 and np.all(np.diag(bpp) == 0), name
            assert bpp.sum(axis=1).max() <= 1 + 1e-3, f"{name}: a row sums above 1"
            assert len(pred.structure) == len(seq)


def test_most_probable_pairs_agree_with_the_predicted_structure(predictions, real_data_dir):
    """Where a base pairs with probability > 0.5, the MFE/MEA structure pairs it with that partner (on the
    competition's designed sequences; random ones have fewer confident pairs)."""
    for name, preds in predictions.items():
        agree = []
        for pred in preds:
            partner = pair_table(pred.structure)
            confident = np.flatnonzero(pred.bpp.max(axis=1) > 0.5)
            agree += list(partner[confident] == pred.bpp[confident].argmax(axis=1))
        assert len(agree) > 300 and np.mean(agree) >= 0.9, (name, np.mean(agree))


def test_the_twelve_predictions_of_a_sequence_all_differ(predictions):
    for (a, pa), (b, pb) in itertools.combinations(predictions.items(), 2):
        assert np.abs(pa[2].bpp - pb[2].bpp).max() > 1e-2, f"{a} and {b} give the same BPP"


def test_fifty_degrees_melts_structure(predictions):
    """Expected number of base pairs (sum of BPP / 2) is lower at 50 C than at 37 C for every source."""
    for source in active_sources(FOLD_CFG):
        cold = np.mean([p.bpp.sum() for p in predictions[f"{source}_37C"]])
        hot = np.mean([p.bpp.sum() for p in predictions[f"{source}_50C"]])
        assert hot < cold, source


def test_unknown_source_is_a_clear_error():
    with pytest.raises(FoldingError, match="unknown folding source 'vienna_turner2099'"):
        make_source("vienna_turner2099", FOLD_CFG)


def test_arnie_backend_selects_arnie_sources():
    cfg = load_config("smoke", overrides=["fold.backend=arnie"]).fold
    assert [s.name for s in prediction_slots(cfg)][:3] == ["arnie_vienna_2_37C", "arnie_vienna_2_50C",
                                                          "arnie_contrafold_2_37C"]
    assert len(prediction_slots(cfg)) == 12


def test_arnie_without_configured_binaries_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("ARNIEFILE", raising=False)
    for name in [m for m in sys.modules if m.startswith("arnie")]:
        monkeypatch.delitem(sys.modules, name)
    source = make_source("arnie_eternafold", FOLD_CFG)
    with pytest.raises(FoldingError, match="arnie source 'eternafold'.*ARNIEFILE"):
        source.fold(["GGGGAAAACCCC"], 37)


def test_arnie_source_symmetrizes_and_decodes_mea(monkeypatch, sequences):
    """Wiring of the arnie backend with arnie's bpps() answered by ViennaRNA (no binaries needed here)."""
    vienna = make_source("vienna_turner2004", FOLD_CFG)
    calls = []

    def fake_bpps(sequence, package, T):
        calls.append((package, T))
        return np.triu(vienna.fold([sequence], T)[0].bpp)  # arnie returns a full matrix; be strict

    monkeypatch.setitem(sys.modules, "arnie.bpps", types.SimpleNamespace(bpps=fake_bpps))
    pred = make_source("arnie_eternafold", FOLD_CFG).fold(sequences[:1], 50)[0]
    assert calls == [("eternafold", 50)]
    assert np.allclose(pred.bpp, pred.bpp.T)
    partner = pair_table(pred.structure)
    assert (partner >= 0).sum() > 10


def test_covalent_distance_features():
    feats = covalent_distance_features(6)
    assert feats.shape == (3, 6, 6)
    assert feats[0, 0, 3] == pytest.approx(1 / 3) and feats[1, 0, 3] == pytest.approx(1 / 9)
    assert feats[2, 5, 3] == pytest.approx(1 / 8) and feats[0, 2, 2] == 1.0
    stacked = pair_features(np.eye(6, k=1) * 0.5)
    assert stacked.shape == (4, 6, 6) and stacked[0, 0, 1] == 0.5


FRESH_PROCESS_FOLD = """
import json
from nucleic.config import load_config
from nucleic.folding import make_source
pred = make_source({source!r}, load_config("smoke").fold).fold([{sequence!r}], 50.0)[0]
print(json.dumps([float(pred.bpp.sum()), pred.structure]))
"""


def test_vienna_energy_sets_do_not_leak_between_sources(sequences):
    """ViennaRNA caches energies per model settings: folding source B after A at the same temperature
    in one process must give what B gives in a fresh process."""
    import json
    import subprocess


    vienna = [s for s in active_sources(FOLD_CFG) if s.startswith("vienna")]
    in_process = {s: make_source(s, FOLD_CFG).fold(sequences[1:2], 50.0)[0] for s in vienna}
    for source in vienna:
        code = FRESH_PROCESS_FOLD.format(source=source, sequence=sequences[1])
        total, structure = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                     text=True, check=True).stdout)
        assert in_process[source].structure == structure, source
        assert float(in_process[source].bpp.sum()) == pytest.approx(total, abs=1e-3), source
