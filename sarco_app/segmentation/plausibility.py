"""Label-free plausibility measures of a body-composition label on one axial slice.

Real CT comes without tissue labels, so these measures look for the mistakes a wrong muscle
label makes, from the image and the label alone (issue #15: organs pressed against the
abdominal wall labelled muscle). They flag; they do not score. Per slice
(:func:`slice_measures`):

- **Muscle share of the body**: muscle area / body area (body: :func:`sarco_app.segmentation.threshold.body_mask`,
  holes such as bowel gas and lungs filled). At L3 muscle is typically 10-30 % of the body's
  cross-section; organs labelled muscle push it up.
- **Muscle components**: 8-connected components of the muscle label of at least
  ``min_component_cm2`` (specks below it are ignored) and the areas of the largest few.
- **Cavity muscle**: the share of muscle pixels inside the abdominal cavity, and the muscle
  components that lie inside it (at least ``inside_share`` of their area). The cavity
  (:func:`cavity_mask`) is derived from the image, not from any label: the region inside the
  inner border of the muscle wall that :func:`sarco_app.segmentation.threshold.wall_contours` finds by ray
  casting in the trunk (arms lying against it left out), minus the *spine zone*
  (:func:`spine_zone`: around and behind the vertebral body, where psoas, quadratus lumborum,
  the crura and the back muscles legitimately lie), eroded by ``margin_mm`` so that the wall's
  own border is outside. Organs (liver, spleen, bowel, kidneys away from the spine) fill it.
- **Organ-blob muscle**: the share of muscle pixels inside organ-like blobs (:func:`organ_blobs`):
  soft tissue (local mean -29..250 HU) that is locally homogeneous (HU SD over a disk of
  ``BLOB_SD_RADIUS_MM`` at most ``BLOB_SD_MAX_HU``, after light smoothing) and lies in a region
  thick enough to hold a disk of radius ``blob_radius_mm`` (a morphological opening: liver,
  spleen and kidney are thick and round, the wall muscles are bands and carry fat streaks),
  inside the wall and outside the spine zone.

Limits (see ``docs/plausibility.md``): the wall contour follows HU, so where an organ touches the
wall without a fat plane the contour's inner border sinks up to ``WALL_MM`` into the organ and
that part of the organ counts as wall, not cavity; the spine zone is a box, so a kidney or the
crura beside the spine are not cavity; at rib levels muscle medial to the ribs (costal
diaphragm, but also transversus abdominis) counts as cavity; below L4 the iliacus inside the
iliac wing does too.

All functions take an ``(X, Y)`` HU slice and label in canonical orientation (axis 0 toward
the patient's left, axis 1 toward posterior) with ``spacing = (sx, sy)`` in mm, and work on
any slice: an empty label, no body or a body too small for an abdomen give zeros, not errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.segmentation.threshold import (
    body_mask,
    ellipse_kernel,
    erosion,
    fill_polygon,
    largest_component,
    wall_contours,
)

#: Muscle components smaller than this (cm²) are specks: not counted as components.
MIN_COMPONENT_CM2 = 1.0
#: Number of largest muscle components whose areas are reported.
TOP_COMPONENTS = 3
#: A body smaller than this (cm²) holds no abdomen: no cavity and no blobs (as the threshold method).
MIN_BODY_CM2 = 25.0
#: Cap (mm) of the wall thickness when the wall contour is cast (organs touching the wall).
WALL_MM = 25.0
#: The trunk is the union of the disks of this radius (mm) that fit in the body (arms are thinner).
TRUNK_MM = 50.0
#: The cavity is eroded by this (mm) so the wall's own border is outside it.
CAVITY_MARGIN_MM = 5.0
#: A muscle component lies inside the cavity when at least this share of its area does.
INSIDE_SHARE = 0.9
#: Vertebral body (:func:`vertebral_body_centre`): mean HU above ``SOLID_BONE_HU`` over a disk
#: of ``VERTEBRAL_BODY_MM`` radius, within ``MIDLINE_MM`` of the body's left-right middle; its
#: centre lies ``VERTEBRAL_HALF_DEPTH_MM`` behind its front.
SOLID_BONE_HU = 110.0
VERTEBRAL_BODY_MM = 8.0
VERTEBRAL_HALF_DEPTH_MM = 15.0
MIDLINE_MM = 40.0
#: Spine zone (:func:`spine_zone`): radius (mm) around the vertebral body's centre, how far in
#: front of that centre it reaches, and half width (mm) of the band behind it.
SPINE_REACH_MM = 60.0
SPINE_FRONT_MM = 35.0
BACK_HALF_WIDTH_MM = 80.0
#: Organ blobs: local HU SD over a disk of this radius (mm) at most this (HU), thick enough
#: to hold a disk of ``BLOB_RADIUS_MM``.
BLOB_SD_RADIUS_MM = 4.0
BLOB_SD_MAX_HU = 20.0
#: Gaussian smoothing (mm) before the local SD: pixel noise should not decide homogeneity.
BLOB_SMOOTH_MM = 1.0
BLOB_RADIUS_MM = 10.0
#: Highest local mean HU of an organ blob (enhanced liver, spleen and kidney; not bone).
BLOB_MAX_HU = 250.0


@dataclass
class SlicePlausibility:
    """The measures of one slice; areas in cm², shares of the muscle area in 0..1 (0 when there
    is no muscle)."""

    slice_index: int
    pixel_spacing_mm: tuple[float, float]
    body_cm2: float
    muscle_cm2: float
    #: muscle area / body area (0 without a body; above 1 only for a label that covers air)
    muscle_body_share: float
    #: muscle components of at least ``min_component_cm2``, and the areas of the largest few
    muscle_components: int
    largest_components_cm2: list[float]
    cavity_cm2: float
    #: muscle pixels inside the cavity / muscle pixels
    cavity_muscle_share: float
    cavity_muscle_cm2: float
    #: muscle components (>= ``min_component_cm2``) with >= ``inside_share`` of their area in the cavity
    cavity_components: int
    cavity_components_cm2: float
    organ_blob_cm2: float
    #: muscle pixels inside organ-like blobs / muscle pixels
    organ_blob_muscle_share: float
    organ_blob_muscle_cm2: float
    spine_found: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pixel_spacing_mm"] = list(self.pixel_spacing_mm)
        return out


def _check(hu: np.ndarray, label: np.ndarray | None, spacing: Sequence[float]):
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 2:
        raise SarcoError(f"plausibility needs a 2D (X, Y) slice, got shape {hu.shape}")
    spacing = (float(spacing[0]), float(spacing[1]))
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise SarcoError(f"invalid pixel spacing {spacing}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != hu.shape:
            raise SarcoError(f"label shape {label.shape} differs from slice {hu.shape}")
    return hu, label, spacing


def _area_cm2(mask: np.ndarray, spacing: tuple[float, float]) -> float:
    return float(np.count_nonzero(mask)) * spacing[0] * spacing[1] / 100.0


def _share(part: int, whole: int) -> float:
    return float(part) / whole if whole else 0.0


def vertebral_body_centre(hu: np.ndarray, spacing: Sequence[float],
                           body: np.ndarray | None = None) -> tuple[float, float] | None:
    """Centre ``(x, y)`` in pixels of the vertebral body on an ``(X, Y)`` HU slice, or None.

    Density is the HU (clipped to -50..400) averaged over a disk of ``VERTEBRAL_BODY_MM``
    radius. Within ``MIDLINE_MM`` of the body's left-right middle and behind a line
    ``MIDLINE_MM`` in front of the body's centre, the regions denser than ``SOLID_BONE_HU`` are
    candidates; the vertebra is the largest one whose centre lies behind a line 10 mm in front of
    the body's centre (a contrast-filled aorta is smaller and lies in front; an enhanced liver
    lies in front, enhanced kidneys mostly beyond the midline band). The vertebral body's centre
    is ``VERTEBRAL_HALF_DEPTH_MM`` behind the region's front edge, at its left-right centre.
    """
    hu, _, spacing = _check(hu, None, spacing)
    if body is None:
        body = body_mask(hu, spacing)
    xs, ys = np.nonzero(body)
    if xs.size == 0:
        return None
    kernel = ellipse_kernel(VERTEBRAL_BODY_MM, spacing).astype(np.float32)
    density = cv2.filter2D(np.clip(hu, -50.0, 400.0), cv2.CV_32F, kernel / kernel.sum(),
                           borderType=cv2.BORDER_REFLECT)
    gx, gy = np.ogrid[: hu.shape[0], : hu.shape[1]]
    search = body & (np.abs(gx - xs.mean()) * spacing[0] <= MIDLINE_MM) & ((gy - ys.mean()) * spacing[1] >= -MIDLINE_MM)
    regions, count = ndi.label(search & (density > SOLID_BONE_HU))
    if count == 0:
        return None
    areas = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    centres = ndi.center_of_mass(search, regions, range(1, count + 1))
    behind = [(areas[k], k + 1) for k, c in enumerate(centres) if (c[1] - ys.mean()) * spacing[1] >= -10.0]
    if not behind:
        return None
    rx, ry = np.nonzero(regions == max(behind)[1])
    return float(rx.mean()), float(ry.min() + VERTEBRAL_HALF_DEPTH_MM / spacing[1])


def spine_zone(hu: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None,
               reach_mm: float = SPINE_REACH_MM, front_mm: float = SPINE_FRONT_MM,
               back_half_width_mm: float = BACK_HALF_WIDTH_MM) -> np.ndarray:
    """Where muscle beside and behind the spine legitimately lies (psoas, quadratus lumborum,
    crura, erector spinae), as a boolean ``(X, Y)`` mask.

    Every pixel within ``reach_mm`` (mm) of the vertebral body's centre
    (:func:`vertebral_body_centre`) and not more than ``front_mm`` in front of it (the vertebral
    body, psoas and crura beside it), plus
    everything behind that centre within ``back_half_width_mm`` of it to the left and the right
    (transverse processes, quadratus lumborum, back muscles), inside the body. Empty when no
    vertebra is found.
    """
    hu, _, spacing = _check(hu, None, spacing)
    if body is None:
        body = body_mask(hu, spacing)
    centre = vertebral_body_centre(hu, spacing, body)
    if centre is None:
        return np.zeros(hu.shape, dtype=bool)
    gx, gy = np.ogrid[: hu.shape[0], : hu.shape[1]]
    dx_mm, dy_mm = (gx - centre[0]) * spacing[0], (gy - centre[1]) * spacing[1]
    beside = (np.hypot(dx_mm, dy_mm) <= reach_mm) & (dy_mm >= -front_mm)
    return (beside | ((np.abs(dx_mm) <= back_half_width_mm) & (dy_mm >= 0))) & body


def disk_opening(mask: np.ndarray, radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Opening of a boolean ``(X, Y)`` mask by a Euclidean disk of ``radius_mm`` (mm): the union
    of the disks that fit in it. Two distance transforms: fast for large disks."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    centres = ndi.distance_transform_edt(mask, sampling=spacing) >= radius_mm
    if not centres.any():
        return centres
    return mask & (ndi.distance_transform_edt(~centres, sampling=spacing) <= radius_mm)


def inside_wall(hu: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None,
                zone: np.ndarray | None = None, wall_mm: float = WALL_MM) -> np.ndarray:
    """The region the muscle wall encloses, without the spine zone, from the image alone
    (boolean ``(X, Y)``): inside the inner border of the wall that
    :func:`sarco_app.segmentation.threshold.wall_contours` finds by ray casting (wall capped at ``wall_mm``),
    minus :func:`spine_zone`. The rays are cast in the trunk: the union of the disks of radius
    ``TRUNK_MM`` that fit in the body (an arm lying against the trunk is thinner; the whole
    body when none fits). Empty for a body under ``MIN_BODY_CM2``."""
    hu, _, spacing = _check(hu, None, spacing)
    if body is None:
        body = body_mask(hu, spacing)
    if _area_cm2(body, spacing) < MIN_BODY_CM2:
        return np.zeros(hu.shape, dtype=bool)
    if zone is None:
        zone = spine_zone(hu, spacing, body)
    # An arm lying against the trunk joins the body mask, and the rays would run into it: the
    # trunk is the union of the TRUNK_MM disks that fit in the body (an arm is thinner).
    trunk = largest_component(disk_opening(body, TRUNK_MM, spacing))
    if not trunk.any():
        trunk = body
    _, _, inner_xy = wall_contours(hu, spacing, body=trunk, max_wall_mm=wall_mm)
    return fill_polygon(inner_xy, hu.shape) & trunk & ~zone


def cavity_mask(hu: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None,
                zone: np.ndarray | None = None, margin_mm: float = CAVITY_MARGIN_MM,
                inside: np.ndarray | None = None) -> np.ndarray:
    """The abdominal cavity without the spine zone, from the image alone (boolean ``(X, Y)``):
    :func:`inside_wall` (or ``inside`` when given) eroded by ``margin_mm`` (mm), so the wall's
    own border is outside it."""
    if inside is None:
        inside = inside_wall(hu, spacing, body, zone)
    return erosion(inside, margin_mm, spacing) if margin_mm > 0 and inside.any() else inside


def local_mean_sd(hu: np.ndarray, spacing: Sequence[float], radius_mm: float = BLOB_SD_RADIUS_MM,
                  smooth_mm: float = BLOB_SMOOTH_MM) -> tuple[np.ndarray, np.ndarray]:
    """HU mean and standard deviation over a disk of ``radius_mm`` around each pixel (HU).

    HU are clipped to -200..300 first (air and bone read as strong edges, not as huge numbers)
    and smoothed by a Gaussian of ``smooth_mm`` (mm), so pixel noise, which differs a lot
    between scanners and slice thicknesses, does not decide; tissue texture (fat streaks in
    muscle) and borders between tissues do.
    """
    hu = np.clip(np.asarray(hu, dtype=np.float32), -200.0, 300.0)
    if smooth_mm > 0:
        hu = ndi.gaussian_filter(hu, [smooth_mm / float(s) for s in spacing[:2]])
    kernel = ellipse_kernel(radius_mm, spacing).astype(np.float32)
    kernel /= kernel.sum()
    mean = cv2.filter2D(hu, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT)
    mean_sq = cv2.filter2D(hu * hu, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT)
    return mean, np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def organ_blobs(hu: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None,
                inside: np.ndarray | None = None, sd_radius_mm: float = BLOB_SD_RADIUS_MM,
                sd_max_hu: float = BLOB_SD_MAX_HU, radius_mm: float = BLOB_RADIUS_MM) -> np.ndarray:
    """Organ-like regions: thick, HU-homogeneous soft tissue inside the wall, ``(X, Y)`` bool.

    A pixel is homogeneous soft tissue when it lies in the body, its local HU mean
    (:func:`local_mean_sd`, disk of ``sd_radius_mm``) is -29 to ``BLOB_MAX_HU`` (muscle, and
    liver, spleen and kidney with or without contrast) and its local HU SD is at most
    ``sd_max_hu``. A blob pixel is such a pixel covered by a disk of radius ``radius_mm`` (mm)
    made only of such pixels (a Euclidean morphological opening: the region is at least twice
    that thick) that lies in :func:`inside_wall` (or ``inside`` when given): organs lie inside
    the muscle wall, while a thick homogeneous wall muscle, an arm or the back muscles do not.
    Empty for a body under ``MIN_BODY_CM2``.
    """
    hu, _, spacing = _check(hu, None, spacing)
    if body is None:
        body = body_mask(hu, spacing)
    if inside is None:
        inside = inside_wall(hu, spacing, body)
    if not inside.any():
        return np.zeros(hu.shape, dtype=bool)
    mean, sd = local_mean_sd(hu, spacing, sd_radius_mm)
    homogeneous = body & (mean >= L.MUSCLE_HU[0]) & (mean <= BLOB_MAX_HU) & (sd <= sd_max_hu)
    return disk_opening(homogeneous, radius_mm, spacing) & inside


def slice_measures(hu: np.ndarray, label: np.ndarray, spacing: Sequence[float], slice_index: int = 0,
                   min_component_cm2: float = MIN_COMPONENT_CM2, top: int = TOP_COMPONENTS,
                   inside_share: float = INSIDE_SHARE, margin_mm: float = CAVITY_MARGIN_MM,
                   blob_radius_mm: float = BLOB_RADIUS_MM,
                   masks: dict[str, np.ndarray] | None = None) -> SlicePlausibility:
    """All plausibility measures of a labelled ``(X, Y)`` slice (see the module docstring).

    Parameters
    ----------
    hu : (X, Y) HU slice; label : (X, Y) label map (1 = muscle, ``sarco_app.labels``).
    spacing : pixel size (sx, sy) in mm.
    slice_index : recorded in the result.
    min_component_cm2 : muscle components below this area (cm²) are ignored as specks.
    top : how many of the largest components' areas to report.
    inside_share : a component is inside the cavity when at least this share of it is.
    margin_mm, blob_radius_mm : see :func:`cavity_mask` and :func:`organ_blobs`.
    masks : when a dict is given, the body, spine zone, cavity and organ-blob masks are stored
        in it (keys ``body``, ``spine_zone``, ``cavity``, ``organ_blobs``), e.g. for overlays.
    """
    hu, label, spacing = _check(hu, label, spacing)
    notes: list[str] = []
    body = body_mask(hu, spacing)
    muscle = label == L.MUSCLE
    n_muscle = int(np.count_nonzero(muscle))
    empty = np.zeros(hu.shape, dtype=bool)
    if _area_cm2(body, spacing) < MIN_BODY_CM2:
        notes.append(f"body under {MIN_BODY_CM2:g} cm2: no cavity or organ blobs")
        zone = cavity = blobs = empty
    else:
        zone = spine_zone(hu, spacing, body)
        if not zone.any():
            notes.append("no vertebra found: the spine zone is empty")
        inside = inside_wall(hu, spacing, body, zone)
        cavity = cavity_mask(hu, spacing, margin_mm=margin_mm, inside=inside)
        blobs = organ_blobs(hu, spacing, body, inside, radius_mm=blob_radius_mm)
    if masks is not None:
        masks.update(body=body, spine_zone=zone, cavity=cavity, organ_blobs=blobs)

    min_px = min_component_cm2 * 100.0 / (spacing[0] * spacing[1])
    count, comp, stats, _ = cv2.connectedComponentsWithStats(muscle.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA] if count > 1 else np.zeros(0, dtype=np.int64)
    kept = np.flatnonzero(areas >= min_px) + 1
    in_cavity = np.bincount(comp[cavity], minlength=count) if count > 1 else np.zeros(1, dtype=np.int64)
    inside = [k for k in kept if in_cavity[k] >= inside_share * stats[k, cv2.CC_STAT_AREA]]
    pixel_cm2 = spacing[0] * spacing[1] / 100.0
    largest = sorted((float(stats[k, cv2.CC_STAT_AREA]) * pixel_cm2 for k in kept), reverse=True)[:top]

    return SlicePlausibility(
        slice_index=int(slice_index),
        pixel_spacing_mm=spacing,
        body_cm2=round(_area_cm2(body, spacing), 2),
        muscle_cm2=round(n_muscle * pixel_cm2, 2),
        muscle_body_share=round(_share(n_muscle, int(np.count_nonzero(body))), 4),
        muscle_components=len(kept),
        largest_components_cm2=[round(a, 2) for a in largest],
        cavity_cm2=round(_area_cm2(cavity, spacing), 2),
        cavity_muscle_share=round(_share(int(np.count_nonzero(muscle & cavity)), n_muscle), 4),
        cavity_muscle_cm2=round(_area_cm2(muscle & cavity, spacing), 2),
        cavity_components=len(inside),
        cavity_components_cm2=round(sum(float(stats[k, cv2.CC_STAT_AREA]) for k in inside) * pixel_cm2, 2),
        organ_blob_cm2=round(_area_cm2(blobs, spacing), 2),
        organ_blob_muscle_share=round(_share(int(np.count_nonzero(muscle & blobs)), n_muscle), 4),
        organ_blob_muscle_cm2=round(_area_cm2(muscle & blobs, spacing), 2),
        spine_found=bool(zone.any()),
        notes=notes,
    )


def volume_measures(hu: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                    slices: Iterable[int] | None = None, **options) -> list[SlicePlausibility]:
    """:func:`slice_measures` of each chosen slice of an ``(X, Y, Z)`` volume (every slice when
    ``slices`` is None); a 2D ``(X, Y)`` image is slice 0."""
    hu = np.asarray(hu)
    label = np.asarray(label)
    if hu.shape != label.shape:
        raise SarcoError(f"label shape {label.shape} differs from image shape {hu.shape}")
    if hu.ndim == 2:
        return [slice_measures(hu, label, spacing, 0, **options)]
    if hu.ndim != 3:
        raise SarcoError(f"expected a 2D or 3D image, got shape {hu.shape}")
    chosen = range(hu.shape[2]) if slices is None else slices
    return [slice_measures(hu[:, :, k], label[:, :, k], spacing, int(k), **options) for k in chosen]
