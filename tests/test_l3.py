"""L3 locator: volume phantoms with vertebra truth, the real scans in ../shared, CLI and views."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sarco_app.__main__ import main
from sarco_app.inputs.ingest import load_image
from sarco_app.errors import SarcoError
from sarco_app.spine.l3 import choose_slice, file_slice_index, locate_l3
from sarco_app.synthesis.phantom3d.build import make_volume_phantom
from sarco_app.synthesis.phantom3d.spine import VERTEBRA_LABELS
from sarco_app.synthesis.phantom3d.writing import resample_z, save_volume
from sarco_app.figures.views import L3_COLOUR, render_l3_views

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real"
CT_LOWER = REAL / "totalsegmentator-ct-lower"
DICOM_SERIES = REAL / "totalsegmentator-dicom-series"

# Small, fast phantoms: 160 x 160 pixels of 2.4 mm (a 384 mm field of view).
FAST = dict(matrix=160, pixel_spacing=2.4)


def _main_label(plane: np.ndarray) -> int | None:
    values, counts = np.unique(plane[plane > 0], return_counts=True)
    return int(values[np.argmax(counts)]) if values.size else None


@pytest.fixture(scope="module")
def phantom():
    image, truth = make_volume_phantom(7, slice_thickness=2.5, variants=[], **FAST)
    return image, truth


# --------------------------------------------------------------------------- phantoms


def test_phantom_truth_matches_its_labels():
    image, truth, labels = make_volume_phantom(3, slice_thickness=3.0, variants=[], with_labels=True, **FAST)
    assert image.hu.shape == labels.shape and truth.l3_index is not None
    k = int(round(truth.l3_index))
    # The L3 body is the commonest vertebra label in the slice through its middle.
    assert _main_label(labels[:, :, k]) == VERTEBRA_LABELS["L3"]
    assert truth.rib_pairs == 12 and truth.variants == []
    # World z of the truth index equals the truth z.
    assert image.affine[2, 2] * truth.l3_index + image.affine[2, 3] == pytest.approx(truth.l3_z_mm)


def test_phantom_variants_change_the_rib_count():
    _, t11 = make_volume_phantom(4, variants=["11_ribs"], slice_thickness=5.0, **FAST, coverage="chest")
    _, t13 = make_volume_phantom(4, variants=["13_ribs"], slice_thickness=5.0, **FAST, coverage="chest")
    assert (t11.rib_pairs, t13.rib_pairs) == (11, 13)
    with pytest.raises(ValueError, match="unknown variants"):
        make_volume_phantom(4, variants=["two_heads"], **FAST)


@pytest.mark.parametrize("seed,thickness,coverage", [(11, 2.0, "full"), (12, 3.0, "abdomen"),
                                                     (13, 5.0, "full"), (14, 1.5, "lower"),
                                                     (15, 2.5, "upper")])
def test_locator_error_on_phantoms(seed, thickness, coverage):
    image, truth = make_volume_phantom(seed, slice_thickness=thickness, coverage=coverage, variants=[], **FAST)
    result = locate_l3(image)
    assert result.found, result.reason
    assert abs(result.z_mm - truth.l3_z_mm) <= 5.0
    assert 0.0 < result.confidence <= 1.0
    # The index and z describe the same slice.
    assert image.affine[2, 2] * result.slice_index + image.affine[2, 3] == pytest.approx(result.z_mm)


def test_locator_after_resampling_to_5mm(phantom):
    image, truth = phantom
    thick = resample_z(image, 5.0)
    assert thick.spacing[2] == pytest.approx(5.0)
    result = locate_l3(thick)
    assert result.found and abs(result.z_mm - truth.l3_z_mm) <= 5.0


def test_chest_only_phantom_is_not_in_field_of_view():
    image, truth = make_volume_phantom(21, slice_thickness=2.5, coverage="chest", variants=[], **FAST)
    assert truth.l3_z_mm is None
    result = locate_l3(image)
    assert not result.found and result.slice_index is None and result.z_mm is None
    assert "not in field of view" in result.reason


def test_slice_choice_is_request_else_l3_else_middle(phantom):
    image, truth = phantom
    found = choose_slice(image)
    assert found.source == "l3_locator" and found.index == locate_l3(image).slice_index
    assert choose_slice(image, "-1").index == image.hu.shape[2] - 1  # request (text, from the end)
    with pytest.raises(SarcoError, match="out of range"):
        choose_slice(image, image.hu.shape[2])
    with pytest.raises(SarcoError, match="must be an integer"):
        choose_slice(image, "L3")
    chest, _ = make_volume_phantom(21, slice_thickness=2.5, coverage="chest", variants=[], **FAST)
    middle = choose_slice(chest)
    assert middle.source == "middle" and middle.index == chest.hu.shape[2] // 2
    refused = choose_slice(chest, middle=False)  # measurement never guesses a level
    assert refused.index is None and "not in field of view" in refused.reason


def test_z_flipped_nifti_gives_the_same_anatomy_and_a_mirrored_file_index(phantom, tmp_path):
    image, truth = phantom
    direct = locate_l3(image)
    path = save_volume(image, tmp_path / "flipped.nii.gz", flip_z=True)
    stored = nib.load(str(path))
    assert stored.affine[2, 2] < 0  # slices really are stored top-down
    flipped = load_image(path)
    result = locate_l3(flipped)
    assert result.found and result.z_mm == pytest.approx(direct.z_mm, abs=0.01)
    n = flipped.num_slices
    assert file_slice_index(flipped, result.slice_index) == n - 1 - result.slice_index
    # The file-order slice really holds the canonical slice's pixels.
    data = np.asarray(stored.dataobj)
    k_file = file_slice_index(flipped, result.slice_index)
    assert np.array_equal(flipped.to_original(flipped.hu)[:, :, k_file], data[:, :, k_file].astype(np.float32))


def test_2d_input_is_refused():
    from sarco_app.errors import SarcoError
    from sarco_app.inputs.ingest import make_image

    with pytest.raises(SarcoError, match="3D"):
        locate_l3(make_image(np.zeros((32, 32), np.float32), (1.0, 1.0)))


# --------------------------------------------------------------------------- real scans


@pytest.mark.skipif(not (CT_LOWER / "ct_lower.nii.gz").exists(), reason="../shared real data absent")
def test_real_ct_lower_slice_lies_inside_l3(tmp_path):
    image = load_image(CT_LOWER / "ct_lower.nii.gz")
    labels = image.from_original(np.asarray(nib.load(str(CT_LOWER / "vertebrae_lower.nii.gz")).dataobj).astype(np.int16))
    result = locate_l3(image)
    assert result.found, result.reason
    assert _main_label(labels[:, :, result.slice_index]) == 29  # TotalSegmentator's L3
    # Also after a 5 mm thick-slice reconstruction (mapped back to the 3 mm label grid).
    thick = locate_l3(resample_z(image, 5.0))
    assert thick.found
    k = int(round((thick.z_mm - image.affine[2, 3]) / image.affine[2, 2]))
    assert _main_label(labels[:, :, k]) == 29
    # And with the slice order flipped on disk.
    flipped = load_image(save_volume(image, tmp_path / "lower_flipped.nii.gz", flip_z=True))
    again = locate_l3(flipped)
    assert again.found and again.z_mm == pytest.approx(result.z_mm, abs=0.01)


@pytest.mark.skipif(not DICOM_SERIES.exists(), reason="../shared real data absent")
def test_real_dicom_series_t11_t12_is_not_in_field_of_view():
    pytest.importorskip("pylibjpeg")
    image = load_image(DICOM_SERIES)
    result = locate_l3(image)
    assert not result.found and "not in field of view" in result.reason
    assert not locate_l3(resample_z(image, 5.0)).found


# --------------------------------------------------------------------------- CLI


def test_cli_l3_json_png_and_exit_codes(phantom, tmp_path, capsys):
    image, truth = phantom
    path = save_volume(image, tmp_path / "scan.nii.gz", flip_z=True)
    out_json, out_png = tmp_path / "out" / "l3.json", tmp_path / "out" / "l3.png"
    assert main(["l3", str(path), "--json", str(out_json), "--png", str(out_png)]) == 0
    answer = json.loads(out_json.read_text())
    assert set(answer) >= {"slice_index", "z_mm", "confidence", "reason"}
    assert abs(answer["z_mm"] - truth.l3_z_mm) <= 5.0
    # slice_index is in the file's voxel order: mirrored for this top-down file.
    assert answer["slice_index"] == image.num_slices - 1 - answer["canonical_slice_index"]
    import cv2

    picture = cv2.imread(str(out_png))
    assert picture is not None and picture.shape[0] > 100

    chest, _ = make_volume_phantom(22, coverage="chest", slice_thickness=4.0, variants=[], **FAST)
    chest_path = save_volume(chest, tmp_path / "chest.nii.gz")
    chest_json = tmp_path / "chest.json"
    assert main(["l3", str(chest_path), "--json", str(chest_json)]) == 2
    none = json.loads(chest_json.read_text())
    assert none["slice_index"] is None and none["z_mm"] is None and "not in field of view" in none["reason"]

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    capsys.readouterr()
    assert main(["l3", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_cli_extract_l3_writes_a_labelable_2d_study(phantom, tmp_path):
    image, truth = phantom
    src = save_volume(image, tmp_path / "patient 1.nii.gz")
    studies = tmp_path / "studies"
    assert main(["extract-l3", str(src), "--out", str(studies)]) == 0
    out = studies / "patient_1_L3.nii.gz"
    sidecar = json.loads((studies / "patient_1_L3.json").read_text())
    assert sidecar["patient"]["sex"] == image.patient.sex
    assert sidecar["patient"]["height_cm"] == image.patient.height_cm
    k = sidecar["source"]["l3"]["canonical_slice_index"]
    slice2d = load_image(out)
    assert slice2d.hu.ndim == 2 and slice2d.patient.weight_kg == image.patient.weight_kg
    np.testing.assert_allclose(slice2d.hu, np.round(image.hu[:, :, k]), atol=0.5)
    z = slice2d.affine[2, 3]
    assert abs(z - truth.l3_z_mm) <= 5.0
    # Never overwrites without --force; a scan without L3 writes nothing and exits 2.
    assert main(["extract-l3", str(src), "--out", str(studies)]) == 1
    # --force replaces the image, but never under an id whose stored label would then mismatch.
    assert main(["extract-l3", str(src), "--out", str(studies), "--force"]) == 0
    (studies / "labels" / "final").mkdir(parents=True)
    (studies / "labels" / "final" / "patient_1_L3.nii.gz").write_bytes(b"label")
    assert main(["extract-l3", str(src), "--out", str(studies), "--force"]) == 1
    assert (studies / "labels" / "final" / "patient_1_L3.nii.gz").read_bytes() == b"label"
    chest, _ = make_volume_phantom(23, coverage="chest", slice_thickness=4.0, variants=[], **FAST)
    chest_src = save_volume(chest, tmp_path / "chest.nii.gz")
    assert main(["extract-l3", str(chest_src), "--out", str(studies)]) == 2
    assert not (studies / "chest_L3.nii.gz").exists()


# --------------------------------------------------------------------------- views


def test_views_have_physical_aspect_and_the_line_at_l3(phantom):
    image, _ = phantom
    result = locate_l3(image)
    picture = render_l3_views(image, result, height_px=500)
    nx, ny, nz = image.hu.shape
    sx, sy, dz = image.spacing
    mm_per_px = max(nz * dz, ny * sy, nx * sx) / 500
    # Width: sagittal (y extent) + 6 px gap + coronal (x extent), at one mm-per-pixel scale.
    assert picture.shape[1] == pytest.approx((ny * sy + nx * sx) / mm_per_px + 6, abs=3)
    assert picture.shape[0] == pytest.approx(nz * dz / mm_per_px, abs=2)
    # The full-width L3 line sits at the row of the chosen z (superior at the top).
    line_rows = np.nonzero((np.abs(picture.astype(int) - L3_COLOUR).sum(axis=2) < 60).mean(axis=1) > 0.5)[0]
    z_top = image.affine[2, 3] + (nz - 1) * dz
    expected = (z_top - result.z_mm + 0.5 * dz) / mm_per_px
    assert line_rows.size and abs(line_rows.mean() - expected) <= 2.5
