#!/usr/bin/env python
"""Peak server memory per request and ``/info/`` latency under load, over HTTP on the real
MONAI Label server (issue #20: bounded inputs, responsiveness).

Starts ``monailabel start_server`` with ``--app`` (default this repository's app; pass an older
checkout's ``apps/sarcopenia`` to measure the stock behaviour) on a temporary studies folder with
a 512x512 phantom and a 2048x2048 one (the 512 phantom's HU upsampled, 0.2 mm pixels), then:

1. **Peak RSS per request.** The server's peak resident memory (``VmHWM``, reset before each
   request through ``/proc/PID/clear_refs``) for: a warm 512x512 infer; a 2048x2048
   ``bodycomp_unet`` infer; a gzip NIfTI upload of 32767 x 32767 int16 zeros (2 GiB unpacked,
   about 2 MB sent: refused from its header); a body declared as 10 GiB (``Content-Length``
   only: refused). Do not run this part against the stock app (``--skip-memory``): it unpacks
   the 2 GiB upload.
2. **/info/ latency.** ``GET /info/`` every 0.25 s for ``--seconds`` while idle, then while
   ``--clients`` threads each send 512x512 ``bodycomp_unet`` infers back to back; prints
   median / 95th percentile / max and the ratio of the medians.

    .venv/bin/python -m scripts.bench_limits [--app apps/sarcopenia] [--clients 8] [--seconds 20]
        [--volume-slices 2048] [--skip-memory] [--skip-latency]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def server_pid(root_pid: int, port: int) -> int:
    """The process (the launcher or a child) that listens on ``port``."""
    import psutil

    procs = [psutil.Process(root_pid)] + psutil.Process(root_pid).children(recursive=True)
    for proc in procs:
        try:
            if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.net_connections()):
                return proc.pid
        except psutil.Error:
            continue
    return root_pid


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def nifti_bomb() -> bytes:
    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((32767, 32767, 1))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:  # really 2 GiB of zeros, ~2 MB packed
        packed.write(header.binaryblock + b"\0" * 4)
        block = b"\0" * (64 * 1024 * 1024)
        for _ in range(32):
            packed.write(block)
    return buffer.getvalue()


def declared_huge_body(port: int) -> str:
    """Send only the headers of a 10 GiB upload; the status line the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"PUT /datastore/?image=huge HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 10737418240\r\n\r\n")
        try:
            return sock.recv(200).split(b"\r\n")[0].decode().split(" ")[1]  # the status code
        except socket.timeout:
            return "no answer within 60 s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=ROOT / "apps" / "sarcopenia")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--volume-slices", type=int, default=0,
                        help="also measure infers on a 512x512xN int16 volume (2048: the default 1 GiB limit)")
    args = parser.parse_args(argv)

    import numpy as np
    import requests

    from sarco_app.inputs.ingest import make_image, save_image
    from sarco_app.synthesis.phantom import generate, write_phantom

    work = Path(tempfile.mkdtemp(prefix="bench_limits_"))
    studies = work / "studies"
    phantom = generate(90210, spacing_mm=0.8, size=512)
    write_phantom(phantom, studies, "p512")
    big = np.kron(phantom.hu, np.ones((4, 4), dtype=phantom.hu.dtype))  # 2048 x 2048, 0.2 mm
    save_image(make_image(big[:, :, None], (0.2, 0.2, 3.0)), studies / "p2048.nii.gz")
    if args.volume_slices:
        volume = np.repeat(phantom.hu[:, :, None], args.volume_slices, axis=2)
        save_image(make_image(volume, (0.8, 0.8, 0.5)), studies / "volume.nii.gz")
        del volume

    from tests.harness import RunningServer  # the test suite's server launcher

    try:
        server = RunningServer(studies, work / "server.log", conf={"model_dir": work / "model"}, timeout=300,
                               app_dir=args.app.resolve())
    except RuntimeError as exc:
        raise SystemExit(f"server did not start: {exc}") from None
    url, port = server.url, server.port
    try:
        pid = server_pid(server.proc.pid, port)
        print(f"app {args.app}; server pid {pid}; {os.cpu_count()} CPU cores; load average "
              f"{os.getloadavg()[0]:.1f}")

        def infer(image: str) -> int:
            return requests.post(f"{url}/infer/bodycomp_unet", params={"image": image, "output": "json"},
                                 timeout=900).status_code

        infer("p512")  # loads the model
        if not args.skip_memory:
            print("\npeak server RSS per request (MiB):")
            print(f"{'request':<58} {'status':>8} {'RSS before':>11} {'peak':>8} {'peak - before':>14}")

            def measure(name: str, send) -> None:
                reset_peak(pid)
                before, _ = memory_mb(pid)
                status = send()
                _, peak = memory_mb(pid)
                print(f"{name:<58} {str(status):>8} {before:>11.0f} {peak:>8.0f} {peak - before:>14.0f}")

            measure("warm bodycomp_unet infer, 512x512", lambda: infer("p512"))
            bomb = nifti_bomb()
            measure(f"gzip NIfTI upload, header 32767^2 int16 ({len(bomb) / 1e6:.1f} MB sent)",
                    lambda: requests.post(f"{url}/infer/bodycomp_unet", timeout=900,
                                          files={"file": ("bomb.nii.gz", bomb)}).status_code)
            measure("upload declaring Content-Length 10 GiB", lambda: declared_huge_body(port))
            measure("bodycomp_unet infer, 2048x2048", lambda: infer("p2048"))
            if args.volume_slices:
                mib = 512 * 512 * args.volume_slices * 2 / 2**20
                measure(f"bodycomp_unet infer, 512x512x{args.volume_slices} int16 ({mib:.0f} MiB), one slice",
                        lambda: requests.post(f"{url}/infer/bodycomp_unet", timeout=900,
                                              params={"image": "volume", "output": "json"},
                                              data={"params": '{"slice_index": 0}'}).status_code)

        if args.skip_latency:
            return 0

        def probe(seconds: float) -> list[float]:
            times, end = [], time.time() + seconds
            while time.time() < end:
                t0 = time.perf_counter()
                requests.get(f"{url}/info/", timeout=300)
                times.append(time.perf_counter() - t0)
                time.sleep(0.25)
            return times

        def summary(times: list[float]) -> str:
            ordered = sorted(times)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            return (f"n {len(times)}, median {statistics.median(times) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
                    f"max {max(times) * 1000:.0f} ms")

        idle = probe(min(10.0, args.seconds))
        stop = threading.Event()
        done = []

        def client():
            while not stop.is_set():
                t0 = time.perf_counter()
                status = infer("p512")
                done.append((status, time.perf_counter() - t0))

        clients = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in clients:
            thread.start()
        time.sleep(2.0)  # let every client have a request in flight
        loaded = probe(args.seconds)
        stop.set()
        for thread in clients:
            thread.join()
        ok = sum(1 for status, _ in done if status == 200)
        print(f"\n/info/ latency idle: {summary(idle)}")
        print(f"/info/ latency with {args.clients} clients sending 512x512 infers: {summary(loaded)}")
        print(f"  infers completed: {len(done)} ({ok} answered 200), median "
              f"{statistics.median(t for _, t in done):.2f} s per infer round trip")
        print(f"  ratio of medians (loaded / idle): {statistics.median(loaded) / statistics.median(idle):.1f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
