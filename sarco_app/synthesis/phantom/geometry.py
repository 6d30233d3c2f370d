"""The pixel grid of a phantom slice and small random-shape helpers (patient mm -> pixels).

Nothing here knows anatomy: :class:`Canvas` rasterises polygons and lines given in patient
millimetres, and the helpers draw random blobs, smooth fields and profiles from a generator.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi


class Canvas:
    """Pixel grid of the slice and the rigid map between patient mm and pixels.

    Picture arrays are indexed ``[row, col]``: rows run toward posterior (scanner Y), columns
    toward the patient's left (scanner X). Patient coordinates ``(u, v)`` are scanner
    coordinates rotated by ``angle`` about, and shifted by, the body centre ``shift``.
    """

    def __init__(self, size: int, spacing: tuple[float, float], angle: float, shift: tuple[float, float]):
        self.size = size
        self.sx, self.sy = spacing
        self.angle = angle
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.shift = shift
        self.centre = (size - 1) / 2.0
        x = ((np.arange(size) - self.centre) * self.sx).astype(np.float32)
        y = ((np.arange(size) - self.centre) * self.sy).astype(np.float32)
        self.X, self.Y = np.meshgrid(x, y)  # scanner mm, [row, col]
        dx, dy = self.X - shift[0], self.Y - shift[1]
        self.U = self.cos * dx + self.sin * dy
        self.V = -self.sin * dx + self.cos * dy
        self.pixel_mm2 = self.sx * self.sy

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) patient (u, v) mm -> (N, 2) pixel (col, row) floats."""
        u, v = pts[:, 0], pts[:, 1]
        x = self.cos * u - self.sin * v + self.shift[0]
        y = self.sin * u + self.cos * v + self.shift[1]
        return np.stack([x / self.sx + self.centre, y / self.sy + self.centre], axis=1)

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        px = np.clip(self.to_pixels(np.asarray(pts, dtype=float)), -4 * self.size, 5 * self.size)
        return np.round(px * 16).astype(np.int32)  # cv2 sub-pixel vertices (shift=4)

    def poly(self, pts: np.ndarray) -> np.ndarray:
        """Boolean mask of the filled polygon ``pts`` (patient mm)."""
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(mask, [self._fixed(pts)], 1, lineType=cv2.LINE_8, shift=4)
        return mask.view(bool)

    def line(self, pts: np.ndarray, width_mm: float, closed: bool = False) -> np.ndarray:
        """Boolean mask of a polyline of about ``width_mm`` (at least one pixel)."""
        mask = np.zeros((self.size, self.size), np.uint8)
        thickness = max(1, int(round(width_mm / min(self.sx, self.sy))))
        cv2.polylines(mask, [self._fixed(pts)], closed, 1, thickness=thickness,
                      lineType=cv2.LINE_8, shift=4)
        return mask.view(bool)

    def distance_inside(self, mask: np.ndarray) -> np.ndarray:
        """Euclidean distance (mm) of each pixel of ``mask`` to the nearest pixel outside."""
        if abs(self.sx - self.sy) < 1e-6:
            return cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * self.sx
        return ndi.distance_transform_edt(mask, sampling=(self.sy, self.sx)).astype(np.float32)

    def nearest_outside(self, mask: np.ndarray) -> np.ndarray:
        """Flat index of the (approximately) nearest pixel outside ``mask`` for every pixel."""
        src = mask.view(np.uint8)
        if abs(self.sx - self.sy) < 1e-6:
            _, lab = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
            # With DIST_LABEL_PIXEL the zero pixels are labelled 1, 2, ... in row-major order.
            zeros = np.flatnonzero(src.ravel() == 0)
            if zeros.size == 0:
                return np.arange(src.size).reshape(src.shape)
            return zeros[np.clip(lab - 1, 0, zeros.size - 1)]
        _, (iy, ix) = ndi.distance_transform_edt(mask, sampling=(self.sy, self.sx), return_indices=True)
        return iy * self.size + ix


def blob(rng: np.random.Generator, centre, ra: float, rb: float, angle: float = 0.0,
          wobble: float = 0.06, n: int = 72, modes: int = 5) -> np.ndarray:
    """Closed polygon (n, 2) mm: an ellipse with half axes ``ra``, ``rb`` rotated by ``angle``
    (rad, from +u toward +v) whose radius is perturbed by a few random Fourier modes."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, modes + 2):
        r += wobble * rng.normal() / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    u, v = ra * np.cos(t) * r, rb * np.sin(t) * r
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * u - s * v + centre[0], s * u + c * v + centre[1]], axis=1)


def smooth_field(rng: np.random.Generator, size: int, corr_px: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length about ``corr_px``."""
    m = int(np.clip(round(size / max(corr_px, 1.0)), 3, size))
    low = rng.standard_normal((m, m)).astype(np.float32)
    field_ = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def profile(rng: np.random.Generator, x: np.ndarray, amp: float, kmax: int = 5, period: float = 2 * np.pi) -> np.ndarray:
    """Smooth random periodic function of ``x`` (1 + small Fourier terms, relative ``amp``)."""
    out = np.ones_like(x, dtype=float)
    for k in range(1, kmax + 1):
        out += amp * rng.normal() / k * np.cos(2 * np.pi * k * x / period + rng.uniform(0, 2 * np.pi))
    return out


def ramp(x: np.ndarray, start: float, length: float) -> np.ndarray:
    """0 before ``start``, smooth rise to 1 over ``length``."""
    t = np.clip((x - start) / max(length, 1e-3), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def half_superellipse_area(n: float) -> float:
    """Area of half a unit superellipse |x|^n + |y|^n <= 1."""
    return 2 * math.gamma(1 + 1 / n) ** 2 / math.gamma(1 + 2 / n)


def circle_mask(n: int) -> np.ndarray:
    """Pixels of an n x n grid inside the inscribed circle (the reconstruction field)."""
    r = (n - 1) / 2
    return np.hypot(np.arange(n)[:, None] - r, np.arange(n)[None, :] - r) <= r + 0.5


def block_mode(label: np.ndarray, f: int, n_classes: int) -> np.ndarray:
    """Majority value of every f x f block of a small-integer label map."""
    if f == 1:
        return label
    n = label.shape[0] // f
    blocks = label.reshape(n, f, n, f).transpose(0, 2, 1, 3).reshape(n, n, f * f)
    counts = np.stack([(blocks == k).sum(axis=2) for k in range(n_classes)], axis=2)
    return counts.argmax(axis=2).astype(np.uint8)


def smooth_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points on a quadratic-ish smooth curve through the control ``points``."""
    points = np.asarray(points, dtype=float)
    t = np.linspace(0, 1, len(points))
    tt = np.linspace(0, 1, n)
    deg = min(len(points) - 1, 2)
    cu = np.polyfit(t, points[:, 0], deg)
    cvv = np.polyfit(t, points[:, 1], deg)
    return np.stack([np.polyval(cu, tt), np.polyval(cvv, tt)], axis=1)
