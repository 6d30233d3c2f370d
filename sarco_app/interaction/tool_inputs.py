"""Validation of the interactive tools' inputs (:mod:`sarco_app.interaction.interactive`): the
tissue, the rectangle, the scribbles, the current label and the pixel spacing (mm), and the slice
of a volume to work on. :func:`prepare_inputs` turns one call's arguments into a
:class:`ToolInputs` of 2D arrays (canonical ``(X, Y)`` order) and a function that puts the 2D
result back into the volume; bad input raises :class:`~sarco_app.errors.SarcoError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from sarco_app.errors import SarcoError
from sarco_app.labels import NAMES, tissue_value


@dataclass
class ToolInputs:
    """Validated 2D inputs of one call."""

    hu: np.ndarray  # (X, Y) float32
    tissue: int
    roi: tuple[int, int, int, int] | None
    fg: np.ndarray  # bool (X, Y)
    bg: np.ndarray  # bool (X, Y)
    current: np.ndarray  # uint8 (X, Y)
    spacing: tuple[float, float]
    denoised: np.ndarray | None = None  # (X, Y) float32, HU after a light Gaussian blur

    @property
    def editing(self) -> bool:
        """Strokes without a rectangle on a slice whose current label holds the tissue: the
        strokes edit that label (e.g. the network's proposal) instead of starting anew."""
        return self.roi is None and bool(np.any(self.current == self.tissue))

    def smooth(self, sigma_mm: float) -> np.ndarray:
        """The slice blurred by a Gaussian of ``sigma_mm`` (CT noise would otherwise push
        single pixels out of their tissue's HU range)."""
        if self.denoised is None:
            if sigma_mm <= 0:
                self.denoised = self.hu
            else:
                sx, sy = self.spacing
                # cv2 wants (rows=y, cols=x): sigmaX is along axis 1 of our (X, Y) array.
                self.denoised = cv2.GaussianBlur(self.hu, (0, 0), sigmaX=sigma_mm / sy,
                                                 sigmaY=sigma_mm / sx)
        return self.denoised


def parse_tissue(tissue: str | int) -> int:
    """Label value of ``tissue`` (name or value); ``SarcoError`` for anything else."""
    try:
        return tissue_value(tissue)
    except (ValueError, TypeError) as exc:
        raise SarcoError(str(exc)) from None


def parse_roi(roi: Sequence[float] | None, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``(x0, x1, y0, y1)`` clipped to an image of ``shape``; extra values (z0, z1) are ignored.

    Raises ``SarcoError`` for fewer than 4 values, an empty rectangle or one that lies entirely
    outside the image.
    """
    if roi is None:
        return None
    values = list(roi)
    if len(values) == 0:
        return None
    if len(values) < 4:
        raise SarcoError(f"roi needs 4 values [x0, x1, y0, y1], got {values}")
    try:
        x0, x1, y0, y1 = (int(round(float(v))) for v in values[:4])
    except (TypeError, ValueError):
        raise SarcoError(f"roi values must be numbers, got {values[:4]}") from None
    if x1 <= x0 or y1 <= y0:
        raise SarcoError(f"roi [{x0}, {x1}, {y0}, {y1}] is empty: it needs x0 < x1 and y0 < y1")
    nx, ny = shape
    if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
        raise SarcoError(f"roi [{x0}, {x1}, {y0}, {y1}] lies outside the image of size {nx}x{ny}")
    return max(x0, 0), min(x1, nx), max(y0, 0), min(y1, ny)


def mask_or_empty(mask: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``mask`` as booleans (all False when None), checked to have ``shape``; ``name`` for the error."""
    if mask is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise SarcoError(f"{name} has shape {mask.shape} but the image has shape {shape}")
    return mask.astype(bool)


def _select_slice(array: np.ndarray | None, index: int | None, ndim3: bool, name: str,
                  shape: tuple[int, ...]) -> np.ndarray | None:
    """The 2D slice of a 3D companion array (fg/bg/current) matching the image slice."""
    if array is None:
        return None
    array = np.asarray(array)
    if ndim3 and array.ndim == 3:
        if array.shape != shape:
            raise SarcoError(f"{name} has shape {array.shape} but the image has shape {shape}")
        return array[:, :, index]
    if ndim3 and array.shape != shape[:2]:
        raise SarcoError(f"{name} has shape {array.shape} but the image has shape {shape}")
    return array


def prepare_inputs(hu, tissue, roi, fg, bg, current, spacing, slice_index):
    """Validate inputs; returns (ToolInputs, a function that puts the 2D result back)."""
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3):
        raise SarcoError(f"expected a 2D slice or a 3D volume, got an array of shape {hu.shape}")
    value = parse_tissue(tissue)
    ndim3 = hu.ndim == 3
    index = None
    if ndim3:
        index = resolve_slice_index(hu.shape, slice_index, roi, fg, bg)
        hu2 = hu[:, :, index]
    else:
        if slice_index not in (None, 0):
            raise SarcoError(f"slice_index {slice_index} given but the image is 2D")
        hu2 = hu
    fg2 = _select_slice(fg, index, ndim3, "foreground scribbles", hu.shape)
    bg2 = _select_slice(bg, index, ndim3, "background scribbles", hu.shape)
    cur2 = _select_slice(current, index, ndim3, "current label", hu.shape)
    shape2 = hu2.shape
    fg2 = mask_or_empty(fg2, shape2, "foreground scribbles")
    bg2 = mask_or_empty(bg2, shape2, "background scribbles")
    if cur2 is None:
        cur2 = np.zeros(shape2, dtype=np.uint8)
    elif cur2.shape != shape2:
        raise SarcoError(f"current label has shape {cur2.shape} but the image has shape {shape2}")
    roi2 = parse_roi(roi, shape2)
    if len(tuple(spacing)) < 2 or min(float(s) for s in tuple(spacing)[:2]) <= 0:
        raise SarcoError(f"spacing must be two positive numbers (mm), got {spacing}")
    sx, sy = (float(s) for s in tuple(spacing)[:2])
    inputs = ToolInputs(np.asarray(hu2, dtype=np.float32), value, roi2, fg2 & ~bg2, bg2,
                     np.asarray(cur2).astype(np.uint8), (sx, sy))
    if roi2 is None and not fg2.any() and not (bg2.any() and inputs.editing):
        raise SarcoError(
            "no foreground scribbles and no roi: draw a rectangle or a foreground scribble "
            f"(background scribbles alone need {NAMES[value]} in the current label to edit)"
        )

    def put_back(label2: np.ndarray) -> np.ndarray:
        if not ndim3:
            return label2
        if current is not None and np.asarray(current).ndim == 3:
            out = np.asarray(current).astype(np.uint8).copy()
        else:
            out = np.zeros(hu.shape, dtype=np.uint8)
        out[:, :, index] = label2
        return out

    return inputs, put_back


def resolve_slice_index(shape3, slice_index, roi, fg, bg) -> int:
    """The slice to work on: ``slice_index``, else the one slice holding scribbles or the roi's
    z-range, else the only slice."""
    nz = shape3[2]
    if slice_index is not None:
        try:
            index = int(slice_index)
        except (TypeError, ValueError):
            raise SarcoError(f"slice_index must be an integer, got {slice_index!r}") from None
        if not 0 <= index < nz:
            raise SarcoError(f"slice_index {index} out of range 0..{nz - 1}")
        return index
    if nz == 1:
        return 0
    candidates = set()
    for mask in (fg, bg):
        if mask is not None and np.asarray(mask).ndim == 3 and np.asarray(mask).shape == tuple(shape3):
            candidates |= set(np.flatnonzero(np.asarray(mask).any(axis=(0, 1))).tolist())
    if len(candidates) == 1:
        return candidates.pop()
    if len(candidates) > 1:
        raise SarcoError(f"scribbles lie on slices {sorted(candidates)}: give slice_index")
    if roi is not None and len(list(roi)) >= 6:
        z0, z1 = int(list(roi)[4]), int(list(roi)[5])
        if z1 - z0 == 1 and 0 <= z0 < nz:
            return z0
    raise SarcoError(f"the image has {nz} slices: give slice_index")
