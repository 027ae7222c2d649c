"""The C++ attention kernel for many small heads (models/cpu_attention.py): the same outputs and
gradients as torch's attention, dropout from a seeded mask, where the model uses it, and torch's
attention where it cannot build."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nucleic.models import cpu_attention
from nucleic.models.nucleic_transformer import KmerAttention, NTConfig, NucleicTransformer, with_cpu_kernel

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler for the CPU kernel")


def qkv_and_bias(batch, heads, length, dim, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=g).to(dtype)
    bias = 2 * torch.randn(batch, heads, length, length, generator=g).to(dtype)
    if channels_last:  # the pair path's memory on a CPU: (B, L, L, H)
        bias = bias.contiguous(memory_format=torch.channels_last)
    return qkv, bias


# (16, 16): two blocks of heads on AVX2 (the kernel works in blocks that fit its vector registers);
# (20, 32): blocks of 8 or 16 heads and a last, partial block of 4, on AVX2 and AVX-512 alike
@pytest.mark.parametrize("heads,dim", [(32, 8), (16, 16), (20, 32), (8, 16), (3, 5), (1, 1)])
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


def reference_attention(qkv, bias, p, seed):
    """Attention in torch, with the kernel's dropout mask when p > 0."""
    batch, length, _, heads, dim = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    weights = ((q * dim ** -0.5) @ k.transpose(-1, -2) + bias).softmax(-1)
    if p:
        dropped = cpu_attention.dropout_mask((batch, length, length, heads), p, seed).permute(0, 3, 1, 2)
        weights = torch.where(dropped, 0.0, weights / (1 - p))
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize("heads,dim", [(32, 8), (16, 16), (20, 32), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_kernel_gives_torchs_outputs_and_gradients(heads, dim, dtype, p):
    qkv, bias = qkv_and_bias(3, heads, 23, dim, dtype, channels_last=True)
    qkv.requires_grad_()
    bias.requires_grad_()
    out = cpu_attention.biased_attention_with_grad(qkv, bias, p, seed=12345)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * upstream).sum().backward()
    qkv64, bias64 = (t.detach().double().requires_grad_() for t in (qkv, bias))
    expected = reference_attention(qkv64, bias64, p, 12345)
    (expected * upstream.double()).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # relative to the largest entry
    for got, want in ((out, expected), (qkv.grad, qkv64.grad), (bias.grad, bias64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        assert (got.detach().double() - want.detach()).abs().max() <= tolerance * want.abs().max()


def test_dropout_mask_drops_at_rate_p_and_repeats_with_its_seed():
    mask = cpu_attention.dropout_mask((4, 50, 50, 32), 0.1, seed=7)
    assert abs(mask.float().mean().item() - 0.1) < 0.005
    assert torch.equal(mask, cpu_attention.dropout_mask((4, 50, 50, 32), 0.1, seed=7))
    assert (mask != cpu_attention.dropout_mask((4, 50, 50, 32), 0.1, seed=8)).float().mean() > 0.1
    qkv, bias = qkv_and_bias(2, 16, 30, 4, torch.float32, channels_last=True)
    runs = [cpu_attention.biased_attention_with_grad(qkv, bias, 0.2, seed) for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(0)
    drawn = cpu_attention.biased_attention_with_grad(qkv, bias, 0.2)
    torch.manual_seed(0)
    assert torch.equal(drawn, cpu_attention.biased_attention_with_grad(qkv, bias, 0.2))  # seed from torch's generator


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(cpu_attention, name)
    monkeypatch.setattr(cpu_attention, name, lambda *args: calls.append(1) or original(*args))
    return calls


def test_model_attends_through_the_kernel_with_many_heads_and_a_full_bias(monkeypatch):
    """An NT with 16 heads: at inference and in training the kernel's outputs and gradients equal torch's
    attention path's; with fewer heads or a broadcast key-padding bias, torch's attention runs."""
    model = NucleicTransformer(NTConfig(nlayer=3, d_model=64, nhead=16, dim_ff=64, embed_dim=8, dropout=0.0))
    g = torch.Generator().manual_seed(3)
    inputs = dict(sequence=torch.randint(1, 5, (3, 50), generator=g), structure=torch.randint(1, 4, (3, 50), generator=g),
                  loop=torch.randint(1, 8, (3, 50), generator=g), pair_features=torch.rand(3, 4, 50, 50, generator=g))
    inference, training = count_calls(monkeypatch, "biased_attention"), count_calls(monkeypatch, "biased_attention_with_grad")
    with torch.inference_mode():
        fast = model.eval()(**inputs)
        with_cpu_kernel(model, False)
        plain = model(**inputs)
    assert (len(inference), len(training)) == (3, 0)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)

    gradients = []
    for enabled in (True, False):
        with_cpu_kernel(model, enabled)
        model.zero_grad()
        model.train()(**inputs).square().mean().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert (len(inference), len(training)) == (3, 3) and gradients[0].keys() == gradients[1].keys()
    assert "layers.0.encoder.attention.qkv.weight" in gradients[0]
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], atol=1e-6, rtol=1e-4, msg=name)

    attention = KmerAttention(64, 16, dropout=0.0).eval()
    x = torch.randn(2, 10, 64)
    padding = torch.zeros(2, 1, 1, 10).masked_fill(torch.arange(10) >= 8, float("-inf"))
    with torch.no_grad():
        attention(x, padding)
        KmerAttention(64, 8, dropout=0.0).eval()(x, torch.randn(2, 8, 10, 10))
    assert (len(inference), len(training)) == (3, 3)


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
