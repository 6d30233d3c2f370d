"""Sagittal and coronal reconstructions with the chosen L3 level drawn (the "select labeling
area" step): a picture a user checks before labelling the slice.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sarco_app.inputs.ingest import CTImage
from sarco_app.spine.l3 import L3Result

#: Display window (HU): level 40, width 400 shows soft tissue, with bone white.
WINDOW = (40.0, 400.0)
L3_COLOUR = (0, 200, 255)  # BGR orange-yellow for the L3 line
LEVEL_COLOUR = (120, 220, 120)


def _window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    low = level - width / 2
    return (np.clip((values - low) / width, 0.0, 1.0) * 255).astype(np.uint8)


def _resize_physical(plane: np.ndarray, mm_per_col: float, mm_per_row: float, mm_per_px: float) -> np.ndarray:
    """Resize a (rows, cols) picture so that one output pixel is ``mm_per_px`` on both axes."""
    rows = max(int(round(plane.shape[0] * mm_per_row / mm_per_px)), 1)
    cols = max(int(round(plane.shape[1] * mm_per_col / mm_per_px)), 1)
    return cv2.resize(plane, (cols, rows), interpolation=cv2.INTER_LINEAR)


def render_l3_views(image: CTImage, result: L3Result, height_px: int = 640) -> np.ndarray:
    """Sagittal and coronal slab reconstructions side by side with the L3 level drawn.

    Parameters
    ----------
    image : CTImage
        Canonical 3D volume (HU).
    result : L3Result
        Output of :func:`sarco_app.spine.l3.locate_l3` for ``image``.
    height_px : int
        Approximate picture height; the width follows from the physical aspect ratio.

    Returns
    -------
    ndarray
        BGR uint8 picture (OpenCV order). Sagittal on the left (anterior to the left), coronal
        on the right (patient's right on the left), superior at the top; both at the same
        physical scale in x, y and z.
    """
    hu = image.hu
    if hu.ndim != 3:
        raise ValueError("views need a 3D image")
    sx, sy, dz = image.spacing
    nx, ny, nz = hu.shape
    spine = result.anchors.get("spine_voxel") or [nx / 2, ny * 0.6]
    cx, cy = int(round(spine[0])), int(round(spine[1]))
    # Slabs 8 mm thick through the spine: the mean shows bodies, discs and canal clearly.
    hx = max(int(round(4.0 / sx)), 1)
    hy = max(int(round(4.0 / sy)), 1)
    sagittal = hu[max(cx - hx, 0) : cx + hx + 1].mean(axis=0)  # (y, z)
    coronal = hu[:, max(cy - hy, 0) : cy + hy + 1].mean(axis=1)  # (x, z)
    total_z = nz * dz
    mm_per_px = max(total_z, ny * sy, nx * sx) / height_px
    sag = _resize_physical(_window(sagittal.T[::-1], *WINDOW), sy, dz, mm_per_px)
    cor = _resize_physical(_window(coronal.T[::-1], *WINDOW), sx, dz, mm_per_px)
    rows = max(sag.shape[0], cor.shape[0])
    gap = np.zeros((rows, 6), dtype=np.uint8)
    canvas = np.concatenate([_pad_rows(sag, rows), gap, _pad_rows(cor, rows)], axis=1)
    canvas = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)

    z_top = image.affine[2, 3] + (nz - 1) * image.affine[2, 2]

    def row_of(z_mm: float) -> int:
        # Row 0 is the centre of the most superior slice.
        return int(round((z_top - z_mm) / abs(image.affine[2, 2]) * dz / mm_per_px + 0.5 * dz / mm_per_px))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for name, (z_lo, z_hi) in sorted(result.levels.items()):
        if name == "L3":
            continue
        r = row_of(0.5 * (z_lo + z_hi))
        if 0 <= r < rows:
            cv2.putText(canvas, name, (4, r + 4), font, 0.45, LEVEL_COLOUR, 1, cv2.LINE_AA)
    if result.found and result.z_mm is not None:
        r = row_of(result.z_mm)
        cv2.line(canvas, (0, r), (canvas.shape[1] - 1, r), L3_COLOUR, 1, cv2.LINE_AA)
        if result.l3_z_range_mm:
            for z in result.l3_z_range_mm:
                rr = row_of(z)
                cv2.line(canvas, (0, rr), (28, rr), L3_COLOUR, 1, cv2.LINE_AA)
        label = f"L3  slice {result.slice_index}  z={result.z_mm:.1f} mm  conf {result.confidence:.2f}"
        cv2.putText(canvas, label, (34, max(r - 5, 12)), font, 0.45, L3_COLOUR, 1, cv2.LINE_AA)
    else:
        cv2.putText(canvas, "L3 not in field of view", (8, 20), font, 0.55, (80, 80, 255), 1, cv2.LINE_AA)
    return canvas


def _pad_rows(picture: np.ndarray, rows: int) -> np.ndarray:
    if picture.shape[0] == rows:
        return picture
    pad = np.zeros((rows - picture.shape[0], picture.shape[1]), dtype=picture.dtype)
    return np.concatenate([picture, pad], axis=0)


def save_l3_views(image: CTImage, result: L3Result, path: str | Path) -> Path:
    """Write :func:`render_l3_views` as a PNG (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), render_l3_views(image, result)):
        raise OSError(f"cannot write {path}")
    return path
