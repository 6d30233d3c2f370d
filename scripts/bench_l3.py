"""Runtime of the L3 locator on CPU for a 512 x 512 x 100 volume (target: <= 5 s).

Builds a volume phantom (256 x 256 pixels of 1.5 mm, 100 slices of 3 mm), upsamples it in
plane to 512 x 512 (0.75 mm pixels, a typical abdominal CT matrix) and times
:func:`sarco_app.spine.l3.locate_l3` (best and median of ``--repeats`` runs, one thread).

Usage: ``python -m scripts.bench_l3 [--repeats 3] [--csv docs/l3_bench.csv]``
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

from sarco_app.inputs.ingest import make_image
from sarco_app.spine.l3 import locate_l3
from sarco_app.synthesis.phantom3d.build import make_volume_phantom

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    small, truth = make_volume_phantom(args.seed, matrix=256, pixel_spacing=1.5, slice_thickness=3.0,
                                       coverage=(-20.0, 277.0), variants=[])
    hu = np.repeat(np.repeat(small.hu, 2, axis=0), 2, axis=1)[:, :, :100]
    origin = (-small.affine[0, 3], -small.affine[1, 3], small.affine[2, 3])
    image = make_image(hu, (0.75, 0.75, 3.0), small.patient, origin=origin)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = locate_l3(image)
        times.append(time.perf_counter() - start)
    error = result.z_mm - truth.l3_z_mm if result.found and truth.l3_z_mm is not None else None
    print(f"volume {image.hu.shape} ({image.hu.nbytes / 2**20:.0f} MiB float32), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible")
    print(f"locate_l3: best {min(times):.2f} s, median {np.median(times):.2f} s over {len(times)} runs "
          f"(target <= 5 s); found={result.found} error={error if error is None else round(error, 1)} mm")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["shape", "runs", "best_s", "median_s", "found", "error_mm"])
            writer.writerow(["x".join(map(str, image.hu.shape)), len(times), round(min(times), 3),
                             round(float(np.median(times)), 3), result.found,
                             None if error is None else round(error, 2)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
