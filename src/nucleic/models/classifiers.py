"""Sequence classifiers for the DNA/RNA tasks (promoter, viral, mirtron): the Nucleic Transformer for
classification (paper 2.2.1-2.2.3) and two baselines, DanQ (seed 004) and the nucleotide-level CNN
(seed 000). Inputs are token ids (B, L): 0 = N / padding, 1..4 = A, C, G, T."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nucleic_transformer import EncoderBlock, ScaledPointwiseConv

N_TOKENS = 5  # N/padding + ACGT


def sinusoidal_encoding(length: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """(L, d_model) sine/cosine positional encoding of the vanilla transformer (eq. 3-4)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(base) / d_model))
    encoding = torch.zeros(length, d_model)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return encoding


class NTClassifier(nn.Module):
    """Nucleotide embedding + positional encoding -> k-mer convolution (no padding) + LayerNorm ->
    transformer encoder stack -> mean over k-mers -> one logit.

    structure=True: the model also takes each sequence's base-pairing probability matrix (B, L, L) and,
    as the OpenVaccine model does, turns it into a per-head attention bias over k-mer pairs (a k x k
    convolution, ReLU, a 1 x 1 convolution to the heads, a learned scale), shared by every block."""

    def __init__(self, k: int = 7, nlayer: int = 6, d_model: int = 256, nhead: int = 8, dim_ff: int = 1024,
                 dropout: float = 0.1, attn_dropout: float | None = None, structure: bool = False,
                 pair_channels: int = 8):
        super().__init__()
        self.k = k
        self.structure = structure
        if structure:
            self.pair_conv = nn.Conv2d(1, pair_channels, k)  # nucleotide pairs -> k-mer pairs
            self.pair_to_bias = ScaledPointwiseConv(pair_channels, nhead)
            self.gamma = nn.Parameter(torch.ones(1))
        self.embedding = nn.Embedding(N_TOKENS, d_model, padding_idx=0)
        self.input_dropout = nn.Dropout(dropout)
        self.kmer_conv = nn.Conv1d(d_model, d_model, k)
        self.kmer_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, nhead, dim_ff, dropout, attn_dropout)
                                    for _ in range(nlayer))
        self.head = nn.Linear(d_model, 1)

    def encode(self, tokens: torch.Tensor, need_weights: bool = False, pairs: torch.Tensor | None = None):
        length = tokens.shape[1]
        x = self.embedding(tokens) + sinusoidal_encoding(length, self.embedding.embedding_dim).to(tokens.device)
        x = self.input_dropout(x)
        kmers = self.kmer_norm(self.kmer_conv(x.transpose(1, 2)).transpose(1, 2))
        valid = self._valid_kmers(tokens)  # k-mers that touch padding are masked as keys and pooled out
        bias = (None if bool(valid.all()) else  # no padding: no mask, so the fused attention kernel applies
                torch.zeros(valid.shape, device=tokens.device).masked_fill(~valid, float("-inf"))[:, None, None, :])
        if self.structure:
            if pairs is None:
                raise ValueError("this NT classifier was built with structure=True: pass the pairing matrices")
            pair_bias = self.pair_to_bias(F.relu(self.pair_conv(pairs[:, None].float())), self.gamma)
            bias = pair_bias if bias is None else pair_bias + bias
        maps = []
        for block in self.blocks:
            kmers, weights = block(kmers, bias, need_weights)
            maps.append(weights)
        pooled = (kmers * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)
        return pooled, maps

    def _valid_kmers(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != 0).sum(dim=1)
        positions = torch.arange(tokens.shape[1] - self.k + 1, device=tokens.device)
        return positions[None, :] < (lengths[:, None] - self.k + 1).clamp(min=1)

    def forward(self, tokens: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encode(tokens, pairs=pairs)[0]).squeeze(-1)

    @torch.no_grad()
    def attention_maps(self, tokens: torch.Tensor, pairs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Attention weights per block, (B, nhead, L-k+1, L-k+1)."""
        return self.encode(tokens, need_weights=True, pairs=pairs)[1]


def one_hot(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B, 4, L); N / padding is all zeros."""
    return F.one_hot(tokens, N_TOKENS)[..., 1:].transpose(1, 2).float()


class DanQ(nn.Module):
    """One-hot -> convolution + ReLU + max-pool + dropout -> bidirectional LSTM + dropout -> dense -> logit."""

    def __init__(self, length: int, filters: int = 320, kernel: int = 26, pool: int = 13, lstm: int = 320,
                 dense: int = 925, dropout_conv: float = 0.2, dropout_lstm: float = 0.5):
        super().__init__()
        self.conv = nn.Conv1d(4, filters, kernel)
        self.pool = nn.MaxPool1d(pool, pool)
        self.dropout_conv = nn.Dropout(dropout_conv)
        self.lstm = nn.LSTM(filters, lstm, batch_first=True, bidirectional=True)
        self.dropout_lstm = nn.Dropout(dropout_lstm)
        steps = (length - kernel + 1) // pool
        if steps < 1:
            raise ValueError(f"sequences of length {length} are too short for kernel {kernel} and pool {pool}")
        self.dense = nn.Linear(2 * lstm * steps, dense)
        self.head = nn.Linear(dense, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.dropout_conv(self.pool(F.relu(self.conv(one_hot(tokens)))))
        x, _ = self.lstm(x.transpose(1, 2))
        x = self.dropout_lstm(x).flatten(1)
        return self.head(F.relu(self.dense(x))).squeeze(-1)


class NucleotideCNN(nn.Module):
    """One-hot -> parallel convolutions (widths 3-6, 32 filters each, ReLU) -> global max-pool ->
    dense 128 + dropout -> logit (the CNN-concat-filters model of seed 000)."""

    def __init__(self, widths: tuple[int, ...] = (3, 4, 5, 6), filters: int = 32, dense: int = 128,
                 dropout: float = 0.5):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(4, filters, w) for w in widths)
        self.dense = nn.Linear(filters * len(widths), dense)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dense, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = one_hot(tokens)
        pooled = torch.cat([F.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=1)
        return self.head(self.dropout(F.relu(self.dense(pooled)))).squeeze(-1)


class ViraMiner(nn.Module):
    """Two convolutional branches over the one-hot sequence, after ViraMiner (Tampuu et al. 2019): a
    pattern branch (global max-pool: does a motif occur anywhere?) and a frequency branch (global
    average-pool: how much of the contig looks like it?), each to a dense layer + dropout; their
    concatenation gives the logit."""

    def __init__(self, filters: int = 128, pattern_kernel: int = 11, frequency_kernel: int = 7, dense: int = 128,
                 dropout: float = 0.5):
        super().__init__()
        self.pattern_conv = nn.Conv1d(4, filters, pattern_kernel)
        self.frequency_conv = nn.Conv1d(4, filters, frequency_kernel)
        self.pattern_dense = nn.Linear(filters, dense)
        self.frequency_dense = nn.Linear(filters, dense)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * dense, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = one_hot(tokens)
        valid = (tokens != 0).float()[:, None, :]  # padding and N: out of the average
        pattern = F.relu(self.pattern_conv(x)).amax(dim=-1)
        frequency = F.relu(self.frequency_conv(x))
        covered = valid[..., : frequency.shape[-1]]
        frequency = (frequency * covered).sum(-1) / covered.sum(-1).clamp(min=1.0)
        branches = [F.relu(self.pattern_dense(self.dropout(pattern))),
                    F.relu(self.frequency_dense(self.dropout(frequency)))]
        return self.head(self.dropout(torch.cat(branches, dim=1))).squeeze(-1)


def sequence_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) each sequence's length: to its last base (inner Ns count, the 3' padding does not)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return ((tokens != 0) * (positions + 1)).amax(dim=1)


def reverse_complement(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids of the other strand: each sequence reversed within its length and A<->T, C<->G;
    N stays N, the 3' padding stays at the end."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    lengths = sequence_lengths(tokens)[:, None]
    source = (lengths - 1 - positions).clamp(min=0)
    flipped = tokens.gather(1, source)
    complement = torch.where(flipped > 0, 5 - flipped, flipped)
    return torch.where(positions < lengths, complement, torch.zeros_like(tokens))


class BothStrands(nn.Module):
    """A sequence classifier that reads both strands: the mean of its logits on the sequence and on its
    reverse complement. A contig may come from either strand of a genome, so the score should not
    depend on which one was sequenced."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(tokens) + self.model(reverse_complement(tokens)))


def kmer_profile(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 4**k) frequency of every k-mer of each sequence (k-mers holding N or padding left out), over
    the uniform 1 / 4**k, so every k gives features around 1. The k-mer order is kmer_frequencies'."""
    windows = (tokens - 1).unfold(1, k, 1)  # (B, L-k+1, k), -1 = N / padding
    valid = (windows >= 0).all(dim=-1).float()
    index = (windows.clamp(min=0) * 4 ** torch.arange(k - 1, -1, -1, device=tokens.device)).sum(dim=-1)
    counts = torch.zeros(tokens.shape[0], 4 ** k, device=tokens.device).scatter_add_(1, index, valid)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0) * 4 ** k


AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
CODING_FEATURES = 6 + len(AMINO_ACIDS)


def genetic_code() -> np.ndarray:
    """The standard genetic code: the AMINO_ACIDS index of each of the 64 codons (-1 for a stop), codon
    index 16 a + 4 b + c with the bases numbered in ACGT order."""
    tcag = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"  # the textbook table, TCAG order
    place = {"T": 0, "C": 1, "A": 2, "G": 3}
    return np.array([AMINO_ACIDS.find(tcag[16 * place[a] + 4 * place[b] + place[c]])
                     for a, b, c in itertools.product("ACGT", repeat=3)])


_GENETIC_CODE = genetic_code()


def coding_profile(tokens: torch.Tensor) -> torch.Tensor:
    """(B, CODING_FEATURES): how much each sequence looks like a piece of a gene, read in all six frames
    (three per strand). A viral genome is mostly coding, the human DNA beside it in a metagenomic sample
    mostly not, and a frame that runs long without a stop codon is what coding looks like in any genome,
    so these features carry over to viruses of runs a model never saw. Per sequence: the longest and
    second-longest stop-free stretch (as a share of its frame's codons), the lowest and second-lowest
    share of stop codons, how many frames run 80 % and 100 % of their length without a stop, then the
    amino-acid composition of the longest stretch (of all that tie for it). A codon holding an N is no
    stop and codes for nothing; the same on either strand."""
    frames = six_frames(tokens)
    codons, stretches = (torch.stack([f[key] for f in frames], 1) for key in ("codons", "longest"))  # (B, 6) each
    open_share = stretches / codons.clamp(min=1)
    stop_share = torch.where(codons > 0, torch.stack([f["stops"] for f in frames], 1) / codons.clamp(min=1), 1.0)
    longest = stretches.amax(dim=1, keepdim=True)
    composition = sum(_stretch_composition(f, longest) for f in frames)
    composition = composition / composition.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.cat([open_share.sort(dim=1, descending=True).values[:, :2], stop_share.sort(dim=1).values[:, :2],
                      (open_share >= 0.8).sum(dim=1, keepdim=True), (open_share >= 1).sum(dim=1, keepdim=True),
                      composition], dim=1).float()


def six_frames(tokens: torch.Tensor) -> list[dict]:
    """The three reading frames of each strand (the sequence's, then its reverse complement's), each as
    _frame gives it: per codon, its amino acid (AMINO_ACIDS index; -1 a stop, -2 an N or past the end)."""
    lengths, table = sequence_lengths(tokens), torch.as_tensor(_GENETIC_CODE, device=tokens.device)
    return [_frame(strand, offset, lengths, table) for strand in (tokens, reverse_complement(tokens))
            for offset in range(3)]


def _frame(tokens: torch.Tensor, offset: int, lengths: torch.Tensor, table: torch.Tensor) -> dict:
    """One reading frame: each codon's amino acid (-1 stop, -2 an N or past the end), the frame's codon
    count, its stops, its longest stop-free stretch, and for each codon the length of the stretch it lies in
    (table: genetic_code on the tokens' device)."""
    n = max((tokens.shape[1] - offset) // 3, 0)
    zero = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    if n == 0:
        empty = torch.zeros(len(tokens), 0, dtype=torch.long, device=tokens.device)
        return {"aminos": empty, "stretch": empty, "codons": zero, "stops": zero, "longest": zero}
    bases = (tokens[:, offset:offset + 3 * n] - 1).reshape(len(tokens), n, 3)
    aminos = table[(bases.clamp(min=0) * torch.tensor([16, 4, 1], device=tokens.device)).sum(-1)]
    inside = offset + 3 * torch.arange(1, n + 1, device=tokens.device) <= lengths[:, None]
    aminos = torch.where((bases >= 0).all(-1) & inside, aminos, -2)
    stop = (aminos == -1) | ~inside
    place = torch.arange(n, device=tokens.device).expand(len(tokens), n)
    last_stop = torch.where(stop, place, -1).cummax(dim=1).values
    next_stop = torch.where(stop, place, n).flip(1).cummin(dim=1).values.flip(1)
    stretch = torch.where(stop, 0, next_stop - last_stop - 1)
    return {"aminos": aminos, "stretch": stretch, "codons": inside.sum(1),
            "stops": ((aminos == -1) & inside).sum(1), "longest": stretch.amax(1)}


def _stretch_composition(frame: dict, longest: torch.Tensor) -> torch.Tensor:
    """(B, 20) amino-acid counts of the codons in a stretch as long as the sequence's longest."""
    member = (frame["stretch"] == longest) & (longest > 0) & (frame["aminos"] >= 0)
    one_hot = F.one_hot(frame["aminos"].clamp(min=0), len(AMINO_ACIDS)) * member[..., None]
    return one_hot.sum(dim=1).float()


def canonical_kmer_matrix(k: int) -> np.ndarray:
    """(4**k, n) 0/1 matrix summing each k-mer's column with its reverse complement's: n columns, one per
    k-mer / reverse-complement pair (a palindrome is its own pair), in the order of the pair's smaller
    code. A profile times it does not depend on which strand was read."""
    codes = np.arange(4 ** k)
    powers = 4 ** np.arange(k - 1, -1, -1)
    digits = codes[:, None] // powers % 4
    complement_codes = (3 - digits[:, ::-1]) @ powers
    _, column = np.unique(np.minimum(codes, complement_codes), return_inverse=True)
    matrix = np.zeros((4 ** k, column.max() + 1), dtype=np.float32)
    matrix[codes, column] = 1.0
    return matrix


class WithKmerBranch(nn.Module):
    """A classifier plus a k-mer statistics branch: the k-mer profiles of the sequence (k in ks, the
    features of the random-forest baseline) through a small MLP, whose logit is added to the
    classifier's, both trained together. With canonical, each k-mer counts together with its reverse
    complement (canonical_kmer_matrix), so the branch reads a contig the same on either strand; with
    coding, the branch also reads the reading-frame features of coding_profile."""

    def __init__(self, model: nn.Module, ks: tuple[int, ...] = (1, 2, 3, 4, 5), dense: int = 64,
                 dropout: float = 0.5, canonical: bool = False, coding: bool = False):
        super().__init__()
        self.model = model
        self.ks = tuple(ks)
        self.canonical, self.coding = bool(canonical), bool(coding)
        for k in self.ks if self.canonical else ():
            self.register_buffer(f"canonical_{k}", torch.from_numpy(canonical_kmer_matrix(k)), persistent=False)
        width = sum(getattr(self, f"canonical_{k}").shape[1] if self.canonical else 4 ** k for k in self.ks)
        width += CODING_FEATURES if self.coding else 0
        self.branch = nn.Sequential(nn.Linear(width, dense), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dense, 1))

    def profile(self, tokens: torch.Tensor) -> torch.Tensor:
        profiles = [kmer_profile(tokens, k) for k in self.ks]
        if self.canonical:
            profiles = [p @ getattr(self, f"canonical_{k}") for p, k in zip(profiles, self.ks)]
        return torch.cat(profiles + ([coding_profile(tokens)] if self.coding else []), dim=1)

    def forward(self, tokens: torch.Tensor, *extra) -> torch.Tensor:
        return self.model(tokens, *extra) + self.branch(self.profile(tokens)).squeeze(-1)
