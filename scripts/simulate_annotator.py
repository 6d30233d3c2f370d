#!/usr/bin/env python
"""Simulated annotator: how many interactions each semi-automatic tool needs per tissue.

The annotator works like a person: first a rectangle around the target tissue (its bounding box
plus a small margin), then, while the tissue's IoU is below the goal, one scribble in the
largest wrong region: a foreground stroke in the largest missed region, a background stroke in
the largest false region (a short stroke along the region's middle, away from its edges).
Scribbles accumulate, as in Slicer/OHIF, and each tool call gets all of them plus the rectangle.

Compared on the same phantoms and the same interactions:

* ``backprojection`` and ``grabcut`` from :mod:`sarco_app.interaction.interactive` (called in-process);
* MONAI Label's built-in ``HistogramBasedGraphCut`` task (its own pre/post transforms, run
  through the task's ``__call__`` on NIfTI files like the server does, with ``pix_dim`` set to
  the phantom's spacing instead of its 2.5 mm default); its foreground mask is merged into the
  label map with the same rules as our tools (:func:`sarco_app.interaction.interactive.merge`).

Protocol ``--start empty`` (default): muscle and SAT are labelled on an empty label map; VAT and
IMAT on a map that already holds the true muscle and SAT (the order a person works in).
Protocol ``--start auto`` (the paper's workflow: "Sarcopenia Predict", then correct): the first
interaction is the automatic label (``bodycomp_unet``'s default output); the annotator then only
paints strokes, no rectangle, and every tool call edits that label. Writes a per-session CSV, a
summary CSV and a PNG plot.

Usage::

    .venv/bin/python -m scripts.simulate_annotator --n 30 --size 256 --out docs/interactive
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from sarco_app import metrics

from sarco_app.interaction import interactive
from sarco_app.labels import LABELS, MUSCLE, SAT

ROOT = Path(__file__).resolve().parents[1]

TISSUES = ("muscle", "sat", "vat", "imat")
METHODS = ("backprojection", "grabcut", "histogram_graphcut")


# --------------------------------------------------------------------------- the annotator


def first_rectangle(truth: np.ndarray, margin_px: int = 4) -> tuple[int, int, int, int]:
    """A rectangle around the true tissue (bounding box + ``margin_px``), as a person draws it:
    ``(x0, x1, y0, y1)`` half-open voxel indices."""
    xs, ys = np.nonzero(truth)
    nx, ny = truth.shape
    return (max(0, int(xs.min()) - margin_px), min(nx, int(xs.max()) + 1 + margin_px),
            max(0, int(ys.min()) - margin_px), min(ny, int(ys.max()) + 1 + margin_px))


#: Brush diameters (mm) of the simulated annotator, as in Slicer's paint effect: the wide one
#: first; where no wrong region is wide enough for it, the person zooms in and paints a
#: one-pixel line (0 mm: the stroke's centre line only).
BRUSHES_MM = (3.0, 0.0)


def next_scribble(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0),
                  stroke_mm: float = 25.0) -> tuple[str, np.ndarray] | None:
    """:func:`scribble_with_brush` with the widest brush of :data:`BRUSHES_MM` that fits."""
    for brush_mm in BRUSHES_MM:
        found = scribble_with_brush(pred, truth, spacing, stroke_mm, brush_mm)
        if found is not None:
            return found
    return None


def scribble_with_brush(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0),
                        stroke_mm: float = 25.0, brush_mm: float = 3.0
                        ) -> tuple[str, np.ndarray] | None:
    """Where a person would paint next: a brush stroke in the largest wrong region it fits in.

    Parameters
    ----------
    pred, truth : (X, Y) bool arrays
        Current result and the truth for the target tissue.
    spacing : (sx, sy) mm.
    stroke_mm : half-length of the stroke around the region's deepest point (mm).
    brush_mm : brush diameter (mm); the painted stroke is its centre line widened by the brush.

    Returns ``('fg' | 'bg', stroke_mask)`` or ``None`` when no wrong region is wide enough for
    the brush (a person cannot paint inside a 1-pixel sliver without marking right pixels).
    The stroke runs along the region's middle (skeleton), never marking a pixel wrongly.
    """
    from sarco_app.segmentation.threshold import ellipse_kernel

    brush = ellipse_kernel(brush_mm / 2.0, spacing) if brush_mm > 0 else np.ones((1, 1), bool)
    best = None
    for kind, wrong in (("fg", truth & ~pred), ("bg", pred & ~truth)):
        # Where the brush's centre may go so that the whole brush stays in the wrong region.
        centre_ok = ndi.binary_erosion(wrong, structure=brush)
        labels, count = ndi.label(wrong, structure=np.ones((3, 3), bool))
        if count == 0 or not centre_ok.any():
            continue
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        fits = np.zeros(count + 1, bool)
        fits[np.unique(labels[centre_ok])] = True
        sizes[~fits] = 0
        k = int(np.argmax(sizes))
        if sizes[k] > 0 and (best is None or sizes[k] > best[2]):
            best = (kind, labels == k, int(sizes[k]), centre_ok & (labels == k))
    if best is None:
        return None
    kind, region, _, centre_ok = best
    depth = ndi.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1]
    depth[~centre_ok] = 0
    cx, cy = np.unravel_index(int(np.argmax(depth)), depth.shape)
    xs, ys = np.ogrid[: region.shape[0], : region.shape[1]]
    near = ((xs - cx) * spacing[0]) ** 2 + ((ys - cy) * spacing[1]) ** 2 <= stroke_mm**2
    line = skeletonize(region) & near & centre_ok
    line[cx, cy] = True
    line = _components_of(line, cx, cy)
    stroke = ndi.binary_dilation(line, structure=brush) & region
    return kind, stroke


def _components_of(mask: np.ndarray, cx: int, cy: int) -> np.ndarray:
    """The 8-connected component of ``mask`` holding pixel (cx, cy): one continuous stroke."""
    labels, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
    return labels == labels[cx, cy]


# --------------------------------------------------------------------------- the tools


def ours(name: str):
    fn = interactive.METHODS[name]

    def call(hu, tissue, roi, fg, bg, current, spacing):
        return fn(hu, tissue, roi=roi, fg=fg, bg=bg, current=current, spacing=spacing)

    return call


class HistogramGraphCutBaseline:
    """MONAI Label's ``HistogramBasedGraphCut`` fed the same rectangle and scribbles."""

    def __init__(self, workdir: Path):
        from monailabel.scribbles.infer import HistogramBasedGraphCut

        class Compatible(HistogramBasedGraphCut):
            # With monai >= 1.5 Spacingd updates every "image_*" key as a meta dict, and
            # BasicInferTask's "image_path" string breaks it: hide that key meanwhile.
            def run_pre_transforms(self, data, transforms):
                path = data.pop("image_path", None)
                data = super().run_pre_transforms(data, transforms)
                if path is not None:
                    data["image_path"] = path
                return data

        self.cls = Compatible
        self.workdir = workdir
        self._image_key = None

    def _image(self, hu, spacing):
        import nibabel as nib

        key = (id(hu), hu.shape)
        if key != self._image_key:
            affine = np.diag([-spacing[0], -spacing[1], 1.0, 1.0])
            nib.save(nib.Nifti1Image(hu[:, :, None].astype(np.int16), affine),
                     str(self.workdir / "image.nii.gz"))
            self.task = self.cls(dimension=3, pix_dim=(spacing[0], spacing[1], 1.0))
            self._image_key = key
            self.affine = affine
        return str(self.workdir / "image.nii.gz")

    def __call__(self, hu, tissue, roi, fg, bg, current, spacing):
        import nibabel as nib

        image = self._image(hu, spacing)
        scrib = np.zeros(hu.shape, np.uint8)
        scrib[bg] = self.task.scribbles_bg_label
        scrib[fg] = self.task.scribbles_fg_label
        scrib_path = str(self.workdir / "scribbles.nii.gz")
        nib.save(nib.Nifti1Image(scrib[:, :, None], self.affine), scrib_path)
        box = roi if roi is not None else (0, hu.shape[0], 0, hu.shape[1])
        request = {"image": image, "label": scrib_path, "device": "cpu",
                   "roi": [box[0], box[1], box[2], box[3], 0, 1]}
        result_path, _ = self.task(request)
        pred = np.asarray(nib.load(result_path).dataobj)
        os.unlink(result_path)
        pred = pred.reshape(pred.shape[:2]) > 0
        return interactive.merge(current, pred, tissue, fg=fg, bg=bg, roi=roi)


# --------------------------------------------------------------------------- a session


def session_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of the annotator's current tissue mask against the truth, as a number.

    :func:`sarco_app.metrics.iou` is ``None`` when both masks are empty (the project's rule: there
    is nothing to compare). For the annotator that case is a finished tissue: a label that
    rightly holds none of a tissue needs no stroke, so it counts IoU 1 (0 would send the
    annotator stroking a region that does not exist until the cap).
    """
    value = metrics.iou(pred, truth)
    return 1.0 if value is None else float(value)


def run_session(tool, hu, truth_label, tissue, current0, spacing, *, goal=0.95, cap=10,
                auto_seconds: float | None = None):
    """Interactions until the tissue's IoU reaches ``goal`` (at most ``cap``).

    With ``auto_seconds`` (protocol ``auto``) the first interaction is ``current0`` itself, the
    automatic label that took that long, and no rectangle is drawn: strokes edit it.
    Returns dict(interactions, reached, final_iou, mean_latency_s, ious).
    """
    value = LABELS[tissue]
    truth = truth_label == value
    roi = None if auto_seconds is not None else first_rectangle(truth)
    fg = np.zeros(hu.shape, bool)
    bg = np.zeros(hu.shape, bool)
    ious, latencies = [], []
    for step in range(1, cap + 1):
        start = time.perf_counter()
        if auto_seconds is not None and step == 1:
            label = current0
            latencies.append(auto_seconds)
        else:
            label = tool(hu, tissue, roi, fg, bg, current0, spacing)
            latencies.append(time.perf_counter() - start)
        pred = label == value
        ious.append(session_iou(pred, truth))
        if ious[-1] >= goal:
            break
        nxt = next_scribble(pred, truth, spacing)
        if nxt is None:
            break
        kind, stroke = nxt
        (fg if kind == "fg" else bg)[stroke] = True
        (bg if kind == "fg" else fg)[stroke] = False
    reached = ious[-1] >= goal
    # A session stopped early (no wrong region a brush fits in) has not reached the goal
    # within the cap: it counts as the cap.
    return {"interactions": len(ious) if reached else cap, "reached": reached, "final_iou": ious[-1],
            "calls": len(ious), "mean_latency_s": float(np.mean(latencies)), "ious": ious}


def starting_label(truth_label: np.ndarray, tissue: str) -> np.ndarray:
    """Empty for muscle and SAT; true muscle + SAT for VAT and IMAT."""
    if tissue in ("muscle", "sat"):
        return np.zeros(truth_label.shape, np.uint8)
    return np.where(np.isin(truth_label, (MUSCLE, SAT)), truth_label, 0).astype(np.uint8)


def load_phantom(seed: int, size: int):
    """(hu (X, Y), label, spacing) of phantom ``seed`` at ``size`` x ``size``."""
    from sarco_app.synthesis import phantom

    ph = phantom.generate(seed, size=size)
    hu = np.asarray(ph.hu, dtype=np.float32)
    label = np.asarray(ph.label)
    if hu.ndim == 3:
        hu, label = hu[:, :, hu.shape[2] // 2], label[:, :, label.shape[2] // 2]
    return hu, label.astype(np.uint8), tuple(float(s) for s in ph.spacing[:2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="phantoms per tissue")
    parser.add_argument("--size", type=int, default=256, help="phantom matrix (pixels)")
    parser.add_argument("--seed0", type=int, default=1000, help="first phantom seed")
    parser.add_argument("--start", choices=("empty", "auto"), default="empty",
                        help="empty: rectangle first; auto: the automatic label first, then strokes")
    parser.add_argument("--model", default=None, help="checkpoint for --start auto (default: the served one)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tissues", default=",".join(TISSUES))
    parser.add_argument("--out", default=str(ROOT / "docs" / "interactive"),
                        help="output prefix: <out>_sessions.csv, <out>_summary.csv, <out>.png")
    parser.add_argument("--markdown-from", metavar="SUMMARY_CSV",
                        help="only print the Markdown results table of an existing summary CSV")
    args = parser.parse_args(argv)
    if args.markdown_from:
        print(markdown_table(args.markdown_from))
        return 0

    import logging

    import pandas as pd

    logging.disable(logging.WARNING)  # MONAI Label logs every task call

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    methods = [m for m in args.methods.split(",") if m]
    tissues = [t for t in args.tissues.split(",") if t]
    model = None
    if args.start == "auto":
        from sarco_app.segmentation.segment import get_model, segment_volume

        model = get_model(args.model)
        print(f"start: automatic label of {model.path}")
    workdir = Path(tempfile.mkdtemp(prefix="sarco_annot_"))
    tools = {}
    for m in methods:
        tools[m] = HistogramGraphCutBaseline(workdir) if m == "histogram_graphcut" else ours(m)

    rows = []
    begin = time.time()
    for i in range(args.n):
        seed = args.seed0 + i
        hu, truth_label, spacing = load_phantom(seed, args.size)
        if args.start == "auto":
            t0 = time.perf_counter()
            auto_label = (segment_volume(hu, spacing, method="unet", model=model).label,
                          time.perf_counter() - t0)
        for tissue in tissues:
            if not (truth_label == LABELS[tissue]).any():
                continue
            if args.start == "auto":
                current0, auto_seconds = auto_label
            else:
                current0, auto_seconds = starting_label(truth_label, tissue), None
            for m in methods:
                res = run_session(tools[m], hu, truth_label, tissue, current0, spacing,
                                  auto_seconds=auto_seconds)
                at_090 = [k + 1 for k, v in enumerate(res["ious"]) if v >= 0.90]
                rows.append({"seed": seed, "tissue": tissue, "method": m,
                             "interactions": res["interactions"], "reached": res["reached"],
                             "interactions_to_090": at_090[0] if at_090 else 10,
                             "reached_090": bool(at_090),
                             "final_iou": round(res["final_iou"], 4),
                             "first_iou": round(res["ious"][0], 4),
                             "mean_latency_s": round(res["mean_latency_s"], 4),
                             "ious": ";".join(f"{v:.4f}" for v in res["ious"])})
        print(f"phantom {i + 1}/{args.n} done ({time.time() - begin:.0f} s)", flush=True)

    sessions = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sessions.to_csv(f"{out}_sessions.csv", index=False)
    summary = (sessions.groupby(["tissue", "method"], sort=False)
               .agg(n=("seed", "size"), interactions_mean=("interactions", "mean"),
                    interactions_median=("interactions", "median"),
                    reached_pct=("reached", lambda s: 100.0 * s.mean()),
                    interactions_to_090_mean=("interactions_to_090", "mean"),
                    reached_090_pct=("reached_090", lambda s: 100.0 * s.mean()),
                    final_iou_mean=("final_iou", "mean"), first_iou_mean=("first_iou", "mean"),
                    latency_ms_mean=("mean_latency_s", lambda s: 1000.0 * s.mean()))
               .round(3).reset_index())
    summary.to_csv(f"{out}_summary.csv", index=False)
    print(f"matrix {args.size}x{args.size}, {args.n} phantoms, goal IoU >= 0.95, cap 10")
    print(summary.to_string(index=False))
    print(markdown_table(f"{out}_summary.csv"))
    plot(sessions, f"{out}.png", tissues, methods)
    print(f"wrote {out}_sessions.csv, {out}_summary.csv, {out}.png")
    return 0


def markdown_table(summary_csv: str) -> str:
    """The docs' results table (Markdown) from a summary CSV written by :func:`main`."""
    import pandas as pd

    summary = pd.read_csv(summary_csv)
    lines = ["| tissue | method | n | interactions to IoU >= 0.95 (mean / median, cap 10) | "
             "reached 0.95 | interactions to IoU >= 0.90 (mean) | reached 0.90 | "
             "IoU after 1st | final IoU | latency per call (ms, in-process) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.tissue} | {r.method} | {r.n} | {r.interactions_mean:.1f} / "
                     f"{r.interactions_median:g} | {r.reached_pct:.0f} % | "
                     f"{r.interactions_to_090_mean:.1f} | {r.reached_090_pct:.0f} % | "
                     f"{r.first_iou_mean:.3f} | {r.final_iou_mean:.3f} | {r.latency_ms_mean:.0f} |")
    return "\n".join(lines)


def plot(sessions, path: str, tissues, methods) -> None:
    """Top: interactions to IoU 0.95 and 0.90 (cap 10). Bottom: mean IoU after k interactions
    (a session that reached 0.95 keeps its last IoU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 6.5))
    n = len(tissues)
    grid = fig.add_gridspec(2, 2 * n)  # top: two plots of n columns; bottom: one per tissue
    width = 0.8 / len(methods)
    x = np.arange(len(tissues))
    for col, (column, title) in enumerate((("interactions", "interactions to IoU >= 0.95 (cap 10)"),
                                           ("interactions_to_090", "interactions to IoU >= 0.90 (cap 10)"))):
        ax = fig.add_subplot(grid[0, col * n:(col + 1) * n])
        for j, m in enumerate(methods):
            sub = sessions[sessions.method == m].groupby("tissue")[column].mean()
            ax.bar(x + j * width, [sub.get(t, np.nan) for t in tissues], width, label=m)
        ax.axhline(3, color="k", lw=0.8, ls="--")
        ax.set_xticks(x + width * (len(methods) - 1) / 2, tissues)
        ax.set_ylim(0, 10.5)
        ax.set_title(title, fontsize=10)
        if col == 0:
            ax.legend(fontsize=8, loc="lower left")
    for i, tissue in enumerate(tissues):
        ax = fig.add_subplot(grid[1, 2 * i:2 * i + 2])
        for m in methods:
            sub = sessions[(sessions.method == m) & (sessions.tissue == tissue)]
            curves = []
            for text in sub.ious:
                values = [float(v) for v in str(text).split(";")]
                curves.append(values + [values[-1]] * (10 - len(values)))
            if curves:
                ax.plot(np.arange(1, 11), np.mean(curves, axis=0), marker="o", ms=3, label=m)
        ax.axhline(0.95, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("interactions")
        ax.set_title(f"{tissue}: mean IoU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
