"""Synthetic CT phantoms: determinism, label geometry, HU per tissue, files, DICOM, CLI."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest

from sarco_app import labels

from sarco_app.synthesis import phantom
from sarco_app.__main__ import main as cli
from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import load_image

SMALL = 160  # matrix for fast tests (the default spacing range scales with it)


@pytest.fixture(scope="module")
def small_phantoms():
    return [phantom.generate(seed, size=SMALL) for seed in range(6)]


def test_same_seed_same_arrays_other_seed_differs():
    a = phantom.generate(11, size=SMALL)
    b = phantom.generate(11, size=SMALL)
    c = phantom.generate(12, size=SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
    assert a.params == b.params and a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)
    assert not np.array_equal(a.label, c.label)


def test_default_phantom_shape_types_spacing_and_speed():
    phantom.generate(0)  # warm-up (imports, caches)
    start = time.perf_counter()
    ph = phantom.generate(3)
    elapsed = time.perf_counter() - start
    assert ph.hu.shape == (512, 512) and ph.hu.dtype == np.float32
    assert ph.label.shape == (512, 512) and ph.label.dtype == np.uint8
    assert set(np.unique(ph.label)) <= {0, 1, 2, 3, 4}
    assert set(np.unique(ph.label)) >= {1, 2, 3}
    assert 0.6 <= ph.spacing[0] <= 1.0 and ph.spacing[0] == ph.spacing[1]
    # "well under 1 s" on an idle core; the bound leaves room for a loaded CI machine.
    assert elapsed < 2.5, f"one 512x512 phantom took {elapsed:.2f} s"


def test_canonical_orientation_spine_posterior_liver_right():
    # Axis 1 runs toward posterior: the vertebral body (dense bone at the midline) lies in the
    # back half of the trunk; axis 0 runs toward the patient's left: the liver (L1) fills low x.
    for seed in range(5, 40):  # a phantom without oral contrast (dense bowel) and a large liver
        ph = phantom.generate(seed, size=256, level="L1", spacing_mm=1.2)
        if not ph.params["oral_contrast"] and ph.params["structures_cm2"]["liver"] > 50:
            break
    trunk = ph.label > 0
    xs, ys = np.nonzero(trunk)
    centre_x, centre_y = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    bone_y = np.nonzero((ph.hu > 250) & (np.abs(np.arange(256)[:, None] - centre_x) < 12))[1]
    depth = ys.max() - ys.min()
    assert bone_y.min() > ys.min() + 0.35 * depth  # the vertebral body is behind the middle
    assert bone_y.max() > ys.min() + 0.75 * depth  # the spinous process reaches the back
    assert ph.params["structures_cm2"]["liver"] > 50
    soft = (ph.label == 0) & (ph.hu > 40) & (ph.hu < 200)
    soft[:, int(centre_y) + 10:] = False  # organs in front of the spine only
    right = soft[: int(centre_x)].sum()
    left = soft[int(centre_x):].sum()
    assert right > 1.2 * left, (right, left)


def test_labels_and_hu_ranges_per_tissue(small_phantoms):
    for ph in small_phantoms:
        label, hu = ph.label, ph.hu
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
        mus = np.median(hu[label == labels.MUSCLE])
        assert abs(mus - ph.params["muscle_hu"]) < 6, (mus, ph.params["muscle_hu"])
        for tissue in (labels.SAT, labels.VAT):
            fat = np.median(hu[label == tissue])
            assert -135 < fat < -60, (tissue, fat)
        if (label == labels.IMAT).sum() > 20:
            assert np.median(hu[label == labels.IMAT]) < -10
        # Air around the body.
        assert np.median(hu[:8, :8]) <= -950
        # Bone exists and is dense (vertebra, label 0).
        assert (hu > 150).sum() * ph.spacing[0] * ph.spacing[1] > 300
        assert hu.max() > 250


def test_myosteatosis_lowers_muscle_hu_like_the_real_l3_slice():
    # The real L3 slice (ct_lower z=73) has muscle ~15-20 HU and SAT ~ -95 HU.
    low = phantom.generate(21, size=SMALL, muscle_hu=18)
    normal = phantom.generate(21, size=SMALL, muscle_hu=50)
    low_med = np.median(low.hu[low.label == labels.MUSCLE])
    assert 8 < low_med < 28
    assert np.median(normal.hu[normal.label == labels.MUSCLE]) - low_med > 20


def test_sat_outside_muscle_ring_vat_inside(small_phantoms):
    from skimage.morphology import convex_hull_image

    for ph in small_phantoms:
        muscle = ph.label == labels.MUSCLE
        hull = convex_hull_image(muscle)
        sat, vat = ph.label == labels.SAT, ph.label == labels.VAT
        assert hull[vat].mean() > 0.97
        assert hull[sat].mean() < 0.2  # some SAT fills concavities of the ring (back, midline)
        cx, cy = np.argwhere(vat).mean(axis=0).round().astype(int)
        assert hull[cx, cy]
        # SAT lies between the skin and the muscle: further from the body centre than VAT.
        centre = np.argwhere(ph.hu > -500).mean(axis=0)
        r_sat = np.hypot(*(np.argwhere(sat) - centre).T).mean()
        r_vat = np.hypot(*(np.argwhere(vat) - centre).T).mean()
        assert r_sat > 1.3 * r_vat


def test_fascia_or_muscle_always_separates_sat_from_vat():
    from scipy import ndimage as ndi

    for seed in range(3):  # full-resolution phantoms: the fascia is about one pixel thick
        ph = phantom.generate(seed)
        assert ph.params["supersampling"] == 1
        sat, vat = ph.label == labels.SAT, ph.label == labels.VAT
        assert not (vat & ndi.binary_dilation(sat, structure=np.ones((3, 3), bool))).any()


def test_label_follows_the_protocol_hu_ranges_inside_the_anatomical_compartments(small_phantoms):
    coarse = phantom.generate(4, size=140, spacing_mm=3.0)
    for ph in (*small_phantoms, coarse):
        hu, label, anatomy = ph.hu, ph.label, ph.anatomical_label
        muscle = label == labels.MUSCLE
        assert ((hu[muscle] >= -29) & (hu[muscle] <= 150)).all()
        for tissue in (labels.SAT, labels.VAT, labels.IMAT):
            assert ((hu[label == tissue] >= -190) & (hu[label == tissue] <= -30)).all()
        # Compartments are kept: the rule only moves pixels between muscle and IMAT or to
        # background (partial volume, noisy low-HU muscle): 0.4-9 % of the compartment on
        # phantoms at 0.6-3 mm.
        compartment = np.isin(anatomy, (labels.MUSCLE, labels.IMAT))
        assert not (np.isin(label, (labels.MUSCLE, labels.IMAT)) & ~compartment).any()
        changed = (label != anatomy) & compartment
        assert 0 < changed.sum() < 0.12 * compartment.sum(), (changed.sum(), compartment.sum())


def test_quantify_measures_the_manifest_areas_within_the_protocol_hu_ranges(tmp_path, capsys):
    """What a user gets: the phantom CLI writes DICOM studies with labels, and ``quantify`` on
    each reports the manifest's areas, with every labelled pixel inside its tissue's HU range."""
    import json

    out = tmp_path / "studies"
    assert cli(["phantom", "--count", "3", "--seed", "7", "--out", str(out), "--size", "96",
                "--level", "mixed", "--format", "dicom"]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    ranges = {"muscle": labels.MUSCLE_HU, "sat": labels.FAT_HU, "vat": labels.FAT_HU, "imat": labels.FAT_HU}
    for row in rows:
        report = tmp_path / f"{row['id']}.json"
        assert cli(["quantify", "--image", str(out / row["id"]), "--json", str(report),
                    "--label", str(out / "labels" / "final" / f"{row['id']}.nii.gz")]) == 0
        tissues = json.loads(report.read_text())["tissues"]
        assert tissues["muscle"]["pixels"] > 0 and tissues["sat"]["pixels"] > 0
        for name, (lo, hi) in ranges.items():
            assert abs(tissues[name]["area_cm2"] - float(row[f"{name}_cm2"])) < 1e-3, (name, row)
            if tissues[name]["pixels"]:
                assert lo <= tissues[name]["hu_min"] <= tissues[name]["hu_max"] <= hi, (name, tissues[name])
    capsys.readouterr()


def test_coarse_pixels_are_supersampled_with_majority_labels():
    ph = phantom.generate(2, size=128, spacing_mm=3.0)
    assert ph.params["supersampling"] >= 3 and ph.spacing == (3.0, 3.0)
    assert ph.hu.shape == ph.label.shape == (128, 128)
    # Thin structures are averaged, not drawn a whole 3 mm pixel wide: hardly any pixel of
    # the SAT reads like solid soft tissue.
    sat = ph.label == labels.SAT
    assert np.mean(ph.hu[sat] > -20) < 0.05


def test_patient_parameters_are_respected_and_drive_composition():
    ph = phantom.generate(4, size=SMALL, sex="F", age=70, height_cm=160, weight_kg=95,
                          sarcopenic=True, muscle_hu=25, spacing_mm=1.5)
    assert ph.patient.sex == "F" and ph.patient.age == 70
    assert ph.patient.height_cm == 160 and ph.patient.weight_kg == 95
    assert ph.spacing == (1.5, 1.5)
    assert ph.params["sarcopenic"] is True
    smi = ph.areas_cm2()["muscle"] / 1.6 ** 2
    assert smi < phantom.smi_cutoff("F", 95 / 1.6 ** 2)
    lean = phantom.generate(4, size=SMALL, sex="F", age=70, height_cm=160, weight_kg=50,
                            sarcopenic=False, spacing_mm=1.5)
    assert lean.areas_cm2()["muscle"] / 1.6 ** 2 >= phantom.smi_cutoff("F", 50 / 1.6 ** 2)
    assert ph.areas_cm2()["sat"] > 1.5 * lean.areas_cm2()["sat"]
    assert ph.areas_cm2()["vat"] > lean.areas_cm2()["vat"]


def test_sarcopenic_flag_matches_muscle_index():
    for seed in range(8):
        ph = phantom.generate(100 + seed, size=128, sarcopenic=seed % 2 == 0)
        p = ph.params
        smi = ph.areas_cm2()["muscle"] / (p["height_cm"] / 100) ** 2
        assert (smi < phantom.smi_cutoff(p["sex"], p["bmi"])) == p["sarcopenic"], p


def test_levels_change_anatomy():
    def mean_structure(level, name):
        return np.mean([phantom.generate(s, size=64, level=level).params["structures_cm2"][name]
                        for s in range(4)])

    assert mean_structure("L1", "psoas") < mean_structure("L3", "psoas") < mean_structure("L4", "psoas")
    assert mean_structure("L1", "liver") > mean_structure("L3", "liver")
    assert mean_structure("L4", "liver") == 0
    assert mean_structure("L1", "kidneys") > mean_structure("L4", "kidneys")


def test_randomisation_covers_scanner_and_body_variety():
    params = [phantom.generate(s, size=160).params for s in range(24)]
    hi = min(phantom.DEFAULT_SPACING_RANGE[1] * 512 / 160, phantom.SPACING_LIMITS[1])
    lo = min(phantom.DEFAULT_SPACING_RANGE[0] * 512 / 160, hi)
    assert all(lo - 1e-9 <= p["spacing_mm"] <= hi + 1e-9 for p in params)
    assert {p["contrast"] for p in params} == {"none", "portal", "arterial"}
    assert all(5 <= p["noise_sd"] <= 25 for p in params)
    assert all(abs(p["rotation_deg"]) <= 10 for p in params)
    for flag in ("table", "fov_circle", "arms", "truncated", "streaks"):
        values = {bool(p[flag]) for p in params}
        assert values == {True, False}, flag
    assert {p["sex"] for p in params} == {"M", "F"}
    assert max(p["bmi"] for p in params) - min(p["bmi"] for p in params) > 10


def test_bad_inputs_raise_one_line_errors():
    for kwargs in ({"level": "L6"}, {"size": 10}, {"spacing_mm": 5.0}, {"sex": "X"},
                   {"age": -3}, {"weight_kg": 1000}):
        with pytest.raises(SarcoError) as info:
            phantom.generate(1, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(SarcoError):
        phantom.generate(-1)
    with pytest.raises(SarcoError):
        phantom.write_cohort("/tmp/never", 0, 1)


def test_cohort_manifest_areas_equal_written_labels(tmp_path):
    manifest = phantom.write_cohort(tmp_path, 4, seed=9, size=128)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["id"] for r in rows] == [f"phantom_{i:04d}" for i in range(4)]
    assert set(phantom.MANIFEST_COLUMNS) <= set(rows[0])
    assert {r["sex"] for r in rows} == {"M", "F"}
    assert {r["sarcopenic"] for r in rows} == {"True", "False"}
    for row in rows:
        image = load_image(tmp_path / f"{row['id']}.nii.gz")
        label = load_image(tmp_path / "labels" / "final" / f"{row['id']}.nii.gz").hu
        sx, sy = image.pixel_spacing
        assert abs(sx - float(row["spacing_mm"])) < 1e-4
        for name, value in labels.LABELS.items():
            area = (label == value).sum() * sx * sy / 100.0
            assert abs(area - float(row[f"{name}_cm2"])) < 1e-2, (name, area, row)
        # The files hold exactly the phantom regenerated from the manifest's seed.
        again = phantom.generate(int(row["seed"]), sex=row["sex"], sarcopenic=row["sarcopenic"] == "True",
                                 size=128, level=row["level"])
        assert np.array_equal(image.hu, again.hu)
        assert np.array_equal(label.astype(np.uint8), again.label)
        assert image.patient.sex == row["sex"] and image.patient.age == float(row["age"])


def test_dicom_round_trip(tmp_path):
    import pydicom

    ph = phantom.generate(3, size=128, sex="M", age=63, height_cm=181, weight_kg=88)
    folder = phantom.write_phantom(ph, tmp_path, "case1", format="dicom")
    image = load_image(folder)
    assert image.hu.shape in ((128, 128), (128, 128, 1))
    hu = image.hu.reshape(128, 128)
    assert np.array_equal(hu, ph.hu)
    assert np.allclose(image.pixel_spacing, ph.spacing, atol=1e-5)
    assert image.patient.sex == "M" and image.patient.age == 63
    assert image.patient.height_cm == 181 and image.patient.weight_kg == 88
    label_img = load_image(tmp_path / "labels" / "final" / "case1.nii.gz")
    assert np.array_equal(label_img.hu.reshape(128, 128).astype(np.uint8), ph.label)
    assert np.allclose(label_img.affine[:2, :2], image.affine[:2, :2])
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.PatientAge == "063Y" and float(ds.PatientSize) == pytest.approx(1.81)
    assert float(ds.RescaleIntercept) == -1024 and ds.PixelRepresentation == 1
    # UIDs are a deterministic function of the seed (and case id).
    phantom.write_phantom(ph, tmp_path / "again", "case1", format="dicom")
    ds2 = pydicom.dcmread(next((tmp_path / "again" / "case1").iterdir()))
    assert ds2.StudyInstanceUID == ds.StudyInstanceUID
    assert ds2.SeriesInstanceUID == ds.SeriesInstanceUID
    other = phantom.generate(4, size=128)
    phantom.write_phantom(other, tmp_path / "other", "case1", format="dicom")
    ds3 = pydicom.dcmread(next((tmp_path / "other" / "case1").iterdir()))
    assert ds3.StudyInstanceUID != ds.StudyInstanceUID


def test_cli_writes_studies_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "studies"
    assert cli(["phantom", "--count", "2", "--seed", "3", "--out", str(out), "--size", "96",
                "--level", "L2"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["phantom_0000.nii.gz", "phantom_0001.nii.gz"]
    assert len(list((out / "labels" / "final").glob("*.nii.gz"))) == 2
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["level"] for r in rows] == ["L2", "L2"]
    assert cli(["phantom", "--count", "3", "--seed", "1", "--out", str(tmp_path / "mixed"),
                "--size", "64", "--level", "mixed", "--format", "dicom"]) == 0
    rows = list(csv.DictReader((tmp_path / "mixed" / "manifest.csv").open()))
    assert len(rows) == 3 and {r["level"] for r in rows} <= set(phantom.LEVELS)
    assert all((tmp_path / "mixed" / r["id"]).is_dir() for r in rows)
    capsys.readouterr()
    assert cli(["phantom", "--count", "0", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "count" in err and "\n" not in err
    assert cli(["phantom", "--count", "1", "--out", str(tmp_path / "y"), "--level", "L9"]) != 0
    assert "level" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit) as info:
        cli(["phantom", "--help"])
    assert info.value.code == 0
    assert "--count" in capsys.readouterr().out


def test_hu_histogram_peaks_match_the_real_l3_slice():
    from pathlib import Path

    real_dir = Path(__file__).resolve().parents[1].parent / "shared/data/real"
    path = real_dir / "totalsegmentator-ct-lower" / "ct_lower.nii.gz"
    if not path.exists():
        pytest.skip("../shared/data/real is not present")
    from scipy import ndimage as ndi

    def peaks(hu):
        body = ndi.binary_fill_holes(hu > -500)
        values = hu[body]
        hist, edges = np.histogram(values, bins=np.arange(-200, 201, 5))
        centres = (edges[:-1] + edges[1:]) / 2
        fat = centres[centres < -30][np.argmax(hist[centres < -30])]
        soft = centres[centres > -10][np.argmax(hist[centres > -10])]
        return fat, soft

    real_fat, real_soft = peaks(load_image(path).slice2d(73))
    phantom_hu = np.concatenate([phantom.generate(s, size=256).hu.ravel() for s in range(4)])
    fat, soft = peaks(phantom_hu.reshape(-1, 256))
    assert abs(fat - real_fat) <= 20, (fat, real_fat)
    assert abs(soft - real_soft) <= 25, (soft, real_soft)



def test_upper_abdomen_organs_lie_against_the_wall_and_come_with_organ_maps():
    """T11-L2 (issue: organs pressed against the wall are what the model labels muscle on real
    CT): liver, spleen or kidney lie within 8 mm of trunk muscle (at most the diaphragm between)
    in at least 80 % of phantoms; the diaphragm is muscle-dense but background; organ maps
    never overlap the tissue label."""
    from scipy import ndimage as ndi

    diaphragm = labels.ORGAN_NAMES.index("diaphragm") + 1
    solid = [labels.ORGAN_NAMES.index(n) + 1 for n in ("liver", "spleen", "kidney")]
    for level in ("T12", "L1", "L2"):
        touching, with_diaphragm = 0, 0
        for s in range(5):
            ph = phantom.generate(300 + s, size=160, level=level)
            assert ph.organ_label.shape == ph.label.shape and ph.organ_label.max() <= len(labels.ORGAN_NAMES)
            assert not ((ph.organ_label > 0) & (ph.label > 0)).any()
            organ = np.isin(ph.organ_label, solid)
            reach = ndi.distance_transform_edt(ph.label != labels.MUSCLE, sampling=ph.spacing)
            touching += bool(organ.any() and reach[organ].min() <= 8.0)
            band = ph.organ_label == diaphragm
            if band.sum() > 20:
                with_diaphragm += 1
                lo, hi = labels.MUSCLE_HU
                assert lo < np.median(ph.hu[band]) < hi  # as dense as muscle, yet not muscle
        assert touching >= 4, level
        if level in ("T12", "L1"):
            assert with_diaphragm >= 3, level
    # T11 has lung bases (very low HU, background) and more ribs than L3.
    t11 = [phantom.generate(310 + s, size=160, level="T11") for s in range(3)]
    assert sum(ph.params.get("lung_cm2", 0) > 1 for ph in t11) >= 2
    l3 = phantom.generate(310, size=160, level="L3")
    assert not (l3.organ_label == diaphragm).any()
    bone = labels.ORGAN_NAMES.index("bone") + 1
    assert np.mean([(ph.organ_label == bone).sum() * np.prod(ph.spacing) for ph in t11]) > \
        (l3.organ_label == bone).sum() * np.prod(l3.spacing)


def test_organ_maps_are_written_on_request(tmp_path):
    from sarco_app.inputs.ingest import load_image
    from sarco_app.measurement.quantify import load_label

    manifest = phantom.write_cohort(tmp_path, 1, seed=4, size=96, level="T12", organs=True)
    image = load_image(tmp_path / "phantom_0000.nii.gz")
    organs = load_label(tmp_path / "labels" / "organs" / "phantom_0000.nii.gz", image,
                        max_value=len(labels.ORGAN_NAMES))
    ph = phantom.generate(int(np.loadtxt(manifest, delimiter=",", skiprows=1, usecols=13, dtype=int)),
                          sex="M", sarcopenic=False, size=96, level="T12")
    assert np.array_equal(organs, ph.organ_label)
    phantom.write_cohort(tmp_path / "plain", 1, seed=4, size=96)
    assert not (tmp_path / "plain" / "labels" / "organs").exists()


def test_phantom_refuses_a_folder_that_holds_phantoms_unless_forced(tmp_path, capsys):
    """Writing phantoms again into a studies folder would replace its images and final labels
    (perhaps corrected by an annotator) and a manifest that no longer lists every study: refused,
    nothing changed; ``--force`` replaces them."""
    out = tmp_path / "studies"
    assert cli(["phantom", "--count", "2", "--seed", "9", "--size", "64", "--out", str(out)]) == 0
    label = out / "labels" / "final" / "phantom_0000.nii.gz"
    before = label.read_bytes()
    capsys.readouterr()
    assert cli(["phantom", "--count", "1", "--seed", "3", "--size", "64", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "already holds" in err and "manifest.csv" in err and "--force" in err
    assert label.read_bytes() == before and len(list(csv.DictReader((out / "manifest.csv").open()))) == 2
    assert cli(["phantom", "--count", "1", "--seed", "3", "--size", "64", "--out", str(out), "--force"]) == 0
    assert label.read_bytes() != before
