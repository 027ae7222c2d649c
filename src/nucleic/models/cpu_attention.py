"""Attention with a full additive bias on a CPU, through a small C++ kernel (biased_attention.cpp) for
the Nucleic Transformer's many heads of a small dimension: `biased_attention` at inference (a custom op,
so torch.compile keeps it in its graph), `biased_attention_with_grad` for training (autograd, with
attention dropout).

The kernel is compiled with the system's C++ compiler on first use (about a second), cached under
NT_KERNEL_CACHE (default ~/.cache/nucleic) per source and CPU, and loaded with ctypes. Without a
compiler, when compiling fails, or with NT_CPU_KERNEL=0, `available()` is False and the model keeps
torch's attention.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("biased_attention.cpp")
# -fno-trapping-math: GCC 12 leaves the exponential's clamp (a select) unvectorized without it
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17", "-fopenmp"]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
MAX_HEADS, MAX_WIDTH = 256, 4096  # the kernel's per-row buffers: heads, heads x head dimension


def _cpu_signature() -> str:
    """The CPU's instruction sets: a library built with -march=native runs only where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("NT_KERNEL_CACHE", Path.home() / ".cache" / "nucleic"))


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target` atomically: a half-written library is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    key = hashlib.sha1(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"biased_attention_{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"the CPU attention kernel did not build, keeping torch's attention: {detail}", stacklevel=2)
        return None
    sizes = [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_int64]
    for suffix in DTYPES.values():
        getattr(library, f"biased_attention_{suffix}").argtypes = [ctypes.c_void_p] * 4 + sizes
        getattr(library, f"biased_attention_backward_{suffix}").argtypes = [ctypes.c_void_p] * 5 + sizes
    return library


@torch.compiler.assume_constant_result  # torch.compile asks once while tracing: no graph break at ctypes
def available() -> bool:
    """Whether the kernel is built and loaded (compiled on the first call); NT_CPU_KERNEL=0 turns it off."""
    return os.environ.get("NT_CPU_KERNEL", "1") != "0" and _library() is not None


def supports(qkv: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel takes these inputs: qkv (B, L, 3, H, D) and a full bias (B, H, L, L), both on
    the CPU in float32 or both in bfloat16."""
    if qkv.dim() != 5 or bias is None:
        return False
    batch, length, _, heads, dim = qkv.shape
    return (qkv.device.type == "cpu" and qkv.dtype in DTYPES and bias.dtype == qkv.dtype
            and bias.shape == (batch, heads, length, length) and heads <= MAX_HEADS and heads * dim <= MAX_WIDTH
            and available())


def _forward(qkv: torch.Tensor, bias: torch.Tensor, p: float = 0.0, seed: int = 0, probs: torch.Tensor | None = None):
    batch, length, _, heads, dim = qkv.shape
    bias = bias.permute(0, 2, 3, 1).contiguous()  # (B, L, L, H): free for channels_last memory
    out = torch.empty(batch, length, heads, dim, dtype=qkv.dtype)
    kernel = getattr(_library(), f"biased_attention_{DTYPES[qkv.dtype]}")
    kernel(qkv.data_ptr(), bias.data_ptr(), out.data_ptr(), None if probs is None else probs.data_ptr(), batch,
           length, heads, dim, dim ** -0.5, p, seed, torch.get_num_threads())
    return out


@torch.library.custom_op("nucleic::biased_attention", mutates_args=())
def biased_attention(qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v of every head, from qkv (B, L, 3, H, D) (the qkv projection's
    output) and bias (B, H, L, L); returns (B, L, H, D), i.e. (B, L, H * D) as the output projection
    reads it. A bias in channels_last memory (the pair path's on a CPU) is read in place. No gradients."""
    return _forward(qkv.contiguous(), bias)


@biased_attention.register_fake
def _(qkv, bias):
    batch, length, _, heads, dim = qkv.shape
    return qkv.new_empty(batch, length, heads, dim)


class _AttentionWithGrad(torch.autograd.Function):
    """The kernel's training pair: the forward pass saves the probabilities (B, L, L, H) in float32 and
    drops weights with the seeded hash mask; the backward pass regenerates that mask."""

    @staticmethod
    def forward(ctx, qkv, bias, p: float, seed: int):
        qkv = qkv.contiguous()
        batch, length, _, heads, _ = qkv.shape
        probs = torch.empty(batch, length, length, heads, dtype=torch.float32)
        out = _forward(qkv, bias, p, seed, probs)
        ctx.save_for_backward(qkv, probs)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, probs = ctx.saved_tensors
        batch, length, _, heads, dim = qkv.shape
        grad_out = grad_out.to(qkv.dtype).contiguous()
        grad_qkv = torch.empty_like(qkv)
        grad_bias = torch.empty(batch, length, length, heads, dtype=qkv.dtype)
        kernel = getattr(_library(), f"biased_attention_backward_{DTYPES[qkv.dtype]}")
        kernel(qkv.data_ptr(), probs.data_ptr(), grad_out.data_ptr(), grad_qkv.data_ptr(), grad_bias.data_ptr(),
               batch, length, heads, dim, dim ** -0.5, ctx.p, ctx.seed, torch.get_num_threads())
        return grad_qkv, grad_bias.permute(0, 3, 1, 2), None, None


def biased_attention_with_grad(qkv: torch.Tensor, bias: torch.Tensor, p: float = 0.0,
                               seed: int | None = None) -> torch.Tensor:
    """biased_attention with gradients for qkv and bias, and dropout p on the attention weights. The mask
    comes from `seed` (default: drawn from torch's generator, so a seeded run repeats itself)."""
    if seed is None:
        seed = int(torch.randint(0, 2**32, (), dtype=torch.int64))
    return _AttentionWithGrad.apply(qkv, bias, float(p), seed)


def dropout_mask(shape: tuple[int, int, int, int], p: float, seed: int) -> torch.Tensor:
    """The kernel's dropout mask (True = dropped) over probabilities shaped (B, L, L, H), computed in torch
    (for tests and checks): mix32(index ^ seed) < p * 2^32, mix32 the kernel's 32-bit integer mixer."""
    m32 = 0xFFFFFFFF
    x = (torch.arange(math.prod(shape), dtype=torch.int64) & m32) ^ seed
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m32
    x = x ^ (x >> 16)
    return (x < min(int(p * 2**32), m32)).view(shape)
