"""Throughput of ``cohort --input`` serially and on a local Dask cluster, on whole 3D phantoms.

Writes ``--scans`` volume phantoms (T10 to the femoral heads, ``--matrix`` pixels in plane,
3 mm slices; 256 x 256 phantoms upsampled in plane, as a 512 x 512 clinical matrix) as NIfTI
into a temporary folder, then runs :func:`sarco_app.measurement.cohort_raw.quantify_raw_folder`
(U-Net, overlays on, ``force``) with 1 worker (in this process), 2 workers and N workers (local
Dask clusters; default N = the CPU cores). Reports, all from this one process:

* throughput (scans per minute, measuring only and with the cluster start) and its ratio
  against the 1-worker run;
* memory per worker: the largest peak RSS of a worker process (MiB; for 1 worker this process,
  the phantoms being written by a child process);
* time per scan split into read, L3, segment, quantify and write (overlay PNG + part file),
  mean seconds over the measured scans.

Usage: ``python -m scripts.bench_cohort [--scans 8] [--matrix 512] [--workers 1 2 4]
[--csv docs/cohort_bench.csv]``
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from sarco_app.inputs.ingest import make_image
from sarco_app.measurement.cohort_raw import quantify_raw_folder
from sarco_app.parallel import default_workers
from sarco_app.synthesis.phantom3d.build import make_volume_phantom
from sarco_app.synthesis.phantom3d.writing import save_volume

logger = logging.getLogger("scripts.bench_cohort")
STEPS = ("read", "l3", "segment", "quantify", "write")


def write_phantoms(folder: Path, n: int, matrix: int) -> list[tuple[int, ...]]:
    """``n`` whole phantoms (seeds 700...) as NIfTI in ``folder``; returns their shapes."""
    shapes = []
    for seed in range(700, 700 + n):
        base = 256 if matrix >= 256 else matrix
        small, _ = make_volume_phantom(seed, matrix=base, pixel_spacing=1.5 * 256 / base, slice_thickness=3.0,
                                       coverage="full", variants=[])
        factor = max(1, matrix // base)
        hu = np.repeat(np.repeat(small.hu, factor, axis=0), factor, axis=1)
        spacing = (small.spacing[0] / factor, small.spacing[1] / factor, small.spacing[2])
        origin = (-small.affine[0, 3], -small.affine[1, 3], small.affine[2, 3])
        image = make_image(hu, spacing, small.patient, origin=origin)
        save_volume(image, folder / f"phantom{seed}.nii.gz")
        shapes.append(hu.shape)
    return shapes


def summarise(workers: int, result: dict, n_scans: int) -> dict:
    records = [r for r in result["records"].values() if r["row"]["status"] == "ok"]
    steps = {}
    for step in STEPS:
        values = [r["seconds"].get(step, 0.0) + (r["seconds"].get("part", 0.0) if step == "write" else 0.0)
                  for r in records]
        steps[step] = float(np.mean(values)) if values else float("nan")
    peaks: dict[int, float] = {}
    for record in records:
        worker = record["worker"]
        peaks[worker["pid"]] = max(peaks.get(worker["pid"], 0.0), worker["peak_rss_mb"])
    measure_s = result["wall_s"] - result["startup_s"]
    return {
        "workers": workers,
        "executor": result["executor"],
        "scans": n_scans,
        "ok": len(records),
        "startup_s": round(result["startup_s"], 2),
        "measure_s": round(measure_s, 2),
        "scans_per_min": round(60 * n_scans / measure_s, 2),
        "scans_per_min_with_start": round(60 * n_scans / result["wall_s"], 2),
        "worker_processes": len(peaks),
        "worker_peak_rss_mb": round(max(peaks.values()), 0) if peaks else None,
        "model_loads": sum(max(r["worker"].get("model_loads", 0) for r in records if r["worker"]["pid"] == pid)
                           for pid in peaks),
        **{f"{step}_s": round(value, 3) for step, value in steps.items()},
        "scan_s": round(sum(steps.values()), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=8, help="phantom series per run (default 8)")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane pixels (default 512)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to compare (default: 1, 2 and the CPU cores)")
    parser.add_argument("--csv", type=Path, default=None, help="write the table here (docs/cohort_bench.csv)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)  # this script's progress only, not Dask's own INFO lines
    logger.setLevel(logging.INFO)
    counts = args.workers or sorted({1, 2, default_workers()})
    if 1 not in counts:
        counts = [1, *counts]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        folder = Path(tmp) / "input"
        folder.mkdir()
        # Written by a child process, so this process's peak RSS (the 1-worker figure) is the cohort's alone.
        with ProcessPoolExecutor(max_workers=1) as pool:
            shapes = pool.submit(write_phantoms, folder, args.scans, args.matrix).result()
        size_mb = sum(p.stat().st_size for p in folder.glob("*.nii.gz")) / 2**20
        logger.info("%d phantoms %s, %.0f MiB of .nii.gz; %s, %d CPUs visible", len(shapes), shapes[0], size_mb,
                    platform.processor() or platform.machine(), os.cpu_count())
        for workers in counts:
            out = Path(tmp) / f"w{workers}" / "cohort.xlsx"
            result = quantify_raw_folder(folder, out, method="unet", workers=workers, force=True, progress=False)
            rows.append(summarise(workers, result, len(shapes)))
            logger.info("%s", rows[-1])
    base = rows[0]
    for row in rows:
        row["throughput_ratio"] = round(row["scans_per_min"] / base["scans_per_min"], 2)
        row["throughput_ratio_with_start"] = round(row["scans_per_min_with_start"] / base["scans_per_min_with_start"], 2)
    print(f"\n{len(shapes)} phantoms {'x'.join(map(str, shapes[0]))}, U-Net, overlays; "
          f"{os.cpu_count()} CPUs visible")
    print("| workers | scans/min | ratio vs 1 | with cluster start | peak RSS per worker (MiB) | "
          "read | L3 | segment | quantify | write (s per scan) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['scans_per_min']:.1f} | {row['throughput_ratio']:.2f} | "
              f"{row['scans_per_min_with_start']:.1f} ({row['startup_s']:.1f} s start) | "
              f"{row['worker_peak_rss_mb']:.0f} | "
              + " | ".join(f"{row[f'{s}_s']:.2f}" for s in STEPS) + " |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
