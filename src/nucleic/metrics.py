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


def binary_classification_metrics(y_true, y_prob, threshold: float = 0.5) -> dict:
    """Accuracy, MCC, sensitivity, specificity, F1, AUC-ROC and PR-AUC (scikit-learn's definitions)."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        f1_score,
        matthews_corrcoef,
        roc_auc_score,
    )

    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    y_pred = (y_prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # one label in truth and prediction (a homology model's few scored rows): 0 by definition, unwarned
        "mcc": float(matthews_corrcoef(y_true, y_pred)) if len(np.unique(np.r_[y_true, y_pred])) == 2 else 0.0,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "auc": float(roc_auc_score(y_true, y_prob)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(y_true, y_prob)) if both_classes else float("nan"),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
