"""Nucleic Transformer building blocks: shapes, attention, loss weighting, metric, schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nucleic.config import load_config
from nucleic.engine import flat_then_cosine, make_optimizer
from nucleic.losses import error_weighted_mse, error_weights
from nucleic.metrics import mcrmse
from nucleic.models.nucleic_transformer import NTConfig, NucleicTransformer
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
