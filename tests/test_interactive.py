"""Semi-automatic tools (sarco_app.interaction.interactive) and the simulated annotator, as a library."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from sarco_app import metrics
from sarco_app.interaction import interactive, scribble_regions
from sarco_app.errors import SarcoError
from sarco_app.labels import IMAT, MUSCLE, SAT, VAT
from scripts import simulate_annotator

TOOLS = [interactive.back_projection, interactive.grabcut]
SPACING = (1.5, 1.5)


def synthetic_slice(nx: int = 150, ny: int = 120, seed: int = 0, bowel: bool = True):
    """A clean abdomen: SAT ring, muscle ring, VAT inside, a vertebra at the back, and a bowel
    loop of muscle HU that touches the muscle ring from inside. Returns (hu, truth label)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    cx, cy = nx / 2, ny / 2

    def inside(ax, ay, ox=0.0, oy=0.0):
        return ((x - cx - ox) / ax) ** 2 + ((y - cy - oy) / ay) ** 2 <= 1.0

    label = np.zeros((nx, ny), np.uint8)
    body = inside(nx * 0.45, ny * 0.42)
    label[body] = SAT
    label[inside(nx * 0.36, ny * 0.32)] = MUSCLE
    label[inside(nx * 0.30, ny * 0.25)] = VAT
    hu = np.full((nx, ny), -1000.0, np.float32)
    hu[label == SAT] = -100
    hu[label == MUSCLE] = 45
    hu[label == VAT] = -90
    spine = inside(9, 8, 0, ny * 0.2)
    hu[spine] = 500
    label[spine] = 0
    if bowel:
        # Touches the muscle ring's inner edge at the front (small y is anterior).
        loop = inside(8, 8, 0, -ny * 0.25 + 7)
        loop &= label != MUSCLE
        hu[loop] = 40
        label[loop] = 0
    skin = body & ~np.pad(body[1:-1, 1:-1] & body[2:, 1:-1] & body[:-2, 1:-1]
                          & body[1:-1, 2:] & body[1:-1, :-2], 1)
    hu[skin] = 20
    label[skin] = 0
    hu += rng.normal(0, 8, hu.shape).astype(np.float32)
    return hu, label


def bowel_loop(hu, truth):
    """The bowel loop of :func:`synthetic_slice`: the largest unlabelled region of muscle HU."""
    from scipy import ndimage as ndi

    regions, count = ndi.label((truth == 0) & (hu > 0) & (hu < 100))
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == int(np.argmax(sizes))


def muscle_plane(seed: int = 0):
    """:func:`synthetic_slice` (no bowel) with a thin fat plane (~0 HU, partial volume) splitting
    the muscle ring into two layers over its left side, as between abdominal wall layers.
    Returns (hu, truth, plane, line): truth has the plane as background; ``line`` is a
    one-pixel stroke along the plane's middle, 30 pixels long."""
    hu, truth = synthetic_slice(bowel=False, seed=seed)
    nx, ny = truth.shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    rho = np.hypot((x - nx / 2) / (nx * 0.33), (y - ny / 2) / (ny * 0.285))
    left = x < nx / 2 - nx * 0.2
    plane = (np.abs(rho - 1.0) < 0.012) & left & (truth == MUSCLE)
    hu = hu.copy()
    hu[plane] = np.random.default_rng(seed + 1).normal(-5, 8, plane.sum())
    truth = truth.copy()
    truth[plane] = 0
    line = plane & (np.abs(y - ny / 2) < 15)
    return hu, truth, plane, line


def bbox(mask, margin=3):
    return simulate_annotator.first_rectangle(mask, margin)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("tool", TOOLS, ids=lambda f: f.__name__)
def test_sat_from_rectangle_on_synthetic(tool):
    hu, truth = synthetic_slice()
    out = tool(hu, "sat", roi=bbox(truth == SAT), spacing=SPACING)
    assert metrics.iou(out == SAT, truth == SAT) >= 0.9
    assert set(np.unique(out)) <= {0, SAT}


@pytest.mark.parametrize("tool", TOOLS, ids=lambda f: f.__name__)
def test_muscle_bowel_separated_by_background_scribble(tool):
    hu, truth = synthetic_slice()
    roi = bbox(truth == MUSCLE)
    loop = (truth == 0) & (hu > 0) & (hu < 100)
    loop[:, int(truth.shape[1] * 0.6):] = False  # the bowel loop only (not skin at the back)
    bg = np.zeros_like(loop)
    xs, ys = np.nonzero(loop)
    bg[int(xs.mean()) - 2:int(xs.mean()) + 3, int(ys.mean())] = True
    out = tool(hu, "muscle", roi=roi, bg=bg, spacing=SPACING)
    assert np.count_nonzero((out == MUSCLE) & loop) < 0.1 * loop.sum()
    assert metrics.iou(out == MUSCLE, truth == MUSCLE) >= 0.9


def test_phantom_sat_and_vat_from_rectangle():
    phantom = pytest.importorskip("sarco_app.synthesis.phantom")
    ph = phantom.generate(1000, size=256)
    truth = np.asarray(ph.label)
    out = interactive.back_projection(ph.hu, "sat", roi=bbox(truth == SAT), spacing=ph.spacing)
    assert metrics.iou(out == SAT, truth == SAT) >= 0.88
    # VAT with the muscle and SAT already labelled (the order a person works in).
    current = np.where(np.isin(truth, (MUSCLE, SAT)), truth, 0).astype(np.uint8)
    out = interactive.grabcut(ph.hu, "vat", roi=bbox(truth == VAT), current=current,
                              spacing=ph.spacing)
    assert metrics.iou(out == VAT, truth == VAT) >= 0.8
    assert np.array_equal(out[current > 0], current[current > 0])


# --------------------------------------------------------------------------- merge rules


@pytest.mark.parametrize("tool", TOOLS, ids=lambda f: f.__name__)
def test_other_tissues_and_outside_roi_untouched(tool):
    hu, truth = synthetic_slice(bowel=False)
    current = np.where(truth == VAT, VAT, 0).astype(np.uint8)
    current[:20, :] = np.where(truth[:20, :] == MUSCLE, MUSCLE, current[:20, :])  # old muscle
    roi = (30, 140, 0, 120)
    out = tool(hu, "muscle", roi=roi, current=current, spacing=SPACING)
    assert np.array_equal(out[current == VAT], current[current == VAT])
    assert np.array_equal(out[:30], current[:30])  # outside the rectangle nothing changes
    assert (out[30:] == MUSCLE).sum() > 0.8 * (truth[30:] == MUSCLE).sum()


def test_foreground_scribble_overrides_other_tissue_and_background_wins():
    hu, truth = synthetic_slice(bowel=False)
    current = np.where(truth == VAT, VAT, 0).astype(np.uint8)
    fg = np.zeros(hu.shape, bool)
    fg[70:76, 60] = True  # on VAT: the user says it is muscle
    out = interactive.back_projection(hu, "muscle", roi=bbox(truth == MUSCLE), fg=fg,
                                      current=current, spacing=SPACING)
    assert (out[fg] == MUSCLE).all()
    bg = np.zeros(hu.shape, bool)
    mx, my = np.argwhere(truth == MUSCLE)[0]
    bg[mx, my] = True
    out = interactive.back_projection(hu, "muscle", roi=bbox(truth == MUSCLE), bg=bg,
                                      spacing=SPACING)
    assert out[mx, my] == 0


def test_merge_helper_rules():
    current = np.array([[0, 1, 3], [2, 1, 0], [0, 0, 4]], np.uint8)
    proposal = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1]], bool)
    fg = np.zeros((3, 3), bool)
    fg[0, 2] = True
    out = interactive.merge(current, proposal, "muscle", fg=fg, roi=(0, 3, 0, 3))
    expected = np.array([[1, 0, 1], [2, 1, 1], [0, 0, 4]], np.uint8)
    assert np.array_equal(out, expected)
    # Without a rectangle the old muscle at (0, 1) stays: the proposal only adds.
    out = interactive.merge(current, proposal, "muscle", fg=fg)
    assert out[0, 1] == MUSCLE and out[0, 0] == MUSCLE


def test_scribbles_only_without_rectangle():
    hu, truth = synthetic_slice(bowel=False)
    fg = np.zeros(hu.shape, bool)
    fg[70:80, 15] = True  # a short stroke in the front SAT
    assert (truth[fg] == SAT).all()
    out = interactive.back_projection(hu, "sat", fg=fg, spacing=SPACING)
    assert metrics.iou(out == SAT, truth == SAT) >= 0.85


@pytest.mark.parametrize("tool", TOOLS)
def test_background_stroke_edits_a_stored_label(tool):
    """The auto-label workflow: a stored label (e.g. the network's) that took the bowel loop as
    muscle is corrected with one background stroke and no rectangle."""
    hu, truth = synthetic_slice()
    loop = bowel_loop(hu, truth)
    current = truth.copy()
    current[loop] = MUSCLE
    bg = np.zeros(hu.shape, bool)
    xs, ys = np.nonzero(loop)
    cx, cy = int(np.median(xs)), int(np.median(ys))
    bg[cx - 2:cx + 3, cy] = True
    assert loop[bg].all()
    out = tool(hu, "muscle", bg=bg, current=current, spacing=SPACING)
    assert np.count_nonzero(out[loop] == MUSCLE) < 0.1 * loop.sum()
    assert metrics.iou(out == MUSCLE, truth == MUSCLE) >= 0.97  # the ring it touches stays
    assert (out[truth == SAT] == SAT).all() and (out[truth == VAT] == VAT).all()
    # Without the tissue in the current label a background stroke alone has nothing to edit.
    with pytest.raises(SarcoError, match="background scribbles alone"):
        tool(hu, "muscle", bg=bg, current=np.where(truth == SAT, SAT, 0), spacing=SPACING)


@pytest.mark.parametrize("tool", TOOLS)
def test_background_line_along_a_fat_plane_takes_the_plane_not_the_muscle_beside_it(tool):
    """A person zoomed in draws a one-pixel background line along a thin fat plane the stored
    label took as muscle: the plane goes, the muscle layers on both sides stay."""
    hu, truth, plane, line = muscle_plane()
    assert line.sum() >= 20 and not ndi.binary_erosion(line).any()
    current = truth.copy()
    current[plane] = MUSCLE
    out = tool(hu, "muscle", bg=line, current=current, spacing=SPACING)
    beside = ndi.binary_dilation(line, iterations=2) & plane
    assert np.count_nonzero(out[beside] == MUSCLE) < 0.2 * beside.sum()
    lost = (truth == MUSCLE) & (out != MUSCLE)
    assert lost.sum() < 0.5 * line.sum()  # the region rule alone took a band ~8x the line
    # Without a contrast (a line through tissue of the muscle's own HU) the region rule acts.
    flat = hu.copy()
    flat[plane] = 45
    out = tool(flat, "muscle", bg=line, current=current, spacing=SPACING)
    assert ((truth == MUSCLE) & (out != MUSCLE)).sum() > 2 * line.sum()


def test_volume_slice_index():
    hu, truth = synthetic_slice(bowel=False)
    vol = np.stack([np.full_like(hu, -1000), hu, np.full_like(hu, -1000)], axis=2)
    current = np.zeros(vol.shape, np.uint8)
    current[:, :, 2] = IMAT
    out = interactive.back_projection(vol, "sat", roi=bbox(truth == SAT), current=current,
                                      spacing=SPACING, slice_index=1)
    assert out.shape == vol.shape
    assert metrics.iou(out[:, :, 1] == SAT, truth == SAT) >= 0.9
    assert (out[:, :, 2] == IMAT).all() and (out[:, :, 0] == 0).all()
    # Scribbles on one slice pick that slice when slice_index is not given.
    fg = np.zeros(vol.shape, bool)
    xs, ys = np.nonzero(truth == SAT)
    fg[xs[0], ys[0], 1] = True
    out = interactive.back_projection(vol, "sat", fg=fg, spacing=SPACING)
    assert (out[:, :, 1] == SAT).sum() > 0.8 * (truth == SAT).sum()
    with pytest.raises(SarcoError, match="slice_index"):
        interactive.back_projection(vol, "sat", roi=bbox(truth == SAT), spacing=SPACING)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("tool", TOOLS, ids=lambda f: f.__name__)
def test_errors(tool):
    hu, truth = synthetic_slice()
    with pytest.raises(SarcoError, match="no foreground scribbles and no roi"):
        tool(hu, "muscle", fg=np.zeros(hu.shape, bool), spacing=SPACING)
    with pytest.raises(SarcoError, match="outside the image"):
        tool(hu, "muscle", roi=(500, 600, 10, 20), spacing=SPACING)
    with pytest.raises(SarcoError, match="unknown tissue"):
        tool(hu, "liver", roi=(10, 20, 10, 20), spacing=SPACING)
    with pytest.raises(SarcoError, match="shape"):
        tool(hu, "muscle", fg=np.ones((10, 10), bool), spacing=SPACING)
    with pytest.raises(SarcoError, match="empty"):
        tool(hu, "muscle", roi=(20, 10, 10, 20), spacing=SPACING)


def test_option_errors():
    hu, truth = synthetic_slice()
    roi = bbox(truth == SAT)
    with pytest.raises(SarcoError, match="iterations"):
        interactive.grabcut(hu, "sat", roi=roi, iterations=0)
    with pytest.raises(SarcoError, match="window"):
        interactive.grabcut(hu, "sat", roi=roi, window=(100, -100))
    with pytest.raises(SarcoError, match="bins"):
        interactive.back_projection(hu, "sat", roi=roi, bins=1)
    # Overrides that are valid change nothing essential.
    out = interactive.grabcut(hu, "sat", roi=roi, window=(-300, 100), iterations=2, spacing=SPACING)
    assert metrics.iou(out == SAT, truth == SAT) >= 0.9


# --------------------------------------------------------------------------- annotator


def test_annotator_scribbles_lie_in_the_largest_error():
    truth = np.zeros((60, 60), bool)
    truth[10:50, 10:50] = True
    pred = truth.copy()
    pred[10:30, 10:30] = False  # 400 px missed
    pred[52:58, 0:20] = True  # 120 px false
    kind, stroke = simulate_annotator.next_scribble(pred, truth)
    assert kind == "fg" and stroke.any()
    assert (truth & ~pred)[stroke].all()
    pred[10:30, 10:30] = True
    kind, stroke = simulate_annotator.next_scribble(pred, truth)
    assert kind == "bg" and (pred & ~truth)[stroke].all()
    assert simulate_annotator.next_scribble(truth, truth) is None


def test_annotator_session_reaches_goal_on_synthetic():
    hu, truth = synthetic_slice()
    tool = simulate_annotator.ours("backprojection")
    result = simulate_annotator.run_session(tool, hu, truth, "muscle",
                                            np.zeros(truth.shape, np.uint8), SPACING)
    assert result["reached"] and result["interactions"] <= 4
    assert result["ious"][-1] >= 0.95


def two_touching_blobs(n: int = 90):
    """A big disk (radius 22 px) and a smaller one (radius 12 px) overlapping in a neck about
    10 px wide: thicker than the contacts :func:`scribble_regions.contact_pieces` cuts at 1 mm pixels."""
    x, y = np.ogrid[:n, :n]
    big = (x - 30) ** 2 + (y - 45) ** 2 <= 22**2
    small = (x - 61) ** 2 + (y - 45) ** 2 <= 12**2
    return big, small & ~big


def test_background_stroke_removes_the_touching_blob_up_to_the_neck():
    big, small = two_touching_blobs()
    answer = big | small
    assert scribble_regions.contact_pieces(answer, (1.0, 1.0)).max() == 1  # one region: no thin contact
    bg = np.zeros_like(answer)
    bg[58:65, 45] = True  # a short stroke in the middle of the small blob
    out = scribble_regions.remove_marked(answer, np.zeros_like(answer), bg, (1.0, 1.0))
    assert np.count_nonzero(out & small) < 0.1 * small.sum()
    assert np.count_nonzero(out & big) > 0.95 * big.sum()


def test_foreground_stroke_adds_the_touching_blob_up_to_the_neck():
    big, small = two_touching_blobs()
    answer = np.zeros_like(big)
    answer[10:20, 40:50] = True  # something already labelled elsewhere
    fg = np.zeros_like(big)
    fg[58:65, 45] = True
    added = scribble_regions.add_touched(answer, big | small, fg, (1.0, 1.0))
    assert np.count_nonzero(added & small) > 0.9 * small.sum()
    assert np.count_nonzero(added & big & ~answer) < 0.1 * big.sum()


def test_annotator_brush_prefers_a_region_it_fits_and_falls_back_to_a_line():
    spacing = (0.7, 0.7)
    truth = np.zeros((80, 80), bool)
    truth[10:70, 10:70] = True
    pred = truth.copy()
    pred[10:70, 10] = False  # a 60-px, 1-px-wide missed sliver along the border
    pred[30:36, 30:36] = False  # a 36-px hole 4.2 mm wide: a 3 mm brush fits
    kind, stroke = simulate_annotator.next_scribble(pred, truth, spacing)
    assert kind == "fg" and (truth & ~pred)[stroke].all()
    assert stroke[30:36, 30:36].any() and not stroke[:, 10].any()
    assert np.count_nonzero(stroke) > 1  # painted with the brush, not a single pixel
    pred[30:36, 30:36] = True  # only the sliver is left: a one-pixel line inside it
    kind, stroke = simulate_annotator.next_scribble(pred, truth, spacing)
    assert kind == "fg" and stroke.any() and (truth & ~pred)[stroke].all()


def test_session_stopped_without_reaching_counts_as_the_cap():
    truth_label = np.zeros((40, 40), np.uint8)
    truth_label[10:30, 10:30] = MUSCLE

    def half_tool(hu, tissue, roi, fg, bg, current, spacing):
        out = np.zeros_like(truth_label)
        out[10:30, 10:20] = MUSCLE  # IoU 0.5 whatever the user does
        return out

    result = simulate_annotator.run_session(half_tool, np.zeros((40, 40), np.float32),
                                            truth_label, "muscle",
                                            np.zeros_like(truth_label), (1.0, 1.0), cap=10)
    assert not result["reached"] and result["interactions"] == 10


def test_markdown_table_from_summary(tmp_path):
    import pandas as pd

    path = tmp_path / "summary.csv"
    pd.DataFrame([{"tissue": "sat", "method": "grabcut", "n": 30, "interactions_mean": 2.5,
                   "interactions_median": 2.0, "reached_pct": 90.0,
                   "interactions_to_090_mean": 1.2, "reached_090_pct": 100.0,
                   "final_iou_mean": 0.951, "first_iou_mean": 0.93,
                   "latency_ms_mean": 123.4}]).to_csv(path, index=False)
    table = simulate_annotator.markdown_table(str(path)).splitlines()
    assert len(table) == 3
    assert table[2] == "| sat | grabcut | 30 | 2.5 / 2 | 90 % | 1.2 | 100 % | 0.930 | 0.951 | 123 |"
