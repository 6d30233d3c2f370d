"""Find the axial slice through the middle of the L3 vertebral body in a 3D CT.

A classical, download-free method that counts vertebrae:

1. **Spine track.** On a ~2 mm in-plane working grid, the vertebral body column is the densest
   body-sized block of bone near the midline; its per-slice position is found with a box filter
   and smoothed along z with a running median (posterior elements and discs cannot pull it away).
2. **Body profile.** The mean HU of a small ellipse inside the vertebral body along the track,
   resampled to 1 mm in z. Bodies (cancellous bone + endplates) are bright, intervertebral discs
   are dark dips; the dips are found with :func:`scipy.signal.find_peaks` and cleaned with the
   regular spacing of vertebrae (a missed disc splits an over-long segment, a spurious dip in a
   body is dropped).
3. **Anchors.** From below, the *iliac crests*: the lowest long run of slices with iliac bone
   on both sides of the spine is the pelvis; its top (the crests, Tuffier's line) lies near the
   L4/L5 disc, so the highest disc at most 12 mm above the crests is taken as L4/L5. From
   above, the *last ribs*: bone in the posterolateral costovertebral zones marks rib-bearing
   vertebrae; the lowest of the topmost run is T12 when a rib-free vertebra follows below it.
4. **Counting.** L3 is the segment above L4 and the third below T12. When both anchors are
   seen, their agreement gives the confidence; when they disagree (transitional anatomy:
   11/13 rib pairs, lumbarised S1, sacralised L5) the pelvic count is kept and the confidence
   drops. When neither anchor can place L3 inside the covered z range, the answer is "not in
   field of view" -- never a guess. The middle of L3 is the midpoint of its two discs; when the
   scan stops inside L3 above its middle, the missing disc is put one median period higher.

Limits: the crest rule fails when the crests lie far from L4/L5 (at L5 or at L3/L4 in a
minority of patients), and both anchors share the ambiguity of transitional vertebrae.

Everything works in the canonical orientation of :mod:`sarco_app.inputs.ingest` (axis 2 toward
superior). :func:`file_slice_index` converts the answer to the voxel order of the source file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import CTImage

logger = logging.getLogger(__name__)

#: In-plane pixel size (mm) of the working grid.
WORK_PIXEL_MM = 2.0
#: HU above which a voxel counts as bone for the lateral (ilium, rib) features.
BONE_HU = 180.0

#: Box-filtered solid-bone score above which a slice contains the vertebral column.
COLUMN_SCORE = 65.0
#: Bone area (mm2, per side) that marks the iliac wings / a rib-bearing vertebra.
ILIUM_AREA_MM2 = 300.0
RIB_AREA_MM2 = 20.0

#: Shortest and longest plausible body + disc height (mm) from T10 to S1 in adults.
MIN_SEGMENT_MM = 20.0
MAX_SEGMENT_MM = 55.0

LUMBAR_NAMES = ["L5", "L4", "L3", "L2", "L1"]


@dataclass
class L3Result:
    """Answer of :func:`locate_l3`.

    ``slice_index`` is canonical (axis 2 toward superior); ``z_mm`` the world (RAS) z in mm of
    that slice centre; both are ``None`` when L3 is not found, and ``reason`` says why.
    """

    found: bool
    slice_index: int | None
    z_mm: float | None
    confidence: float
    reason: str
    l3_z_range_mm: tuple[float, float] | None = None  # world z of the L3 body's bounding discs
    levels: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> z range, mm
    anchors: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["levels"] = {k: [round(float(a), 1), round(float(b), 1)] for k, (a, b) in self.levels.items()}
        return out


# --------------------------------------------------------------------------- working grid


def _block_mean(hu: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` in-plane blocks (cropping the ragged edge)."""
    if factor <= 1:
        return hu.astype(np.float32, copy=False)
    nx, ny = (hu.shape[0] // factor) * factor, (hu.shape[1] // factor) * factor
    view = hu[:nx, :ny].reshape(nx // factor, factor, ny // factor, factor, hu.shape[2])
    return view.mean(axis=(1, 3), dtype=np.float32)


def _running_median(values: np.ndarray, size: int) -> np.ndarray:
    return ndi.median_filter(values, size=max(int(size) | 1, 1), mode="nearest")


# --------------------------------------------------------------------------- main steps


def _spine_track(work: np.ndarray, px: float, dz: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice vertebral-body centre (x, y in working pixels), its score and a body mask.

    Returns ``(x, y, score, body_present)``; ``x``/``y`` are smoothed along z.
    """
    nx, ny, nz = work.shape
    body = work > -300.0
    # Body outline centre per slice: the spine lies near the midline, behind the middle.
    counts = body.sum(axis=(0, 1)).astype(float)
    present = counts > 0.002 * nx * ny
    xi = np.arange(nx, dtype=float)[:, None]
    yi = np.arange(ny, dtype=float)[None, :]
    cx = np.where(present, (body * xi[:, :, None]).sum(axis=(0, 1)) / np.maximum(counts, 1), nx / 2)
    cy = np.where(present, (body * yi[:, :, None]).sum(axis=(0, 1)) / np.maximum(counts, 1), ny / 2)
    cx = _running_median(cx, 9)
    cy = _running_median(cy, 9)
    # Solid bone at vertebral-body scale: a grey opening (16 mm square) removes thin posterior
    # elements, ribs and iliac plates; a box filter (~26 mm in-plane, ~15 mm along z) of HU
    # clipped to -50..250 then peaks inside the vertebral bodies.
    k_open = max(int(round(16.0 / px)), 3)
    opened = ndi.grey_opening(np.clip(work, -50.0, 250.0), size=(k_open, k_open, 1))
    k_xy = max(int(round(26.0 / px)), 3)
    k_z = max(int(round(15.0 / dz)), 1)
    density = ndi.uniform_filter(opened, size=(k_xy, k_xy, k_z), mode="nearest")
    xs = np.zeros(nz)
    ys = np.zeros(nz)
    score = np.zeros(nz)
    half_x = 45.0 / px
    for k in range(nz):
        d = density[:, :, k]
        # Candidate zone: within 45 mm of the midline, not more than 30 mm anterior of the
        # body centre (keeps the pubic symphysis and anterior organs out).
        x0, x1 = int(max(cx[k] - half_x, 0)), int(min(cx[k] + half_x + 1, nx))
        y0 = int(max(cy[k] - 30.0 / px, 0))
        zone = d[x0:x1, y0:]
        if zone.size == 0:
            xs[k], ys[k] = cx[k], cy[k]
            continue
        best = float(zone.max())
        # Of the strong candidates take the most posterior one: the aorta (with contrast) lies
        # in front of the vertebral body, never behind it.
        lab, n = ndi.label(zone >= best - max(0.12 * abs(best), 10.0))
        centres = ndi.center_of_mass(np.ones_like(zone), lab, index=np.arange(1, n + 1))
        i, j = max(centres, key=lambda c: c[1])
        xs[k], ys[k], score[k] = x0 + i, y0 + j, best
    win = max(int(round(40.0 / dz)), 3)
    xs_s = _running_median(xs, win)
    ys_s = _running_median(ys, win)
    return xs_s, ys_s, score, present


def _body_profile(work: np.ndarray, xs: np.ndarray, ys: np.ndarray, px: float) -> np.ndarray:
    """Median HU in a small ellipse (12 x 8 mm semi-axes) at the track, per slice.

    The median ignores the cortical ring and noise; thin bright endplates still make bumps,
    which :func:`_find_discs` caps.
    """
    nx, ny, nz = work.shape
    rx, ry = 12.0 / px, 8.0 / px
    ii = np.arange(-int(rx) - 1, int(rx) + 2)
    jj = np.arange(-int(ry) - 1, int(ry) + 2)
    di, dj = np.meshgrid(ii, jj, indexing="ij")
    inside = (di / rx) ** 2 + (dj / ry) ** 2 <= 1.0
    di, dj = di[inside], dj[inside]
    profile = np.zeros(nz, dtype=np.float32)
    for k in range(nz):
        i = np.clip(np.round(xs[k]).astype(int) + di, 0, nx - 1)
        j = np.clip(np.round(ys[k]).astype(int) + dj, 0, ny - 1)
        profile[k] = np.median(work[i, j, k])
    return profile


def _lateral_features(work: np.ndarray, xs: np.ndarray, ys: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: rib and iliac-wing bone areas (mm2), each the minimum over the two sides.

    * Ribs: bone (> 180 HU) in the posterolateral costovertebral zones (52-110 mm from the
      spine, up to 60 mm behind the body centre). Slices where either side holds more than
      6 cm2 (an iliac wing, not a rib section) count as rib-free.
    * Ilium: bone (> 180 HU) 40-160 mm left and right of the spine, from 80 mm in front of to
      60 mm behind it: several cm2 per side from the iliac crests down to the hips.
    """
    nx, ny, nz = work.shape
    ribs = np.zeros(nz)
    ilium = np.zeros(nz)
    xi = np.arange(nx)[:, None]
    yi = np.arange(ny)[None, :]
    area = px * px
    for k in range(nz):
        dx = (xi - xs[k]) * px
        dy = (yi - ys[k]) * px
        adx = np.abs(dx)
        b = work[:, :, k] > BONE_HU
        zone = b & (adx >= 52.0) & (adx <= 110.0) & (dy >= -5.0) & (dy <= 60.0)
        left = np.count_nonzero(zone & (dx > 0)) * area
        right = np.count_nonzero(zone & (dx < 0)) * area
        ribs[k] = min(left, right) if max(left, right) < 600.0 else 0.0
        wide = b & (adx >= 40.0) & (adx <= 160.0) & (dy >= -80.0) & (dy <= 60.0)
        ilium[k] = min(np.count_nonzero(wide & (dx > 0)), np.count_nonzero(wide & (dx < 0))) * area
    return ribs, ilium


def _find_discs(profile_mm: np.ndarray, slice_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Disc positions (indices on the 1 mm grid) as prominent dips of the body profile.

    The profile is first capped at its running 35th percentile over 41 mm (the local cancellous
    plateau), so that the bright endplates at both ends of a body cannot make a dip in its
    middle, whatever the bone density of that region. Thick slices average a disc with the
    endplates around it (partial volume), so the required dip depth shrinks with thickness.
    """
    raw = profile_mm.astype(float)
    thick = slice_mm >= 4.0
    # Thick slices: few samples per vertebra, most of them body; thin: discs and endplates
    # take a larger share of the window.
    cap = ndi.percentile_filter(raw, 50 if thick else 35, size=41, mode="nearest")
    # Cap before smoothing: a bright endplate next to a disc must not fill its dip. Thick
    # slices are smooth already.
    p = np.minimum(raw, cap) if thick else ndi.gaussian_filter1d(np.minimum(raw, cap), 1.5)
    # Values far below the plateau are soft tissue beside the column ends, not discs: floor
    # them so that they cannot make huge dips.
    plateau = float(np.median(cap))
    p = np.maximum(p, plateau - 150.0)
    peaks, props = find_peaks(-p, distance=12, prominence=8.0)
    proms = props["prominences"]
    if peaks.size == 0:
        return peaks, proms
    # Discs are the deep dips: keep those at least a fraction of the typical deep dip (the
    # median of the deeper half); thick slices blur dips unevenly, so the fraction is lower.
    deep = np.sort(proms)[proms.size // 2 :]
    factor = 0.4 if slice_mm < 4.0 else 0.25
    keep = proms >= max(factor * float(np.median(deep)), 10.0)
    return peaks[keep], proms[keep]


def _regularise(discs: list[float], prominences: list[float]) -> tuple[list[float], float]:
    """Drop dips inside bodies and fill single missed discs using the median segment length.

    Returns the cleaned disc positions (mm) and a regularity score in [0, 1] (1 = all segments
    within 20 % of the median).
    """
    discs = list(discs)
    proms = list(prominences)
    if len(discs) < 3:
        return discs, 0.5
    for _ in range(6):
        gaps = np.diff(discs)
        median = float(np.median(gaps))
        short = np.nonzero(gaps < max(0.55 * median, MIN_SEGMENT_MM))[0]
        if short.size:
            g = int(short[0])
            # Drop the weaker of the two dips bounding a too-short segment.
            drop = g if proms[g] < proms[g + 1] else g + 1
            del discs[drop], proms[drop]
            if len(discs) < 3:
                break
            continue
        # A gap much longer than its neighbours (or longer than any adult vertebra plus disc)
        # hides a missed disc; vertebrae grow from T10 to L5, so compare locally.
        local = np.array([np.median(np.delete(gaps, i)[max(i - 2, 0) : i + 2]) if gaps.size > 1 else median
                          for i in range(gaps.size)])
        long = np.nonzero((gaps > 1.6 * local) | (gaps > MAX_SEGMENT_MM))[0]
        if long.size:
            g = int(long[0])
            n_new = max(int(round(gaps[g] / min(local[g], MAX_SEGMENT_MM))) - 1, 1)
            step = gaps[g] / (n_new + 1)
            for m in range(n_new, 0, -1):
                discs.insert(g + 1, discs[g] + m * step)
                proms.insert(g + 1, 0.0)
            continue
        break
    gaps = np.diff(discs)
    if gaps.size == 0:
        return discs, 0.5
    rel = np.abs(gaps / np.median(gaps) - 1.0)
    regularity = float(np.clip(1.0 - np.mean(np.clip(rel - 0.2, 0, None)) * 3.0, 0.0, 1.0))
    return discs, regularity


def _world_z(image: CTImage, index: float) -> float:
    return float(image.affine[2, 2] * index + image.affine[2, 3])


def locate_l3(image: CTImage) -> L3Result:
    """Locate the middle of the L3 vertebral body in a canonical 3D CT.

    Parameters
    ----------
    image : CTImage
        Canonical volume in HU (axis 2 toward superior), any slice spacing (1-5 mm tested).

    Returns
    -------
    L3Result
        ``slice_index`` (canonical) and ``z_mm`` of the slice nearest to the middle of the L3
        body, with a confidence in [0, 1]; ``found`` is False with a reason ("not in field of
        view") when the counting cannot place L3 inside the scanned range.
    """
    started = time.perf_counter()
    if image.hu.ndim != 3 or image.hu.shape[2] < 3:
        raise SarcoError("L3 location needs a 3D volume with at least 3 slices")
    sx, sy, dz = image.spacing
    if not 0 < dz <= 10.0:
        raise SarcoError(f"slice spacing {dz:.1f} mm is outside 0-10 mm")
    factor = max(1, int(round(WORK_PIXEL_MM / max(min(sx, sy), 1e-3))))
    work = _block_mean(image.hu, factor)
    px = float(min(sx, sy) * factor)
    nz = work.shape[2]

    xs, ys, score, present = _spine_track(work, px, dz)
    profile = _body_profile(work, xs, ys, px)
    ribs, ilium = _lateral_features(work, xs, ys, px)

    # Everything along z on a 1 mm grid (mm above the first slice centre).
    grid = np.arange(0.0, (nz - 1) * dz + 1e-6, 1.0)
    zk = np.arange(nz) * dz
    column = np.interp(grid, zk, score) > COLUMN_SCORE  # a bony column is in the slice
    prof_mm = np.interp(grid, zk, profile)
    ilium_mm = np.interp(grid, zk, ilium)
    ribs_mm = np.interp(grid, zk, ribs)
    to_world = lambda mm: _world_z(image, mm / dz)  # noqa: E731
    elapsed = lambda: time.perf_counter() - started  # noqa: E731
    anchors: dict[str, Any] = {}
    on_column = score > COLUMN_SCORE
    if on_column.any():
        # Spine position in canonical voxels (for views): median of the track on the column.
        anchors["spine_voxel"] = [round(float(np.median(xs[on_column])) * factor + (factor - 1) / 2, 1),
                                  round(float(np.median(ys[on_column])) * factor + (factor - 1) / 2, 1)]

    if column.sum() < 20:
        return L3Result(False, None, None, 0.0,
                        "L3 not in field of view: no vertebral column found in the scan",
                        anchors=anchors, seconds=elapsed())
    # Discs only inside the bony column: outside it the profile is soft tissue.
    lo_col, hi_col = np.nonzero(column)[0][[0, -1]]
    peaks, proms = _find_discs(prof_mm[lo_col : hi_col + 1], dz)
    discs, regularity = _regularise([float(p + lo_col) for p in peaks], [float(q) for q in proms])
    period = float(np.median(np.diff(discs))) if len(discs) > 2 else 35.0
    anchors["discs_z_mm"] = [round(to_world(d), 1) for d in discs]
    anchors["regularity"] = round(regularity, 3)

    # ---- bottom anchor: the iliac crests. The pelvic zone is the lowest long run of slices
    # with iliac bone on both sides; its top (the crests) lies near the L4/L5 disc (Tuffier's
    # line), and a bone-free gap must separate it from any ribs above.
    bottom_l3 = None
    pelvic = ilium_mm > ILIUM_AREA_MM2
    crest = None
    k = 0
    while k < pelvic.size:
        if not pelvic[k]:
            k += 1
            continue
        start = top = k
        while top + 1 < pelvic.size and pelvic[top + 1 : top + 9].any():
            top += 1 + int(np.argmax(pelvic[top + 1 : top + 9]))
        gap = ilium_mm[top + 1 : top + 31]
        if top - start >= 30 and gap.size >= 20 and float(np.percentile(gap, 80)) < ILIUM_AREA_MM2 / 3:
            crest = float(top)
            break
        if top - start >= 30:
            break  # a long run without a free gap above it: ribs or a merged rib cage
        k = top + 1
    if crest is not None:
        anchors["iliac_crest_z_mm"] = round(to_world(crest), 1)
        below = [d for d in discs if crest - 45.0 <= d <= crest + 12.0]
        above = [d for d in discs if crest + 12.0 < d <= crest + 12.0 + period]
        k45 = None
        if below:
            k45 = discs.index(below[-1])
        elif above and above[0] - period >= lo_col:
            # A missed L4/L5 dip (thick slices): the first disc above the crests is L3/L4.
            k45 = discs.index(above[0])
            discs.insert(k45, above[0] - period)
            anchors["l4l5_inferred"] = True
        if k45 is not None:
            anchors["l4l5_z_mm"] = round(to_world(discs[k45]), 1)
            bottom_l3 = k45 + 1  # segment k45 is L4, k45 + 1 is L3
        ribs_mm[: int(crest + 20)] = 0.0  # iliac wings are not ribs

    # ---- top anchor: the last rib-bearing vertebra (T12), followed by a rib-free one.
    top_l3 = None
    segments = list(zip(discs[:-1], discs[1:]))

    def rib_bearing(lo: float, hi: float) -> bool:
        a, b = int(lo + 0.2 * (hi - lo)), int(hi - 0.2 * (hi - lo)) + 1
        return bool(np.median(ribs_mm[a:b]) > RIB_AREA_MM2) if b > a else False

    rib_flags = [rib_bearing(lo, hi) for lo, hi in segments]
    anchors["rib_bearing_segments"] = rib_flags
    if any(rib_flags):
        # The topmost run of rib-bearing segments ends at T12.
        last = max(i for i, f in enumerate(rib_flags) if f)
        while last > 0 and rib_flags[last - 1]:
            last -= 1
        if last > 0:
            t12_confirmed = True  # segment last-1 exists and is rib-free
        else:
            # Nothing complete below the last ribs: accept the open bottom part of the column
            # when >= 12 mm of it is bony and rib-free.
            a = int(max(discs[0] - 30.0, lo_col))
            tail, bony = ribs_mm[a : int(discs[0])], column[a : int(discs[0])]
            t12_confirmed = bony.sum() >= 12 and bool(np.all(tail[bony] <= RIB_AREA_MM2))
        if t12_confirmed:
            anchors["t12_z_mm"] = [round(to_world(discs[last]), 1), round(to_world(discs[last + 1]), 1)]
            top_l3 = last - 3  # T12 -> L1 -> L2 -> L3, one segment each

    if bottom_l3 is not None and top_l3 is not None:
        if bottom_l3 == top_l3:
            chosen, confidence = bottom_l3, 0.95
            reason = "L3 counted up from the iliac crests (L4/L5) and down from the last ribs (they agree)"
        else:
            chosen, confidence = bottom_l3, 0.45
            reason = (
                f"L3 counted up from the iliac crests; the last ribs imply {top_l3 - bottom_l3 + 5} "
                "lumbar-type vertebrae (transitional anatomy?): check the level"
            )
    elif bottom_l3 is not None:
        chosen, confidence = bottom_l3, 0.8 if not anchors.get("l4l5_inferred") else 0.6
        reason = "L3 counted up from the iliac crests at L4/L5 (no rib-bearing vertebra in the field of view)"
    elif top_l3 is not None:
        chosen, confidence = top_l3, 0.75
        reason = "L3 counted down from the last ribs at T12 (no pelvis in the field of view)"
    else:
        if rib_flags and all(rib_flags):
            why = "L3 not in field of view: every vertebra in the scan carries ribs (thoracic level)"
        elif float(np.max(ribs_mm, initial=0.0)) > RIB_AREA_MM2:
            why = "L3 not in field of view: the scan ends before a rib-free vertebra (chest or upper abdomen only)"
        else:
            why = "L3 not in field of view: neither the last ribs nor the iliac crests anchor the vertebra count"
        return L3Result(False, None, None, 0.0, why, anchors=anchors, seconds=elapsed())

    levels: dict[str, tuple[float, float]] = {}
    for offset, name in zip(range(-2, 3), LUMBAR_NAMES):
        i = chosen + offset
        if 0 <= i < len(discs) - 1:
            levels[name] = (to_world(discs[i]), to_world(discs[i + 1]))
    if chosen < 0 or chosen + 1 >= len(discs):
        if chosen + 1 == len(discs) and discs and grid[hi_col] - discs[-1] > 0.75 * period:
            # The top of L3 is cut off but its middle is inside the scan: use the period.
            discs.append(discs[-1] + period)
            confidence *= 0.7
        else:
            side = "below" if chosen < 0 else "above"
            return L3Result(
                False, None, None, 0.0,
                f"L3 not in field of view: the count places L3 {side} the scanned range ({reason})",
                levels=levels, anchors=anchors, seconds=elapsed(),
            )
    lo, hi = discs[chosen], discs[chosen + 1]
    index = int(np.clip(round(0.5 * (lo + hi) / dz), 0, nz - 1))
    confidence *= 0.6 + 0.4 * regularity
    levels["L3"] = (to_world(lo), to_world(hi))
    return L3Result(
        True,
        index,
        _world_z(image, index),
        round(float(confidence), 3),
        reason,
        l3_z_range_mm=(to_world(lo), to_world(hi)),
        levels=levels,
        anchors=anchors,
        seconds=elapsed(),
    )


def file_slice_index(image: CTImage, canonical_index: int) -> int | None:
    """The index of canonical axial slice ``canonical_index`` in the source file's voxel order.

    Returns ``None`` when the file's slices are not axial (its third axis is not head-feet), so
    no single file slice index exists.
    """
    return image.file_slice(canonical_index)


def answer_json(image: CTImage, result: L3Result, source: str | None = None) -> dict:
    """The JSON answer (CLI ``l3`` and the server's ``l3_locator``) for an image and its
    :class:`L3Result`; ``slice_index`` in the file's voxel order."""
    file_index = file_slice_index(image, result.slice_index) if result.found else None
    return {
        "slice_index": file_index if result.found else None,
        "z_mm": round(float(result.z_mm), 2) if result.found else None,
        "confidence": float(result.confidence),
        "reason": result.reason,
        "found": bool(result.found),
        "canonical_slice_index": result.slice_index if result.found else None,
        "index_order": "file voxel order (canonical_slice_index: axis 2 toward superior)",
        "l3_z_range_mm": [round(float(z), 1) for z in result.l3_z_range_mm] if result.l3_z_range_mm else None,
        "levels_z_mm": {k: [round(float(a), 1), round(float(b), 1)] for k, (a, b) in result.levels.items()},
        "num_slices": int(image.num_slices),
        "slice_spacing_mm": round(float(image.spacing[2]), 3),
        "image": source,
        "seconds": round(float(result.seconds), 3),
    }


# --------------------------------------------------------------------------- slice choice


@dataclass
class SliceChoice:
    """The axial slice to work on and why (:func:`choose_slice`)."""

    index: int | None  # canonical (axis 2 toward superior); 0 for a 2D image; None: no slice
    source: str  # '2d', 'request', 'l3_locator', 'middle', or 'none' (no L3, no middle wanted)
    l3: L3Result | None = None  # the locator's answer when it was asked
    reason: str = ""  # why L3 was not used, when it was not found


def choose_slice(image: CTImage, requested: Any = None, *, middle: bool = True) -> SliceChoice:
    """The library's one slice-choice policy: the requested slice, else L3, else the middle.

    Parameters
    ----------
    image : canonical CT (2D images have one slice: 0, source ``'2d'``).
    requested : canonical slice index (int or its text; negative counts from the end), or
        ``None``/``''`` for none. Out of range or not an integer: :class:`SarcoError`.
    middle : fall back to the middle slice when L3 is not found (segmentation, pseudo-labels:
        a label anywhere helps; a locator error is then logged, not raised). ``False`` for
        measurement (``quantify``, ``cohort --input``): a muscle index away from L3 means
        nothing, so the answer is ``index None`` (source ``'none'``) with the reason.
    """
    if image.hu.ndim == 2:
        if requested not in (None, "", 0, "0"):
            raise SarcoError(f"slice {requested!r} given but the image is 2D")
        return SliceChoice(0, "2d")
    depth = image.hu.shape[2]
    if requested not in (None, ""):
        try:
            index = int(requested)
        except (TypeError, ValueError):
            raise SarcoError(f"slice_index must be an integer, not {requested!r}") from None
        if not -depth <= index < depth:
            raise SarcoError(f"slice {index} is out of range: the image has {depth} slices (0..{depth - 1})")
        return SliceChoice(index % depth, "request")
    found, why = None, f"{depth} slices are too few to locate L3"
    if depth >= 3:
        try:
            found = locate_l3(image)
            why = found.reason
        except Exception as exc:  # the locator is optional help when a middle slice will do
            if not middle:
                raise
            logger.info("L3 locator failed (%s); using the middle slice", exc)
            why = f"the L3 locator failed ({exc})"
    if found is not None and found.found and found.slice_index is not None:
        return SliceChoice(int(found.slice_index), "l3_locator", found)
    if middle:
        return SliceChoice(depth // 2, "middle", found, why)
    return SliceChoice(None, "none", found, why)
