"""Training losses."""
from __future__ import annotations

import torch


def error_weights(errors: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha + exp(-beta * error) per measurement (paper 2.3.2): noisy labels count less."""
    return alpha + torch.exp(-beta * errors)


def error_weighted_mse(pred: torch.Tensor, target: torch.Tensor, errors: torch.Tensor,
                       alpha: float = 0.5, beta: float = 5.0, column_weights=None) -> torch.Tensor:
    """Mean over every measurement of weight * squared error; pred, target, errors: (B, scored, 5).
    column_weights: optional weight per target column (e.g. more on the 3 scored ones)."""
    weights = error_weights(errors, alpha, beta)
    if column_weights is not None:
        weights = weights * torch.as_tensor(column_weights, dtype=weights.dtype, device=weights.device)
    return (weights * (pred - target) ** 2).mean()
