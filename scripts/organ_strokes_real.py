#!/usr/bin/env python
"""One background stroke on a liver labelled muscle, on real upper-abdomen CT.

The real scans in ``../shared/data/real`` (``totalsegmentator-dicom-series``,
``dcmqi-ct-3slice``) are labelled with the shipped model (``sarco_app.segmentation.segment.segment_volume``,
middle slice). Where the model does not take the liver for muscle on that slice, the failure is
made by hand, as on the phantoms (``scripts/simulate_organ_strokes.py``): the liver part within
``--reach-mm`` of the model's muscle (and in the muscle HU range) is added to the muscle label.
The liver is found from HU alone: the largest soft-tissue region (smoothed HU 40-200, opened by
a 5 mm disk, deeper than 15 mm in the body, not muscle or SAT) on the patient's right, narrowed to its own HU band (median
+- 3 robust spreads). The simulated annotator (``simulate_annotator.next_scribble``, taking
the model's muscle as the truth) then paints one background stroke in the largest wrong
region, and ``back_projection`` edits the label with it; then up to ``--strokes`` strokes in
all, each in the largest wrong region left, as in the phantom study.

Prints, per scan, the liver pixels added, the share of them removed by the first stroke, the
model's muscle pixels lost, and the muscle IoU against the model label before and after it and
after each stroke; writes one PNG (per scan: model label | failure + first stroke | after it).

Usage::

    .venv/bin/python -m scripts.organ_strokes_real --out docs/organ_strokes_real
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from sarco_app import metrics

from sarco_app.interaction import interactive

from sarco_app.segmentation import threshold
from sarco_app.labels import MUSCLE, MUSCLE_HU, SAT
from scripts.simulate_annotator import next_scribble

ROOT = Path(__file__).resolve().parents[1]

SCANS = ("totalsegmentator-dicom-series", "dcmqi-ct-3slice")


def find_liver(hu: np.ndarray, label: np.ndarray, spacing) -> np.ndarray:
    """The liver on an upper-abdomen slice, from HU: the largest soft-tissue region deep in the
    body on the patient's right (small x in canonical order), in its own HU band."""
    smooth = ndi.gaussian_filter(hu.astype(np.float32), sigma=[2.0 / s for s in spacing])
    body = threshold.body_mask(hu, spacing)
    deep = ndi.distance_transform_edt(body, sampling=spacing) > 15.0  # not skin, SAT or wall
    soft = deep & (smooth > 40) & (smooth < 200) & ~np.isin(label, (MUSCLE, SAT))
    soft = ndi.binary_opening(soft, structure=threshold.ellipse_kernel(5.0, spacing))
    xs = np.nonzero(body)[0]
    soft[int((xs.min() + xs.max()) / 2):, :] = False  # the patient's right half
    regions, count = ndi.label(soft)
    if count == 0:
        return soft
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    liver = regions == int(np.argmax(sizes))
    centre = float(np.median(smooth[liver]))
    spread = 1.4826 * float(np.median(np.abs(smooth[liver] - centre)))
    band = body & (np.abs(smooth - centre) <= 3.0 * max(spread, 3.0))
    regions, _ = ndi.label(band)
    hit = np.unique(regions[liver & band])
    return np.isin(regions, hit[hit > 0]) & ~np.isin(label, (SAT,))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"))
    parser.add_argument("--reach-mm", type=float, default=20.0)
    parser.add_argument("--strokes", type=int, default=3, help="strokes of the simulated annotator")
    parser.add_argument("--out", default=str(ROOT / "docs" / "organ_strokes_real"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sarco_app.inputs.ingest import load_image
    from sarco_app.figures.overlay import label_rgba
    from sarco_app.segmentation.segment import segment_volume

    panels = []
    for name in SCANS:
        path = Path(args.data) / name
        if not path.exists():
            print(f"{name}: not found under {args.data}, skipped")
            continue
        image = load_image(path)
        hu = image.hu if image.hu.ndim == 2 else image.hu[:, :, image.hu.shape[2] // 2]
        hu = np.asarray(hu, np.float32)
        spacing = tuple(float(s) for s in image.pixel_spacing[:2])
        model_label = segment_volume(hu, spacing).label
        model_muscle = model_label == MUSCLE
        liver = find_liver(hu, model_label, spacing)
        labelled_liver = np.count_nonzero(liver & model_muscle)
        near = ndi.distance_transform_edt(~model_muscle, sampling=spacing) <= args.reach_mm
        in_range = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])
        added = liver & near & in_range & ~model_muscle & (model_label == 0)
        failure = model_label.copy()
        failure[added] = MUSCLE
        # Strokes as in the phantom study: each in the largest wrong region, accumulating.
        fg, bg = np.zeros(hu.shape, bool), np.zeros(hu.shape, bool)
        pred, ious, first = failure == MUSCLE, [], None
        for _ in range(args.strokes):
            found = next_scribble(pred, model_muscle, spacing)
            if found is None:
                break
            kind, stroke = found
            (fg if kind == "fg" else bg)[stroke] = True
            (bg if kind == "fg" else fg)[stroke] = False
            label = interactive.back_projection(hu, "muscle", fg=fg, bg=bg, current=failure,
                                                spacing=spacing)
            pred = label == MUSCLE
            ious.append(metrics.iou(pred, model_muscle))
            if first is None:
                first = (kind, stroke, label)
        kind, stroke, after = first
        muscle_after = after == MUSCLE
        removed = np.count_nonzero(added & ~muscle_after)
        lost = np.count_nonzero(model_muscle & ~muscle_after & ~stroke)
        cm2 = spacing[0] * spacing[1] / 100.0
        print(f"{name}: liver {np.count_nonzero(liver) * cm2:.1f} cm2 found "
              f"({labelled_liver} px of it labelled muscle by the model); added to muscle "
              f"{np.count_nonzero(added) * cm2:.1f} cm2; one {kind} stroke of "
              f"{np.count_nonzero(stroke)} px removed {100.0 * removed / max(np.count_nonzero(added), 1):.1f} % "
              f"of it; model muscle lost {lost * cm2:.2f} cm2; muscle IoU vs model "
              f"{metrics.iou(failure == MUSCLE, model_muscle):.3f} -> "
              f"{metrics.iou(muscle_after, model_muscle):.3f}; after each of up to "
              f"{args.strokes} strokes: {', '.join(f'{v:.3f}' for v in ious)}")
        panels.append((name, hu, spacing, model_label, failure, stroke, after))

    if not panels:
        return 1
    fig, axes = plt.subplots(len(panels), 3, figsize=(13, 4.4 * len(panels)), squeeze=False)
    for row, (name, hu, spacing, model_label, failure, stroke, after) in zip(axes, panels):
        nx, ny = hu.shape
        extent = (0.0, nx * spacing[0], ny * spacing[1], 0.0)
        for ax, label, title in zip(row, (model_label, failure, after),
                                    ("shipped model", "liver near the wall added to muscle + stroke",
                                     "after one background stroke")):
            ax.imshow(hu.T, cmap="gray", vmin=-160, vmax=240, extent=extent)
            ax.imshow(label_rgba(label.T), extent=extent)
            if label is failure:
                overlay = np.zeros(stroke.T.shape + (4,))
                overlay[stroke.T] = (0.1, 0.3, 1.0, 1.0)
                ax.imshow(overlay, extent=extent)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    out = Path(f"{args.out}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
