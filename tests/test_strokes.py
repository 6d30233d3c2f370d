"""Stroke regions (sarco_app.interaction.strokes): one stroke removes an organ glued to the muscle wall, one
adds a missed muscle piece; and the same through the interactive tools."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from sarco_app import metrics
from sarco_app.interaction import interactive, scribble_regions, strokes
from sarco_app.labels import MUSCLE, SAT, VAT
from tests.test_interactive import SPACING, synthetic_slice


def organ_against_wall(organ_hu: float = 100.0, seed: int = 0):
    """:func:`synthetic_slice` (no bowel loop) with a big organ (radius 20 px = 30 mm, like a
    liver tip) pressed against the inside of the muscle ring on the left along a long contact,
    the way the automatic label takes it for muscle on real CT.

    Returns (hu, truth, organ, stored): ``truth`` has the organ as background, ``stored`` is the
    truth with the organ labelled muscle."""
    hu, truth = synthetic_slice(bowel=False, seed=seed)
    nx, ny = truth.shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    inner_left = nx / 2 - nx * 0.30  # the ring's inner border on the left, at mid-height
    organ = (x - (inner_left + 19)) ** 2 + (y - ny / 2) ** 2 <= 20**2
    organ &= truth == VAT  # pressed against the ring, not over it
    rng = np.random.default_rng(seed + 1)
    hu[organ] = organ_hu + rng.normal(0, 8, int(organ.sum()))
    truth = truth.copy()
    truth[organ] = 0
    stored = truth.copy()
    stored[organ] = MUSCLE
    return hu, truth, organ, stored


def stroke_in(mask: np.ndarray, half: int = 4) -> np.ndarray:
    """A short vertical stroke (3 px wide) through the middle of ``mask``."""
    xs, ys = np.nonzero(mask)
    cx, cy = int(np.median(xs)), int(np.median(ys))
    stroke = np.zeros(mask.shape, bool)
    stroke[cx - 1:cx + 2, cy - half:cy + half + 1] = True
    assert mask[stroke].all()
    return stroke


def test_organ_glued_to_the_wall_is_removed_by_one_stroke_and_the_wall_stays():
    hu, truth, organ, stored = organ_against_wall()
    muscle = truth == MUSCLE
    # Glued along a long contact: dozens of organ pixels touch the ring.
    assert np.count_nonzero(organ & ndi.binary_dilation(muscle)) > 20
    stroke = stroke_in(organ)
    assert stroke.sum() < 0.1 * organ.sum()  # a short stroke, not a painted organ
    removed = strokes.organ_under_stroke(stored == MUSCLE, stroke, hu, SPACING)
    assert np.count_nonzero(removed & organ) > 0.95 * organ.sum()
    assert np.count_nonzero(removed & muscle) < 0.01 * muscle.sum()
    # The geometric rule alone (the stroke's reach, cut at a neck) takes the wall behind the
    # organ with it: the contact is no neck.
    old = scribble_regions.remove_marked(stored == MUSCLE, np.zeros_like(stroke), stroke, SPACING)
    assert np.count_nonzero(muscle & ~old) > 0.05 * muscle.sum()


@pytest.mark.parametrize("tool", [interactive.back_projection, interactive.grabcut],
                         ids=lambda f: f.__name__)
def test_tools_remove_the_organ_with_one_background_stroke(tool):
    hu, truth, organ, stored = organ_against_wall(organ_hu=75.0, seed=3)
    out = tool(hu, "muscle", bg=stroke_in(organ), current=stored, spacing=SPACING)
    assert np.count_nonzero(out[organ] == MUSCLE) < 0.05 * organ.sum()
    assert metrics.iou(out == MUSCLE, truth == MUSCLE) >= 0.97
    assert (out[truth == SAT] == SAT).all() and (out[truth == VAT] == VAT).all()


def test_organ_of_the_muscle_own_hu_is_left_to_the_geometric_rule():
    """HU cannot say where an organ of the muscle's own HU ends: no HU region is returned (the
    tools then fall back to the stroke's reach), rather than the muscle with it."""
    hu, truth, organ, stored = organ_against_wall(organ_hu=45.0)
    removed = strokes.organ_under_stroke(stored == MUSCLE, stroke_in(organ), hu, SPACING)
    assert not removed.any()


def test_foreground_stroke_keeps_and_blocks():
    """Foreground scribbles are never taken: an organ stroke stops at them."""
    hu, truth, organ, stored = organ_against_wall()
    xs, _ = np.nonzero(organ)
    keep = organ & (np.arange(organ.shape[0])[:, None] >= xs.min() + 25)  # its inner part
    removed = strokes.organ_under_stroke(stored == MUSCLE, stroke_in(organ & ~keep), hu, SPACING,
                                         keep=keep)
    assert removed.any() and not (removed & keep).any()


def missed_muscle_piece(seed: int = 0):
    """:func:`synthetic_slice` with an elongated muscle (60 x 12 px, 90 x 18 mm, like a psoas or
    quadratus cut obliquely) that the label missed, and an organ of other HU (a kidney, 130 HU)
    touching it. Returns (hu, truth, piece, organ, stored)."""
    hu, truth = synthetic_slice(bowel=False, seed=seed)
    nx, ny = truth.shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    piece = (((x - nx / 2) / 30.0) ** 2 + ((y - (ny / 2 + 12)) / 6.0) ** 2 <= 1) & (truth == VAT)
    organ = (((x - nx / 2) / 14.0) ** 2 + ((y - (ny / 2 - 4)) / 11.0) ** 2 <= 1) & (truth == VAT) & ~piece
    rng = np.random.default_rng(seed + 2)
    hu[piece] = 45 + rng.normal(0, 8, int(piece.sum()))
    hu[organ] = 130 + rng.normal(0, 8, int(organ.sum()))
    truth = truth.copy()
    truth[piece] = MUSCLE
    truth[organ] = 0
    stored = truth.copy()
    stored[piece] = 0
    return hu, truth, piece, organ, stored


def test_missed_muscle_piece_is_added_by_one_stroke_without_the_organ_it_touches():
    hu, truth, piece, organ, stored = missed_muscle_piece()
    assert np.count_nonzero(piece & ndi.binary_dilation(organ)) > 5  # they touch
    stroke = np.zeros(piece.shape, bool)
    xs, ys = np.nonzero(piece)
    cx, cy = int(np.median(xs)), int(np.median(ys))
    stroke[cx - 1:cx + 2, cy] = True  # three pixels
    candidate = (hu > -29) & (hu < 150) & (stored == 0)
    added = strokes.piece_under_stroke(candidate, stroke, hu, SPACING)
    assert np.count_nonzero(added & piece) > 0.9 * piece.sum()
    assert not (added & organ).any()
    assert np.count_nonzero(added & ~piece) < 0.1 * piece.sum()
    # Through the tool: the stored label gets the whole piece, not the stroke's reach (the
    # geometric rule alone added an eighth of it).
    out = interactive.back_projection(hu, "muscle", fg=stroke, current=stored, spacing=SPACING)
    assert np.count_nonzero(out[piece] == MUSCLE) > 0.9 * piece.sum()
    assert np.count_nonzero(out[organ] == MUSCLE) == 0
    assert metrics.iou(out == MUSCLE, truth == MUSCLE) >= 0.97


def test_strokes_outside_the_tissue_give_nothing():
    hu, truth, organ, stored = organ_against_wall()
    stroke = np.zeros(organ.shape, bool)
    stroke[2, 2] = True  # air
    assert not strokes.organ_under_stroke(stored == MUSCLE, stroke, hu, SPACING).any()
    assert not strokes.piece_under_stroke(np.zeros_like(stroke), stroke, hu, SPACING).any()
