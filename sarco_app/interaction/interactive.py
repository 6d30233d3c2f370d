"""Semi-automatic labelling tools: histogram back-projection and GrabCut, tissue-aware.

Both tools take a CT slice in HU as an ``(X, Y)`` array (canonical order, see
``docs/CONVENTIONS.md``), a target tissue (``'muscle'``, ``'sat'``, ``'vat'``, ``'imat'`` or its
label value), the user's input and optionally the current label map, and return the merged label
map. The user's input is any of

* ``roi``: a rectangle ``(x0, x1, y0, y1)`` in voxel indices, half-open like a Python slice and
  like MONAI Label's ``roi`` (which is ``[x0, x1, y0, y1, z0, z1]``; extra values are ignored);
* ``fg``: boolean mask of foreground scribbles (pixels that are the target tissue);
* ``bg``: boolean mask of background scribbles (pixels that are not).

Rules shared by both tools (see :func:`merge`):

* with a rectangle, the target tissue inside the rectangle is replaced by the tool's proposal;
  outside it nothing changes;
* with scribbles only, the proposal is added where the foreground scribbles touch, and existing
  target-tissue pixels nearer (inside the tissue) to a background scribble than to the proposal
  are removed;
* pixels of *other* tissues are never overwritten unless a foreground scribble covers them, and
  a background-scribbled pixel is never the target tissue.

Tissue knowledge used with a rectangle (:func:`_tissue_rules`, from the image and the current
label; the muscle wall's contours come from :func:`sarco_app.segmentation.threshold.wall_contours`): SAT is
fat outside the muscle wall; muscle is muscle-HU tissue in the wall plus what touches the
vertebra (psoas, quadratus, paraspinals) once thin contacts are cut, never skin or the spinal
canal; VAT is fat inside the ring of labelled SAT + muscle + bone; IMAT is fat in the fascial
planes between and inside labelled muscles. Candidates are restricted to the tissue's HU range
(``sarco_app.labels.MUSCLE_HU`` / ``FAT_HU``) unless a foreground scribble says otherwise.

Scribbles act on regions separated at thin contacts (geometry in :mod:`sarco_app.interaction.scribble_regions`):
a foreground scribble adds the part of the region it touches that it stands for, a background
scribble removes it — the whole region when it lies within the stroke's geodesic reach, else the
reach cut back at a neck — and a region with both kinds is split geodesically between them. That
is what separates muscle from a bowel loop of the same HU that touches it, without taking the
muscle behind the contact.

For muscle a stroke also stands for the region of its own HU (:mod:`sarco_app.interaction.strokes`): a
background stroke on an organ the label took for muscle (liver, spleen or kidney pressed
against the muscle wall, glued along a long contact that is no neck) removes the whole organ
where its HU differs from the muscle's, and a foreground stroke on missed muscle adds the
connected piece of its HU. Where HU cannot tell an organ from the muscle the geometric rule
above decides alone.

Input validation (the roi, scribbles, current label and slice of a volume) is in
:mod:`sarco_app.interaction.tool_inputs`, the geometry of scribbled regions in
:mod:`sarco_app.interaction.scribble_regions`, the file adapter in the app's scribbles task; this
module keeps the tissue rules, :func:`merge` and the two tools, which share the per-call
:class:`~sarco_app.interaction.tool_inputs.ToolInputs` and the cached ``_Anatomy``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi

from sarco_app.interaction import scribble_regions

from sarco_app.segmentation import threshold
from sarco_app.errors import SarcoError
from sarco_app.labels import FAT_HU, IMAT, MUSCLE, MUSCLE_HU, NAMES, SAT, VAT
from sarco_app.interaction.scribble_regions import OPENING_MM
from sarco_app.interaction.tool_inputs import ToolInputs, mask_or_empty, parse_roi, parse_tissue, prepare_inputs

#: HU range where each tissue's pixels may lie (published thresholds).
TISSUE_HU: dict[int, tuple[float, float]] = {MUSCLE: MUSCLE_HU, SAT: FAT_HU, VAT: FAT_HU, IMAT: FAT_HU}
#: Default back-projection bin width in HU (about a fifth of CT noise at abdominal doses).
BIN_WIDTH_HU = 4.0
#: Sigma (HU) of the Gaussian that smooths the back-projected histogram.
HIST_SMOOTH_HU = 10.0
#: Default GrabCut display window (low, high) in HU per tissue: the tissue's range with a margin,
#: so the 8-bit image GrabCut sees spends its grey levels on the contrast that matters.
GRABCUT_WINDOW: dict[int, tuple[float, float]] = {
    MUSCLE: (MUSCLE_HU[0] - 70.0, MUSCLE_HU[1] + 50.0),
    SAT: (FAT_HU[0] - 60.0, FAT_HU[1] + 70.0),
    VAT: (FAT_HU[0] - 60.0, FAT_HU[1] + 70.0),
    IMAT: (FAT_HU[0] - 60.0, FAT_HU[1] + 70.0),
}
#: Gaussian blur (sigma, mm) applied before HU tests: CT noise moves single pixels across the
#: published HU limits, and the truth is anatomy, not single-pixel HU.
DENOISE_MM = 0.0
#: Half-width (mm) of the band along HU borders that GrabCut decides.
GRABCUT_BAND_MM = 1.0
#: Bone (cortex and most marrow) closes the abdominal wall ring at the spine.
BONE_HU = 150.0
#: Skin thickness (mm): skin has muscle HU and is never muscle.
SKIN_MM = 2.0
#: Muscle-HU tissue within this distance (mm) of bone is taken as muscle (psoas, paraspinals).
BONE_CONTACT_MM = 3.0
#: Psoas search box around the vertebra: lateral reach and how far in front of it (mm).
PSOAS_REACH_MM = 60.0
PSOAS_FRONT_MM = 15.0
#: Fat gaps between muscles narrower than twice this (mm) are intermuscular (IMAT).
IMAT_GAP_MM = 2.0


# --------------------------------------------------------------------------- anatomy helpers


@dataclass
class _Anatomy:
    """Compartments of the slice estimated from HU (wall contours by ray casting)."""

    body: np.ndarray
    outside_wall: np.ndarray  # between skin and the outer border of the muscle wall
    wall: np.ndarray  # between the outer and inner border (muscle wall + back muscles)
    inside_wall: np.ndarray  # inside the inner border (abdominal cavity, psoas, spine)


_ANATOMY_CACHE: "OrderedDict[tuple, _Anatomy]" = OrderedDict()


def _anatomy(hu: np.ndarray, spacing) -> _Anatomy:
    """:func:`_compute_anatomy`, remembered for the last few slices: a user's interactions on
    one slice repeat it with the same pixels."""
    key = (hashlib.blake2b(np.ascontiguousarray(hu).tobytes(), digest_size=16).hexdigest(),
           hu.shape, tuple(spacing))
    if key in _ANATOMY_CACHE:
        _ANATOMY_CACHE.move_to_end(key)
        return _ANATOMY_CACHE[key]
    anatomy = _compute_anatomy(hu, spacing)
    _ANATOMY_CACHE[key] = anatomy
    while len(_ANATOMY_CACHE) > 8:
        _ANATOMY_CACHE.popitem(last=False)
    return anatomy


def _compute_anatomy(hu: np.ndarray, spacing) -> _Anatomy:
    body = threshold.body_mask(hu, spacing)
    empty = np.zeros(hu.shape, dtype=bool)
    if body.sum() * spacing[0] * spacing[1] < 2500:  # no abdomen (< 25 cm^2): no compartments
        return _Anatomy(body, body.copy(), empty, empty)
    _, outer_xy, inner_xy = threshold.wall_contours(hu, spacing, body=body, max_wall_mm=25)
    inside_outer = threshold.fill_polygon(outer_xy, hu.shape) & body
    inside_inner = threshold.fill_polygon(inner_xy, hu.shape) & body
    return _Anatomy(body, body & ~inside_outer, inside_outer & ~inside_inner, inside_inner)


def _tissue_rules(inp: ToolInputs, candidate: np.ndarray, anat: _Anatomy) -> np.ndarray:
    """The part of ``candidate`` the tissue's anatomy allows when the user gave a rectangle.

    SAT: fat outside the muscle wall. Muscle: muscle-HU tissue in the wall, plus regions inside
    it that touch bone (psoas, paraspinals) once thin contacts are cut. VAT: fat inside the wall
    (inside the labelled muscle/SAT ring when they exist). IMAT: fat inside the labelled muscle's
    close neighbourhood (fascial planes between muscle layers), else fat within the wall.
    """
    hu, cur, spacing = inp.hu, inp.current, inp.spacing
    bone = (hu > BONE_HU) & anat.body
    if inp.tissue == SAT:
        return candidate & anat.outside_wall
    if inp.tissue == MUSCLE:
        skin = anat.body & ~ndi.binary_erosion(anat.body, structure=threshold.ellipse_kernel(SKIN_MM, spacing))
        # The spinal canal (CSF, muscle HU) is enclosed by bone.
        canal = ndi.binary_fill_holes(ndi.binary_closing(bone, structure=threshold.ellipse_kernel(1.0, spacing))) & ~bone
        cand = candidate & ~skin & ~anat.outside_wall & ~canal
        in_wall = cand & anat.wall
        # Psoas and quadratus lie beside the vertebra: follow muscle HU from the bone, cutting
        # thin contacts, but only in a box around the vertebra (bowel lies in front of it).
        # 4-connected: a diagonal touch would join bone bits in front of the vertebra and push
        # the box into the bowel (first-rectangle muscle IoU 0.88 -> 0.75 on phantom 1000).
        spine = threshold.largest_component(bone & anat.inside_wall, connectivity=4) if (bone & anat.inside_wall).any() else bone
        if not spine.any():
            return in_wall
        xs, ys = np.nonzero(spine)
        box = np.zeros_like(cand)
        half_x = PSOAS_REACH_MM / spacing[0]
        box[max(0, int(xs.min() - half_x)):int(xs.max() + half_x) + 1,
            max(0, int(ys.min() - PSOAS_FRONT_MM / spacing[1])):int(ys.max()) + 1] = True
        near_bone = ndi.binary_dilation(spine, structure=threshold.ellipse_kernel(BONE_CONTACT_MM, spacing))
        inner = scribble_regions.reconstruct(cand & anat.inside_wall & box, near_bone, OPENING_MM, spacing)
        return in_wall | inner
    muscle_ref = cur == MUSCLE
    if not muscle_ref.any():
        muscle_ref = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]) & anat.wall
    # Fat in the muscle's close neighbourhood or enclosed by it is intermuscular.
    around = ndi.binary_closing(muscle_ref, structure=threshold.ellipse_kernel(IMAT_GAP_MM, spacing))
    holes = ndi.binary_fill_holes(muscle_ref) & ~muscle_ref
    hole_labels, count = ndi.label(holes)
    enclosed = np.zeros_like(holes)
    if count:
        sizes = np.bincount(hole_labels.ravel())[1:]
        limit = 0.02 * max(int(np.count_nonzero(anat.body)), 1)  # the cavity is no IMAT
        enclosed = np.isin(hole_labels, 1 + np.flatnonzero(sizes < limit))
    imat_zone = (around | enclosed) & ~muscle_ref
    if inp.tissue == IMAT:
        return candidate & imat_zone
    # VAT: inside the ring of labelled SAT + muscle + bone when there is one, else the contour.
    sat_ref = cur == SAT
    cavity = np.zeros_like(candidate)
    if (cur == MUSCLE).any() and sat_ref.any():
        ring = sat_ref | muscle_ref | bone | imat_zone
        # A body cut by the field of view: the image edge closes the ring.
        frame = np.zeros_like(ring)
        frame[[0, -1], :] = frame[:, [0, -1]] = True
        ring |= frame & anat.body
        canal = ndi.binary_fill_holes(ndi.binary_closing(bone, structure=threshold.ellipse_kernel(1.0, spacing))) & ~bone
        cavity = ndi.binary_fill_holes(ring) & ~ring & ~canal
    if np.count_nonzero(cavity) < 0.05 * max(int(np.count_nonzero(anat.body)), 1):
        cavity = anat.inside_wall
    return candidate & cavity & ~imat_zone


def remove_speckle(mask: np.ndarray, tissue: int, spacing) -> np.ndarray:
    """``mask`` with holes under 3 mm^2 filled and islands under 6 mm^2 (1 mm^2 for IMAT)
    dropped; components are 8-connected (:func:`sarco_app.segmentation.threshold.remove_small_components`)."""
    pixel_mm2 = spacing[0] * spacing[1]
    min_island = 1.0 if tissue == IMAT else 6.0
    mask = ~threshold.remove_small_components(~mask, max(1, int(round(3.0 / pixel_mm2))))
    return threshold.remove_small_components(mask, max(1, int(round(min_island / pixel_mm2))))


def _refine(inp: ToolInputs, proposal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the tissue rules, the connected-region rule and the scribbles to a raw proposal.

    With a rectangle, the anatomy-allowed part of the proposal (see :func:`_tissue_rules`) is
    the starting answer; without one, the current label's tissue is (``ToolInputs.editing``:
    strokes correct a stored label such as the network's proposal). Foreground scribbles add the regions of the proposal they touch (even
    where the anatomy rule said no; regions are separated at thin contacts, :func:`sarco_app.interaction.scribble_regions.contact_pieces`;
    big ones only near the stroke, :func:`sarco_app.interaction.scribble_regions.add_touched`); background scribbles remove the
    regions they mark (:func:`sarco_app.interaction.scribble_regions.remove_marked`) and, for muscle, the organs of their own HU they
    lie in (:func:`sarco_app.interaction.scribble_regions.organs_marked`; foreground strokes then also add the muscle piece of their
    HU). Returns ``(answer, organs)``: the organs go to :func:`merge` as background too.
    """
    region = _region(inp)
    candidate = remove_speckle(proposal & region, inp.tissue, inp.spacing)
    answer = np.zeros_like(candidate)
    if inp.roi is not None:
        answer |= _tissue_rules(inp, candidate, _anatomy(inp.hu, inp.spacing))
        # The rules' openings and contours shave the tissue's rim: take back candidate pixels
        # touching the answer (one pixel; a wider step would climb into touching organs).
        answer |= ndi.binary_dilation(answer, structure=np.ones((3, 3), bool)) & candidate & ~_skin_or_outside(inp)
    elif inp.editing:
        answer |= inp.current == inp.tissue
    # A stroke on an organ of its own HU glued to the muscle takes the whole organ; merge gets
    # it as background, so its geodesic split cannot hand the organ's rim back to the muscle.
    # Organs and muscle pieces are soft tissue: the HU region rules are for muscle.
    organs, organ_strokes = np.zeros_like(answer), None
    if inp.tissue == MUSCLE:
        organs, organ_strokes = scribble_regions.organs_marked(answer, inp.fg, inp.bg, inp.spacing, inp.hu)
    if inp.fg.any():
        if answer.any():
            # A removed organ is neither added back nor crossed by a foreground stroke.
            answer |= scribble_regions.add_touched(answer, candidate, inp.fg, inp.spacing, bg=inp.bg | organs,
                                   hu=inp.hu if inp.tissue == MUSCLE else None)
        else:  # scribbles only: the regions they touch are the answer
            answer |= scribble_regions.pieces_touched(scribble_regions.contact_pieces(candidate, inp.spacing), inp.fg)
    answer = scribble_regions.remove_marked(answer, inp.fg, inp.bg, inp.spacing, inp.hu,
                            organ_strokes=organ_strokes) & ~organs
    return answer | (inp.fg & region), organs


def _skin_or_outside(inp: ToolInputs) -> np.ndarray:
    """Pixels no tissue grows into: outside the body, and the skin for muscle."""
    anat = _anatomy(inp.hu, inp.spacing)
    out = ~anat.body
    if inp.tissue == MUSCLE:
        out |= anat.body & ~ndi.binary_erosion(anat.body, structure=threshold.ellipse_kernel(SKIN_MM, inp.spacing))
    return out


def _region(inp: ToolInputs) -> np.ndarray:
    region = np.zeros(inp.hu.shape, dtype=bool)
    if inp.roi is None:
        region[:] = True
    else:
        x0, x1, y0, y1 = inp.roi
        region[x0:x1, y0:y1] = True
    return region


# --------------------------------------------------------------------------- merge


def merge(current: np.ndarray | None, proposal: np.ndarray, tissue: str | int, *,
          fg: np.ndarray | None = None, bg: np.ndarray | None = None,
          roi: Sequence[int] | None = None) -> np.ndarray:
    """Merge a proposal for one tissue into the current label map (``uint8``, same shape).

    Parameters
    ----------
    current : (X, Y) int array or None
        Label map before the interaction (``None``: all background).
    proposal : (X, Y) bool array
        Pixels the tool says are ``tissue``.
    tissue : str or int
        Target tissue.
    fg, bg : (X, Y) bool arrays, optional
        Foreground / background scribbles.
    roi : (x0, x1, y0, y1), optional
        With a rectangle the target tissue inside it is replaced by the proposal; without one
        the proposal is added, and target pixels cut off by background scribbles are removed.

    Other tissues' pixels are kept unless a foreground scribble covers them; background
    scribbles are never the target tissue.
    """
    value = parse_tissue(tissue)
    proposal = np.asarray(proposal, dtype=bool)
    shape = proposal.shape
    out = np.zeros(shape, np.uint8) if current is None else np.asarray(current).astype(np.uint8).copy()
    if out.shape != shape:
        raise SarcoError(f"current label has shape {out.shape} but the proposal has shape {shape}")
    fg = mask_or_empty(fg, shape, "foreground scribbles")
    bg = mask_or_empty(bg, shape, "background scribbles")
    target = out == value
    roi = parse_roi(roi, shape)
    if roi is not None:
        region = np.zeros(shape, dtype=bool)
        region[roi[0]:roi[1], roi[2]:roi[3]] = True
        out[region & target & ~proposal] = 0
    else:
        region = np.ones(shape, dtype=bool)
        if bg.any():
            # Existing target pixels nearer (inside the tissue) to a bg scribble than to the
            # proposal or fg scribbles go; unconnected ones stay.
            kept = scribble_regions.split(target | proposal | bg, proposal | fg, bg)
            out[target & ~kept] = 0
    out[bg & (out == value)] = 0
    free = (out == 0) | (out == value) | fg
    out[proposal & region & free & ~bg] = value
    return out


# --------------------------------------------------------------------------- the tools


def _in_range(hu: np.ndarray, tissue: int) -> np.ndarray:
    lo, hi = TISSUE_HU[tissue]
    return (hu >= lo) & (hu <= hi)


def _histogram(hu: np.ndarray, mask: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Normalised (max 1) and lightly smoothed 1D HU histogram of ``hu[mask]`` (cv2.calcHist)."""
    hist = cv2.calcHist([hu], [0], mask.astype(np.uint8), [bins], [lo, hi]).ravel()
    # Smoothing by about CT noise (HIST_SMOOTH_HU) fills the gaps a small scribble sample leaves.
    sigma_bins = HIST_SMOOTH_HU / ((hi - lo) / bins)
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), sigma=sigma_bins, mode="constant")
    peak = hist.max()
    return (hist / peak).astype(np.float32) if peak > 0 else hist.astype(np.float32)


def _option_number(name: str, value: Any, kind: type) -> Any:
    """``kind(value)`` for a tool option, or a SarcoError naming the option."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SarcoError(f"{name} must be a number, got {value!r}") from None


def back_projection(hu: np.ndarray, tissue: str | int, *, roi: Sequence[int] | None = None,
                    fg: np.ndarray | None = None, bg: np.ndarray | None = None,
                    current: np.ndarray | None = None, spacing: Sequence[float] = (1.0, 1.0),
                    slice_index: int | None = None, bins: int | None = None,
                    threshold: float | None = None, denoise_mm: float | None = None) -> np.ndarray:
    """Label ``tissue`` by back-projecting the HU histogram of the user's rectangle or scribbles.

    Parameters
    ----------
    hu : (X, Y) or (X, Y, Z) float array
        CT in HU, canonical order.
    tissue : str or int
        'muscle', 'sat', 'vat', 'imat' or 1-4.
    roi : (x0, x1, y0, y1), optional
        Rectangle in voxel indices (half-open). Its pixels in the tissue's HU range give the
        histogram when there are no foreground scribbles.
    fg, bg : bool arrays like ``hu`` (or like one slice), optional
        Foreground scribbles give the histogram; background scribbles exclude (their HU
        histogram vetoes HU values far more typical of them, and their connected parts are cut).
    current : int array like ``hu``, optional
        Current label map; only the target tissue changes (see :func:`merge`).
    spacing : (sx, sy)
        Pixel size in mm (morphology sizes are in mm).
    slice_index : int, optional
        Axial slice of a 3D ``hu``; by default the slice holding the scribbles.
    bins : int, optional
        Histogram bins over the tissue's HU range (default: 4 HU wide).
    threshold : float, optional
        Back-projection level (0-1 of the histogram peak) a pixel needs (default 0.05).

    Returns
    -------
    uint8 label map shaped like ``hu`` (a 3D input gets only ``slice_index`` changed).
    """
    inp, put_back = prepare_inputs(hu, tissue, roi, fg, bg, current, spacing, slice_index)
    lo, hi = TISSUE_HU[inp.tissue]
    nbins = int(np.ceil((hi - lo) / BIN_WIDTH_HU)) if bins is None else _option_number("bins", bins, int)
    if nbins < 2 or nbins > 4096:
        raise SarcoError(f"bins must be between 2 and 4096, got {nbins}")
    level = 0.05 if threshold is None else _option_number("threshold", threshold, float)
    if not 0.0 <= level < 1.0:
        raise SarcoError(f"threshold must be in [0, 1), got {level}")
    region = _region(inp)
    hu_s = inp.smooth(DENOISE_MM if denoise_mm is None else float(denoise_mm))
    in_range = _in_range(hu_s, inp.tissue)
    # The rectangle's pixels in the tissue's range, plus the foreground scribbles.
    sample = inp.fg & in_range
    if inp.roi is not None:
        sample |= region & in_range & _anatomy(inp.hu, inp.spacing).body
    elif not sample.any() and inp.editing:  # background strokes on a stored label
        sample = (inp.current == inp.tissue) & in_range
    if not sample.any():
        raise SarcoError(f"no {NAMES[inp.tissue]} HU values under the rectangle or scribbles")
    ranges = [lo, hi + 1e-3]
    fg_hist = _histogram(hu_s, sample, ranges[0], ranges[1], nbins)
    likelihood = cv2.calcBackProject([hu_s], [0], fg_hist, ranges, scale=1)
    proposal = (likelihood >= level) & in_range
    if (inp.bg & in_range).any():
        bg_hist = _histogram(hu_s, inp.bg & in_range, ranges[0], ranges[1], nbins)
        bg_like = cv2.calcBackProject([hu_s], [0], bg_hist, ranges, scale=1)
        # Only HU values far more typical of the background are vetoed: tissues of similar HU
        # (muscle and bowel) are separated spatially instead.
        proposal &= ~(bg_like > 4.0 * likelihood + 0.05)
    mask, organs = _refine(inp, proposal)
    return put_back(merge(inp.current, mask, inp.tissue, fg=inp.fg, bg=inp.bg | organs, roi=inp.roi))


def window_to_uint8(hu: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """HU clipped to ``window`` = (low, high) and scaled to 0-255."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise SarcoError(f"window must be (low, high) with low < high, got {tuple(window)}")
    scaled = (np.clip(hu, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


def grabcut(hu: np.ndarray, tissue: str | int, *, roi: Sequence[int] | None = None,
            fg: np.ndarray | None = None, bg: np.ndarray | None = None,
            current: np.ndarray | None = None, spacing: Sequence[float] = (1.0, 1.0),
            slice_index: int | None = None, window: Sequence[float] | None = None,
            iterations: int = 5, denoise_mm: float | None = None) -> np.ndarray:
    """Label ``tissue`` with OpenCV's GrabCut started from a rectangle and/or scribbles.

    GrabCut runs on the image windowed for the tissue (``window`` in HU, default
    :data:`GRABCUT_WINDOW`) and cropped to the rectangle (without one, to the body).
    Its initial mask is a trimap: outside the rectangle, background scribbles, other labelled
    tissues and pixels well outside the tissue's HU range are sure background; foreground
    scribbles and pixels well inside the range sure foreground; the band of
    ``GRABCUT_BAND_MM`` along the HU borders is probable foreground/background by HU, and
    GrabCut's colour models and smoothness decide it. The result goes through the same tissue rules and
    :func:`merge` as :func:`back_projection`.

    Parameters are those of :func:`back_projection`, plus ``window`` (low, high) HU and
    ``iterations`` (GrabCut iterations, 1-50). Returns the merged uint8 label map.
    """
    inp, put_back = prepare_inputs(hu, tissue, roi, fg, bg, current, spacing, slice_index)
    try:
        iterations = int(iterations)
    except (TypeError, ValueError):
        raise SarcoError(f"iterations must be an integer, got {iterations!r}") from None
    if not 1 <= iterations <= 50:
        raise SarcoError(f"iterations must be between 1 and 50, got {iterations}")
    if window is None:
        window = GRABCUT_WINDOW[inp.tissue]
    else:
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
            raise SarcoError(f"window must be [low, high] in HU, got {window!r}")
        window = tuple(_option_number("window", w, float) for w in window)
        if window[0] >= window[1]:
            raise SarcoError(f"window must be [low, high] with low < high, got {list(window)}")
    if len(window) != 2:
        raise SarcoError(f"window must be (low, high) in HU, got {window}")
    hu_s = inp.smooth(DENOISE_MM if denoise_mm is None else float(denoise_mm))
    gray = window_to_uint8(hu_s, window)

    region = _region(inp)
    in_range = _in_range(hu_s, inp.tissue)
    # A trimap: GrabCut decides the band along the tissue's HU borders (partial volume),
    # where HU alone is unsure; deep inside / outside the HU range is taken as sure.
    band = threshold.ellipse_kernel(GRABCUT_BAND_MM, inp.spacing)
    sure_in = ndi.binary_erosion(in_range, structure=band)
    sure_out = ndi.binary_erosion(~in_range, structure=band)
    other = (inp.current > 0) & (inp.current != inp.tissue)  # kept by the merge anyway
    gc_mask = np.full(inp.hu.shape, cv2.GC_BGD, dtype=np.uint8)
    gc_mask[region] = cv2.GC_PR_BGD
    gc_mask[region & in_range] = cv2.GC_PR_FGD
    gc_mask[region & sure_in] = cv2.GC_FGD
    gc_mask[region & (sure_out | other)] = cv2.GC_BGD
    gc_mask[inp.bg] = cv2.GC_BGD
    gc_mask[inp.fg] = cv2.GC_FGD

    # Crop to the working area plus a margin: GrabCut time grows with the pixel count.
    if inp.roi is not None:
        x0, x1, y0, y1 = inp.roi
    else:
        # Scribbles only: the tissue may extend anywhere in the body.
        xs, ys = np.nonzero(threshold.body_mask(inp.hu, inp.spacing) | inp.fg | inp.bg)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    margin = 8
    nx, ny = inp.hu.shape
    x0, y0 = max(0, x0 - margin), max(0, y0 - margin)
    x1, y1 = min(nx, x1 + margin), min(ny, y1 + margin)
    crop_mask = np.ascontiguousarray(gc_mask[x0:x1, y0:y1].T)  # OpenCV wants (rows=y, cols=x)
    crop_img = cv2.cvtColor(np.ascontiguousarray(gray[x0:x1, y0:y1].T), cv2.COLOR_GRAY2BGR)
    fg_like = np.isin(crop_mask, (cv2.GC_FGD, cv2.GC_PR_FGD))
    if fg_like.all() or not fg_like.any():
        # GrabCut needs samples of both classes; the HU rule alone is then the answer.
        raw = np.isin(crop_mask, (cv2.GC_FGD, cv2.GC_PR_FGD))
    else:
        bgd_model = np.zeros((1, 65), np.float64)
        fgd_model = np.zeros((1, 65), np.float64)
        cv2.grabCut(crop_img, crop_mask, None, bgd_model, fgd_model, iterations,
                    cv2.GC_INIT_WITH_MASK)
        raw = np.isin(crop_mask, (cv2.GC_FGD, cv2.GC_PR_FGD))
    proposal = np.zeros(inp.hu.shape, dtype=bool)
    proposal[x0:x1, y0:y1] = raw.T
    # GrabCut's smoothness term may pull in a rim of other HU; the tissue's range still holds.
    proposal &= in_range | inp.fg
    mask, organs = _refine(inp, proposal)
    return put_back(merge(inp.current, mask, inp.tissue, fg=inp.fg, bg=inp.bg | organs, roi=inp.roi))


#: The tools by name, as the MONAI Label tasks are called.
METHODS = {"backprojection": back_projection, "grabcut": grabcut}
