"""Classification metrics for FER, from integer predictions and targets (numpy only).

Conventions (they decide numbers people compare, so they are spelled out):

* **accuracy** = **WAR** (weighted average recall: per-class recall weighted by class support,
  which is plain accuracy) — the figure FER papers report as "accuracy".
* **UAR** (unweighted average recall) = mean of the per-class recalls over the classes *present in
  y_true*; a class with no true samples has no recall and is left out, not counted as 0.
* **per-class recall**: one entry per class; ``None`` for a class with no true samples (JSON has
  no NaN).
* **macro-F1** = mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes present in y_true
  *or* y_pred (scikit-learn's default label set), so predicting a class that never occurs
  costs a 0 in the average.
* **confusion**: rows = true class, columns = predicted class, counts.
* **95 % CI on accuracy**: percentile bootstrap over samples with ``n_boot`` resamples.
  Resampling n predictions with replacement makes the number of correct ones
  Binomial(n, accuracy), so the resampled accuracies are drawn as ``binomial(n, acc) / n`` —
  the same distribution as index resampling, in O(n_boot) memory instead of O(n_boot · n).
  ``n_boot = 0`` gives ``None`` bounds.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ArrayLike = Sequence[int] | np.ndarray


def _as_labels(values: ArrayLike, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = int(array[(array < 0) | (array >= num_classes)][0])
        raise ValueError(f"{name} holds class {bad}, outside 0..{num_classes - 1}")
    return array


def _checked(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _as_labels(y_true, "y_true", num_classes)
    p = _as_labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no predictions to score (empty y_true)")
    return t, p


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    t, p = _checked(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.shape != p.shape or t.size == 0:
        raise ValueError("accuracy needs two non-empty sequences of the same length")
    return float(np.mean(t == p))


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    """Recall per class; NaN where the class has no true samples."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def uar(confusion: np.ndarray) -> float:
    """Mean recall over the classes present in y_true."""
    recall = per_class_recall(confusion)
    return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else float("nan")


def per_class_f1(confusion: np.ndarray) -> np.ndarray:
    """F1 per class; NaN where the class is neither true nor predicted anywhere."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def macro_f1(confusion: np.ndarray) -> float:
    f1 = per_class_f1(confusion)
    return float(np.nanmean(f1)) if np.any(~np.isnan(f1)) else float("nan")


def bootstrap_accuracy_ci(correct: int, n: int, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI for accuracy = correct / n (see the module docstring)."""
    if n_boot <= 0:
        return None, None
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    rng = np.random.default_rng(seed)
    samples = rng.binomial(n, correct / n, size=n_boot) / n
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def classification_report(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int, n_boot: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """Every metric above as a JSON-serialisable dict with keys ``accuracy, uar, war, macro_f1,
    per_class_recall, confusion, accuracy_ci_low, accuracy_ci_high, n``."""
    t, p = _checked(y_true, y_pred, num_classes)
    confusion = confusion_matrix(t, p, num_classes)
    correct = int(np.trace(confusion))
    acc = correct / t.size
    low, high = bootstrap_accuracy_ci(correct, int(t.size), n_boot=n_boot, seed=seed)
    recall = per_class_recall(confusion)
    return {
        "accuracy": float(acc),
        "uar": uar(confusion),
        "war": float(acc),
        "macro_f1": macro_f1(confusion),
        "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
        "confusion": confusion.astype(int).tolist(),
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "n": int(t.size),
    }
