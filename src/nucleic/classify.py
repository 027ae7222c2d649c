"""One training loop for the sequence classifiers (NT, DanQ, nucleotide CNN) and the k-mer random forest."""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dna_data import DNA_ALPHABET
from .engine import Trainer, eq11_peak_lr, load_checkpoint, make_adam, seed_torch, to_device, warmup_inverse_sqrt
from .features import tokenize
from .models.classifiers import (
    AMINO_ACIDS,
    CODING_FEATURES,
    BothStrands,
    DanQ,
    NTClassifier,
    NucleotideCNN,
    ViraMiner,
    WithKmerBranch,
    canonical_kmer_matrix,
    coding_profile,
    six_frames,
)


def encode_sequences(sequences: list[str], length: int | None = None) -> torch.Tensor:
    """(N, length) token ids, 1..4 for ACGT, 0 for padding at the 3' end (to the longest sequence)."""
    length = length or max(len(s) for s in sequences)
    out = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens = tokenize(sequence[:length], DNA_ALPHABET)
        out[row, :len(tokens)] = torch.from_numpy(tokens)
    return out


def mutate(tokens: torch.Tensor, nmute: int, generator: torch.Generator) -> torch.Tensor:
    """A copy with `nmute` random positions per sequence (within its length) set to a random base; the
    base may be the same, so about 3/4 of them change (paper 2.3.5)."""
    if nmute <= 0:
        return tokens
    lengths = (tokens != 0).sum(dim=1, keepdim=True)
    positions = (torch.rand(tokens.shape[0], nmute, generator=generator) * lengths).long()
    bases = torch.randint(1, 5, (tokens.shape[0], nmute), generator=generator)
    return tokens.clone().scatter_(1, positions, bases)


def epoch_indices(labels: torch.Tensor, negatives_per_positive: float | None,
                  generator: torch.Generator) -> torch.Tensor:
    """Shuffled training rows of one epoch: all of them, or (negatives_per_positive set) every positive
    plus that many times as many negatives, drawn afresh each epoch. Undersampling the majority class
    this way keeps every batch informative and makes an epoch short, so a rare class (2 % viral) gets
    many passes; over the epochs most negatives are still seen."""
    if not negatives_per_positive:
        return torch.randperm(len(labels), generator=generator)
    positives = torch.nonzero(labels > 0.5).squeeze(1)
    negatives = torch.nonzero(labels <= 0.5).squeeze(1)
    count = min(len(negatives), max(1, round(negatives_per_positive * len(positives))))
    chosen = torch.cat([positives, negatives[torch.randperm(len(negatives), generator=generator)[:count]]])
    return chosen[torch.randperm(len(chosen), generator=generator)]


def balanced_pos_weight(labels: torch.Tensor, setting) -> float:
    """BCE weight of positives: "balanced" = negatives / positives of these labels, else the number given."""
    if setting != "balanced":
        return float(setting)
    positives = float(labels.sum())
    return (len(labels) - positives) / max(positives, 1.0)


STRUCTURE_KINDS = ("nt_bpp",)  # classifiers that also read base-pairing probabilities
NT_KINDS = ("nt", *STRUCTURE_KINDS)  # Nucleic Transformers: the nt settings and the eq. 11 schedule


def model_settings(task_cfg, kind: str):
    """A kind's section of a task config; nt_bpp is the NT with the structure input, same settings."""
    return task_cfg["nt" if kind in NT_KINDS else kind]


def build_classifier(kind: str, settings, length: int) -> torch.nn.Module:
    """The network of `kind` from its settings. Two optional settings wrap it: `kmer_branch: {ks, dense}`
    adds a k-mer statistics branch (WithKmerBranch), `both_strands: true` scores the mean of its logits on
    the sequence and on the reverse complement (BothStrands)."""
    settings = dict(settings)
    both_strands = settings.pop("both_strands", False)
    kmer_branch = settings.pop("kmer_branch", None)
    if kind in NT_KINDS:
        model = NTClassifier(**settings, structure=kind in STRUCTURE_KINDS)
    elif kind == "danq":
        model = DanQ(length, **settings)
    elif kind == "cnn":
        model = NucleotideCNN(**settings)
    elif kind == "viraminer":
        model = ViraMiner(**settings)
    else:
        raise ValueError(f"unknown classifier '{kind}' (nt, nt_bpp, danq, cnn, viraminer)")
    if both_strands and kind in STRUCTURE_KINDS:
        raise ValueError(f"{kind} reads a pairing matrix per strand: both_strands is not supported")
    if kmer_branch:
        model = WithKmerBranch(model, **kmer_branch)
    return BothStrands(model) if both_strands else model


def fit_classifier(kind: str, settings, tc, tokens: torch.Tensor, labels: np.ndarray,
                   val_tokens: torch.Tensor, val_labels: np.ndarray, seed: int, device: torch.device,
                   run_dir: Path, desc: str = "train", select_best: bool = False,
                   pairs: torch.Tensor | None = None, val_pairs: torch.Tensor | None = None):
    """Train for tc.epochs through the engine (resumable from run_dir/last.pt); returns the model and a
    per-epoch history (train loss, held-out AUC and accuracy). select_best=True returns the weights of
    the epoch with the best validation AUC (only for a validation set that is not the test set), or with
    tc.average_top_k = k >= 2 the mean of the k best epochs' weights when its validation AUC is higher;
    otherwise the final weights.

    NT: Adam (0.9, 0.99, 1e-8, weight decay 1e-5) with the warm-up + inverse-square-root schedule of
    eq. 11. DanQ and CNN: the same Adam at a constant tc.baseline_lr. Against class imbalance, positives
    are weighted by tc.pos_weight ("balanced": negatives / positives among an epoch's rows), and with
    tc.negatives_per_positive set each epoch undersamples the negatives (epoch_indices).
    """
    from .metrics import binary_classification_metrics

    torch.manual_seed(seed)
    model = build_classifier(kind, settings, tokens.shape[1]).to(device)
    if kind in NT_KINDS:
        optimizer = make_adam(model, eq11_peak_lr(settings["d_model"], tc.warmup_steps, tc.lr_scale))
        scheduler = warmup_inverse_sqrt(optimizer, tc.warmup_steps)
    else:
        optimizer = make_adam(model, tc.baseline_lr)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    trainer = Trainer(model, optimizer, scheduler, run_dir, tc.epochs, device, seed=seed, name=desc,
                      select="val_auc" if select_best else None, higher_is_better=True,
                      top_k=tc.average_top_k if select_best else 0)
    labels_t = torch.as_tensor(labels, dtype=torch.float32)
    generator = torch.Generator()
    epoch = {}

    def epoch_batches(rng):
        generator.manual_seed(int(rng.integers(2**31)))  # rows and mutations
        seed_torch(rng)  # dropout
        order = epoch_indices(labels_t, tc.negatives_per_positive, generator)
        epoch["pos_weight"] = torch.tensor(balanced_pos_weight(labels_t[order], tc.pos_weight), device=device)
        return order.split(tc.batch_size)

    def batch_loss(batch, rng):
        logits = model(to_device(mutate(tokens[batch], tc.nmute, generator), device), *_rows(pairs, batch, device))
        return F.binary_cross_entropy_with_logits(logits.float(), to_device(labels_t[batch], device),
                                                  pos_weight=epoch["pos_weight"])

    def evaluate(done: int) -> dict:
        scores = binary_classification_metrics(val_labels, predict_proba(model, val_tokens, device, tc.batch_size * 4,
                                                                         val_pairs))
        return {"val_auc": scores["auc"], "val_accuracy": scores["accuracy"]}

    trainer.fit(epoch_batches, batch_loss, evaluate,
                describe=lambda s: f"val AUC {s['val_auc']:.4f} accuracy {s['val_accuracy']:.4f}")
    weights, _ = trainer.final_weights(lambda: evaluate(0))
    model.load_state_dict(weights)
    return model, trainer.state["history"]


def save_classifier(path, kind: str, settings, length: int, model: torch.nn.Module) -> None:
    """Weights plus what rebuilding the model needs (the predict command reads these). The settings are
    saved as plain data: a nested config section (kmer_branch) would not load with weights_only."""
    from .config import Config
    from .io_utils import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"kind": kind, "settings": Config(settings).to_dict(), "length": length,
                    "model": model.state_dict()}, tmp)


def load_classifier(path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """(model in eval mode, with its kind as model.kind; the sequence length it was trained on)."""
    from .stage import InputError

    saved = load_checkpoint(path, device)
    if not {"kind", "settings", "length"} <= set(saved):
        raise InputError(path, "not a classifier checkpoint (stages 10-12 write those)")
    model = build_classifier(saved["kind"], saved["settings"], saved["length"]).to(device)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError:
        raise InputError(path, "weights do not fit the model the checkpoint describes") from None
    model.kind = saved["kind"]
    return model.eval(), saved["length"]


def _rows(pairs: torch.Tensor | None, rows, device) -> tuple:
    """The extra model input of these rows (pairing matrices), or nothing for sequence-only models."""
    return () if pairs is None else (to_device(pairs[rows], device),)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int,
                  pairs: torch.Tensor | None = None) -> np.ndarray:
    model.eval()
    return np.concatenate([torch.sigmoid(model(to_device(tokens[rows], device), *_rows(pairs, rows, device))).cpu().numpy()
                           for rows in torch.arange(len(tokens)).split(batch_size)])


def kmer_frequencies(sequences: list[str], ks: tuple[int, ...], canonical: bool = False) -> np.ndarray:
    """Per sequence, the frequency of every k-mer for each k in ks (ViraMiner's baseline features); with
    canonical, of every k-mer / reverse-complement pair (canonical_kmer_matrix: the same on either strand)."""
    blocks = []
    for k in ks:
        rows = []
        for sequence in sequences:
            codes = tokenize(sequence, DNA_ALPHABET) - 1
            if len(codes) < k:
                rows.append(np.zeros(4 ** k, dtype=np.float32))
                continue
            windows = np.lib.stride_tricks.sliding_window_view(codes, k)
            index = windows @ (4 ** np.arange(k - 1, -1, -1))
            rows.append(np.bincount(index, minlength=4 ** k).astype(np.float32) / len(index))
        block = np.stack(rows)
        blocks.append(block @ canonical_kmer_matrix(k) if canonical else block)
    return np.concatenate(blocks, axis=1)


FEATURE_GLOBALS = ("length", "gc", "mfe")


def feature_spec(settings) -> dict:
    """The hand-made features' settings (of a random forest or a linear model) from a config section or a
    saved model: ks (k-mer sizes), canonical (each k-mer counted with its reverse complement), ends
    (nucleotides read at each end), globals (any of FEATURE_GLOBALS), positions (one-hot nucleotides of
    the first n positions, for aligned sequences), boxes ([motif, start, end] each: its fewest mismatches
    within those positions), neighbours (k: SharedKmerNeighbours.features against the training rows,
    added by the fitted model; neighbours_both_strands: found on either strand). Missing keys mean none,
    as in forests saved before canonical, ends, globals, positions, boxes and neighbours existed."""
    spec = {"ks": [int(k) for k in settings.get("ks") or []], "canonical": bool(settings.get("canonical")),
            "ends": int(settings.get("ends") or 0),
            "globals": list(settings.get("globals") or []), "positions": int(settings.get("positions") or 0),
            "boxes": [[str(motif).upper(), int(start), int(end)] for motif, start, end in settings.get("boxes") or []],
            "coding": bool(settings.get("coding")), "neighbours": int(settings.get("neighbours") or 0),
            "neighbours_both_strands": bool(settings.get("neighbours_both_strands"))}
    unknown = set(spec["globals"]) - set(FEATURE_GLOBALS)
    if unknown:
        raise ValueError(f"globals: unknown {sorted(unknown)}; choose from {list(FEATURE_GLOBALS)}")
    return spec


def sequence_features(sequences: list[str], spec: dict) -> np.ndarray:
    """One row per sequence: k-mer frequencies for each k in spec["ks"]; the one-hot nucleotides of the
    first and last spec["ends"] positions (a mirtron's ends are its intron's splice sites, GU...AG); then
    spec["globals"]: length, GC content, ViennaRNA minimum free energy (Turner 2004, 37 C) in total and
    per nucleotide (how stable the hairpin is); the one-hot nucleotide at each of the first
    spec["positions"] positions (aligned promoters: each base's place relative to the transcription
    start); for each spec["boxes"] motif, its fewest mismatches within its window (the -10 and -35 boxes)."""
    blocks = [kmer_frequencies(sequences, tuple(spec["ks"]), spec.get("canonical", False))]
    if spec["ends"]:
        blocks.append(end_nucleotides(sequences, spec["ends"]))
    lengths = np.array([len(s) for s in sequences], dtype=np.float32)
    for name in spec["globals"]:
        if name == "length":
            blocks.append(lengths[:, None])
        elif name == "gc":
            blocks.append(np.array([[(s.count("G") + s.count("C")) / max(len(s), 1)] for s in sequences],
                                   dtype=np.float32))
        else:
            from .folding import ViennaSource

            energies = ViennaSource("Turner2004").free_energies(sequences)
            blocks.append(np.stack([energies, energies / np.maximum(lengths, 1)], axis=1))
    if spec.get("coding"):
        blocks.append(coding_features(sequences))
    if spec.get("positions"):
        blocks.append(position_nucleotides(sequences, spec["positions"]))
    for motif, start, end in spec.get("boxes", []):
        windows = [s[start:end].ljust(len(motif), "N") for s in sequences]  # bases a short sequence lacks: mismatches
        blocks.append(np.array([[fewest_mismatches(w, motif)] for w in windows], dtype=np.float32))
    return np.concatenate(blocks, axis=1)


_COMPLEMENT = str.maketrans("ACGTUNacgtun", "TGCAANtgcaan")
_BASE_CODES = np.full(256, -1, dtype=np.int8)  # ASCII byte -> 2-bit code of A, C, G, T; -1 for any other
_BASE_CODES[np.frombuffer(b"ACGT", np.uint8)] = np.arange(4)


def reverse_complement(sequence: str) -> str:
    """The other strand read 5' to 3' (DNA letters; U pairs with A, N stays N)."""
    return sequence.translate(_COMPLEMENT)[::-1]


def _window_sums(flags: np.ndarray, k: int) -> np.ndarray:
    """(N, L) booleans -> (N, L - k + 1): how many are set in each window of k."""
    totals = np.zeros((flags.shape[0], flags.shape[1] + 1), dtype=np.int32)
    np.cumsum(flags, axis=1, out=totals[:, 1:])
    return totals[:, k:] - totals[:, :-k]


def _distinct_pairs(owners: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, code) pairs without repeats, sorted by code then owner."""
    order = np.lexsort((owners, codes))
    owners, codes = owners[order], codes[order]
    new = np.ones(len(codes), dtype=bool)
    new[1:] = (codes[1:] != codes[:-1]) | (owners[1:] != owners[:-1])
    return owners[new], codes[new]


class SharedKmerNeighbours:
    """The labelled sequences that share at least one k-mer with a query: its neighbours. At k = 16 chance
    matches are rare among a few thousand 81-nt sequences, so a neighbour overlaps the query. The promoter
    set holds such overlapping fragments (close transcription starts of one region: 34 % of the promoters,
    6 % of the non-promoters have a neighbour), and a query overlapping known promoters is most likely one too.
    With both_strands, a k-mer of the query's reverse complement counts too: a fragment of the same region
    read from the other strand (5 % more of the promoter set's rows find a neighbour). max_base_share: a
    k-mer with more than that share of one base (poly-A tails, simple repeats) links nothing. groups (the
    labelled sequences' sequencing experiments): a query given its own group finds neighbours in the other
    groups only, as a new experiment's contig does. max_holders: a k-mer that more labelled sequences hold
    (a repeat common in the human genome) links nothing. Pickles as its settings, sequences and labels; the
    k-mer index (sorted integer codes) is rebuilt on first use, in about 2 s for the viral bundle."""

    def __init__(self, sequences: list[str], labels, k: int, both_strands: bool = False,
                 max_base_share: float | None = None, groups=None, max_holders: int | None = None):
        self.k, self.sequences, self.both_strands = int(k), list(sequences), bool(both_strands)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_base_share = None if max_base_share is None else float(max_base_share)
        self.groups = None if groups is None else np.asarray(groups)
        self.max_holders = None if max_holders is None else int(max_holders)
        self._index = None

    _STATE = {"both_strands": False, "max_base_share": None, "groups": None,
              "max_holders": None}  # the defaults of older pickles

    def __getstate__(self) -> dict:
        return {"k": self.k, "sequences": self.sequences, "labels": self.labels,
                **{key: getattr(self, key) for key in self._STATE}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({**self._STATE, **state}, _index=None)

    def _kmers(self, sequence: str) -> set[str]:
        """The distinct k-mers of `sequence` that link (as strings; the reference for _kmer_codes)."""
        kmers = {sequence[i:i + self.k] for i in range(len(sequence) - self.k + 1)}
        return {kmer for kmer in kmers if self._links(kmer)}

    def _links(self, kmer: str) -> bool:
        return self.max_base_share is None or max(kmer.count(base) for base in "ACGT") <= self.max_base_share * self.k

    def _kmer_codes(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """The k-mers of `sequences` that link: (i, code) pairs, sequence i's k-mers of A, C, G and T only
        as 2-bit integer codes (k <= 32), and (i, k-mer) for any other (N, lower case, U; every k-mer where
        k > 32). Repeats are not removed. Sequences of one length are encoded together as one array."""
        owners, codes, others = [np.empty(0, np.int64)], [np.empty(0, np.uint64)], []
        by_length = collections.defaultdict(list)
        for i, sequence in enumerate(sequences):
            by_length[len(sequence)].append(i)
        k = self.k
        for length, members in by_length.items():
            n = length - k + 1
            if n <= 0:
                continue
            if k > 32:
                others += [(i, kmer) for i in members for kmer in self._kmers(sequences[i])]
                continue
            for chunk in (members[a:a + 4096] for a in range(0, len(members), 4096)):
                text = "".join(sequences[i] for i in chunk).encode("ascii", "replace")
                bases = _BASE_CODES[np.frombuffer(text, np.uint8)].reshape(len(chunk), length)
                plain = _window_sums(bases < 0, k) == 0
                links = plain
                if self.max_base_share is not None:  # the plain windows; the others are checked as strings
                    most = np.max([_window_sums(bases == base, k) for base in range(4)], axis=0)
                    links = plain & (most <= self.max_base_share * k)
                digits = np.where(bases >= 0, bases, 0).astype(np.uint64)
                window_codes = np.zeros((len(chunk), n), dtype=np.uint64)
                for t in range(k):
                    window_codes = window_codes * np.uint64(4) + digits[:, t:t + n]
                row, position = np.nonzero(links)
                owners.append(np.asarray(chunk, dtype=np.int64)[row])
                codes.append(window_codes[row, position])
                for row, position in zip(*np.nonzero(~plain)):
                    kmer = sequences[chunk[row]][position:position + k]
                    if self._links(kmer):
                        others.append((chunk[row], kmer))
        return np.concatenate(owners), np.concatenate(codes), others

    def _query_codes(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray, set[tuple[int, str]]]:
        """_kmer_codes of the queries (and of their reverse complements with both_strands), distinct per query."""
        owners, codes, others = self._kmer_codes(sequences)
        if self.both_strands:
            rc_owners, rc_codes, rc_others = self._kmer_codes([reverse_complement(s) for s in sequences])
            owners, codes, others = np.concatenate([owners, rc_owners]), np.concatenate([codes, rc_codes]), others + rc_others
        owners, codes = _distinct_pairs(owners, codes)
        return owners, codes, set(others)

    def _build_index(self) -> None:
        """Every labelled sequence's distinct k-mer codes, sorted, with the row each comes from (and a dict
        for the k-mers kept as strings): for the viral bundle's 26k contigs at k = 24, about 2 s and 0.1
        GB, where a dict of strings took 23 s and 1.5 GB."""
        rows, codes, others = self._kmer_codes(self.sequences)
        rows, codes = _distinct_pairs(rows, codes)  # sorted by code
        by_kmer = collections.defaultdict(set)
        for row, kmer in others:
            by_kmer[kmer].add(row)
        if self.max_holders is not None:
            holders = np.unique(codes, return_counts=True)[1]
            kept = np.repeat(holders <= self.max_holders, holders)
            rows, codes = rows[kept], codes[kept]
            by_kmer = {kmer: r for kmer, r in by_kmer.items() if len(r) <= self.max_holders}
        self._index = (codes, rows, {kmer: np.array(sorted(r), dtype=np.int64) for kmer, r in by_kmer.items()})

    def _shared(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, row, count) for every labelled row sharing k-mers with a query: how many distinct ones."""
        index_codes, index_rows, index_others = self._index
        queries, codes, others = self._query_codes(sequences)
        first = np.searchsorted(index_codes, codes, side="left")
        lengths = np.searchsorted(index_codes, codes, side="right") - first
        starts = np.repeat(first - np.cumsum(lengths) + lengths, lengths)
        hit_queries = [np.repeat(queries, lengths)]
        hit_rows = [index_rows[np.arange(lengths.sum()) + starts]]
        for query, kmer in others:
            if kmer in index_others:
                hit_rows.append(index_others[kmer])
                hit_queries.append(np.full(len(index_others[kmer]), query, dtype=np.int64))
        keys, counts = np.unique(np.concatenate(hit_queries) * len(self.sequences) + np.concatenate(hit_rows),
                                 return_counts=True)
        return keys // len(self.sequences), keys % len(self.sequences), counts

    def pairs(self, sequences: list[str], self_rows=None, query_groups=None):
        """Yields (query, row, shared) arrays, a chunk of queries at a time (bounding the memory of the hits):
        each labelled row sharing k-mers with a query, and how many distinct ones. self_rows[i]: query i's
        own row, left out; query_groups[i]: its group, whose rows are left out (needs groups)."""
        if query_groups is not None and self.groups is None:
            raise ValueError("query_groups given, but the labelled sequences have no groups")
        if self._index is None:
            self._build_index()
        for first in range(0, len(sequences) if self.sequences else 0, 2048):
            queries, rows, shared = self._shared(list(sequences[first:first + 2048]))
            queries = queries + first
            keep = np.ones(len(rows), dtype=bool)
            if self_rows is not None:
                keep &= rows != np.asarray(self_rows, dtype=np.int64)[queries]
            if query_groups is not None:
                keep &= self.groups[rows] != np.asarray(query_groups)[queries]
            yield queries[keep], rows[keep], shared[keep]

    def counts(self, sequences: list[str], self_rows=None, query_groups=None) -> np.ndarray:
        """(N, 4): neighbours that are positives, that are negatives; the most k-mers one positive and one
        negative neighbour shares with the query. self_rows[i]: query i's own row among the labelled
        sequences, left out (a training sequence is not its own neighbour). query_groups[i]: query i's
        group; labelled sequences of that group are left out (needs groups)."""
        out = np.zeros((len(sequences), 4), dtype=np.float32)
        for queries, rows, shared in self.pairs(sequences, self_rows, query_groups):
            for column, label in enumerate((1, 0)):
                of_label = self.labels[rows] == label
                np.add.at(out[:, column], queries[of_label], 1)
                np.maximum.at(out[:, 2 + column], queries[of_label], shared[of_label])
        return out

    def features(self, sequences: list[str], self_rows=None) -> np.ndarray:
        """(N, 4) for a linear model: log(1 + neighbours) of each class, the most k-mers shared per class."""
        counts = self.counts(sequences, self_rows)
        return np.concatenate([np.log1p(counts[:, :2]), counts[:, 2:]], axis=1)

    def proba(self, sequences: list[str], query_groups=None) -> np.ndarray:
        """The share of positives among the neighbours; NaN where there is none (no opinion)."""
        counts = self.counts(sequences, query_groups=query_groups)
        found = counts[:, 0] + counts[:, 1]
        return np.where(found > 0, counts[:, 0] / np.maximum(found, 1), np.nan)


class SharedPeptideNeighbours(SharedKmerNeighbours):
    """SharedKmerNeighbours over the proteins the sequences may encode: a k-mer here is a peptide of k amino
    acids, read in all six frames (stop-free windows only), so two contigs of one virus family link where
    their DNA has drifted apart at synonymous codons and no nucleotide 24-mer is left in common. Across
    the viral bundle's experiments at k = 10 it links 2-21 % of a new run's contigs to others' and ranks
    those at AUC 0.92-1.00, except in one run where it is at chance (README). max_base_share: a peptide
    with more than that share of one amino acid (low-complexity repeats) links nothing; max_holders: as in
    SharedKmerNeighbours (20 skips human repeats that a frame reads as peptides)."""

    MAX_K = 14  # 21 ** k codes (20 amino acids, digit 0 unused) fit in 64 bits

    def __init__(self, sequences: list[str], labels, k: int, max_base_share: float | None = None, groups=None,
                 max_holders: int | None = None):
        if not 1 <= int(k) <= self.MAX_K:
            raise ValueError(f"peptide length k={k}: choose 1..{self.MAX_K}")
        super().__init__(sequences, labels, k, False, max_base_share, groups, max_holders)

    def _kmer_codes(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
        """(i, code) for every linking peptide of sequence i (repeats not removed); none is kept as a string."""
        owners, codes = [np.empty(0, np.int64)], [np.empty(0, np.uint64)]
        for first in range(0, len(sequences), 4096):
            chunk = sequences[first:first + 4096]
            for frame in six_frames(encode_sequences(chunk, max(max(map(len, chunk)), 1))):
                chunk_owners, chunk_codes = self._frame_peptides(frame["aminos"].numpy())
                owners.append(chunk_owners + first)
                codes.append(chunk_codes)
        return np.concatenate(owners), np.concatenate(codes), []

    def _frame_peptides(self, aminos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, code) of each window of k amino acids in one frame (B, n) that has no stop or N and, with
        max_base_share, no amino acid above that share; code: the amino acids as base-21 digits 1..20."""
        k, n = self.k, aminos.shape[1] - self.k + 1
        if n <= 0:
            return np.empty(0, np.int64), np.empty(0, np.uint64)
        links = _window_sums(aminos < 0, k) == 0
        if self.max_base_share is not None:
            most = np.max([_window_sums(aminos == a, k) for a in range(len(AMINO_ACIDS))], axis=0)
            links &= most <= self.max_base_share * k
        digits = (aminos + 1).clip(min=0).astype(np.uint64)
        window_codes = np.zeros((len(aminos), n), dtype=np.uint64)
        for t in range(k):
            window_codes = window_codes * np.uint64(21) + digits[:, t:t + n]
        row, position = np.nonzero(links)
        return row.astype(np.int64), window_codes[row, position]


def log_odds(probs: np.ndarray, clip: float = 1e-3) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [clip, 1 - clip], so one confident vote stays finite."""
    clipped = np.clip(np.asarray(probs, dtype=np.float64), clip, 1 - clip)
    return np.log(clipped) - np.log1p(-clipped)


def contig_mean(probs: np.ndarray, contigs) -> np.ndarray:
    """Each segment's probability replaced by its contig's: the sigmoid of the mean log-odds of the contig's
    segments. A contig longer than the models' 300-bp segments has one label, and each of its segments is
    separate evidence of it, so their mean ranks it better than any one segment does (leave one experiment
    out: 0.8449 -> 0.8558 mean AUC, README). The log-odds are clipped at 1e-12 only, so a one-segment contig keeps its
    probability."""
    scores = log_odds(probs, clip=1e-12)
    _, inverse = np.unique(np.asarray(contigs), return_inverse=True)
    mean = np.bincount(inverse, scores) / np.bincount(inverse)
    return 1.0 / (1.0 + np.exp(-mean[inverse]))


RUN_CONTEXT_FEATURES = ("linked contigs", "best neighbour above", "neighbours' mean above")


def run_context(sequences: list[str], scores: np.ndarray, k: int = 10, max_base_share: float | None = 0.5,
                max_holders: int | None = 20) -> np.ndarray:
    """(N, 3) what the other contigs of one sequencing run say of each, without a label: log(1 + how many
    share a peptide of k amino acids with it, SharedPeptideNeighbours among the run itself); how far its best
    such neighbour's score (log-odds) lies above its own; its neighbours' mean score minus its own (both 0
    without a neighbour). Each column is z-scored within the run, so runs of any size and depth read alike.
    Viral contigs recur within a run far more often than human ones (exp2: 56 % of the viral contigs, 11 %
    of the others have such a neighbour), and a contig linked to a confidently viral one is likely viral."""
    scores = np.asarray(scores, dtype=np.float64)
    index = SharedPeptideNeighbours(sequences, np.zeros(len(sequences)), k, max_base_share, None, max_holders)
    degree, total, best = np.zeros(len(sequences)), np.zeros(len(sequences)), np.full(len(sequences), -np.inf)
    for queries, rows, _ in index.pairs(sequences, self_rows=np.arange(len(sequences))):
        np.add.at(degree, queries, 1)
        np.add.at(total, queries, scores[rows])
        np.maximum.at(best, queries, scores[rows])
    linked = degree > 0
    raw = np.stack([np.log1p(degree), np.where(linked, np.maximum(best - scores, 0), 0),
                    np.where(linked, total / np.maximum(degree, 1) - scores, 0)], axis=1)
    return (raw - raw.mean(axis=0)) / (raw.std(axis=0) + 1e-9) if len(raw) else raw


class RunContextStacker:
    """A logistic regression over a blend's log-odds and its run_context, for contigs scored as one
    sequencing run: fitted on runs that the blend's models never saw (each training experiment scored by
    fits on the others), so it learns how much a run's own recurrences add to a new run's ranking. A run of
    fewer than min_run contigs is too small to z-score: it keeps the blend's probabilities. each_run_equal:
    every training run weighs the same in the fit (each contig 1 / its run's size), as each run counts the
    same in a mean of per-run AUCs; otherwise every contig does, and the largest run decides."""

    def __init__(self, k: int = 10, max_base_share: float | None = 0.5, max_holders: int | None = 20,
                 min_run: int = 200, C: float = 1.0, each_run_equal: bool = True):
        self.k, self.max_base_share, self.max_holders = int(k), max_base_share, max_holders
        self.min_run, self.C, self.each_run_equal, self.model_ = int(min_run), float(C), bool(each_run_equal), None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"each_run_equal": False, **state})  # stackers saved before it: fitted per contig

    def features(self, probs: np.ndarray, sequences: list[str], runs: np.ndarray) -> np.ndarray:
        """(N, 4): each contig's log-odds, then run_context within its run."""
        scores, runs = log_odds(probs), np.asarray(runs)
        out = np.zeros((len(sequences), 1 + len(RUN_CONTEXT_FEATURES)))
        out[:, 0] = scores
        for run in np.unique(runs):
            rows = np.flatnonzero(runs == run)
            out[rows, 1:] = run_context([sequences[i] for i in rows], scores[rows], self.k, self.max_base_share,
                                        self.max_holders)
        return out

    def _large(self, runs: np.ndarray) -> np.ndarray:
        names, sizes = np.unique(runs, return_counts=True)
        return np.isin(runs, names[sizes >= self.min_run])

    def fit(self, probs: np.ndarray, sequences: list[str], runs, labels) -> RunContextStacker:
        """Fitted on the rows of runs holding at least min_run contigs; probs: the blend's, from models
        that did not see the row's run."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        runs, labels = np.asarray(runs), np.asarray(labels)
        kept = np.flatnonzero(self._large(runs))
        if len(np.unique(labels[kept])) < 2:
            raise ValueError(f"run context: the runs of at least {self.min_run} contigs hold one class only")
        table = self.features(np.asarray(probs)[kept], [sequences[i] for i in kept], runs[kept])
        self.model_ = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=2000))
        self.model_.fit(table, labels[kept], logisticregression__sample_weight=self.run_weights(runs[kept]))
        return self

    def run_weights(self, runs: np.ndarray) -> np.ndarray | None:
        """Each contig's weight in the fit (mean 1): with each_run_equal, every run's weights sum the same."""
        if not self.each_run_equal:
            return None
        _, inverse, sizes = np.unique(runs, return_inverse=True, return_counts=True)
        return len(runs) / len(sizes) / sizes[inverse]

    def proba(self, probs: np.ndarray, sequences: list[str], runs=None) -> np.ndarray:
        """Each run's contigs (runs: each row's run; None: all one run) stacked with their run's context,
        the contigs of a run under min_run left at probs."""
        probs = np.asarray(probs, dtype=np.float64)
        runs = np.zeros(len(sequences), dtype=np.int64) if runs is None else np.asarray(runs)
        out, large = probs.copy(), np.flatnonzero(self._large(runs))
        if len(large):
            table = self.features(probs[large], [sequences[i] for i in large], runs[large])
            out[large] = self.model_.predict_proba(table)[:, 1]
        return out

    def settings(self) -> dict:
        return {"k": self.k, "max_base_share": self.max_base_share, "max_holders": self.max_holders,
                "min_run": self.min_run, "C": self.C, "each_run_equal": self.each_run_equal}

    def coefficients(self) -> dict[str, float]:
        """The fitted weights (on standardized inputs), by input name."""
        names = ("log-odds", *RUN_CONTEXT_FEATURES)
        return {name: round(float(w), 4) for name, w in zip(names, self.model_[-1].coef_[0])}


def coding_features(sequences: list[str], batch_size: int = 4096) -> np.ndarray:
    """(N, CODING_FEATURES) reading-frame features of each sequence (coding_profile: the stop-free
    stretches of its six frames and the amino-acid composition of the longest)."""
    if not sequences:
        return np.zeros((0, CODING_FEATURES), np.float32)
    return np.concatenate([coding_profile(encode_sequences(sequences[i:i + batch_size])).numpy()
                           for i in range(0, len(sequences), batch_size)])


def position_nucleotides(sequences: list[str], n: int) -> np.ndarray:
    """(N, 4 n): the one-hot nucleotide at each of the first n positions; past a sequence's end, zeros."""
    out = np.zeros((len(sequences), n, 4), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        codes = tokenize(sequence[:n], DNA_ALPHABET) - 1
        out[row, np.arange(len(codes)), codes] = 1
    return out.reshape(len(sequences), -1)


def fewest_mismatches(sequence: str, box: str) -> int:
    """The fewest mismatches with `box` over every alignment of it inside `sequence` (upper case)."""
    return min(sum(a != b for a, b in zip(sequence[o:o + len(box)], box))
               for o in range(max(1, len(sequence) - len(box) + 1)))


def end_nucleotides(sequences: list[str], n: int) -> np.ndarray:
    """(N, 2 n 4): the one-hot nucleotide at each of the first n and the last n positions; positions a
    sequence shorter than n does not reach stay zero."""
    out = np.zeros((len(sequences), 2 * n, 4), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        codes = tokenize(sequence, DNA_ALPHABET) - 1
        head, tail = codes[:n], codes[-n:][::-1]  # the tail read from the last nucleotide inward
        out[row, np.arange(len(head)), head] = 1
        out[row, n + np.arange(len(tail)), tail] = 1
    return out.reshape(len(sequences), -1)
