#!/usr/bin/env python
"""Latency of the ``backprojection`` and ``grabcut`` tasks on a 512x512 slice over HTTP.

Starts the real MONAI Label server (``apps/sarcopenia``) on a temporary studies folder holding
one 512x512 phantom slice, then for each tool and tissue times ``--repeats`` requests of each
kind: a rectangle only, and a rectangle plus a scribble file (the scribbles a simulated
annotator draws after the first result). In the same run it times, on the same slice:

* the first request on the slice (it also computes the wall contours, cached afterwards);
* the library call in-process (no HTTP, no file I/O);
* the bare OpenCV call: ``cv2.calcBackProject`` of a tissue histogram over the slice, and
  ``cv2.grabCut`` with the same rectangle and iteration count (mask initialisation).

Writes ``<out>.csv`` (one row per timing kind) and prints the table.

Usage::

    .venv/bin/python -m scripts.bench_interactive --out docs/interactive_latency
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from sarco_app.interaction import interactive
from sarco_app.inputs.ingest import load_image, make_image, save_image
from sarco_app.labels import LABELS

from scripts import simulate_annotator

ROOT = Path(__file__).resolve().parents[1]


def scribble_file(fg, bg, image) -> bytes:
    """Scribbles (canonical masks) as the gzipped NIfTI a MONAI Label client sends."""
    import nibabel as nib

    scrib = np.zeros(fg.shape, np.uint8)
    scrib[bg] = len(LABELS) + 1
    scrib[fg] = len(LABELS) + 2
    img = nib.Nifti1Image(image.to_original(scrib), image.original_affine)
    return gzip.compress(img.to_bytes())


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tissues", default="muscle,sat")
    parser.add_argument("--out", default=str(ROOT / "docs" / "interactive_latency"))
    args = parser.parse_args(argv)

    import cv2
    import pandas as pd
    import requests

    cv2.setNumThreads(2)
    from sarco_app.synthesis import phantom

    ph = phantom.generate(args.seed, size=args.size)
    hu = np.asarray(ph.hu, np.float32)
    truth_label = np.asarray(ph.label)
    spacing = tuple(float(s) for s in ph.spacing[:2])
    work = Path(tempfile.mkdtemp(prefix="sarco_bench_"))
    studies = work / "studies"
    studies.mkdir()
    save_image(make_image(hu, spacing), studies / "slice.nii.gz")
    image = load_image(studies / "slice.nii.gz")
    hu_file = image.hu  # what the server sees (int16-rounded)

    rows = []

    def record(kind, method, tissue, times):
        t = np.asarray(times) * 1000.0
        rows.append({"kind": kind, "method": method, "tissue": tissue, "n": len(t),
                     "median_ms": round(float(np.median(t)), 1),
                     "p90_ms": round(float(np.percentile(t, 90)), 1),
                     "max_ms": round(float(t.max()), 1)})

    from tests.harness import RunningServer  # the test suite's server launcher

    server = RunningServer(studies, work / "server.log")
    url = server.url
    try:
        for tissue in args.tissues.split(","):
            value = LABELS[tissue]
            truth = truth_label == value
            roi = simulate_annotator.first_rectangle(truth)
            # The scribbles a person would add after the first back-projection result.
            first = interactive.back_projection(hu_file, tissue, roi=roi, spacing=spacing)
            kind, stroke = simulate_annotator.next_scribble(first == value, truth, spacing)
            fg = stroke if kind == "fg" else np.zeros_like(stroke)
            bg = stroke if kind == "bg" else np.zeros_like(stroke)
            payload = scribble_file(fg, bg, image)
            for method in ("backprojection", "grabcut"):
                def http(with_scribbles):
                    files = {"params": (None, json.dumps({"tissue": tissue, "roi": list(roi)}))}
                    if with_scribbles:
                        files["label"] = ("scribbles.nii.gz", payload, "application/octet-stream")
                    res = requests.post(f"{url}/infer/{method}?image=slice&output=image",
                                        files=files, timeout=120)
                    res.raise_for_status()

                # The first call on a slice also computes the slice's anatomy (cached after).
                record("http_first_call", method, tissue, timed(lambda: http(False), 1))
                record("http_rectangle", method, tissue, timed(lambda: http(False), args.repeats))
                record("http_rectangle+scribbles", method, tissue,
                       timed(lambda: http(True), args.repeats))
                fn = interactive.METHODS[method]
                record("library_in_process", method, tissue, timed(
                    lambda: fn(hu_file, tissue, roi=roi, fg=fg, bg=bg, spacing=spacing),
                    args.repeats))
            # Bare OpenCV references on the same slice.
            lo, hi = interactive.TISSUE_HU[value]
            mask = np.zeros(hu_file.shape, np.uint8)
            mask[roi[0]:roi[1], roi[2]:roi[3]] = 1
            img_t = np.ascontiguousarray(hu_file.T)
            mask_t = np.ascontiguousarray(mask.T)

            def bare_backprojection():
                hist = cv2.calcHist([img_t], [0], mask_t, [45], [lo, hi])
                cv2.normalize(hist, hist, 0, 1, cv2.NORM_MINMAX)
                cv2.calcBackProject([img_t], [0], hist, [lo, hi], scale=1)

            gray = interactive.window_to_uint8(img_t, interactive.GRABCUT_WINDOW[value])
            bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
            rect = (roi[0], roi[2], roi[1] - roi[0], roi[3] - roi[2])  # x, y, w, h in cv2 terms

            def bare_grabcut():
                m = np.zeros(gray.shape, np.uint8)
                bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
                cv2.grabCut(bgr, m, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)

            record("opencv_bare", "cv2.calcBackProject", tissue, timed(bare_backprojection, args.repeats))
            record("opencv_bare", "cv2.grabCut(5 it, rect)", tissue, timed(bare_grabcut, args.repeats))
    finally:
        server.stop()

    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(f"{out}.csv", index=False)
    print(f"slice {hu.shape[0]}x{hu.shape[1]} (phantom seed {args.seed}), {args.repeats} repeats, "
          f"CPU, cv2 threads 2")
    print(table.to_string(index=False))
    print(f"wrote {out}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
