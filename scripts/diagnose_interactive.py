#!/usr/bin/env python
"""Where the semi-automatic tools lose IoU, and how much a per-pixel HU rule could reach.

For each phantom and tissue (muscle, SAT) at the clinical 512x512 matrix:

* the IoU of back-projection after the first rectangle, and its error pixels split into
  (a) whole wrong components (error components of at least 50 mm^2: bowel, organs, missed
  muscles), (b) thin boundary disagreements (the rest within 1 pixel of the true border) and
  (c) specks (error components of at most 4 pixels elsewhere);
* the *oracle ceiling*: the best IoU any HU window ``lo <= HU <= hi`` (on the raw or the
  Gaussian-denoised image, with or without the tools' speck cleanup) reaches when it is only
  applied within ``k`` pixels of the true tissue (k = 1, 2, 5), i.e. with the components known
  and only the border left to HU. The truth is used here and only here: it is a ceiling, not
  a method.

Usage::

    .venv/bin/python -m scripts.diagnose_interactive --seeds 1000,1001,1002 --size 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from sarco_app import metrics

from sarco_app.interaction import interactive
from sarco_app.labels import FAT_HU, LABELS, MUSCLE_HU

from scripts import simulate_annotator as sim

ROOT = Path(__file__).resolve().parents[1]


def error_breakdown(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Fractions of the error pixels in whole components, border disagreements and specks."""
    err = pred ^ truth
    n = max(int(err.sum()), 1)
    eight = np.ones((3, 3), bool)
    labels, _ = ndi.label(err, structure=eight)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    big = np.isin(labels, np.flatnonzero(sizes >= 50.0 / (spacing[0] * spacing[1])))
    speck = np.isin(labels, np.flatnonzero((sizes > 0) & (sizes <= 4)))
    border = ndi.binary_dilation(truth, structure=eight) & ~ndi.binary_erosion(truth, structure=eight)
    thin = err & border & ~big
    return {"error_px": int(err.sum()), "whole_components": big.sum() / n,
            "border_1px": thin.sum() / n, "specks": (speck & ~thin).sum() / n}


def oracle(hu: np.ndarray, truth: np.ndarray, tissue: str, spacing, reach_px: int) -> tuple[float, str]:
    """Best IoU of an HU window applied within ``reach_px`` of the truth."""
    near = ndi.binary_dilation(truth, structure=np.ones((3, 3), bool), iterations=reach_px)
    lo0, hi0 = MUSCLE_HU if tissue == "muscle" else FAT_HU
    his = [hi0, hi0 + 100] if tissue == "muscle" else list(np.arange(hi0 - 30, hi0 + 31, 5))
    best = (0.0, "")
    for sigma_mm in (0.0, 0.6, 1.0):
        img = hu if sigma_mm == 0 else cv2.GaussianBlur(hu, (0, 0), sigmaX=sigma_mm / spacing[1],
                                                        sigmaY=sigma_mm / spacing[0])
        for lo in np.arange(lo0 - 50, lo0 + 51, 5):
            for hi in his:
                rule = near & (img >= lo) & (img <= hi)
                for clean in (False, True):
                    mask = interactive.remove_speckle(rule, LABELS[tissue], spacing) if clean else rule
                    value = metrics.iou(mask, truth)
                    if value > best[0]:
                        best = (value, f"sigma {sigma_mm} mm, {lo:.0f}..{hi:.0f} HU{' +cleanup' if clean else ''}")
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1000,1001,1002")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    print(f"matrix {args.size}x{args.size}; error split after the rectangle (back-projection); "
          "oracle = best HU window within k px of the truth")
    for seed in (int(s) for s in args.seeds.split(",")):
        hu, label, spacing = sim.load_phantom(seed, args.size)
        for tissue in ("muscle", "sat"):
            truth = label == LABELS[tissue]
            pred = interactive.back_projection(hu, tissue, roi=sim.first_rectangle(truth),
                                               spacing=spacing) == LABELS[tissue]
            parts = error_breakdown(pred, truth, spacing)
            ceilings = {k: oracle(hu, truth, tissue, spacing, k) for k in (1, 2, 5)}
            print(f"seed {seed} {tissue:6s} pixel {spacing[0]:.2f} mm  IoU {metrics.iou(pred, truth):.3f}  "
                  f"errors {parts['error_px']} px: whole components {parts['whole_components']:.0%}, "
                  f"1-px border {parts['border_1px']:.0%}, specks {parts['specks']:.0%}  |  oracle "
                  + ", ".join(f"k={k}: {v[0]:.3f}" for k, v in ceilings.items())
                  + f"  (k=1 best: {ceilings[1][1]})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
