"""Nucleic Transformer for per-nucleotide RNA property prediction (He et al. 2021, sections 2.2 and 3.3).

A stack of single-layer Nucleic Transformers with kernel sizes k = nlayer, nlayer - 1, ..., 1. Each
one turns nucleotides into k-mers (1-D convolution without padding + LayerNorm), lets the k-mers
attend to each other with an additive bias gamma * conv2d_k(M) from the pair representation M
(base-pairing probabilities and inverse covalent distances, eq. 10), and maps back to nucleotides
with a transposed convolution. Both the nucleotide (1-D) and the pair (2-D) representations carry
residual paths through the stack. No positional encoding: the distance channels carry position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..features import LOOP_TOKENS, SEQUENCE_TOKENS, STRUCTURE_TOKENS
from . import cpu_attention

PAIR_INPUT_CHANNELS = 4  # BPP, 1/d, 1/d^2, 1/d^3


@dataclass
class NTConfig:
    nlayer: int = 5
    d_model: int = 256
    nhead: int = 32
    dim_ff: int = 1024
    dropout: float = 0.1
    embed_dim: int = 64
    pair_channels: int = 8
    n_outputs: int = 5


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Boolean mask, True with probability p (rounded to a multiple of 2^-16), from 16 random bits per
    element: four elements per 64-bit draw of torch's generator.

    Why: on CPU, torch's dropout draws one random number per element (bernoulli_), and that was a
    quarter of a Nucleic Transformer training step (attention weights are B x heads x L x L); a quarter
    of the draws makes the mask about 4x cheaper. Inside torch.compile, whose generated kernels draw
    their own random numbers where they use them, a plain uniform draw."""
    if torch.compiler.is_compiling():
        return torch.rand(shape, device=device) < p
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(shape) < round(p * 65536) - 32768


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on CPU through drop_mask, elsewhere torch's own (fused on GPUs)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return torch.where(drop_mask(x.shape, p, x.device), 0.0, x * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (the cheaper CPU mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class FeedForward(nn.Module):
    """Linear, ReLU, dropout, linear, dropout (the parameter names of timm's Mlp, fc1 and fc2)."""

    def __init__(self, d_model: int, dim_ff: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, dim_ff), nn.Linear(dim_ff, d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))


def explicit_attention(q, k, v, bias, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout_p(softmax(q k^T / sqrt(d) + bias)) v, the weights before dropout), q k v: (B, H, L, d).
    The 1/sqrt(d) scale goes on q and dropout's 1/(1-p) on the output: (B, H, L, d), not (B, H, L, L)."""
    batch, heads, length, dim = q.shape
    q = (q * dim ** -0.5).reshape(-1, length, dim)
    k_t = k.reshape(-1, length, dim).transpose(1, 2)
    if bias is None:
        scores = torch.bmm(q, k_t)
    else:  # a broadcast bias (a classifier's key-padding mask) is expanded to (B * H, L, L)
        scores = torch.baddbmm(bias.expand(batch, heads, length, length).reshape(-1, length, length), q, k_t)
    weights = scores.softmax(dim=-1)
    kept = torch.where(drop_mask(weights.shape, p, weights.device), 0.0, weights) if p else weights
    context = torch.bmm(kept, v.reshape(-1, length, dim))
    context = context * (1.0 / (1.0 - p)) if p else context
    return context.view(batch, heads, length, dim), weights.view(batch, heads, length, length)


class KmerAttention(nn.Module):
    """Multi-head self-attention over k-mers with a per-head additive bias on the logits.

    cpu_kernel: on a CPU, with a full bias and at least CPU_KERNEL_MIN_HEADS heads, attend through
    cpu_attention's C++ kernel: at inference as a custom op (eager or compiled), in training with its
    own backward pass and attention dropout (eager only). With the paper config's 32 heads of dimension 8
    it is several times faster than torch's kernels; with fewer, wider heads torch's matrix products are
    faster (README "Hardware")."""

    CPU_KERNEL_MIN_HEADS = 16

    def __init__(self, d_model: int, nhead: int, dropout: float, cpu_kernel: bool = True):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.nhead = nhead
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.cpu_kernel = cpu_kernel

    def cpu_kernel_mode(self, qkv: torch.Tensor, bias: torch.Tensor | None, p: float, need_weights: bool) -> str | None:
        """"inference", "training" (gradients or dropout) or None (torch's attention)."""
        if not (self.cpu_kernel and not need_weights and self.nhead >= self.CPU_KERNEL_MIN_HEADS
                and cpu_attention.supports(qkv, bias)):
            return None
        if not (p or torch.is_grad_enabled()):
            return "inference"
        return None if torch.compiler.is_compiling() else "training"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, need_weights: bool = False):
        batch, length, d_model = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.nhead, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        bias = None if bias is None else bias.to(q.dtype)
        p = self.dropout if self.training else 0.0
        mode = self.cpu_kernel_mode(qkv, bias, p, need_weights)
        if mode is not None:
            context = (cpu_attention.biased_attention(qkv, bias) if mode == "inference"
                       else cpu_attention.biased_attention_with_grad(qkv, bias, p))  # (B, L, H, D)
            return self.out(context.reshape(batch, length, d_model)), None
        # The explicit path gives the plots their weights, and drops attention weights on CPU, where torch's
        # fused kernel does not drop and its fallback draws one random number per weight. Under torch.compile
        # on a CPU it is also faster: inductor fuses the softmax, while the fused kernel's tiny head dimension
        # (8 in the paper config) starves it (inference 1.2-1.4x, README "Hardware"). Key-padding masks
        # (-inf, broadcast) stay with torch, whose softmax gives fully masked rows zeros instead of NaN.
        full_bias = bias is None or bias.shape == (batch, self.nhead, length, length)
        on_cpu = q.device.type == "cpu"
        if need_weights or (on_cpu and full_bias and (p or torch.compiler.is_compiling())):
            context, weights = explicit_attention(q, k, v, bias, p)
        else:
            context, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p), None
        context = context.transpose(1, 2).reshape(batch, length, d_model)
        return self.out(context), weights if need_weights else None


def with_cpu_kernel(model: nn.Module, enabled: bool) -> nn.Module:
    """`model` with the C++ attention kernel on or off in every KmerAttention (for comparisons)."""
    for module in model.modules():
        if isinstance(module, KmerAttention):
            module.cpu_kernel = enabled
    return model


class EncoderBlock(nn.Module):
    """Post-LayerNorm transformer encoder layer (eq. 5-8) whose attention takes an optional additive bias.

    attn_dropout (default: dropout) drops attention weights; 0 lets the CPU use the fused attention
    kernel instead of drawing a random mask over every (head, query, key), 4x faster at L = 300."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float, attn_dropout: float | None = None):
        super().__init__()
        self.attention = KmerAttention(d_model, nhead, dropout if attn_dropout is None else attn_dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, dim_ff, dropout)
        self.ff_norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, need_weights: bool = False):
        attended, weights = self.attention(x, bias, need_weights)
        x = self.attn_norm(x + self.dropout(attended))
        return self.ff_norm(x + self.feed_forward(x)), weights


class ScaledPointwiseConv(nn.Conv2d):
    """gamma * conv1x1(x) with gamma folded into the kernel: no extra pass over the (B, heads, L, L) output."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, gamma * self.weight, gamma * self.bias)


class KmerConv(nn.Conv1d):
    """Nucleotides (B, L, d) -> k-mers (B, L - k + 1, d): a Conv1d (same weights) computed as one matrix
    product over the k stacked neighbours, with no transposes to and from (B, d, L). The neighbours are
    stacked whole (index i * d + c), so torch.compile copies them in contiguous rows of d channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kmers = x.shape[1] - self.kernel_size[0] + 1
        windows = torch.cat([x[:, i:i + kmers] for i in range(self.kernel_size[0])], dim=-1)
        return F.linear(windows, self.weight.permute(0, 2, 1).reshape(self.out_channels, -1), self.bias)


class KmerDeconv(nn.ConvTranspose1d):
    """k-mers (B, L', d) -> nucleotides (B, L' + k - 1, d): a ConvTranspose1d (same weights) computed as one
    matrix product to k outputs per k-mer, then a sum of k shifted copies.

    The copies are zero-padded slices added out of place: torch.compile turned in-place adds into slices
    of one buffer into nested masked expressions that its fused LayerNorm evaluated again on each pass
    (2.5x the time of the padded sum; README "Measured figures")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, kmers, _ = x.shape
        k = self.kernel_size[0]
        spread = F.linear(x, self.weight.permute(2, 1, 0).reshape(k * self.out_channels, -1))
        spread = spread.view(batch, kmers, k, self.out_channels)
        out = self.bias.to(spread.dtype)
        for i in range(k):  # k-mer t feeds nucleotides t .. t + k - 1
            out = out + F.pad(spread[:, :, i], (0, 0, i, k - 1 - i))
        return out


class NucleicTransformerLayer(nn.Module):
    """One single-layer Nucleic Transformer with k-mer size k (Fig. 3)."""

    def __init__(self, cfg: NTConfig, k: int):
        super().__init__()
        d, c = cfg.d_model, cfg.pair_channels
        self.kmer_conv = KmerConv(d, d, k)
        self.kmer_norm = nn.LayerNorm(d)
        self.pair_conv = nn.Conv2d(c, c, k)  # nucleotide pairs -> k-mer pairs
        self.pair_to_bias = ScaledPointwiseConv(c, cfg.nhead)
        self.gamma = nn.Parameter(torch.ones(1))
        self.encoder = EncoderBlock(d, cfg.nhead, cfg.dim_ff, cfg.dropout)
        self.deconv = KmerDeconv(d, d, k)
        self.pair_deconv = nn.ConvTranspose2d(c, c, k)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pair: torch.Tensor, need_weights: bool = False):
        kmers = self.kmer_norm(self.kmer_conv(x))
        kmer_pairs = F.relu(self.pair_conv(pair))
        bias = self.pair_to_bias(kmer_pairs, self.gamma)
        kmers, weights = self.encoder(kmers, bias, need_weights)
        x = self.out_norm(x + self.deconv(kmers))
        pair = pair + self.pair_deconv(kmer_pairs)
        return x, pair, weights


class NucleicTransformer(nn.Module):
    """Inputs: token ids (B, L) of sequence, structure and loop type, and pair features (B, 4, L, L).
    Output: (B, L, n_outputs)."""

    def __init__(self, cfg: NTConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.sequence_embedding = nn.Embedding(len(SEQUENCE_TOKENS) + 1, e)
        self.structure_embedding = nn.Embedding(len(STRUCTURE_TOKENS) + 1, e)
        self.loop_embedding = nn.Embedding(len(LOOP_TOKENS) + 1, e)
        self.project = nn.Linear(3 * e, cfg.d_model)
        self.pair_in = nn.Conv2d(PAIR_INPUT_CHANNELS, cfg.pair_channels, 1)
        self.layers = nn.ModuleList(NucleicTransformerLayer(cfg, k) for k in range(cfg.nlayer, 0, -1))
        self.head = nn.Linear(cfg.d_model, cfg.n_outputs)

    def encode(self, sequence, structure, loop, pair_features, need_weights: bool = False):
        x = torch.cat([self.sequence_embedding(sequence), self.structure_embedding(structure),
                       self.loop_embedding(loop)], dim=-1)
        x = self.project(x)
        pair = self.pair_in(pair_features)
        attention = []
        for layer in self.layers:
            x, pair, weights = layer(x, pair, need_weights)
            attention.append(weights)
        return x, attention

    def forward(self, sequence, structure, loop, pair_features):
        x, _ = self.encode(sequence, structure, loop, pair_features)
        return self.head(x)

    @torch.no_grad()
    def attention_maps(self, sequence, structure, loop, pair_features) -> list[torch.Tensor]:
        """Attention weights of every layer, (B, nhead, L-k+1, L-k+1) each; the last is per nucleotide."""
        _, attention = self.encode(sequence, structure, loop, pair_features, need_weights=True)
        return attention
