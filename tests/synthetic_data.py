"""A small data bundle in our layout, generated: what the tests use when the real bundle is not at hand
(a fresh clone). Same files, columns and lengths as the real data (see ../shared/data/README.md);
random sequences, ViennaRNA structures and loop types, labels and errors drawn to the real ranges,
a few hundred rows per task.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGETS = ("reactivity", "deg_Mg_pH10", "deg_pH10", "deg_Mg_50C", "deg_50C")
VIRAL_EXPERIMENTS = ("exp11_2014_G7", "exp13_2014_N1", "exp17_2015_F2", "exp1_2011_N19", "exp2_2013_E2_SCC",
                     "exp3_2013_H4", "exp5_2014_D3")


def random_sequence(rng: np.random.Generator, length: int, letters: str) -> str:
    return "".join(rng.choice(list(letters), size=length))


def folded(sequence: str) -> tuple[str, str]:
    """(dot-bracket, bpRNA loop types) from ViennaRNA's MFE structure."""
    import RNA

    from nucleic.loop_types import loop_types

    structure, _ = RNA.fold(sequence)
    return structure, "".join(loop_types(structure))


def openvaccine_row(rng: np.random.Generator, number: int, length: int, scored: int, labelled: bool) -> dict:
    sequence = "GGAAA" + random_sequence(rng, length - 5, "ACGU")
    structure, loops = folded(sequence)
    row = {"index": number, "id": f"id_{number:09x}", "sequence": sequence, "structure": structure,
           "predicted_loop_type": loops, "seq_length": length, "seq_scored": scored}
    if labelled:
        signal_to_noise = float(rng.uniform(1.0, 12.0))
        row.update(signal_to_noise=round(signal_to_noise, 3), SN_filter=int(signal_to_noise > 1.2))
        unpaired = np.array([c == "." for c in structure[:scored]], dtype=float)
        for target in TARGETS:
            mean = 0.2 + 0.6 * unpaired
            row[target] = np.round(rng.gamma(2.0, mean / 2.0), 4).tolist()
            error = target.replace("deg_", "deg_error_") if target.startswith("deg_") else f"{target}_error"
            row[error] = np.round(rng.uniform(0.03, 0.3, scored), 4).tolist()
    return row


def with_motif(rng: np.random.Generator, length: int, motif: str, at: int) -> str:
    sequence = random_sequence(rng, length, "acgt")
    return sequence[:at] + motif + sequence[at + len(motif):]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def write_synthetic_bundle(folder: Path, seed: int = 0) -> Path:
    """openvaccine/ (120 train rows of 107 nt; 30 + 30 test rows of 107 and 130 nt), promoter/ (240
    rows of 81 bp, promoters carrying the -35/-10 boxes), viral/ (7 experiments x 60 contigs of 300 bp,
    ~10% viral), mirna/ (120 + 30 hairpins)."""
    rng = np.random.default_rng(seed)
    train = [openvaccine_row(rng, i, 107, 68, True) for i in range(120)]
    test = ([openvaccine_row(rng, 1000 + i, 107, 68, False) for i in range(30)]
            + [openvaccine_row(rng, 2000 + i, 130, 91, False) for i in range(30)])
    write_lines(folder / "openvaccine" / "train.json", [json.dumps(r) for r in train])
    write_lines(folder / "openvaccine" / "test.json", [json.dumps(r) for r in test])

    promoters = [f"{with_motif(rng, 81, 'ttgaca' + random_sequence(rng, 17, 'acgt') + 'tataat', 30)},1,1"
                 for _ in range(120)]
    others = [f"{random_sequence(rng, 81, 'acgt')},0,0" for _ in range(120)]
    write_lines(folder / "promoter" / "v9d3.csv", ["seqs,labels,directions", *promoters, *others])

    for experiment in VIRAL_EXPERIMENTS:
        tag = experiment.split("_", 1)[1]
        rows = []
        for i in range(60):
            viral = int(i % 10 == 0)
            sequence = random_sequence(rng, 300, "ACGT" if not viral else "AACGTTT")
            rows.append(f"seq{i}_{tag}_SYNTHETIC,{sequence},{viral}")
        write_lines(folder / "viral" / f"{experiment}.csv", rows)

    def hairpin(mirtron: bool) -> str:
        stem = random_sequence(rng, int(rng.integers(20, 30)), "ACGU")
        loop = random_sequence(rng, int(rng.integers(4, 12)), "ACGU")
        pairs = {"A": "U", "U": "A", "G": "C", "C": "G"}
        start = "GU" if mirtron else ""
        return start + stem + loop + "".join(pairs[c] for c in reversed(stem)) + ("AG" if mirtron else "")

    mirbase = [f"hsa-mir-syn{i},{hairpin(i % 4 == 0)},{'TRUE' if i % 4 == 0 else 'FALSE'}" for i in range(120)]
    putative = [f"uc-syn.{i},{hairpin(True).replace('U', 'T')},TRUE" for i in range(30)]
    write_lines(folder / "mirna" / "miRBase_set.csv", mirbase)
    write_lines(folder / "mirna" / "putative_mirtrons_set.csv", putative)
    return folder
