"""Benchmark metrics: AUC of error curves and the DKM release's "mAP" (mean accuracy)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def error_auc(errors: Sequence[float], thresholds: Sequence[float]) -> list[float]:
    """Area under the recall-vs-error curve up to each threshold, normalized to [0, 1].

    The exact integration of the DKM/SuperGlue evaluation code: errors sorted, recall ``(i+1)/n``,
    a point ``(0, 0)`` prepended, the curve cut at the threshold (holding the last recall) and
    integrated with the trapezoidal rule. Infinite/NaN errors count as failures (never recalled).
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        raise ValueError("error_auc() needs at least one error")
    errors = np.where(np.isfinite(errors), errors, np.inf)
    errors = np.sort(errors)
    recall = (np.arange(len(errors)) + 1) / len(errors)
    errors = np.r_[0.0, errors]
    recall = np.r_[0.0, recall]
    aucs = []
    for t in thresholds:
        last = np.searchsorted(errors, t)
        r = np.r_[recall[:last], recall[last - 1]]
        e = np.r_[errors[:last], t]
        aucs.append(float(np.trapezoid(r, x=e) / t))
    return aucs


def accuracy(errors: Sequence[float], threshold: float) -> float:
    """Fraction of errors strictly below ``threshold``."""
    errors = np.asarray(errors, dtype=np.float64)
    return float(np.mean(np.nan_to_num(errors, nan=np.inf) < threshold))


def mean_accuracy(errors: Sequence[float], threshold: float, grid: Sequence[float] = (5, 10, 15, 20)) -> float:
    """The release's "mAP@t": mean of the accuracies at the ``grid`` thresholds ``<= t``
    (mAP@5 = acc@5, mAP@10 = mean(acc@5, acc@10), mAP@20 = mean(acc@5, acc@10, acc@15, acc@20))."""
    used = [g for g in grid if g <= threshold]
    if not used:
        raise ValueError(f"no grid threshold <= {threshold} in {tuple(grid)}")
    return float(np.mean([accuracy(errors, g) for g in used]))
