"""``cohort`` on Dask: a local 2-worker cluster gives the serial rows, reruns skip done scans,
``--force`` redoes them, an unreadable scan is reported in its row, and a killed run or worker
leaves only whole part files and loses no finished row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sarco_app.__main__ import main
from sarco_app.measurement.cohort_parts import parts_dir
from sarco_app.synthesis.phantom3d.build import make_volume_phantom
from sarco_app.synthesis.phantom3d.writing import save_volume

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(matrix=128, pixel_spacing=3.0, slice_thickness=4.0, coverage="abdomen", variants=[])
N_SCANS = 4  # three phantom series and one unreadable file


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_input")
    for seed in (61, 62, 63):
        image, _ = make_volume_phantom(seed, **SMALL)
        save_volume(image, root / f"scan{seed}.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI file")
    return root


def run_cli(folder, out, *extra, capsys=None):
    code = main(["cohort", "--input", str(folder), "--out", str(out), "--method", "threshold", *extra])
    return code, (capsys.readouterr() if capsys is not None else None)


def rows(out: Path) -> pd.DataFrame:
    """The scans CSV without the overlay paths (they name the output folder)."""
    frame = pd.read_csv(out.with_suffix(".csv")).set_index("id").sort_index()
    return frame.drop(columns=["overlay"])


def part_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in parts_dir(out).glob("*.json")}


@pytest.fixture(scope="module")
def serial_and_dask(raw_folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dask_out")
    serial, dask = out_dir / "serial" / "r.xlsx", out_dir / "dask" / "r.xlsx"
    assert run_cli(raw_folder, serial, "--workers", "1")[0] == 0
    assert run_cli(raw_folder, dask, "--workers", "2")[0] == 0
    return serial, dask


@pytest.fixture(scope="module")
def cluster():
    """A running 2-worker Dask cluster that the commands join with ``--scheduler`` (workers
    start once for the module's tests; each ``--workers 2`` run starts a cluster of its own)."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        with Client(local) as client:
            yield local.scheduler_address, client


def test_local_cluster_gives_the_serial_rows(serial_and_dask):
    serial, dask = serial_and_dask
    expected, got = rows(serial), rows(dask)
    assert list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(got, expected)
    # An unreadable scan is reported in its row; the three series are measured at L3.
    assert got.loc["broken", "status"].startswith("unreadable:")
    assert (got.drop(index="broken")["status"] == "ok").all()
    assert (got.drop(index="broken")["muscle_area_cm2"] > 10).all()
    overlays = sorted(p.name for p in dask.with_name("r_overlays").glob("*.png"))
    assert overlays == ["scan61.png", "scan62.png", "scan63.png"]
    # One part per scan, each a whole record from a worker process (not this one).
    records = [json.loads(p.read_text()) for p in parts_dir(dask).glob("*.json")]
    assert sorted(r["id"] for r in records) == sorted(got.index)
    pids = {r["worker"]["pid"] for r in records}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for record in records:
        if record["row"]["status"] == "ok":
            assert {"read", "l3", "segment", "quantify", "write"} <= set(record["seconds"])


def test_rerun_skips_done_scans_and_force_redoes_them(raw_folder, serial_and_dask, cluster, capsys):
    _, dask = serial_and_dask
    before = part_times(dask)
    assert len(before) == N_SCANS
    code, out = run_cli(raw_folder, dask, "--workers", "2", capsys=capsys)
    assert code == 0 and f"measured 0 (nothing to measure), {N_SCANS} reused" in out.out
    assert part_times(dask) == before
    # A lost part: only that scan is measured again.
    lost = sorted(before)[0]
    (parts_dir(dask) / lost).unlink()
    code, out = run_cli(raw_folder, dask, "--workers", "1", capsys=capsys)
    assert code == 0 and f"measured 1 (serial, in this process), {N_SCANS - 1} reused" in out.out
    after = part_times(dask)
    assert set(after) == set(before) and all(after[n] == before[n] for n in before if n != lost)
    # --force measures every scan again, on a running cluster; the rows stay the same.
    expected = rows(dask)
    address, _ = cluster
    code, out = run_cli(raw_folder, dask, "--scheduler", address, "--force", capsys=capsys)
    assert code == 0 and f"measured {N_SCANS} (Dask at {address}, 2 workers)" in out.out and "reused" not in out.out
    forced = part_times(dask)
    assert all(forced[n] > after[n] for n in after)
    pd.testing.assert_frame_equal(rows(dask), expected)


def test_unet_is_loaded_once_per_worker(raw_folder, cluster, tmp_path):
    out = tmp_path / "unet.xlsx"
    assert main(["cohort", "--input", str(raw_folder), "--out", str(out), "--method", "unet",
                 "--scheduler", cluster[0], "--no-overlays"]) == 0
    records = [json.loads(p.read_text()) for p in parts_dir(out).glob("*.json")]
    measured = [r for r in records if r["row"]["status"] == "ok"]
    assert len(measured) == 3 and all(r["row"]["segmentation"] == "unet" for r in measured)
    # Three scans on two workers: one worker measured two, and no worker loaded the model twice.
    pids = [r["worker"]["pid"] for r in measured]
    assert len(set(pids)) < len(pids)
    assert all(r["worker"]["model_loads"] == 1 for r in measured)


def start_cohort(folder: Path, out: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sarco_app", "cohort", "--input", str(folder), "--out", str(out),
           "--method", "threshold", "--scheduler", address, "--no-overlays"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_measured_part(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until a part of a measured (status ok) series exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        for path in parts_dir(out).glob("*.json") if parts_dir(out).is_dir() else []:
            if json.loads(path.read_text())["row"]["status"] == "ok":
                return
        time.sleep(0.02)
    raise AssertionError("no series was measured in time")


def test_killed_run_leaves_whole_parts_and_a_rerun_completes(raw_folder, serial_and_dask, cluster, tmp_path,
                                                            capsys):
    serial, _ = serial_and_dask
    out = tmp_path / "killed.xlsx"
    proc = start_cohort(raw_folder, out, cluster[0])
    try:
        wait_for_measured_part(out, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers, mid-run
        proc.wait()
    parts = sorted(parts_dir(out).glob("*.json"))
    assert 1 <= len(parts) < N_SCANS
    for path in parts:  # every part left is a whole record
        assert json.loads(path.read_text())["row"]["status"]
    assert not out.with_suffix(".csv").exists()
    code, captured = run_cli(raw_folder, out, "--workers", "1", "--no-overlays", capsys=capsys)
    assert code == 0
    assert f"measured {N_SCANS - len(parts)} (serial, in this process), {len(parts)} reused" in captured.out
    assert not list(parts_dir(out).glob(".*.tmp"))
    expected = rows(serial)
    got = pd.read_csv(out.with_suffix(".csv")).set_index("id").sort_index()
    pd.testing.assert_frame_equal(got, expected)


def test_killed_worker_loses_no_row(raw_folder, serial_and_dask, cluster, tmp_path):
    serial, _ = serial_and_dask
    address, client = cluster
    out = tmp_path / "worker_killed.xlsx"
    proc = start_cohort(raw_folder, out, address)
    try:
        wait_for_measured_part(out, proc)
        pids = client.run(os.getpid)
        busy = [address for address, keys in client.processing().items() if keys] or list(pids)
        os.kill(pids[busy[0]], signal.SIGKILL)  # mid-task: its nanny starts a new worker, the task runs again
        output = proc.communicate(timeout=180)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output
    got = pd.read_csv(out.with_suffix(".csv")).set_index("id").sort_index()
    pd.testing.assert_frame_equal(got, rows(serial))


def test_loop_pseudo_labels_on_the_cluster_as_in_process(cluster, tmp_path, capsys):
    """``loop --scheduler``: the batch pseudo-labels made by the cluster's workers are those made
    in this process (the network runs with one thread on a worker, so confidences may differ in
    the last digits), and the info file keeps every image's entry although workers write at once."""
    import nibabel as nib

    from sarco_app.inputs.ingest import load_image
    from sarco_app.segmentation import pseudo
    from sarco_app.segmentation.segment import SHIPPED_MODEL_PATH, get_model
    from sarco_app.synthesis.phantom import generate, write_phantom

    studies = tmp_path / "studies"
    for k in range(4):
        write_phantom(generate(7300 + k, size=96), studies, f"case{k}")
    for k in (1, 2, 3):
        (studies / "labels" / "final" / f"case{k}.nii.gz").unlink()
    assert main(["loop", "--studies", str(studies), "--scheduler", cluster[0], "--rounds", "1",
                 "--init", str(SHIPPED_MODEL_PATH), "--epochs", "1", "--iterations-per-epoch", "1",
                 "--batch-size", "2", "--crop", "64"]) == 0
    assert f"running on Dask at {cluster[0]}, 2 workers" in capsys.readouterr().out
    info = json.loads((studies / "labels" / "pseudo_info.json").read_text())
    assert set(info) == {"case1", "case2", "case3"}
    model = get_model(SHIPPED_MODEL_PATH)
    for image_id, got in info.items():
        expected = pseudo.pseudo_label_image(load_image(studies / f"{image_id}.nii.gz"), model)
        assert got["checkpoint"] == pseudo.checkpoint_id(SHIPPED_MODEL_PATH) and got["slices"] == expected.slices
        assert got["confidence"]["overall"] == pytest.approx(expected.confidence["overall"], abs=1e-4)
        stored = np.asarray(nib.load(str(studies / "labels" / "pseudo" / f"{image_id}.nii.gz")).dataobj)
        assert stored.shape == expected.label.shape or stored.squeeze().shape == expected.label.shape
        assert (stored.reshape(expected.label.shape) == expected.label).mean() > 0.999


def test_bad_worker_count_is_one_clear_line(raw_folder, tmp_path, capsys):
    code, out = run_cli(raw_folder, tmp_path / "r.xlsx", "--workers", "0", capsys=capsys)
    assert code == 1 and out.err.strip() == "error: --workers must be at least 1 (got 0)"
