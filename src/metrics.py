"""Competition metric: MCRMSE, the mean over columns of each column's RMSE over all scored positions."""
from __future__ import annotations

import numpy as np


def columnwise_rmse(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """y_*: (positions, columns). Returns the RMSE of every column."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: {y_true.shape} vs {y_pred.shape}")
    return np.sqrt(np.mean((y_true - y_pred) ** 2, axis=0))


def mcrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(columnwise_rmse(y_true, y_pred)))
