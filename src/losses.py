"""Training losses."""
from __future__ import annotations

import torch


def error_weights(errors: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha + exp(-beta * error) per measurement (paper 2.3.2): noisy labels count less."""
    return alpha + torch.exp(-beta * errors)


def error_weighted_mse(pred: torch.Tensor, target: torch.Tensor, errors: torch.Tensor,
                       alpha: float = 0.5, beta: float = 5.0) -> torch.Tensor:
    """Mean over every measurement of weight * squared error; pred, target, errors: (B, scored, 5)."""
    return (error_weights(errors, alpha, beta) * (pred - target) ** 2).mean()
