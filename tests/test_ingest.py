"""Ingest: DICOM grouping/sorting/HU/affine/patient data, NIfTI round trips, errors, real samples."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from sarco_app.inputs import dicom, ingest
from sarco_app.inputs.patient import PatientInfo
from sarco_app.__main__ import main as cli
from sarco_app.errors import IngestError
from tests.dicom_factory import write_ct_slice, write_series

RNG = np.random.default_rng(0)


def _volume(n=4, rows=6, cols=5):
    """Raw stored values where slice k is filled with 1024 + 100 k (HU 100 k after rescale)."""
    return np.stack([np.full((rows, cols), 1024 + 100 * k, np.int16) for k in range(n)])


def _lps_to_ras(p):
    return np.array([-p[0], -p[1], p[2]])


def test_slices_sorted_by_position_not_name_or_instance_number(tmp_path):
    vol = _volume()
    z = [10.0, 12.5, 15.0, 17.5]
    order = [2, 0, 3, 1]  # file names and InstanceNumber disagree with the geometry
    for rank, k in enumerate(order):
        write_ct_slice(tmp_path / f"img{rank}.dcm", vol[k], position=(0, 0, z[k]),
                       InstanceNumber=10 - k)
    image = ingest.load_image(tmp_path)
    assert image.hu.shape == (5, 6, 4)
    assert [float(image.hu[0, 0, k]) for k in range(4)] == [0.0, 100.0, 200.0, 300.0]
    assert image.spacing == pytest.approx((0.8, 0.8, 2.5))


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0)])
@pytest.mark.parametrize("z_step", [3.0, -3.0])
def test_affine_maps_voxels_to_dicom_positions(tmp_path, orientation, z_step):
    """HFS, FFS and flipped series: every voxel lands where the DICOM geometry puts it."""
    rows, cols, n = 7, 9, 3
    raw = np.zeros((n, rows, cols), np.int16)
    raw[1, 2, 6] = 3000  # one bright voxel in slice 1, row 2, column 6
    origin = np.array([-50.0, 30.0, 100.0])
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    spacing = (0.7, 0.9)  # (between rows, between columns)
    for k in range(n):
        write_ct_slice(tmp_path / f"s{k}.dcm", raw[k], position=origin + k * z_step * normal,
                       orientation=orientation, spacing=spacing, intercept=0)
    image = ingest.load_image(tmp_path)
    expected_lps = origin + 1 * z_step * normal + 6 * spacing[1] * row_dir + 2 * spacing[0] * col_dir
    i, j, k = np.argwhere(image.hu == 3000)[0]
    world = image.affine @ np.array([i, j, k, 1.0])
    assert np.allclose(world[:3], _lps_to_ras(expected_lps))
    # canonical axes: +L, +P, +S
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    # back on the original grid the label voxel is where the raw voxel was
    marker = (image.hu == 3000).astype(np.uint8)
    original = image.to_original(marker)
    assert original.shape == image.original_shape


def test_rescale_and_padding(tmp_path):
    raw = np.array([[-2000, -1500, 0], [40, 1000, 2000]], np.int16)
    write_ct_slice(tmp_path / "a.dcm", raw, position=(0, 0, 0), slope=1.0, intercept=0.0,
                   PixelPaddingValue=-2000)
    hu = ingest.load_image(tmp_path / "a.dcm").hu[:, :, 0].T
    assert hu.tolist() == [[-1024, -1024, 0], [40, 1000, 2000]]
    write_ct_slice(tmp_path / "b.dcm", np.array([[0, 500]], np.int16), position=(0, 0, 0),
                   slope=2.0, intercept=-1000.0)
    assert ingest.load_image(tmp_path / "b.dcm").hu[:, 0, 0].tolist() == [-1000.0, 0.0]


def test_series_without_uids_grouped_by_geometry(tmp_path):
    write_series(tmp_path / "a", _volume(3), [0, 2, 4], series_uid="", spacing=(0.8, 0.8))
    write_series(tmp_path / "b", _volume(2), [0, 5], series_uid="", spacing=(0.6, 0.6))
    found = dicom.list_series(tmp_path)
    assert sorted(s.num_slices for s in found) == [2, 3]
    image = ingest.load_image(tmp_path)  # largest CT series by default
    assert image.num_slices == 3
    assert ingest.load_image(tmp_path, series=1).num_slices == 2


def test_patient_data_from_tags(tmp_path):
    write_ct_slice(tmp_path / "p.dcm", _volume(1)[0], position=(0, 0, 0), PatientSex="F",
                   PatientAge="045Y", PatientSize=1.62, PatientWeight=58.5)
    p = ingest.load_image(tmp_path / "p.dcm").patient
    assert (p.sex, p.age, p.height_cm, p.weight_kg) == ("F", 45.0, 162.0, 58.5)
    write_ct_slice(tmp_path / "q.dcm", _volume(1)[0], position=(0, 0, 0), PatientSex="",
                   PatientAge="", PatientSize=0, PatientWeight=0, PatientBirthDate="19600315",
                   StudyDate="20200314")
    q = ingest.load_image(tmp_path / "q.dcm").patient
    assert (q.sex, q.height_cm, q.weight_kg) == (None, None, None)
    assert q.age == pytest.approx(60.0, abs=0.01)


def test_zip_equals_folder(tmp_path):
    paths = write_series(tmp_path / "series", _volume(3), [0, 2, 4])
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in paths:
            zf.write(p, arcname=f"nested/{p.name}")
    a, b = ingest.load_image(tmp_path / "series"), ingest.load_image(archive)
    assert np.array_equal(a.hu, b.hu) and np.allclose(a.affine, b.affine)


@pytest.mark.parametrize("case, message", [
    ("not_dicom", "not a DICOM file"),
    ("no_pixels", "without pixel data"),
    ("mr", "not CT"),
    ("inconsistent", "inconsistent slice geometry"),
    ("uneven", "inconsistent slice geometry"),
    ("duplicate", "share a position"),
    ("truncated", "damaged DICOM|cannot read pixel data"),
    ("missing", "no such file"),
])
def test_clear_errors(tmp_path, case, message):
    target = tmp_path / "in"
    if case == "not_dicom":
        target = tmp_path / "notes.dcm"
        target.write_text("hello, not an image")
    elif case == "no_pixels":
        target = write_ct_slice(tmp_path / "x.dcm", _volume(1)[0], position=(0, 0, 0), pixel_data=False)
    elif case == "mr":
        write_series(target, _volume(2), [0, 2], modality="MR")
    elif case == "inconsistent":
        write_series(target, _volume(2), [0, 2])
        write_ct_slice(target / "odd.dcm", _volume(1)[0], position=(0, 0, 4), spacing=(0.5, 0.5))
    elif case == "uneven":
        write_series(target, _volume(4), [0, 2, 4, 10])
    elif case == "duplicate":
        write_series(target, _volume(2), [0, 0])
    elif case == "truncated":
        full = write_ct_slice(tmp_path / "t.dcm", _volume(1)[0], position=(0, 0, 0))
        target = tmp_path / "cut.dcm"
        target.write_bytes(full.read_bytes()[:-20])  # cut inside the pixel data
    with pytest.raises(IngestError, match=message):
        ingest.load_image(target)


def test_nifti_label_round_trip_keeps_grid(tmp_path):
    """A label computed on the canonical grid is written on the file's own grid and affine."""
    data = RNG.normal(0, 50, (6, 7, 5)).astype(np.float32)
    data[1, 2, 3] = 999
    affine = np.array([[0.8, 0, 0, -10], [0, 0, 2.5, 20], [0, -0.8, 0, 5], [0, 0, 0, 1]])  # coronal-ish
    src = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    image = ingest.load_image(src)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    label = (image.hu == 999).astype(np.uint8)
    out = ingest.save_label(label, image, tmp_path / "lbl.nii.gz")
    written = nib.load(out)
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    assert np.argwhere(np.asarray(written.dataobj) == 1).tolist() == [[1, 2, 3]]
    assert np.array_equal(image.from_original(np.asarray(written.dataobj)), label)


def test_2d_nifti_and_sidecar(tmp_path):
    hu = RNG.normal(0, 30, (8, 6)).astype(np.float32)
    image = ingest.make_image(hu, (0.7, 0.9), PatientInfo(sex="M", age=70, height_cm=170,
                                                                 weight_kg=80))
    path = ingest.save_image(image, tmp_path / "case.nii.gz")
    assert json.loads((tmp_path / "case.json").read_text())["patient"]["height_cm"] == 170
    back = ingest.load_image(path)
    assert back.hu.shape == (8, 6) and back.pixel_spacing == pytest.approx((0.7, 0.9))
    assert np.allclose(back.hu, np.round(hu))
    assert back.patient == image.patient
    assert back.slice2d().shape == (8, 6)
    with pytest.raises(IngestError, match="out of range"):
        back.slice2d(3)


# --------------------------------------------------------------------------- real samples


def test_real_jpeg2000_series_with_empty_uids(real_data):
    image = ingest.load_image(real_data / "totalsegmentator-dicom-series")
    assert image.hu.shape == (512, 512, 20)
    assert image.spacing == pytest.approx((0.977, 0.977, 2.0), abs=0.01)
    assert image.patient.weight_kg == 79 and image.patient.height_cm is None
    assert image.patient.sex is None and image.patient.age is None
    assert image.hu.min() >= -1024 and image.hu.max() > 1000  # bone, contrast
    body = image.hu[200:300, 200:300, 10]
    assert -200 < float(np.median(body)) < 200


def test_real_ffs_series_with_padding(real_data):
    folder = real_data / "dcmqi-ct-3slice"
    image = ingest.load_image(folder)  # the DICOM SEG beside the slices is not CT: skipped
    assert image.hu.shape == (512, 512, 3)
    assert image.meta["patient_position"] == "FFS"
    assert image.hu.min() == -1024  # padding -2000 mapped to air
    assert image.patient.sex == "M" and image.patient.age == 60
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    # the spine is posterior: bone in the posterior half of the middle column
    column = image.hu[230:290, :, 1].mean(axis=0)
    assert np.argmax(column) > 256


def test_real_nifti(real_data):
    image = ingest.load_image(real_data / "totalsegmentator-ct-lower" / "ct_lower.nii.gz")
    assert sorted(image.hu.shape) == sorted((122, 101, 82))
    assert image.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert image.hu.min() == -1024 and image.hu.max() > 500


def test_compressed_without_decoder_names_package(real_data, monkeypatch):
    import pydicom.config
    from pydicom.pixel_data_handlers import numpy_handler

    monkeypatch.setattr(pydicom.config, "pixel_data_handlers", [numpy_handler])
    with pytest.raises(IngestError, match="pip install pylibjpeg pylibjpeg-openjpeg"):
        ingest.load_image(real_data / "totalsegmentator-dicom-series")


# --------------------------------------------------------------------------- CLI


def test_info_cli(real_data, capsys):
    assert cli(["info", str(real_data / "dcmqi-ct-3slice")]) == 0
    out = capsys.readouterr().out
    assert "1 CT series" in out and "3 slice(s)" in out and "sex M" in out and "SEG" in out
    assert cli(["info", "--json", str(real_data / "totalsegmentator-dicom-series")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["series"][0]["slices"] == 20
    assert summary["series"][0]["patient"]["weight_kg"] == 79


def test_info_cli_bad_input(tmp_path, capsys):
    bad = tmp_path / "x.txt"
    bad.write_text("no")
    assert cli(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        cli(["info", "--help"])
    assert exc.value.code == 0


def test_info_cli_without_ct_series_fails_with_the_reason(tmp_path, capsys):
    """An MR-only folder is not "0 CT series" and success: it is an error naming what was skipped."""
    write_series(tmp_path, _volume(n=2), [0.0, 2.5], modality="MR")
    assert cli(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no CT series found" in err and "MR (2 file(s))" in err and len(err.strip().splitlines()) == 1
    assert cli(["info", "--json", str(tmp_path)]) == 1


def test_nifti_with_nan_voxels_is_refused(tmp_path):
    data = np.full((8, 8), 40.0, np.float32)
    data[2:4, 2:4] = np.nan
    data[0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(IngestError, match="5 voxel"):
        ingest.load_image(tmp_path / "nan.nii.gz")


AXIS_ORDERS = [(perm, flips) for perm in __import__("itertools").permutations(range(3))
               for flips in __import__("itertools").product((1, -1), repeat=3)]


@pytest.mark.parametrize("perm, flips", AXIS_ORDERS)
def test_every_axis_order_round_trips(tmp_path, perm, flips):
    """All 48 axis orders/flips: voxels keep their world position, labels go back exactly."""
    shape = (4, 5, 6)
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, (axis, flip) in enumerate(zip(perm, flips)):
        affine[axis, i] = flip * (0.5 + i)  # file axis i runs along world axis `axis`
    affine[:3, 3] = [10, -20, 30]
    src = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    image = ingest.load_image(src)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    # the same value sits at the same world position in the file and in the canonical array
    for canonical_index in ([0, 0, 0], [1, 2, 3], list(np.array(image.hu.shape) - 1)):
        value = image.hu[tuple(canonical_index)]
        file_index = np.argwhere(data == value)[0]
        world_c = image.affine @ np.array(canonical_index + [1.0])
        world_f = affine @ np.array(list(file_index) + [1.0])
        assert np.allclose(world_c, world_f)
    assert np.array_equal(image.to_original(image.hu), data)
    assert np.array_equal(image.from_original(data), image.hu)
    label = (image.hu % 5 == 0).astype(np.uint8)
    out = ingest.save_label(label, image, tmp_path / "label.nii.gz")
    stored = np.asarray(nib.load(out).dataobj)
    assert np.array_equal(stored, (data % 5 == 0).astype(np.uint8))
    assert np.array_equal(image.from_original(stored), label)
    # slice indices: canonical <-> the file's own order, when the file's slices are axial
    for k in range(image.hu.shape[2]):
        f = image.file_slice(k)
        if perm[2] != 2:
            assert f is None
        else:
            assert image.canonical_slice(f) == k
            assert set(data[:, :, f].ravel()) == set(image.hu[:, :, k].ravel())


def test_jpeg_lossless_series_reads_like_the_uncompressed_one(tmp_path, capsys):
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) decodes with pylibjpeg-libjpeg: the HU are the
    uncompressed series' exactly, through ``load_image`` and the ``info`` command."""
    from tests.dicom_factory import compress_jpeg_lossless

    rng = np.random.default_rng(3)
    raw = rng.integers(-1024, 1500, size=(3, 40, 48)).astype(np.int16)
    plain = write_series(tmp_path / "plain", raw, [0.0, 2.0, 4.0])
    for path in write_series(tmp_path / "jpeg", raw, [0.0, 2.0, 4.0]):
        compress_jpeg_lossless(path)
    import pydicom

    assert pydicom.dcmread(str(tmp_path / "jpeg" / "slice000.dcm")).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    expected = ingest.load_image(plain[0].parent)
    decoded = ingest.load_image(tmp_path / "jpeg")
    assert np.array_equal(decoded.hu, expected.hu)
    assert cli(["info", str(tmp_path / "jpeg")]) == 0
    assert "3 slice(s)" in capsys.readouterr().out


def test_jpeg_ls_series_reads_like_the_uncompressed_one(tmp_path):
    from tests.dicom_factory import compress_jpeg_ls

    raw = np.random.default_rng(4).integers(0, 2500, size=(3, 40, 48)).astype(np.int16)  # stored = HU + 1024
    plain = write_series(tmp_path / "plain", raw, [0.0, 2.0, 4.0])
    for path in write_series(tmp_path / "jpegls", raw, [0.0, 2.0, 4.0]):
        compress_jpeg_ls(path)
    import pydicom

    assert pydicom.dcmread(str(tmp_path / "jpegls" / "slice000.dcm")).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert np.array_equal(ingest.load_image(tmp_path / "jpegls").hu, ingest.load_image(plain[0].parent).hu)
