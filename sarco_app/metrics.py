"""Overlap between label maps: Dice and IoU, per label and pooled over many maps.

The one answer for empty masks, everywhere in the library, its scripts and tests: when neither
map holds the label (or labels) compared, Dice and IoU are ``None`` -- undefined, there is
nothing to agree or disagree on -- never 0 or 1. Callers that average skip the ``None`` values;
a caller that needs a number (a CSV cell, a plot) says what it puts in its place.

Label maps are integer arrays of any shape (``sarco_app.labels``: 0 background, 1 muscle,
2 SAT, 3 VAT, 4 IMAT); comparisons are class-aware: a pixel agrees only when both maps give it
the same value. *Pooled* means pixel counts summed (over labels, or over many images) before
the ratio, so large images weigh more than small ones.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from sarco_app import labels as L
from sarco_app.errors import SarcoError


def overlap_counts(pred: np.ndarray, truth: np.ndarray, values: Iterable[int]) -> dict[str, int]:
    """Pixel counts ``intersection``, ``union``, ``pred``, ``truth`` pooled over the label
    ``values`` (class-aware). ``SarcoError`` when the maps' shapes differ."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise SarcoError(f"prediction shape {pred.shape} differs from reference shape {truth.shape}")
    inter = union = n_pred = n_truth = 0
    for value in values:
        p, t = pred == value, truth == value
        inter += int(np.count_nonzero(p & t))
        union += int(np.count_nonzero(p | t))
        n_pred += int(np.count_nonzero(p))
        n_truth += int(np.count_nonzero(t))
    return {"intersection": inter, "union": union, "pred": n_pred, "truth": n_truth}


def iou_dice(counts: dict[str, int]) -> tuple[float | None, float | None]:
    """IoU and Dice from :func:`overlap_counts`; ``(None, None)`` when both maps are empty."""
    if counts["union"] == 0:
        return None, None
    return counts["intersection"] / counts["union"], 2 * counts["intersection"] / (counts["pred"] + counts["truth"])


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """Intersection over union of two boolean masks (``None`` when both are empty)."""
    return iou_dice(overlap_counts(np.asarray(a, bool), np.asarray(b, bool), (True,)))[0]


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks (``None`` when both are empty)."""
    return iou_dice(overlap_counts(np.asarray(a, bool), np.asarray(b, bool), (True,)))[1]


def dice_per_tissue(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Dice of each tissue (``{'muscle': ..., 'sat': ..., 'vat': ..., 'imat': ...}``) between
    two label maps; ``None`` for a tissue absent from both."""
    return {name: iou_dice(overlap_counts(pred, truth, (value,)))[1] for value, name in L.NAMES.items()}


class PooledOverlap:
    """Pixel counts per tissue summed over many (prediction, truth) pairs: pooled Dice/IoU.

    >>> pooled = PooledOverlap()
    >>> for pred, truth in pairs:          # doctest: +SKIP
    ...     pooled.add(pred, truth)
    >>> pooled.dice()["muscle"]            # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.counts = {value: {"intersection": 0, "union": 0, "pred": 0, "truth": 0} for value in L.NAMES}

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one pair of label maps (numpy arrays, or CPU/GPU torch tensors)."""
        pred, truth = _as_numpy(pred), _as_numpy(truth)
        for value, total in self.counts.items():
            for key, count in overlap_counts(pred, truth, (value,)).items():
                total[key] += count

    def dice(self) -> dict[str, float | None]:
        """Pooled Dice per tissue name (``None`` for a tissue absent from every pair)."""
        return {L.NAMES[value]: iou_dice(counts)[1] for value, counts in self.counts.items()}

    def iou(self) -> dict[str, float | None]:
        """Pooled IoU per tissue name (``None`` for a tissue absent from every pair)."""
        return {L.NAMES[value]: iou_dice(counts)[0] for value, counts in self.counts.items()}


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, possibly on the GPU
        return array.detach().cpu().numpy()
    return np.asarray(array)
