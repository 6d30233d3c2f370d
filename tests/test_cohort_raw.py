"""``cohort --input DIR``: L3, segmentation and quantification of raw scans, one row per series,
with good, broken, non-CT, non-axial and L3-less inputs mixed."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from sarco_app.__main__ import main
from sarco_app.synthesis.phantom3d.build import make_volume_phantom
from sarco_app.synthesis.phantom3d.writing import save_volume
from tests.dicom_factory import write_series

FAST = dict(matrix=160, pixel_spacing=2.4)


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_input")
    good, truth = make_volume_phantom(41, slice_thickness=3.0, coverage="abdomen", variants=[], **FAST)
    save_volume(good, root / "good.nii.gz", truth=truth)
    chest, _ = make_volume_phantom(42, slice_thickness=4.0, coverage="chest", variants=[], **FAST)
    save_volume(chest, root / "chest_only.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    # The same kind of anatomy as a DICOM CT series (slices, rows, columns; raw = HU + 1024).
    lower, lower_truth = make_volume_phantom(43, slice_thickness=4.0, coverage="lower", variants=[], **FAST)
    raw = np.clip(np.round(lower.hu + 1024), 0, 4000).astype(np.int16)
    # Canonical x runs to the patient's left = DICOM +x; canonical y to posterior = DICOM +y.
    volume = np.transpose(raw, (2, 1, 0))  # (slices, rows = y, columns = x)
    z = lower.affine[2, 3] + 4.0 * np.arange(lower.num_slices)
    write_series(root / "ct_study", volume, z, spacing=(2.4, 2.4), series_uid="1.2.826.0.1.99",
                 PatientSex="F", PatientWeight=61)
    write_series(root / "mr_study", np.zeros((3, 16, 16), np.int16), [0.0, 3.0, 6.0], modality="MR",
                 series_uid="1.2.826.0.1.77")
    # A NIfTI whose slices are sagittal (third voxel axis left-right).
    sag = np.transpose(good.hu[:, :, :40], (2, 1, 0)).astype(np.int16)  # (z, y, x)
    affine = np.array([[0, 0, -2.4, 0], [0, -2.4, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(sag, affine), str(root / "sagittal.nii.gz"))
    (root / "notes.txt").write_text("not a scan")
    return root, truth, lower_truth


def test_cohort_input_mixes_good_broken_and_skipped_inputs(raw_folder, tmp_path, capsys):
    root, truth, lower_truth = raw_folder
    out = tmp_path / "cohort.xlsx"
    assert main(["cohort", "--input", str(root), "--out", str(out), "--method", "threshold"]) == 0
    captured = capsys.readouterr()
    frame = pd.read_csv(out.with_suffix(".csv")).set_index("id")
    status = frame["status"].to_dict()
    assert set(status) == {"good", "chest_only", "broken", "ct_study", "mr_study", "sagittal"}
    assert status["good"] == "ok" and status["ct_study"] == "ok"
    assert status["chest_only"].startswith("no L3: L3 not in field of view")
    assert status["broken"].startswith("unreadable:")
    assert status["mr_study"].startswith("skipped: not CT")
    assert status["sagittal"].startswith("skipped: not an axial")
    # L3 columns and measures for the measured scans.
    good = frame.loc["good"]
    assert abs(good["l3_z_mm"] - truth.l3_z_mm) <= 5.0
    assert good["muscle_area_cm2"] > 10 and good["sat_area_cm2"] > 0
    assert abs(frame.loc["ct_study", "l3_z_mm"] - lower_truth.l3_z_mm) <= 5.0
    assert frame.loc["ct_study", "sex"] == "F"
    # Workbook sheets, overlays for the measured scans only, a progress bar on stderr.
    sheets = pd.read_excel(out, sheet_name=None)
    assert {"scans", "summary", "reference"} <= set(sheets)
    overlays = sorted(p.name for p in (tmp_path / "cohort_overlays").glob("*.png"))
    assert overlays == ["ct_study.png", "good.png"]
    assert "cohort" in captured.err and "broken: unreadable" in captured.err


def test_cohort_input_reads_loose_dicom_slices_as_one_series(raw_folder, tmp_path):
    root, _, lower_truth = raw_folder
    loose = tmp_path / "loose"
    loose.mkdir()
    slices = sorted((root / "ct_study").iterdir())
    for path in slices:
        shutil.copy(path, loose / path.name)
    (loose / "notes.txt").write_text("not a scan")
    out = tmp_path / "loose.xlsx"
    assert main(["cohort", "--input", str(loose), "--out", str(out), "--method", "threshold",
                 "--no-overlays"]) == 0
    frame = pd.read_csv(out.with_suffix(".csv"))
    assert list(frame["id"]) == ["loose"] and frame.loc[0, "status"] == "ok"  # one row, not one per file
    assert abs(frame.loc[0, "l3_z_mm"] - lower_truth.l3_z_mm) <= 5.0
    assert frame.loc[0, "sex"] == "F"


def test_cohort_input_needs_a_folder(tmp_path, capsys):
    assert main(["cohort", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x.xlsx")]) == 1
    assert "no such folder" in capsys.readouterr().err
