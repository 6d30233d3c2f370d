#!/usr/bin/env python
"""What the label checks at save cost: ``PUT /datastore/label`` round trips on the real server,
and the bare :func:`sarco_app.labels.check_label_file` time in this process, for a 512x512
slice and a 512x512xN volume.

Starts the real MONAI Label server (``apps/sarcopenia``, hardened datastore) on a temporary
studies folder holding the two images, saves a valid final label ``--repeats`` times for each
and prints median / min / max wall time of the HTTP round trip (upload, checks, atomic write,
datastore JSON), then the median time of the checks alone.

    .venv/bin/python -m scripts.bench_label_save [--repeats 10] [--slices 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slices", type=int, default=60, help="slices of the volume case")
    args = parser.parse_args(argv)

    from tests.harness import RunningServer  # the test suite's server launcher

    from sarco_app.labels import check_label_file

    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        cases = {"slice_512": (512, 512), f"volume_512x512x{args.slices}": (512, 512, args.slices)}
        labels = {}
        for name, shape in cases.items():
            nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, shape).astype(np.int16), affine),
                     str(studies / f"{name}.nii.gz"))
            label_path = Path(tmp) / f"{name}_label.nii.gz"
            nib.save(nib.Nifti1Image(rng.integers(0, 5, shape).astype(np.uint8), affine), str(label_path))
            labels[name] = label_path
        server = RunningServer(studies, Path(tmp) / "server.log", env={"OMP_NUM_THREADS": "1"})
        try:
            print("case,label_bytes,http_median_s,http_min_s,http_max_s,check_median_s")
            for name, label_path in labels.items():
                data = label_path.read_bytes()
                times = []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    response = requests.put(f"{server.url}/datastore/label", params={"image": name, "tag": "final"},
                                            files={"label": (f"{name}.nii.gz", data)}, timeout=300)
                    times.append(time.perf_counter() - begin)
                    response.raise_for_status()
                checks = []
                for _ in range(args.repeats):
                    begin = time.perf_counter()
                    check_label_file(label_path, studies / f"{name}.nii.gz")
                    checks.append(time.perf_counter() - begin)
                print(f"{name},{len(data)},{statistics.median(times):.3f},{min(times):.3f},{max(times):.3f},"
                      f"{statistics.median(checks):.3f}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
