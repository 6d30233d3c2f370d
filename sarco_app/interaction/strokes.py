"""What one scribble stands for: the HU-homogeneous region under a stroke.

The interactive tools (:mod:`sarco_app.interaction.interactive`) edit a label with strokes. Where the
automatic label took an organ pressed against the muscle wall as muscle (liver at the lateral
wall, spleen and kidney at the posterior wall, crura beside the vertebra), the wrong region is
large, of nearly muscle HU and glued to the muscle along a long contact, so neither a stroke's
geodesic reach nor a cut at a neck removes it in one go. These functions find the region a
stroke stands for from the HU under the stroke itself:

* :func:`organ_under_stroke` -- a background stroke on a wrongly labelled organ: the region of
  the labelled tissue whose (lightly smoothed) HU is nearer the stroke's HU than the rest of
  the labelled tissue's, connected to the stroke, cut at thin contacts, its border placed on
  the steepest HU edge nearby (scikit-image marker watershed), holes filled. An organ whose HU
  cannot be told from the tissue it is glued to gives an empty result, and the caller falls
  back to its geometric rule.
* :func:`piece_under_stroke` -- a foreground stroke on missed tissue: the connected region of
  candidate pixels within the stroke's HU band, cut at thin contacts.

All arrays are 2D ``(X, Y)`` in canonical order; spacing is ``(sx, sy)`` in mm; HU are Hounsfield
units. No server imports: plain numpy / scipy.ndimage / scikit-image / OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation

from sarco_app.segmentation.threshold import ellipse_kernel

#: Gaussian sigma (mm) of the HU smoothing before HU statistics: CT noise (10-20 HU per pixel)
#: hides the 10-60 HU by which liver, spleen and kidney differ from muscle; the organs' own
#: texture is smoother than that.
SMOOTH_MM = 1.5
#: Lighter smoothing (mm) of the image whose HU edges place the organ's border.
EDGE_SMOOTH_MM = 0.7
#: Robust spread (HU) below which a stroke's smoothed HU is taken as this value (a short stroke
#: in a very smooth organ would otherwise give a band too narrow to fill the organ).
MIN_SPREAD_HU = 3.0
#: Half-width of the HU band around the stroke's median, in robust spreads of the stroke ...
BAND_SPREADS = 3.0
#: ... and never narrower than this (HU).
MIN_BAND_HU = 8.0
#: The organ's HU must differ from the rest of the labelled tissue by at least this many
#: spreads (the root mean square of the two: real muscle is far less homogeneous than an organ)
#: for the HU to say where the organ ends.
MIN_SEPARATION_SPREADS = 1.5
#: The tissue's own HU is read this far (mm) inside its label (borders are partial volume).
RIM_MM = 2.0
#: Fewer tissue pixels than this (and than this share of the tissue) outside the stroke's HU
#: region: the stroke's HU is the tissue's own, nothing to tell them apart by.
MIN_REST_PIXELS = 50
MIN_REST_SHARE = 0.25
#: Contacts thinner than twice this (mm) are cut: a region of matching HU that reaches the
#: muscle only through such a bridge does not continue into it.
CONTACT_MM = 2.0
#: A foreground stroke's HU band is at least this wide on each side (HU): muscle is less
#: homogeneous than an organ (fibres, fat specks) ...
MIN_FG_BAND_HU = 15.0
#: ... and at most this wide: a stroke across muscle and a vessel or fat speck would otherwise
#: spread its band over every soft tissue (liver, spleen, kidney).
MAX_FG_BAND_HU = 25.0


EIGHT = np.ones((3, 3), bool)


def smooth_hu(hu: np.ndarray, spacing, sigma_mm: float = SMOOTH_MM) -> np.ndarray:
    """``hu`` blurred by a Gaussian of ``sigma_mm`` (float32, same shape)."""
    hu = np.asarray(hu, dtype=np.float32)
    if sigma_mm <= 0:
        return hu
    sx, sy = spacing
    # cv2 works on (rows=x here, cols=y): sigmaX runs along axis 1, i.e. our y.
    return cv2.GaussianBlur(hu, (0, 0), sigmaX=sigma_mm / sy, sigmaY=sigma_mm / sx)


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """(median, spread) of ``values``: spread = 1.4826 x median absolute deviation (the
    standard deviation for Gaussian data), at least :data:`MIN_SPREAD_HU`."""
    values = np.asarray(values, dtype=np.float64)
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    return centre, max(spread, MIN_SPREAD_HU)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    xs, ys = np.nonzero(mask)
    return (slice(max(int(xs.min()) - margin, 0), int(xs.max()) + margin + 1),
            slice(max(int(ys.min()) - margin, 0), int(ys.max()) + margin + 1))


def cut_thin_contacts(region: np.ndarray, seeds: np.ndarray, spacing,
                      radius_mm: float = CONTACT_MM) -> np.ndarray:
    """The part of ``region`` joined to ``seeds`` through contacts at least ``2 * radius_mm``
    wide: an opening by a disk finds the cores, the cores the seeds touch are kept and grown
    back by the disk within ``region``. Thin parts the seeds lie in themselves stay."""
    kernel = ellipse_kernel(radius_mm, spacing)
    core = ndi.binary_opening(region, structure=kernel)
    labels, count = ndi.label(core, structure=EIGHT)
    near_seeds = ndi.binary_dilation(seeds, structure=kernel)
    hit = np.unique(labels[near_seeds & core])
    kept = np.isin(labels, hit[hit > 0])
    grown = ndi.binary_dilation(kept, structure=kernel) & region
    # A stroke drawn in a part thinner than the disk still marks that part.
    labels, _ = ndi.label(region & ~grown, structure=EIGHT)
    hit = np.unique(labels[seeds & region & ~grown])
    return grown | np.isin(labels, hit[hit > 0])


def grow_into_rim(region: np.ndarray, allowed: np.ndarray, spacing,
                  sigma_mm: float = SMOOTH_MM) -> np.ndarray:
    """``region`` grown, by up to ``2 * sigma_mm``, into the pixels of ``allowed`` that lie
    within that distance of its border: there the smoothing mixed the region's HU with its
    neighbours' (fat, air), so the HU test misses them although they belong to the region."""
    kernel = ellipse_kernel(2.0 * sigma_mm, spacing)
    rim = allowed & ~ndi.binary_erosion(allowed, structure=kernel, border_value=1)
    steps = int(np.ceil(2.0 * sigma_mm / min(spacing)))
    return ndi.binary_dilation(region, structure=EIGHT, iterations=steps, mask=rim | region)


def organ_under_stroke(tissue: np.ndarray, stroke: np.ndarray, hu: np.ndarray, spacing, *,
                       keep: np.ndarray | None = None) -> np.ndarray:
    """The wrongly labelled organ a background stroke marks inside a tissue label.

    Parameters
    ----------
    tissue : (X, Y) bool
        Pixels currently labelled as the target tissue (e.g. muscle, organ included).
    stroke : (X, Y) bool
        One background stroke (pixels the user says are not the tissue).
    hu : (X, Y) float
        CT slice in HU.
    spacing : (sx, sy)
        Pixel size in mm.
    keep : (X, Y) bool, optional
        Pixels that must stay (foreground scribbles): never taken, never crossed.

    Returns
    -------
    (X, Y) bool: the organ to remove -- the pixels of ``tissue`` connected to the stroke whose
    smoothed HU (Gaussian :data:`SMOOTH_MM`) is nearer to the stroke's median HU than to the
    tissue's own (the median, away from its borders, of the tissue outside the stroke's HU
    band: median +- max(:data:`BAND_SPREADS` spreads, :data:`MIN_BAND_HU`)), cut at contacts
    thinner than ``2 * CONTACT_MM`` mm; its border then placed on the steepest HU edge within
    ``2 * SMOOTH_MM`` of it (marker watershed on the gradient of the image smoothed by
    :data:`EDGE_SMOOTH_MM`), with the holes it encloses in ``tissue`` filled. Empty when the
    stroke's median HU is within :data:`MIN_SEPARATION_SPREADS` spreads (root mean square of
    the two) of the tissue's, or when the stroke's HU band holds most of the tissue (HU cannot
    say where the organ ends; the caller's geometric rule decides).
    """
    tissue = np.asarray(tissue, bool)
    stroke = np.asarray(stroke, bool)
    empty = np.zeros(tissue.shape, bool)
    keep = empty if keep is None else np.asarray(keep, bool)
    allowed = tissue & ~keep
    on_tissue = stroke & allowed
    if not on_tissue.any():
        return empty
    smooth = smooth_hu(hu, spacing)
    organ_hu, organ_spread = robust_stats(smooth[on_tissue])
    band = max(BAND_SPREADS * organ_spread, MIN_BAND_HU)
    within = allowed & (np.abs(smooth - organ_hu) <= band)
    labels, _ = ndi.label(within, structure=EIGHT)
    hit = np.unique(labels[on_tissue & within])
    flood = np.isin(labels, hit[hit > 0])
    # The tissue's own HU: its pixels outside that flood, away from its borders (partial
    # volume with fat there), over the whole slice (the true tissue is the majority).
    core = ndi.binary_erosion(allowed, structure=ellipse_kernel(RIM_MM, spacing)) & ~stroke
    rest = core & ~flood
    if np.count_nonzero(rest) < max(MIN_REST_PIXELS, MIN_REST_SHARE * np.count_nonzero(core)):
        # Most of the tissue has the stroke's HU: HU does not say where the organ ends.
        return empty
    rest_hu, rest_spread = robust_stats(smooth[rest])
    spread = float(np.sqrt((organ_spread**2 + rest_spread**2) / 2.0))
    if abs(rest_hu - organ_hu) < MIN_SEPARATION_SPREADS * spread:
        # The stroke's HU is the tissue's own: HU does not say where the organ ends.
        return empty
    # The border between the two lies half-way in HU, where the smoothing mixed them equally
    # (the band only served to find the rest: the organ's rim at the contact lies outside it).
    nearer = allowed & (np.abs(smooth - organ_hu) <= np.abs(smooth - rest_hu))
    labels, _ = ndi.label(nearer, structure=EIGHT)
    hit = np.unique(labels[on_tissue & nearer])
    nearer = np.isin(labels, hit[hit > 0])
    # Crop around it, with room for the border to move by the smoothing's reach.
    box = _bounding_box(nearer | stroke, int(np.ceil(2.0 * SMOOTH_MM / min(spacing))) + 2)
    region, stroke_b, comp = nearer[box], stroke[box], allowed[box]
    region = cut_thin_contacts(region, stroke_b & region, spacing)
    if not region.any():
        return empty
    # The smoothing blurs the border over a couple of mm (and into a thin muscle layer beside
    # the organ): sure organ and sure tissue lie that far on each side, and the border between
    # them follows the steepest HU edge of a lightly smoothed image (a marker watershed on the
    # gradient), which also takes the organ's rim against fat.
    kernel = ellipse_kernel(2.0 * SMOOTH_MM, spacing)
    markers = np.zeros(region.shape, np.int32)
    markers[comp & ~ndi.binary_dilation(region, structure=kernel)] = 2
    markers[ndi.binary_erosion(region, structure=kernel) | (stroke_b & comp)] = 1
    fine = smooth_hu(np.asarray(hu)[box], spacing, EDGE_SMOOTH_MM)
    edges = np.hypot(ndi.sobel(fine, axis=0) / spacing[0], ndi.sobel(fine, axis=1) / spacing[1])
    basins = segmentation.watershed(edges, markers, mask=comp, connectivity=2)
    region = basins == 1
    # Vessels and cysts inside the organ are part of it.
    region |= ndi.binary_fill_holes(region) & comp
    out = empty.copy()
    out[box] = region
    return out


def piece_under_stroke(candidate: np.ndarray, stroke: np.ndarray, hu: np.ndarray, spacing, *,
                       blocked: np.ndarray | None = None) -> np.ndarray:
    """The missed piece of tissue a foreground stroke marks.

    Parameters
    ----------
    candidate : (X, Y) bool
        Pixels that may become the tissue (e.g. in its HU range and not yet labelled).
    stroke : (X, Y) bool
        One foreground stroke.
    hu : (X, Y) float
        CT slice in HU.
    spacing : (sx, sy) mm.
    blocked : (X, Y) bool, optional
        Pixels never taken nor crossed (background scribbles).

    Returns
    -------
    (X, Y) bool: the pixels of ``candidate`` connected to the stroke whose smoothed HU lies
    within the stroke's band (median +- :data:`BAND_SPREADS` spreads, at least
    :data:`MIN_FG_BAND_HU` and at most :data:`MAX_FG_BAND_HU`), cut at contacts thinner than
    ``2 * CONTACT_MM`` mm, grown into the candidate's blurred rim (:func:`grow_into_rim`) where
    the unsmoothed HU lies in the stroke's unsmoothed band.
    """
    candidate = np.asarray(candidate, bool)
    stroke = np.asarray(stroke, bool)
    empty = np.zeros(candidate.shape, bool)
    allowed = candidate if blocked is None else candidate & ~np.asarray(blocked, bool)
    near = ndi.binary_dilation(stroke, structure=EIGHT)
    if not (near & allowed).any():
        return empty
    labels, _ = ndi.label(allowed, structure=EIGHT)
    hit = np.unique(labels[near & allowed])
    component = np.isin(labels, hit[hit > 0])
    margin = int(np.ceil(3 * SMOOTH_MM / min(spacing))) + 2
    box = _bounding_box(component | stroke, margin)
    comp, stroke_b = component[box], stroke[box]
    smooth = smooth_hu(np.asarray(hu)[box], spacing)
    under = stroke_b & (comp | ~np.asarray(candidate, bool)[box])
    centre, spread = robust_stats(smooth[under if under.any() else stroke_b])
    band = min(max(BAND_SPREADS * spread, MIN_FG_BAND_HU), MAX_FG_BAND_HU)
    similar = comp & (np.abs(smooth - centre) <= band)
    seeds = ndi.binary_dilation(stroke_b, structure=EIGHT) & similar
    labels, _ = ndi.label(similar, structure=EIGHT)
    hit = np.unique(labels[seeds])
    region = np.isin(labels, hit[hit > 0])
    region = cut_thin_contacts(region, seeds, spacing)
    # Into the rim only where the unsmoothed HU is the stroke's (not a touching organ's rim).
    raw = np.asarray(hu, dtype=np.float32)[box]
    raw_centre, raw_spread = robust_stats(raw[under if under.any() else stroke_b])
    raw_band = max(BAND_SPREADS * raw_spread, MIN_FG_BAND_HU)  # raw CT noise: no upper cap
    region = grow_into_rim(region, comp & (np.abs(raw - raw_centre) <= raw_band), spacing)
    out = empty.copy()
    out[box] = region
    return out
