"""Nucleic Transformer building blocks: shapes, attention, loss weighting, metric, schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nucleic.config import load_config
from nucleic.engine import flat_then_cosine, make_optimizer
from nucleic.losses import error_weighted_mse, error_weights
from nucleic.metrics import mcrmse
from nucleic.models.nucleic_transformer import (
    KmerAttention,
    KmerConv,
    KmerDeconv,
    NTConfig,
    NucleicTransformer,
    ScaledPointwiseConv,
    drop_mask,
    dropout,
    explicit_attention,
)
from nucleic.train import build_model


def random_inputs(batch: int, length: int):
    g = torch.Generator().manual_seed(length)
    return dict(sequence=torch.randint(1, 5, (batch, length), generator=g),
                structure=torch.randint(1, 4, (batch, length), generator=g),
                loop=torch.randint(1, 8, (batch, length), generator=g),
                pair_features=torch.rand(batch, 4, length, length, generator=g))


@pytest.mark.parametrize("length", [107, 130, 61])
def test_output_and_attention_shapes(length):
    cfg = NTConfig(nlayer=4, d_model=32, nhead=4, dim_ff=64, embed_dim=8, pair_channels=4)
    model = NucleicTransformer(cfg).eval()
    inputs = random_inputs(2, length)
    assert model(**inputs).shape == (2, length, 5)
    maps = model.attention_maps(**inputs)
    assert [m.shape for m in maps] == [(2, 4, length - k + 1, length - k + 1) for k in (4, 3, 2, 1)]
    assert torch.allclose(maps[-1].sum(dim=-1), torch.ones(2, 4, length), atol=1e-5)


def test_sdpa_path_matches_explicit_attention():
    model = NucleicTransformer(NTConfig(nlayer=3, d_model=32, nhead=4, dim_ff=64, embed_dim=8)).eval()
    inputs = random_inputs(2, 40)
    fast = model(**inputs)
    hidden, _ = model.encode(**inputs, need_weights=True)
    assert torch.allclose(fast, model.head(hidden), atol=1e-5)


@pytest.mark.parametrize("shape", [(4_000_003,), (1000, 997, 3)])
def test_drop_mask_drops_at_rate_p_from_packed_bits(shape):
    torch.manual_seed(0)
    mask = drop_mask(shape, 0.1, torch.device("cpu"))
    n = math.prod(shape)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.1) < 5 * math.sqrt(0.09 / n)
    for axis in range(4):  # the 4 int16 lanes of each 64-bit draw are each uniform
        lane = mask.flatten()[axis:n - n % 4:4].float().mean().item()
        assert abs(lane - 0.1) < 5 * math.sqrt(0.09 * 4 / n)
    torch.manual_seed(0)
    assert torch.equal(drop_mask(shape, 0.1, torch.device("cpu")), mask)  # torch's generator decides


def test_dropout_is_inverted_dropout_with_its_mask():
    x = torch.rand(64, 300, requires_grad=True)
    torch.manual_seed(3)
    dropped = dropout(x, 0.25, training=True)
    torch.manual_seed(3)
    mask = drop_mask(x.shape, 0.25, x.device)
    assert torch.allclose(dropped, torch.where(mask, 0.0, x / 0.75)) and torch.equal(dropped == 0, mask)
    dropped.sum().backward()
    assert torch.allclose(x.grad, (~mask).float() / 0.75)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0, training=True) is x
    big = dropout(torch.ones(2_000_000), 0.1, training=True)
    assert abs(big.mean().item() - 1.0) < 0.003  # expectation kept


@pytest.mark.parametrize("bias_kind", ["full", "key padding", None])
def test_explicit_attention_matches_sdpa_without_dropout(bias_kind):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 8, generator=g, requires_grad=True) for _ in range(3))
    with_bias = bias_kind is not None
    bias = torch.randn(2, 4, 33, 33, generator=g, requires_grad=True) if bias_kind == "full" else None
    if bias_kind == "key padding":  # the classifiers' (B, 1, 1, L) mask: the last 5 keys of row 1 are padding
        bias = torch.zeros(2, 1, 1, 33).index_fill_(3, torch.arange(28, 33), float("-inf"))
        bias[0] = 0.0
        bias.requires_grad_(False)
        with_bias = False  # no gradient to compare for a constant mask
    ours, weights = explicit_attention(q, k, v, bias, 0.0)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 33), atol=1e-5)
    leaves = [q, k, v] + ([bias] if with_bias else [])
    ours_grad = torch.autograd.grad(ours.pow(2).sum(), leaves)
    theirs_grad = torch.autograd.grad(theirs.pow(2).sum(), leaves)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours_grad, theirs_grad))


def test_attention_dropout_drops_weights_and_rescales():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) for _ in range(3))
    bias = torch.randn(2, 4, 20, 20, generator=g)
    torch.manual_seed(5)
    context, weights = explicit_attention(q, k, v, bias, 0.2)
    torch.manual_seed(5)
    mask = drop_mask((8, 20, 20), 0.2, q.device).view(2, 4, 20, 20)
    assert torch.allclose(context, torch.where(mask, 0.0, weights) @ v / 0.8, atol=1e-5)
    attention = KmerAttention(32, 4, dropout=0.2)
    x = torch.randn(2, 20, 32, generator=g)
    torch.manual_seed(0)
    first, _ = attention.train()(x, bias)
    second, _ = attention(x, bias)
    assert not torch.allclose(first, second)  # a fresh mask per call
    assert torch.allclose(attention.eval()(x, bias)[0], attention(x, bias)[0])  # eval: no dropout


def test_pair_bias_conv_folds_gamma_into_its_kernel():
    conv = ScaledPointwiseConv(4, 6)
    gamma = torch.tensor([0.7], requires_grad=True)
    x = torch.randn(2, 4, 9, 9)
    folded = conv(x, gamma)
    assert torch.allclose(folded, gamma * F.conv2d(x, conv.weight, conv.bias), atol=1e-6)
    (grad,) = torch.autograd.grad(folded.sum(), gamma)
    assert torch.allclose(grad, F.conv2d(x, conv.weight, conv.bias).sum().reshape(1), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_kmer_matrix_products_equal_the_convolutions_they_replace(k):
    """KmerConv / KmerDeconv keep Conv1d / ConvTranspose1d's weights and give their outputs and gradients
    on (B, L, d) inputs, without the transposes to (B, d, L)."""
    torch.manual_seed(k)
    conv, deconv = KmerConv(6, 5, k), KmerDeconv(5, 6, k)
    x = torch.randn(3, 11, 6, requires_grad=True)
    reference = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias).transpose(1, 2)
    kmers = conv(x)
    assert kmers.shape == (3, 11 - k + 1, 5) and torch.allclose(kmers, reference, atol=1e-5)
    back = deconv(kmers)
    expected = F.conv_transpose1d(reference.transpose(1, 2), deconv.weight, deconv.bias).transpose(1, 2)
    assert back.shape == (3, 11, 6) and torch.allclose(back, expected, atol=1e-5)
    grads = torch.autograd.grad(back.square().sum(), (x, conv.weight, deconv.weight))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, deconv.weight))
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(grads, expected_grads))
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.weight.shape == (5, 6, k)


def test_pair_bias_changes_the_output():
    """The BPP/distance channels reach the attention logits (gamma * conv2d(M))."""
    model = NucleicTransformer(NTConfig(nlayer=2, d_model=32, nhead=4, dim_ff=64, embed_dim=8)).eval()
    inputs = random_inputs(1, 30)
    other = dict(inputs, pair_features=torch.zeros_like(inputs["pair_features"]))
    assert not torch.allclose(model(**inputs), model(**other), atol=1e-4)


def test_paper_preset_builds_the_paper_model():
    cfg = load_config("paper")
    model = build_model(cfg.model)
    assert [layer.kmer_conv.kernel_size[0] for layer in model.layers] == [5, 4, 3, 2, 1]
    assert model.cfg.d_model == 256 and model.cfg.nhead == 32 and model.cfg.dim_ff == 1024
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 75 and cfg.train.folds == 10
    assert cfg.train.bf16 == "auto" and cfg.train.channels_last == "auto"  # the fast variant where it is fast
    assert cfg.train.compile_inference and not load_config("cpu").train.compile_inference


def test_error_weights_hand_computed():
    errors = torch.tensor([[[0.0, 0.2], [1.0, 0.1]]])
    pred = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.5, 1.0]]])
    # weights: 0.5 + exp(-5 * e) = 1.5, 0.5 + e^-1, 0.5 + e^-5, 0.5 + e^-0.5
    w = [1.5, 0.5 + math.exp(-1), 0.5 + math.exp(-5), 0.5 + math.exp(-0.5)]
    sq = [1.0, 4.0, 0.25, 4.0]
    assert error_weights(errors, 0.5, 5.0).flatten().tolist() == pytest.approx(w)
    expected = sum(a * b for a, b in zip(w, sq)) / 4
    assert error_weighted_mse(pred, target, errors, 0.5, 5.0).item() == pytest.approx(expected, rel=1e-6)


def test_mcrmse_hand_computed():
    truth = np.array([[0.0, 1.0], [0.0, 1.0]])
    pred = np.array([[3.0, 1.0], [-3.0, 2.0]])
    assert mcrmse(truth, pred) == pytest.approx((3.0 + math.sqrt(0.5)) / 2)


def test_flat_then_cosine_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = load_config("smoke").train
    optimizer = make_optimizer(model, cfg)
    scheduler = flat_then_cosine(optimizer, total_steps=100, flat_fraction=0.75)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == lrs[74] == pytest.approx(1e-3)
    assert lrs[75] == pytest.approx(1e-3) and lrs[87] == pytest.approx(0.5e-3, rel=0.1)
    assert lrs[99] < 1e-5 and all(a >= b for a, b in zip(lrs[75:], lrs[76:]))


def test_column_weights_scale_each_target_column():
    pred, target = torch.zeros(2, 3, 5), torch.ones(2, 3, 5)
    target[..., 2] = 3.0
    errors = torch.zeros(2, 3, 5)  # weight alpha + 1 = 1.5 everywhere
    assert error_weighted_mse(pred, target, errors).item() == pytest.approx(1.5 * (4 + 9) / 5)
    only_third = error_weighted_mse(pred, target, errors, column_weights=[0, 0, 1, 0, 0]).item()
    assert only_third == pytest.approx(1.5 * 9 / 5)
    halved = error_weighted_mse(pred, target, errors, column_weights=[1, 1, 0.5, 1, 1]).item()
    assert halved == pytest.approx(1.5 * (4 + 4.5) / 5)
