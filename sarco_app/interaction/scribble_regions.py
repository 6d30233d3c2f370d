"""Scribble-region geometry: which part of a binary mask a user's stroke stands for.

The interactive tools (:mod:`sarco_app.interaction.interactive`) turn a proposal into an answer and then
let strokes edit it. The geometry of that editing lives here, independent of tissues and HU
ranges, so it can be tested and reused on any boolean mask:

* :func:`contact_pieces` separates a mask into regions at contacts thinner than ``2 * OPENING_MM``
  (where muscle touches a bowel loop of the same HU);
* :func:`stroke_reach` and :func:`stroke_part` give the part of a region a stroke stands for:
  the whole region when it lies within the stroke's geodesic reach, else the reach cut back at
  a neck (marker watershed on the distance map);
* :func:`add_touched` / :func:`remove_marked` apply foreground / background strokes;
  :func:`planes_under_lines` recognises a thin background line along a plane of its own HU;
  :func:`organs_marked` asks :mod:`sarco_app.interaction.strokes` for the organ of a stroke's own HU;
* :func:`split` divides a mask geodesically between two kinds of seed.

All arrays are 2D ``(X, Y)`` in canonical order, spacing is ``(sx, sy)`` in mm, and
connectivity is 8 (a diagonal step joins pixels), like :mod:`sarco_app.segmentation.threshold`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation

from sarco_app.interaction import strokes

#: Contacts thinner than twice this (mm) separate regions (and are cut when following muscle

from sarco_app.segmentation import threshold

#: Contacts thinner than twice this (mm) separate regions (and are cut when following muscle
#: from bone).
OPENING_MM = 1.5
#: A scribble acts within a geodesic reach of at least this (mm) around it.
STROKE_REACH_MM = 4.0
#: A region lying within this multiple of that reach is taken whole.
FAR_SCALE = 1.5
#: A background line (at most 2 pixels wide) whose HU differs from the labelled tissue beside
#: it by at least this much traces a plane of its own (a fascia, a fat plane between muscle
#: layers): only that plane goes, not the stroke's geodesic reach of the tissue around it.
PLANE_CONTRAST_HU = 20.0
#: Such a plane is followed at most this many pixels to each side of the line.
PLANE_HALF_WIDTH_PX = 2

def components_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Connected components (8-connected) of ``mask`` that contain a ``seeds`` pixel."""
    labels, count = ndi.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask.copy()
    hit = np.unique(labels[seeds & mask])
    hit = hit[hit > 0]
    return np.isin(labels, hit)


def split(mask: np.ndarray, keep_seeds: np.ndarray, drop_seeds: np.ndarray) -> np.ndarray:
    """The part of ``mask`` geodesically nearer to ``keep_seeds`` than to ``drop_seeds``.

    A marker watershed on a flat relief, i.e. a geodesic Voronoi split inside ``mask``: where
    muscle touches a bowel loop of the same HU, a background scribble in the loop takes the
    loop and the cut falls near the contact. Components with no seed are dropped.
    """
    keep_seeds = keep_seeds & mask & ~drop_seeds
    if not drop_seeds.any():
        return components_touching(mask, keep_seeds)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[keep_seeds] = 1
    markers[drop_seeds & mask] = 2
    if not markers.any():
        return np.zeros_like(mask)
    regions = segmentation.watershed(np.zeros(mask.shape, np.uint8), markers, mask=mask,
                                     connectivity=2)
    return regions == 1


def reconstruct(mask: np.ndarray, seeds: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """Regions of ``mask`` connected to ``seeds`` once bridges thinner than ``2 * radius_mm``
    are cut (opening), grown back to their full extent within ``mask``."""
    kernel = threshold.ellipse_kernel(radius_mm, spacing)
    core = ndi.binary_opening(mask, structure=kernel)
    kept = components_touching(core, ndi.binary_dilation(seeds, structure=kernel) & core)
    grown = ndi.binary_dilation(kept, structure=kernel) & mask
    return grown | components_touching(mask & ~core, seeds) & ndi.binary_dilation(grown, structure=kernel)


def contact_pieces(mask: np.ndarray, spacing) -> np.ndarray:
    """Partition of ``mask`` into regions separated at contacts thinner than ``2 * OPENING_MM``.

    An opening finds the regions' cores; thin structures that vanish in it (fascial planes,
    septa) are regions of their own; every other pixel joins its geodesically nearest region.
    Returns an int32 label image (0 outside ``mask``).
    """
    eight = np.ones((3, 3), bool)
    core = ndi.binary_opening(mask, structure=threshold.ellipse_kernel(OPENING_MM, spacing))
    markers, count = ndi.label(core, structure=eight)
    rest, _ = ndi.label(mask & ~ndi.binary_dilation(core, structure=eight), structure=eight)
    markers[rest > 0] = rest[rest > 0] + count
    return segmentation.watershed(np.zeros(mask.shape, np.uint8), markers, mask=mask,
                                  connectivity=2)


def pieces_touched(pieces: np.ndarray, strokes: np.ndarray) -> np.ndarray:
    """Union of the regions of ``pieces`` that ``strokes`` touch (8-neighbourhood)."""
    ids = np.unique(pieces[ndi.binary_dilation(strokes, structure=np.ones((3, 3), bool))])
    return np.isin(pieces, ids[ids > 0])


def stroke_reach(piece: np.ndarray, stroke: np.ndarray, spacing,
                 blocked: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """The part of ``piece`` within a geodesic reach of ``stroke``: 1.5 times the median depth
    of the stroke in the piece (about the half-width of the structure the user drew in), at
    least ``STROKE_REACH_MM``, times ``scale``; ``blocked`` pixels are neither crossed nor
    taken."""
    eight = np.ones((3, 3), bool)
    touching = stroke & ndi.binary_dilation(piece, structure=eight)
    depth_map = ndi.distance_transform_edt(piece | stroke, sampling=spacing)
    depth = float(np.median(depth_map[touching])) if touching.any() else 0.0
    reach_mm = scale * max(STROKE_REACH_MM, 1.5 * depth)
    allowed = piece if blocked is None else piece & ~blocked
    grown = ndi.binary_dilation(stroke, structure=eight) & allowed
    for _ in range(int(np.ceil(reach_mm / min(spacing)))):
        nxt = ndi.binary_dilation(grown, structure=eight) & allowed
        if np.array_equal(nxt, grown):
            break
        grown = nxt
    return grown


def stroke_part(piece: np.ndarray, stroke: np.ndarray, spacing,
                blocked: np.ndarray | None = None) -> np.ndarray:
    """The part of ``piece`` a stroke stands for.

    The whole piece when it lies within ``FAR_SCALE`` times the stroke's geodesic reach (a
    bowel loop or blob the user struck through). Otherwise the part within the reach
    (:func:`stroke_reach`), cut back at a neck: a marker watershed on the negated distance
    map (distance to the piece's edge, mm) between the stroke and the rest of the piece puts
    the border where the structure narrows, so a stroke in a blob that meets the tissue
    through a neck takes the blob, not the tissue behind the neck.
    """
    # Work in the piece's bounding box (+2 px): a stroke touches dozens of small pieces, and
    # whole-slice morphology per piece costs seconds at 512x512.
    xs, ys = np.nonzero(piece)
    if xs.size == 0:
        return np.zeros_like(piece)
    box = (slice(max(int(xs.min()) - 2, 0), int(xs.max()) + 3),
           slice(max(int(ys.min()) - 2, 0), int(ys.max()) + 3))
    out = np.zeros_like(piece)
    out[box] = _stroke_part_in_box(piece[box], stroke[box], spacing,
                                   None if blocked is None else blocked[box])
    return out


def _stroke_part_in_box(piece: np.ndarray, stroke: np.ndarray, spacing,
                        blocked: np.ndarray | None) -> np.ndarray:
    """:func:`stroke_part` on arrays cropped around the piece."""
    wide = stroke_reach(piece, stroke, spacing, blocked, scale=FAR_SCALE)
    allowed = piece if blocked is None else piece & ~blocked
    if not (allowed & ~wide).any():
        return wide
    within = stroke_reach(piece, stroke, spacing, blocked)
    # A stroke drawn in a hole of the piece (the middle of a bowel loop whose rim alone was
    # taken) stands for the filled structure: the hole counts as part of it.
    holes = ndi.binary_fill_holes(allowed) & ~allowed
    shape = allowed | components_touching(holes, ndi.binary_dilation(stroke, structure=np.ones((3, 3), bool)))
    markers = np.zeros(piece.shape, dtype=np.int32)
    markers[ndi.binary_dilation(stroke, structure=np.ones((3, 3), bool)) & shape] = 1
    markers[allowed & ~within] = 2
    depth = ndi.distance_transform_edt(np.pad(shape, 1), sampling=spacing)[1:-1, 1:-1]
    basins = segmentation.watershed(-depth, markers, mask=shape, connectivity=2)
    return within & (basins == 1)


def add_touched(answer: np.ndarray, candidate: np.ndarray, fg: np.ndarray, spacing,
                bg: np.ndarray | None = None, hu: np.ndarray | None = None) -> np.ndarray:
    """Regions (:func:`contact_pieces`) of ``candidate`` outside ``answer`` that foreground scribbles
    touch: each whole when it lies within the stroke's reach, else the part within that reach
    (:func:`stroke_part`). With ``hu``, each stroke also adds the piece of its own HU it lies
    in, cut at thin contacts (:func:`sarco_app.interaction.strokes.piece_under_stroke`): a missed muscle
    comes whole, not as the stroke's reach."""
    pieces = contact_pieces(candidate & ~answer, spacing)
    near_fg = ndi.binary_dilation(fg, structure=np.ones((3, 3), bool))
    added = np.zeros_like(answer)
    for piece_id in np.unique(pieces[near_fg]):
        if piece_id == 0:
            continue
        piece = pieces == piece_id
        added |= stroke_part(piece, fg & near_fg, spacing, blocked=bg)
    if hu is not None:
        labels, count = ndi.label(fg, structure=np.ones((3, 3), bool))
        for k in range(1, count + 1):
            added |= strokes.piece_under_stroke(candidate & ~answer, labels == k, hu, spacing,
                                                blocked=bg)
    return added


def planes_under_lines(answer: np.ndarray, bg: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split background strokes into lines that trace a plane and the rest.

    A stroke at most 2 pixels wide (a person zoomed in to draw along a thin fascia or fat
    plane) whose median HU differs from the labelled tissue 2-3 pixels beside it by at least
    :data:`PLANE_CONTRAST_HU` marks that plane: the answer pixels next to the line (up to
    :data:`PLANE_HALF_WIDTH_PX`) on the line's side of the midpoint HU go. A line without such
    a contrast (through a bowel loop of muscle HU) is left to the region rule.
    Returns ``(plane pixels to remove, the other background strokes)``.
    """
    eight = np.ones((3, 3), bool)
    strokes, count = ndi.label(bg, structure=eight)
    planes = np.zeros_like(bg)
    rest = bg.copy()
    for k in range(1, count + 1):
        line = strokes == k
        if ndi.binary_erosion(line).any():  # 4-connected erosion: wider than 2 pixels
            continue
        near = ndi.binary_dilation(line, structure=eight, iterations=PLANE_HALF_WIDTH_PX)
        ring = ndi.binary_dilation(near, structure=eight) & ~ndi.binary_dilation(line, structure=eight) & answer
        if ring.sum() < line.sum():
            continue
        line_hu, ring_hu = float(np.median(hu[line])), float(np.median(hu[ring]))
        if abs(line_hu - ring_hu) < PLANE_CONTRAST_HU:
            continue
        mid = (line_hu + ring_hu) / 2
        side = (hu < mid) if line_hu < ring_hu else (hu > mid)
        plane = line.copy()
        for _ in range(PLANE_HALF_WIDTH_PX):
            plane |= ndi.binary_dilation(plane, structure=eight) & near & side & answer
        planes |= plane
        rest &= ~line
    return planes, rest


def remove_marked(answer: np.ndarray, fg: np.ndarray, bg: np.ndarray, spacing,
                  hu: np.ndarray | None = None,
                  organ_strokes: np.ndarray | None = None) -> np.ndarray:
    """``answer`` without what background scribbles mark.

    With ``hu``, a thin line along a plane of distinct HU takes only that plane
    (:func:`planes_under_lines`). Otherwise, in each marked region (:func:`contact_pieces`) the part
    the stroke stands for goes: the whole region when it lies within the stroke's reach (a
    bowel loop, a blob), else the part within that reach (:func:`stroke_part`), so a stroke
    in a bowel loop glued to a big muscle does not take the muscle with it (the old rule took
    any region under a quarter of the answer, which at 512x512 took a whole psoas with a bowel
    loop). Foreground scribbles are never crossed, and a region holding them too is split
    geodesically between the two kinds. A region touched only by ``organ_strokes`` (strokes
    whose organ :func:`organs_marked` found) goes only when it is taken whole: cut back at a
    neck it would be the wall behind a big organ, and the organ's HU says where that ends.
    """
    answer = answer & ~bg
    if not bg.any() or not answer.any():
        return answer
    if hu is not None:
        planes, bg = planes_under_lines(answer, bg, hu)
        answer &= ~(planes & ~fg)
        if not bg.any():
            return answer
    pieces = contact_pieces(answer, spacing)
    near_bg = ndi.binary_dilation(bg, structure=np.ones((3, 3), bool))
    out = answer.copy()
    for piece_id in np.unique(pieces[near_bg & answer]):
        if piece_id == 0:
            continue
        piece = pieces == piece_id
        gone = stroke_part(piece, bg, spacing, blocked=fg)
        if organ_strokes is not None and (piece & ~gone).any():
            others = ndi.binary_dilation(bg & ~organ_strokes, structure=np.ones((3, 3), bool))
            if not (piece & others).any():
                continue
        if (piece & fg).any():
            gone &= ~split(piece | bg, fg & piece, bg)
        out[gone] = False
    return out


def organs_marked(answer: np.ndarray, fg: np.ndarray, bg: np.ndarray, spacing,
                  hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The organs background strokes mark inside ``answer``: for each stroke (8-connected) the
    region of the stroke's own HU, told apart from the tissue's
    (:func:`sarco_app.interaction.strokes.organ_under_stroke`); none where HU cannot tell them apart.
    Lines along a plane of their own HU (:func:`planes_under_lines`) mark only that plane.
    Returns ``(organs, the strokes that found one)``."""
    organs = np.zeros_like(answer)
    found = np.zeros_like(bg)
    if not bg.any() or not answer.any():
        return organs, found
    planes_left = planes_under_lines(answer & ~bg, bg, hu)[1]
    labels, count = ndi.label(planes_left, structure=np.ones((3, 3), bool))
    for k in range(1, count + 1):
        stroke = labels == k
        organ = strokes.organ_under_stroke(answer, stroke, hu, spacing, keep=fg)
        if organ.any():
            organs |= organ
            found |= stroke
    return organs, found


