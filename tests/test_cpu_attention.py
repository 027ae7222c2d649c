"""The C++ attention kernel for many small heads at inference (models/cpu_attention.py): the same
numbers as torch's attention, where the model uses it, and torch's attention where it cannot build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nucleic.models import cpu_attention
from nucleic.models.nucleic_transformer import KmerAttention, NTConfig, NucleicTransformer

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler for the CPU kernel")


def qkv_and_bias(batch, heads, length, dim, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=g).to(dtype)
    bias = 2 * torch.randn(batch, heads, length, length, generator=g).to(dtype)
    if channels_last:  # the pair path's memory on a CPU: (B, L, L, H)
        bias = bias.contiguous(memory_format=torch.channels_last)
    return qkv, bias


@pytest.mark.parametrize("heads,dim", [(32, 8), (8, 16), (3, 5), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_kernel_matches_torch_attention(heads, dim, dtype, channels_last):
    qkv, bias = qkv_and_bias(2, heads, 37, dim, dtype, channels_last)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    got = cpu_attention.biased_attention(qkv, bias)
    assert got.dtype == dtype and got.shape == (2, 37, heads, dim)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 output: 8 bits of mantissa
    torch.testing.assert_close(got.double(), expected.transpose(1, 2), atol=tolerance, rtol=tolerance)


def test_kernel_handles_a_single_position_and_large_logits():
    qkv, bias = qkv_and_bias(1, 16, 1, 4, torch.float32, True)
    torch.testing.assert_close(cpu_attention.biased_attention(qkv, bias), qkv[:, :, 2])  # one key: its value
    qkv, bias = qkv_and_bias(2, 16, 20, 4, torch.float32, True)
    bias = bias * 500  # softmax saturates: one key per row takes all the weight
    q4 = qkv.permute(2, 0, 3, 1, 4).double()
    expected = F.scaled_dot_product_attention(*q4, attn_mask=bias.double()).transpose(1, 2)
    got = cpu_attention.biased_attention(qkv, bias)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)  # logits of 1e3: float32's rounding


def test_model_attends_through_the_kernel_only_at_inference_with_many_heads():
    """An NT with 16 heads in eval: the kernel's output equals torch's attention path's; in training,
    with fewer heads, or with a broadcast key-padding bias, torch's attention runs."""
    model = NucleicTransformer(NTConfig(nlayer=3, d_model=64, nhead=16, dim_ff=64, embed_dim=8)).eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(sequence=torch.randint(1, 5, (3, 50), generator=g), structure=torch.randint(1, 4, (3, 50), generator=g),
                  loop=torch.randint(1, 8, (3, 50), generator=g), pair_features=torch.rand(3, 4, 50, 50, generator=g))
    calls = []
    original = cpu_attention.biased_attention
    try:
        cpu_attention.biased_attention = lambda *args: calls.append(1) or original(*args)
        with torch.inference_mode():
            fast = model(**inputs)
            assert len(calls) == 3
            for module in model.modules():
                if isinstance(module, KmerAttention):
                    module.cpu_kernel = False
            plain = model(**inputs)
        assert len(calls) == 3
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        attention = KmerAttention(64, 16, dropout=0.0).eval()
        x, full = torch.randn(2, 10, 64), torch.randn(2, 16, 10, 10)
        padding = torch.zeros(2, 1, 1, 10).masked_fill(torch.arange(10) >= 8, float("-inf"))
        with torch.no_grad():
            attention(x, padding)
            assert len(calls) == 3
            attention(x, full)
            assert len(calls) == 4
        attention.train()
        attention(x, full).__getitem__(0).sum().backward()  # training: torch's path, with gradients
        assert len(calls) == 4 and attention.qkv.weight.grad is not None
        few_heads = KmerAttention(64, 8, dropout=0.0).eval()
        with torch.no_grad():
            few_heads(x, torch.randn(2, 8, 10, 10))
        assert len(calls) == 4
    finally:
        cpu_attention.biased_attention = original


def test_kernel_is_built_once_into_its_cache_and_a_missing_compiler_keeps_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("NT_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_attention._library.cache_clear()
    try:
        assert cpu_attention.available()
        built = list((tmp_path / "cache").glob("biased_attention_*.so"))
        assert len(built) == 1 and not list((tmp_path / "cache").glob("tmp*"))  # no scratch left behind
        stamp = built[0].stat().st_mtime_ns
        cpu_attention._library.cache_clear()
        assert cpu_attention.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt

        monkeypatch.setenv("NT_CPU_KERNEL", "0")
        assert not cpu_attention.available()
        monkeypatch.delenv("NT_CPU_KERNEL")
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        cpu_attention._library.cache_clear()
        assert not cpu_attention.available()
        qkv, bias = qkv_and_bias(1, 16, 12, 4, torch.float32, True)
        assert not cpu_attention.supports(qkv, bias)
        attention = KmerAttention(64, 16, dropout=0.0).eval()
        with torch.no_grad():
            assert attention(torch.randn(1, 12, 64), bias)[0].shape == (1, 12, 64)
    finally:
        cpu_attention._library.cache_clear()
