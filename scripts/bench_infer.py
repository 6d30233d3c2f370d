#!/usr/bin/env python
"""CPU latency of the ``bodycomp_unet`` task for one 512x512 slice, end to end over HTTP, with
the bare network forward time (and the split head's, when the model has one) measured in the same
run as a reference.

Starts the real MONAI Label server on a temporary studies folder holding one 512x512 phantom
(0.8 mm pixels), calls ``POST /infer/bodycomp_unet?image=...`` ``--repeats`` times after a warm-up
call, and prints median / min / max wall time of the HTTP round trip (request, NIfTI load,
resampling, network, post-processing, writing and transferring the label), then the median time
of the bare network forward on the same slice's network input in this process.

    .venv/bin/python -m scripts.bench_infer [--model models/bodycomp_unet.pt] [--repeats 10] [--no-hu-refine]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "bodycomp_unet.pt")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-hu-refine", action="store_true",
                        help="time the raw labels (hu_refine false: the split head instead of the HU rule)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the infer task and the bare forward (default 1, as served)")
    args = parser.parse_args(argv)

    import requests
    import torch

    from sarco_app.segmentation.network import load_checkpoint
    from sarco_app.synthesis.phantom import generate, write_phantom
    from sarco_app.segmentation.segment import preprocess

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    studies = tmp / "studies"
    ph = generate(4242, spacing_mm=0.8, size=512)
    write_phantom(ph, studies, "bench")
    from tests.harness import RunningServer  # the test suite's server launcher

    env = {"OMP_NUM_THREADS": str(args.threads), "SARCO_INFER_THREADS": str(args.threads),
           "SARCO_MODEL_DIR": str(tmp / "model"), "SARCO_SHIPPED_MODEL": str(args.model.resolve())}
    try:
        server = RunningServer(studies, tmp / "server.log", env=env, timeout=300)
    except RuntimeError as exc:
        raise SystemExit(f"server did not start: {exc}") from None
    url = server.url
    try:

        def call():
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/bodycomp_unet", params={"image": "bench"},
                              data={"params": json.dumps({"hu_refine": False} if args.no_hu_refine else {})}, timeout=120)
            r.raise_for_status()
            return time.perf_counter() - t, r

        _, first = call()  # warm-up: model load, first-call allocations
        times = [call()[0] for _ in range(args.repeats)]
        model = load_checkpoint(args.model)
        x, _ = preprocess(ph.hu[None], ph.spacing, model)
        forward = []
        with torch.no_grad():
            model.network(x)
            for _ in range(args.repeats):
                t = time.perf_counter()
                model.network(x)
                forward.append(time.perf_counter() - t)
        print(f"slice 512x512 at {ph.spacing[0]:.2f} mm -> network input {tuple(x.shape)}; "
              f"torch threads {args.threads}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        print(f"HTTP end to end (POST /infer/bodycomp_unet{', hu_refine false' if args.no_hu_refine else ''}, label returned): median {statistics.median(times):.3f} s, "
              f"min {min(times):.3f} s, max {max(times):.3f} s over {len(times)} calls")
        print(f"bare network forward (same run): median {statistics.median(forward):.3f} s, min {min(forward):.3f} s")
        if model.split_head is not None:
            hu = torch.as_tensor(ph.hu[None], dtype=torch.float32)
            logits = torch.zeros((1, model.num_classes) + tuple(ph.hu.shape))
            head = []
            with torch.no_grad():
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    model.split_head.probabilities(logits, hu)
                    head.append(time.perf_counter() - t)
            print(f"split head on the 512x512 grid (same run): median {statistics.median(head):.3f} s")
        target = statistics.median(times) <= 0.5
        print(f"target <= 0.5 s end to end: {'met' if target else 'NOT met'}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
