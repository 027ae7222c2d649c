"""Predict new sequences with trained weights, for every task.

    python -m nucleic.predict openvaccine --input new.fasta --output degradation.csv [--preset cpu]
    python -m nucleic.predict promoter    --input seqs.csv  --output promoter_probs.csv [--weights fold0.pt ...]

Input: FASTA, or CSV with a `sequence` column (and `id` or `name`). OpenVaccine: RNA (ACGU, T read as
U) up to 500 nt, folded on the fly with the preset's 12 structure predictions; the output has one row
per position (`id_seqpos` + 5 targets), averaged over folds and structures. Classifiers: DNA/RNA
(ACGT, U read as T) up to the length the model was trained on; the output is `id,probability`.
Viral: the input file is scored as one sequencing run where stage 11 serves a run context, or run by run
where a CSV has a `run` column; where it has a `contig` column, the segments of one contig are then scored
together (--independent: each record alone). A bad record stops with one line naming the file and the record.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError, Paths, load_config
from .features import clean_sequence
from .stage import InputError, read_text

MAX_RNA_LENGTH = 500
MAX_DNA_LENGTH = 100_000  # random forests only: k-mer counts take any length
TASKS = ("openvaccine", "promoter", "viral", "mirna")


GROUPING_COLUMNS = {"run": "its sequencing run", "contig": "the contig it was cut from"}


def read_records(path: Path) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(id, raw sequence) from a FASTA file or a CSV with a `sequence` column; and, where the CSV has them,
    each record's `run` (viral: each run scored as one) and `contig` (viral: the segments of one contig
    scored together) as {column: values}."""
    text = read_text(path)
    if text.lstrip().startswith(">"):
        from Bio import SeqIO

        return [(record.id or f"record{n}", str(record.seq))
                for n, record in enumerate(SeqIO.parse(io.StringIO(text), "fasta"), 1)], {}
    if not text.strip():
        raise InputError(path, "empty file: expected FASTA (>id lines) or CSV with a 'sequence' column")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "sequence" not in rows[0]:
        raise InputError(path, "expected FASTA (>id lines) or CSV with a 'sequence' column")
    records = [(row.get("id") or row.get("name") or f"row{n}", row["sequence"] or "") for n, row in enumerate(rows, 2)]
    groupings = {}
    for column, what in GROUPING_COLUMNS.items():
        if column not in rows[0]:
            continue
        for n, (row, (name, _)) in enumerate(zip(rows, records), 2):
            if not (row[column] or "").strip():
                raise InputError(path, f"empty: give every sequence {what} (or drop the column)", row=n,
                                 field=column, record=name)
        groupings[column] = [row[column].strip() for row in rows]
    return records, groupings


def clean_records(records, path: Path, alphabet: str, max_length: int, min_length: int = 1) -> list[tuple[str, str]]:
    cleaned = []
    for name, raw in records:
        try:
            sequence = clean_sequence(raw, alphabet)
        except ValueError as err:
            raise InputError(path, str(err), record=name) from None
        if len(sequence) < min_length:
            raise InputError(path, f"{len(sequence)} nt is shorter than the {min_length} nt this model needs",
                             record=name)
        if len(sequence) > max_length:
            raise InputError(path, f"{len(sequence)} nt is longer than the {max_length} nt this model takes",
                             record=name)
        cleaned.append((name, sequence))
    return cleaned


def predict_openvaccine(cfg, records, weights: list[Path], device) -> pd.DataFrame:
    from .dataset import load_rna_tensors
    from .engine import load_checkpoint
    from .structures import StructureStore
    from .submission import predictions_frame
    from .train import build_model, predict

    models = []
    for path in weights:  # every checkpoint checked before anything is folded
        model = build_model(cfg.model).to(device)
        try:
            model.load_state_dict(load_checkpoint(path, device)["model"])
        except RuntimeError:
            raise InputError(path, f"weights do not fit the preset's model (--preset {cfg.preset}; "
                                   "pass the preset it was trained with)") from None
        models.append((path, model))
    sequences = [s for _, s in records]
    # The preset's 12 structure predictions, through the same store as stage 01 (cached for next time)
    store = StructureStore(Paths(cfg).structures, cfg.fold)
    store.fold_all(sequences, meta={"stage": "predict"}, n_jobs=cfg.fold.n_jobs)
    data = load_rna_tensors(pd.DataFrame({"id": [name for name, _ in records], "sequence": sequences,
                                          "seq_scored": [len(s) for s in sequences]}), store)
    everything = np.arange(len(records))
    per_model = [predict(model, data, everything, device, cfg.train, desc=path.parent.name) for path, model in models]
    mean = [np.mean([p[i] for p in per_model], axis=0) for i in everything]
    return predictions_frame(data.ids, mean, [len(s) for s in sequences])


def predict_classifier(cfg, records, weights: list[Path], path: Path, device, blend: str = "probability",
                       one_run: bool = True, runs: list[str] | None = None, contigs: list[str] | None = None,
                       score_contigs: bool = False) -> pd.DataFrame:
    """The served probability of the given models: networks (.pt), random forests, linear and homology
    models (.joblib), all written by stages 10-12. Each kind's files (its CV folds) are averaged, then
    the kinds, as the stage serves them (served_mean with the task's `blend`: a homology model without an
    opinion is left out). With a run-context model among them (stage 11's serve_run_context.joblib) and
    one_run, the sequences are scored as one sequencing run, or with `runs` (each record's run) run by run
    (RunContextStacker; a run of fewer than its min_run sequences keeps the blend). With score_contigs (the
    task's contig_mean) and one_run, the records of one of `contigs` (within one run) then share their mean
    log-odds (classify.contig_mean). `runs` and `contigs` are written beside the probabilities.
    Sequences may be as long as the shortest length a network was trained on."""
    from .classify import encode_sequences, load_classifier, predict_proba
    from .dna_data import DNA_ALPHABET
    from .dna_tasks import RUN_CONTEXT, feature_model_proba, is_feature_model, served_mean
    from .structures import pairing_probabilities

    saved = {w: load_feature_model(w) for w in weights if is_feature_model(w)}
    feature_models = [model for model in saved.values() if model["kind"] != RUN_CONTEXT]
    contexts = [w for w, model in saved.items() if model["kind"] == RUN_CONTEXT]
    if len(contexts) > 1:
        raise InputError(contexts[1], "a second run-context model among the weights: give one")
    stacker = saved[contexts[0]]["estimator"] if contexts else None
    models = [load_classifier(w, device) for w in weights if not is_feature_model(w)]
    length = min((trained for _, trained in models), default=MAX_DNA_LENGTH)
    cleaned = clean_records(records, path, DNA_ALPHABET, length)
    sequences = [s for _, s in cleaned]
    per_kind = collections.defaultdict(list)  # each kind's folds (or its one served model)
    for saved in feature_models:
        per_kind[saved["kind"]].append(feature_model_proba(saved["estimator"], saved, sequences))
    if models:
        tokens = encode_sequences(sequences, length)
        reads_structure = any(getattr(model, "structure", False) for model, _ in models)
        pairs = pairing_probabilities(cfg, sequences, length) if reads_structure else None  # folded as in training
        for model, _ in models:
            per_kind[model.kind].append(predict_proba(model, tokens, device, 256,
                                                      pairs if getattr(model, "structure", False) else None))
    means = [served_mean(probs) for probs in per_kind.values()]  # (a homology model's folds: those with an opinion)
    probability = served_mean(means, blend)
    if stacker is not None and one_run:
        probability = stacker.proba(probability, sequences, runs)
        print(run_context_note(path, runs or [""] * len(sequences), stacker.min_run))
    if contigs is not None and score_contigs and one_run:
        from .classify import contig_mean

        keys = contigs if runs is None else [f"{run}\t{contig}" for run, contig in zip(runs, contigs)]
        probability = contig_mean(probability, keys)
        print(f"{path}: the segments of each of {len(set(keys))} contigs scored together (the 'contig' column)")
    frame = pd.DataFrame({"id": [name for name, _ in cleaned], "probability": probability})
    for column, values in (("contig", contigs), ("run", runs)):
        if values is not None:
            frame.insert(1, column, values)
    return frame


def run_context_note(path: Path, runs: list[str], min_run: int) -> str:
    """What the run context did to the file: one run, or the `run` column's runs, and which were too small."""
    sizes = collections.Counter(runs)
    small = sum(size < min_run for size in sizes.values())
    scored = ("one sequencing run" if len(sizes) == 1 else f"{len(sizes)} sequencing runs (the 'run' column)")
    if small == len(sizes) == 1:
        scored += f": fewer than {min_run}, so each alone, by the blend"
    elif small:
        scored += f"; in the {small} of fewer than {min_run}, each sequence alone, by the blend"
    return f"{path}: {len(runs)} sequences scored with the run context, as {scored}; --independent: each alone"


def load_feature_model(path: Path) -> dict:
    """A random forest or linear model written by stages 10-12 ({"kind", its feature_spec, "estimator"};
    forests saved before linear models existed keep theirs under "forest"). joblib files are pickles:
    load only ones you trust (your own runs)."""
    import joblib

    from .classify import RunContextStacker
    from .dna_tasks import FEATURE_KINDS, RUN_CONTEXT

    if not path.exists():
        raise InputError(path, "no such file")
    try:
        saved = joblib.load(path)
    except Exception as err:  # a truncated or foreign file: one line, not a traceback
        raise InputError(path, f"not a model written by stages 10-12 ({type(err).__name__})") from None
    if isinstance(saved, dict) and saved.get("kind") == RUN_CONTEXT and isinstance(saved.get("estimator"), RunContextStacker):
        return saved
    if not isinstance(saved, dict) or saved.get("kind") not in FEATURE_KINDS or "ks" not in saved:
        raise InputError(path, "not a random forest or linear model written by stages 10-12")
    if "forest" in saved:
        saved["estimator"] = saved.pop("forest")
    return saved


def default_weights(cfg, task: str) -> list[Path]:
    run = Paths(cfg).run
    if task == "openvaccine":
        found = sorted((run / "models" / cfg.model.name).glob("fold*/model.pt"))
        stage = "03_train_folds"
    elif task == "promoter":
        from .dna_tasks import promoter_models, weights_suffix

        kinds = promoter_models(cfg)  # (predict_classifier averages each kind's files apart: folds x seeds)
        per_kind = [sorted((run / "promoter" / kind).glob(f"fold*{weights_suffix(kind)}")) for kind in kinds]
        found = [path for paths in per_kind for path in paths] if all(per_kind) else []
        stage = "10_promoter"
    elif task == "viral":
        from .dna_tasks import served_weights

        metrics = Paths(cfg).oof / "viral_metrics.json"
        served = json.loads(metrics.read_text())["served"] if metrics.exists() else {"models": []}
        context = served.get("run_context")
        found = [served_weights(run / "viral", kind) for kind in served["models"]]
        found += [Path(context["weights"])] if context else []
        found = found if all(path.exists() for path in found) else []
        stage = "11_viral"
    else:
        from .dna_tasks import weights_suffix

        metrics = Paths(cfg).oof / "mirna_metrics.json"
        served = json.loads(metrics.read_text())["served"]["models"] if metrics.exists() else []
        found = [run / "mirna" / f"paper_{kind}{weights_suffix(kind)}" for kind in served]
        found = found if found and all(path.exists() for path in found) else []
        stage = "12_mirna"
    if not found:
        raise InputError(run, f"no trained weights for {task}: run stage {stage} (preset {cfg.preset}) or pass --weights")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--input", required=True, help="FASTA or CSV of sequences")
    parser.add_argument("--output", required=True, help="CSV to write")
    parser.add_argument("--preset", default="cpu", help="preset the weights were trained with")
    parser.add_argument("--weights", nargs="*", help="checkpoint file(s); default: the preset's trained ones")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--independent", action="store_true",
                        help="viral: score each record alone, not the file as one sequencing run (run context) "
                             "nor a contig's segments together")
    args = parser.parse_args(argv)
    try:
        from .engine import setup_device
        from .features import SEQUENCE_TOKENS
        from .io_utils import write_csv

        cfg = load_config(args.preset, args.overrides)
        device = setup_device(cfg.train)
        path = Path(args.input)
        records, groupings = read_records(path)
        weights = [Path(w) for w in args.weights] if args.weights else default_weights(cfg, args.task)
        if args.task == "openvaccine":
            # the deepest layer reads k-mers of k = model.nlayer nucleotides: the shortest RNA it can take
            cleaned = clean_records(records, path, SEQUENCE_TOKENS, MAX_RNA_LENGTH, min_length=cfg.model.nlayer)
            frame = predict_openvaccine(cfg, cleaned, weights, device)
        else:
            from .dna_tasks import task_blend

            frame = predict_classifier(cfg, records, weights, path, device, task_blend(cfg[args.task]),
                                       one_run=not args.independent, runs=groupings.get("run"),
                                       contigs=groupings.get("contig"),
                                       score_contigs=bool(cfg[args.task].get("contig_mean")))
        write_csv(args.output, frame)
    except (InputError, ConfigError) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(frame)} rows from {len(records)} sequences, {len(weights)} checkpoint(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
