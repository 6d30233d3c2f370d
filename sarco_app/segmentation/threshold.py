"""Rule-based body-composition labels: the classical HU-threshold baseline.

This is the method body-composition software used before CNNs (Mitsiopoulos 1998, Slice-O-Matic
style): tissues are told apart by HU alone and the compartments by geometry.

1. **Body mask**: the largest connected region above -500 HU after a morphological opening that
   cuts the scanner table, cables and arms' thin bridges off; holes filled.
2. **Abdominal wall** by ray casting from the body's centre: along each of 360 rays, from the
   skin inward, the first sustained run of muscle HU (-29..150) is the outer border of the muscle
   wall; the next sustained run of something else (fat, gas, bone) is its inner border. Both
   contours are median-filtered over neighbouring angles so gaps in the wall (linea alba,
   fascia) do not let SAT leak into the abdomen.
3. **Labels**: fat HU (-190..-30) outside the outer contour is SAT, between the contours IMAT,
   inside the inner contour VAT; muscle HU between the contours is muscle.

Known limits (why the U-Net exists): the psoas and other muscles inside the wall are missed
(HU cannot tell them from bowel), organs touching the wall without a fat plane are clipped
at ``max_wall_mm``, and the skin band is never labelled.

All functions take a slice as an ``(X, Y)`` HU array (axis 0 toward the patient's left, axis 1
toward posterior) with ``spacing = (sx, sy)`` in mm.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from sarco_app import labels as L

#: HU above which a pixel belongs to the patient (or the table) rather than air.
BODY_HU = -500.0


def ellipse_kernel(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Boolean disk of ``radius_mm`` for an ``(X, Y)`` grid with pixel ``spacing`` (mm).

    Returns an array of shape ``(2*rx+1, 2*ry+1)``; at least 3x3.
    """
    rx = max(1, int(round(radius_mm / float(spacing[0]))))
    ry = max(1, int(round(radius_mm / float(spacing[1]))))
    gx, gy = np.ogrid[-rx : rx + 1, -ry : ry + 1]
    return (gx / rx) ** 2 + (gy / ry) ** 2 <= 1.0


def _morph(mask: np.ndarray, kernel: np.ndarray, op: int) -> np.ndarray:
    # OpenCV treats the array's first axis as rows; the kernel is built in the same axis order.
    out = cv2.morphologyEx(mask.astype(np.uint8), op, kernel.astype(np.uint8))
    return out.astype(bool)


def opening(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Morphological opening of a boolean ``(X, Y)`` mask with a disk of ``radius_mm``."""
    return _morph(mask, ellipse_kernel(radius_mm, spacing), cv2.MORPH_OPEN)


def closing(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Morphological closing of a boolean ``(X, Y)`` mask with a disk of ``radius_mm``.

    The mask is padded first so structures at the image edge are not eroded by the border.
    """
    kernel = ellipse_kernel(radius_mm, spacing)
    px, py = kernel.shape[0], kernel.shape[1]
    padded = np.pad(mask, ((px, px), (py, py)))
    return _morph(padded, kernel, cv2.MORPH_CLOSE)[px:-px, py:-py]


def erosion(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Erosion of a boolean ``(X, Y)`` mask with a disk of ``radius_mm``."""
    kernel = ellipse_kernel(radius_mm, spacing).astype(np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


def dilation(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Dilation of a boolean ``(X, Y)`` mask with a disk of ``radius_mm``."""
    kernel = ellipse_kernel(radius_mm, spacing).astype(np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def largest_component(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The largest connected component of a boolean 2D mask (empty mask -> empty).

    Pixels are connected through edges and corners (``connectivity=8``, the library's default
    everywhere) or through edges only (``4``, for callers that must not join diagonal touches).
    """
    count, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                             connectivity=connectivity)
    if count <= 1:
        return np.zeros(mask.shape, dtype=bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return comp == best


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_pixels``."""
    if min_pixels <= 1 or not mask.any():
        return mask.astype(bool)
    count, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[comp]


def body_mask(
    hu: np.ndarray,
    spacing: tuple[float, float],
    threshold_hu: float = BODY_HU,
    cut_mm: float = 6.0,
) -> np.ndarray:
    """The patient's body on an axial slice, without table, cables or air outside.

    This is the library's one body mask (the threshold baseline, the interactive tools'
    compartments and samples, the scripts): the patient only, so a table or arm that touches
    the skin through a thin bridge is not "body".

    Parameters
    ----------
    hu : (X, Y) array of HU.
    spacing : pixel size (sx, sy) in mm.
    threshold_hu : HU above which a pixel is tissue (default -500).
    cut_mm : radius (mm) of the opening that severs thin bridges such as the table's top or
        blankets before the largest region is kept; edges are then restored from the raw mask.

    Returns
    -------
    (X, Y) boolean mask, holes (bowel gas, lungs) filled.
    """
    tissue = np.asarray(hu) > threshold_hu
    if not tissue.any():
        return np.zeros(tissue.shape, dtype=bool)
    core = largest_component(opening(tissue, cut_mm, spacing))
    if not core.any():  # everything thinner than the cut: keep the raw largest region
        core = largest_component(tissue)
    # Give back the skin detail the opening rounded off, but nothing beyond a cut radius.
    body = tissue & dilation(core, cut_mm, spacing)
    body = largest_component(ndimage.binary_fill_holes(body))
    return ndimage.binary_fill_holes(body)


def _runs_start(flags: np.ndarray, min_len: int) -> int:
    """Index of the first run of ``min_len`` consecutive True values in a 1D array, or -1."""
    if min_len <= 1:
        hits = np.flatnonzero(flags)
        return int(hits[0]) if hits.size else -1
    window = np.convolve(flags.astype(np.int32), np.ones(min_len, dtype=np.int32), mode="valid")
    hits = np.flatnonzero(window == min_len)
    return int(hits[0]) if hits.size else -1


def _circular_median(values: np.ndarray, width: int) -> np.ndarray:
    return ndimage.median_filter(values, size=width, mode="wrap")


def wall_contours(
    hu: np.ndarray,
    spacing: tuple[float, float],
    body: np.ndarray | None = None,
    n_rays: int = 360,
    step_mm: float = 0.5,
    skin_mm: float = 3.0,
    min_muscle_mm: float = 3.0,
    min_gap_mm: float = 3.0,
    max_wall_mm: float = 35.0,
    max_back_wall_mm: float = 110.0,
    smooth_deg: int = 15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outer and inner border of the abdominal muscle wall, by ray casting.

    Parameters
    ----------
    hu : (X, Y) HU slice; spacing : (sx, sy) mm.
    body : body mask (computed when ``None``).
    n_rays : number of rays from the body's centre (equal angles).
    step_mm : sampling step along a ray (mm).
    skin_mm : skin thickness skipped before looking for muscle (mm).
    min_muscle_mm : a run of muscle HU at least this long starts the wall (mm).
    min_gap_mm : a run of non-muscle HU at least this long ends the wall (mm).
    max_wall_mm / max_back_wall_mm : cap of the wall thickness in front and at the back
        (paraspinal muscles are thick), in mm, for organs that touch the wall.
    smooth_deg : width (degrees) of the circular median filter applied to both radii.

    Returns
    -------
    centre : (2,) body centre in pixel coordinates (x, y).
    outer_xy, inner_xy : (n_rays, 2) polygon vertices in pixel coordinates (x, y).
    """
    hu = np.asarray(hu, dtype=np.float32)
    sx, sy = float(spacing[0]), float(spacing[1])
    if body is None:
        body = body_mask(hu, spacing)
    xs, ys = np.nonzero(body)
    if xs.size == 0:
        raise ValueError("no body found on the slice (nothing above -500 HU)")
    centre = np.array([xs.mean(), ys.mean()])
    # Longest possible ray: from the centre to the farthest body pixel, in mm.
    r_max = float(np.sqrt(((xs - centre[0]) * sx) ** 2 + ((ys - centre[1]) * sy) ** 2).max()) + 2
    radii = np.arange(0.0, r_max, step_mm)
    angles = np.linspace(0, 2 * np.pi, n_rays, endpoint=False)
    px = centre[0] + np.cos(angles)[:, None] * radii[None, :] / sx
    py = centre[1] + np.sin(angles)[:, None] * radii[None, :] / sy
    # Light smoothing along the ray so single noisy samples do not break runs.
    hu_smooth = ndimage.uniform_filter(hu, size=(max(1, round(1.5 / sx)), max(1, round(1.5 / sy))))
    prof = ndimage.map_coordinates(hu_smooth, [px, py], order=1, mode="nearest")
    inside = ndimage.map_coordinates(body.astype(np.float32), [px, py], order=0, mode="constant")
    lo, hi = L.MUSCLE_HU
    n_skin = int(round(skin_mm / step_mm))
    n_muscle = max(1, int(round(min_muscle_mm / step_mm)))
    n_gap = max(1, int(round(min_gap_mm / step_mm)))
    outer_r = np.zeros(n_rays)
    inner_r = np.zeros(n_rays)
    for i, angle in enumerate(angles):
        in_body = np.flatnonzero(inside[i] > 0.5)
        if in_body.size == 0:
            continue
        surface = int(in_body[-1])
        # Walk inward: reverse the profile so index 0 is just under the skin.
        inward = prof[i, : max(0, surface - n_skin) + 1][::-1]
        is_muscle = (inward >= lo) & (inward <= hi)
        start = _runs_start(is_muscle, n_muscle)
        if start < 0:
            outer_r[i] = inner_r[i] = max(0, surface - n_skin) * step_mm
            continue
        rest = ~is_muscle[start:]
        stop = _runs_start(rest, n_gap)
        # Posterior rays (axis 1 points posterior, angle ~ +90 deg) cross the thick back muscles.
        back = np.sin(angle) > 0.7
        cap = int(round((max_back_wall_mm if back else max_wall_mm) / step_mm))
        stop = cap if stop < 0 else min(stop, cap)
        r_out = (surface - n_skin - start) * step_mm
        outer_r[i] = max(r_out, 0.0)
        inner_r[i] = max(r_out - stop * step_mm, 0.0)
    width = max(3, int(round(smooth_deg * n_rays / 360.0)) | 1)
    outer_r = _circular_median(outer_r, width)
    inner_r = np.minimum(_circular_median(inner_r, width), outer_r)

    def polygon(r: np.ndarray) -> np.ndarray:
        return np.stack([centre[0] + np.cos(angles) * r / sx, centre[1] + np.sin(angles) * r / sy], 1)

    return centre, polygon(outer_r), polygon(inner_r)


def fill_polygon(vertices_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(X, Y)`` mask of the inside of a polygon given in pixel coordinates (x, y)."""
    canvas = np.zeros((shape[1], shape[0]), dtype=np.uint8)  # OpenCV image: rows = y
    pts = np.round(vertices_xy * 16).astype(np.int32).reshape(-1, 1, 2)  # 4 fractional bits
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.T.astype(bool)


def threshold_segment(
    hu: np.ndarray,
    spacing: tuple[float, float],
    min_island_mm2: float = 10.0,
    **wall_options,
) -> np.ndarray:
    """Body-composition label of one axial slice by HU thresholds and wall geometry.

    Parameters
    ----------
    hu : (X, Y) HU slice (axis 0 toward patient left, axis 1 toward posterior).
    spacing : pixel size (sx, sy) in mm.
    min_island_mm2 : tissue islands smaller than this area (mm^2) are dropped.
    **wall_options : passed to :func:`wall_contours`.

    Returns
    -------
    (X, Y) uint8 label map: 0 background, 1 muscle, 2 SAT, 3 VAT, 4 IMAT (``sarco_app.labels``).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise ValueError(f"threshold_segment expects a 2D (X, Y) slice, got shape {hu.shape}")
    label = np.zeros(hu.shape, dtype=np.uint8)
    body = body_mask(hu, spacing)
    if body.sum() * spacing[0] * spacing[1] < 2500:  # < 25 cm^2: no abdomen on this slice
        return label
    _, outer_xy, inner_xy = wall_contours(hu, spacing, body=body, **wall_options)
    inside_outer = fill_polygon(outer_xy, hu.shape) & body
    inside_inner = fill_polygon(inner_xy, hu.shape) & body
    compartment = inside_outer & ~inside_inner
    fat = (hu >= L.FAT_HU[0]) & (hu <= L.FAT_HU[1]) & body
    muscle = (hu >= L.MUSCLE_HU[0]) & (hu <= L.MUSCLE_HU[1]) & body
    min_px = int(round(min_island_mm2 / (spacing[0] * spacing[1])))
    parts = {
        L.SAT: fat & ~inside_outer,
        L.VAT: fat & inside_inner,
        L.MUSCLE: muscle & compartment,
        L.IMAT: fat & compartment,
    }
    for value, mask in parts.items():
        label[remove_small_components(mask, min_px)] = value
    return label
