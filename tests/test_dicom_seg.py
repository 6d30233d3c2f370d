"""DICOM SEG export/import through the CLI: every pixel survives, terms and references are right,
bad input gets a clear error."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sarco_app.inputs import dicom_seg, ingest
from sarco_app.__main__ import main as cli
from sarco_app.labels import COLORS, LABELS
from tests.dicom_factory import write_ct_slice

RNG = np.random.default_rng(17)


def _series(folder, orientation=(1, 0, 0, 0, 1, 0), z_step=2.5, n=4, rows=12, cols=10, series_uid="1.2.3.4",
            origin=(-20.0, 15.0, 40.0)):
    raw = RNG.integers(0, 2000, size=(n, rows, cols)).astype(np.int16)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    positions = [np.array(origin, dtype=float) + k * z_step * normal for k in range(n)]
    for k in range(n):
        write_ct_slice(folder / f"s{k:02d}.dcm", raw[k], position=positions[k], orientation=orientation,
                       series_uid=series_uid, SOPInstanceUID=pydicom.uid.generate_uid(),
                       SeriesNumber=3, InstanceNumber=k + 1)
    return folder


def _label_file(image, path, seed=0):
    """A random 0-4 label with every tissue present, written on the image's own grid."""
    label = np.random.default_rng(seed).integers(0, 5, size=image.hu.shape).astype(np.uint8)
    ingest.save_label(label, image, path)
    return label


@pytest.mark.parametrize("orientation,z_step", [((1, 0, 0, 0, 1, 0), 2.5), ((-1, 0, 0, 0, 1, 0), -3.0),
                                                ((1, 0, 0, 0, -1, 0), 2.0)])
def test_export_import_round_trip_keeps_every_pixel(tmp_path, capsys, orientation, z_step):
    series = _series(tmp_path / "ct", orientation, z_step)
    image = ingest.load_image(series)
    _label_file(image, tmp_path / "label.nii.gz")
    assert cli(["export-seg", str(series), str(tmp_path / "label.nii.gz"), "--out", str(tmp_path / "seg.dcm")]) == 0
    assert cli(["import-seg", str(series), str(tmp_path / "seg.dcm"), "--out", str(tmp_path / "back.nii.gz")]) == 0
    written = nib.load(tmp_path / "label.nii.gz")
    back = nib.load(tmp_path / "back.nii.gz")
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(written.dataobj))
    assert np.allclose(back.affine, written.affine)
    assert "segments muscle, sat, vat, imat" in capsys.readouterr().out


def test_seg_of_a_phantom_names_tissues_codes_colours_and_the_source(tmp_path):
    cli(["phantom", "--count", "1", "--seed", "5", "--format", "dicom", "--out", str(tmp_path / "studies")])
    series = next(p for p in (tmp_path / "studies").iterdir() if p.is_dir() and p.name != "labels")
    label_path = tmp_path / "studies" / "labels" / "final" / f"{series.name}.nii.gz"
    assert cli(["export-seg", str(series), str(label_path), "--out", str(tmp_path / "seg.dcm"),
                "--algorithm", "bodycomp_unet"]) == 0
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    source = pydicom.dcmread(next(series.iterdir()))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert dicom_seg.referenced_series(seg) == {source.SeriesInstanceUID}
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert {s.SegmentLabel: n for n, s in items.items()} == LABELS
    codes = {n: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for n, s in items.items()}
    assert codes[LABELS["muscle"]] == "127954009" and codes[LABELS["sat"]] == "67769002"
    assert items[LABELS["vat"]].AnatomicRegionSequence[0].CodeValue == "52731004"
    for value, item in items.items():
        assert tuple(item.RecommendedDisplayCIELabValue) == dicom_seg.dicom_cielab(COLORS[value])
        assert item.SegmentAlgorithmType == "AUTOMATIC"
    # The SEG read back equals the phantom's label.
    image = ingest.load_image(series)
    from sarco_app.measurement.quantify import load_label

    assert np.array_equal(dicom_seg.seg_to_label(tmp_path / "seg.dcm", image), load_label(label_path, image))


def test_cielab_of_pure_colours():
    # White and black in DICOM's scaled CIELab (L* 100 / 0, a* = b* = 0 -> 0x8080), red with a
    # large positive a*.
    assert np.allclose(dicom_seg.dicom_cielab((255, 255, 255)), (65535, 32896, 32896), atol=2)
    assert np.allclose(dicom_seg.dicom_cielab((0, 0, 0)), (0, 32896, 32896), atol=2)
    assert dicom_seg.dicom_cielab((255, 0, 0))[1] > 50000


def test_wrong_label_shape_is_a_clear_error(tmp_path, capsys):
    series = _series(tmp_path / "ct")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4)), tmp_path / "small.nii.gz")
    assert cli(["export-seg", str(series), str(tmp_path / "small.nii.gz"), "--out", str(tmp_path / "s.dcm")]) == 1
    err = capsys.readouterr().err
    assert "shape (3, 3, 3)" in err and "(10, 12, 4)" in err
    assert not (tmp_path / "s.dcm").exists()


def test_seg_of_another_series_is_refused(tmp_path, capsys):
    first = _series(tmp_path / "a", series_uid="1.2.3.4")
    other = _series(tmp_path / "b", series_uid="1.2.3.5")
    _label_file(ingest.load_image(first), tmp_path / "label.nii.gz")
    cli(["export-seg", str(first), str(tmp_path / "label.nii.gz"), "--out", str(tmp_path / "seg.dcm")])
    assert cli(["import-seg", str(other), str(tmp_path / "seg.dcm"), "--out", str(tmp_path / "x.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert "references series 1.2.3.4, not this image's series 1.2.3.5" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_seg_off_a_series_without_uid_is_refused_and_a_truncated_seg_is_a_clear_error(tmp_path, capsys):
    """A series without a SeriesInstanceUID cannot be compared by UID: a SEG none of whose
    pixels lands on its slices is refused (it used to write an empty label), and a SEG cut short
    is one line, not a traceback."""
    first = _series(tmp_path / "a")
    elsewhere = _series(tmp_path / "b", series_uid=None, origin=(-20.0, 15.0, 400.0))
    _label_file(ingest.load_image(first), tmp_path / "label.nii.gz")
    assert cli(["export-seg", str(first), str(tmp_path / "label.nii.gz"), "--out", str(tmp_path / "seg.dcm")]) == 0
    capsys.readouterr()
    assert cli(["import-seg", str(elsewhere), str(tmp_path / "seg.dcm"), "--out", str(tmp_path / "x.nii.gz")]) == 1
    assert "lies on this image's slices" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
    data = (tmp_path / "seg.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    assert cli(["import-seg", str(first), str(tmp_path / "cut.dcm"), "--out", str(tmp_path / "y.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "y.nii.gz").exists()


def test_series_without_uids_and_non_seg_files_are_clear_errors(tmp_path, capsys):
    series = _series(tmp_path / "ct", series_uid=None)
    _label_file(ingest.load_image(series), tmp_path / "label.nii.gz")
    assert cli(["export-seg", str(series), str(tmp_path / "label.nii.gz"), "--out", str(tmp_path / "s.dcm")]) == 1
    assert "without Study/Series/SOP Instance UIDs" in capsys.readouterr().err
    assert cli(["import-seg", str(series), str(series / "s00.dcm"), "--out", str(tmp_path / "x.nii.gz")]) == 1
    assert "not a DICOM Segmentation" in capsys.readouterr().err
