"""The optimizer keeps a converged model where it is: a fresh Ranger on warm-started weights (pretrained
encoder entering stage 03, phase 1 entering phase 2 of stage 05) must not undo them."""
from __future__ import annotations

import contextlib
import io

import torch
from ranger_adabelief import RangerAdaBelief

from nucleic.config import Config
from nucleic.engine import Ranger, make_optimizer


def regression_task(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=generator)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    return model, x, y


def train(model, optimizer, x, y, steps: int) -> float:
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def settings(**overrides) -> Config:
    return Config({"lr": 1e-3, "weight_decay": 0.1, "adabelief": False, **overrides})


def converged():
    model, x, y = regression_task()
    train(model, make_optimizer(model, settings(lr=1e-2)), x, y, steps=1500)
    return model, x, y


def test_a_fresh_optimizer_keeps_a_converged_model():
    model, x, y = converged()
    start = train(model, make_optimizer(model, settings()), x, y, steps=0)
    after = train(model, make_optimizer(model, settings()), x, y, steps=40)
    assert start < 0.05, "the model should have converged"
    assert after <= start * 1.05


def test_the_library_weight_decay_undoes_a_converged_model():
    """Why Ranger passes weight_decay=0 to ranger-adabelief 0.1.0: its own decoupled decay lands in the
    momentum buffer during RAdam's warm-up. If this starts to fail, the library was fixed."""
    model, x, y = converged()
    start = train(model, make_optimizer(model, settings()), x, y, steps=0)
    with contextlib.redirect_stdout(io.StringIO()):
        library = RangerAdaBelief(model.parameters(), lr=1e-3, weight_decay=0.1, use_gc=True, adabelief=False)
    assert train(model, library, x, y, steps=40) > 2 * start


def test_weight_decay_shrinks_the_weights_by_lr_times_decay():
    weight = torch.nn.Parameter(torch.full((3, 4), 2.0))
    optimizer = Ranger([weight], lr=0.5, weight_decay=0.1)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    # a zero gradient leaves only the decay: 2 * (1 - 0.5 * 0.1); the first Lookahead sync is at step 6
    torch.testing.assert_close(weight.detach(), torch.full((3, 4), 1.9))


def test_optimizer_state_round_trips_through_a_checkpoint():
    model, x, y = regression_task()
    optimizer = make_optimizer(model, settings())
    train(model, optimizer, x, y, steps=7)
    restored = make_optimizer(model, settings(weight_decay=0.0))
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["decoupled_weight_decay"] == 0.1
