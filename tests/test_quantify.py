"""Known-answer tests for sarco_app.measurement.quantify / sarco_app.measurement.reference and the
quantify / reference CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sarco_app import labels as L
from sarco_app.__main__ import main as cli
from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import load_image, make_image, save_image, save_label
from sarco_app.inputs.patient import PatientInfo
from sarco_app.measurement.quantify import load_label, quantify_scan, tissue_measures
from sarco_app.measurement.reference import category, load_cutoffs, load_reference, t_score
from tests.dicom_factory import write_ct_slice


def block_label(shape, counts, width=None):
    """A label map holding exactly ``counts[value]`` pixels of each value, filled row by row
    into disjoint stripes (so the counts are exact by construction)."""
    label = np.zeros(shape, dtype=np.uint8)
    flat = label.reshape(-1)
    start = 0
    for value, count in counts.items():
        flat[start : start + count] = value
        start += count
    assert start <= flat.size
    return label


def scan(counts, spacing=(1.0, 1.0), shape=(200, 200), patient=None, seed=0):
    """(image, label) with random HU per tissue in its usual range and exact pixel counts."""
    rng = np.random.default_rng(seed)
    label = block_label(shape, counts)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    ranges = {L.MUSCLE: (-29, 150), L.SAT: (-190, -30), L.VAT: (-150, -50), L.IMAT: (-190, -30)}
    for value, (low, high) in ranges.items():
        mask = label == value
        hu[mask] = rng.integers(low, high, size=int(mask.sum()))
    return make_image(hu, spacing, patient or PatientInfo()), label


# --------------------------------------------------------------------------- areas and HU


def test_exact_areas_from_pixel_counts_and_spacing():
    counts = {L.MUSCLE: 1234, L.SAT: 2500, L.VAT: 777, L.IMAT: 31}
    image, label = scan(counts, spacing=(0.8, 0.7))
    result = quantify_scan(image, label)
    for value, n in counts.items():
        tissue = result["tissues"][L.NAMES[value]]
        assert tissue["pixels"] == n
        assert tissue["area_cm2"] == pytest.approx(n * 0.8 * 0.7 / 100.0, rel=1e-12)
    assert result["pixel_spacing_mm"] == [0.8, 0.7]
    sat, vat, imat = (counts[v] * 0.0056 for v in (L.SAT, L.VAT, L.IMAT))
    assert result["indices"]["vat_sat_ratio"] == pytest.approx(vat / sat, rel=1e-12)
    assert result["indices"]["total_adipose_cm2"] == pytest.approx(sat + vat + imat, rel=1e-12)
    assert result["indices"]["sma_cm2"] == result["tissues"]["muscle"]["area_cm2"]


def test_areas_exact_after_nifti_round_trip(tmp_path):
    """NIfTI stores spacing as float32; 0.7 mm must still give 0.7 mm, not 0.699999988."""
    image, label = scan({L.MUSCLE: 10000, L.SAT: 400}, spacing=(0.7, 0.9), patient=PatientInfo(sex="F"))
    save_image(image, tmp_path / "a.nii.gz")
    save_label(label, image, tmp_path / "a_label.nii.gz")
    loaded = load_image(tmp_path / "a.nii.gz")
    result = quantify_scan(loaded, load_label(tmp_path / "a_label.nii.gz", loaded))
    assert result["tissues"]["muscle"]["area_cm2"] == pytest.approx(10000 * 0.63 / 100, rel=1e-12)
    assert result["pixel_spacing_mm"] == [0.7, 0.9]


def test_hu_statistics_match_numpy():
    image, label = scan({L.MUSCLE: 3001, L.SAT: 1500, L.VAT: 999, L.IMAT: 45}, seed=3)
    result = quantify_scan(image, label)
    for value, name in L.NAMES.items():
        pixels = image.hu[label == value].astype(np.float64)
        stats = result["tissues"][name]
        assert stats["hu_min"] == pixels.min()
        assert stats["hu_max"] == pixels.max()
        assert stats["hu_mean"] == pytest.approx(pixels.mean(), abs=1e-9)
        assert stats["hu_sd"] == pytest.approx(pixels.std(), abs=1e-9)
        assert stats["hu_median"] == pytest.approx(np.median(pixels), abs=1e-9)
    assert result["indices"]["muscle_hu_mean"] == result["tissues"]["muscle"]["hu_mean"]


def test_empty_tissue_gives_zero_area_and_null_stats():
    image, label = scan({L.MUSCLE: 100})
    result = quantify_scan(image, label)
    assert result["tissues"]["imat"] == {
        "pixels": 0, "area_cm2": 0.0, "hu_min": None, "hu_max": None,
        "hu_mean": None, "hu_sd": None, "hu_median": None,
    }
    assert result["indices"]["vat_sat_ratio"] is None
    assert "vat_sat_ratio" in result["reasons"]


def test_tissue_measures_rejects_mismatched_slices():
    with pytest.raises(SarcoError):
        tissue_measures(np.zeros((4, 4)), np.zeros((4, 5)), (1.0, 1.0))


# --------------------------------------------------------------------------- T-scores


def test_default_reference_is_table4_with_provenance():
    table = load_reference()
    assert table.stat("M", "sma_cm2").mean == 186.54 and table.stat("M", "sma_cm2").sd == 32.98
    assert table.stat("F", "sma_per_bmi").n == 68
    assert "Table 4" in table.describe()
    assert set(table.indices) == {"sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi"}


@pytest.mark.parametrize(
    "sex, pixels, expected_t, expected_category",
    [
        ("M", 15356, -1.0, "low"),  # 153.56 cm², the paper's T = -1 cut-off for men
        ("M", 12058, -2.0, "sarcopenia"),  # 120.58 cm², T = -2
        ("M", 18654, 0.0, "normal"),  # the mean
        ("F", 9154, -1.0, "low"),  # 116.20 - 24.66
        ("F", 6688, -2.0, "sarcopenia"),  # 116.20 - 2 x 24.66
    ],
)
def test_t_scores_reproduce_paper_cutoffs(sex, pixels, expected_t, expected_category):
    # 1 mm x 1 mm pixels: 100 pixels per cm², so pixel counts are areas x 100 exactly.
    image, label = scan({L.MUSCLE: pixels}, spacing=(1.0, 1.0), shape=(200, 200),
                        patient=PatientInfo(sex=sex))
    result = quantify_scan(image, label)
    assert result["indices"]["sma_cm2"] == pytest.approx(pixels / 100.0, rel=1e-12)
    assert result["t_scores"]["sma_cm2"] == pytest.approx(expected_t, abs=1e-9)
    assert result["categories"]["sma_cm2"] == expected_category


def test_category_boundaries():
    assert category(-0.999) == "normal"
    assert category(-1.0) == "low"
    assert category(-1.999) == "low"
    assert category(-2.0) == "sarcopenia"
    assert category(None) is None
    assert t_score(153.56, 186.54, 32.98) == pytest.approx(-1.0)


def test_every_index_scored_against_same_sex():
    patient = PatientInfo(sex="F", height_cm=160.0, weight_kg=60.0, age=70)
    image, label = scan({L.MUSCLE: 10000, L.SAT: 5000}, patient=patient)
    result = quantify_scan(image, label)
    table = load_reference()
    sma = 100.0
    expected = {
        "sma_cm2": sma,
        "smi_cm2_m2": sma / 1.6**2,
        "sma_per_weight": sma / 60.0,
        "sma_per_bmi": sma / (60.0 / 1.6**2),
    }
    for index, value in expected.items():
        assert result["indices"][index] == pytest.approx(value, rel=1e-12)
        row = table.stat("F", index)
        assert result["t_scores"][index] == pytest.approx((value - row.mean) / row.sd, rel=1e-12)


# --------------------------------------------------------------------------- patient data


def _dicom_scan(tmp_path, **tags):
    raw = np.full((64, 48), 1024 - 1000, dtype=np.int16)  # stored = HU + 1024
    raw[10:30, 10:30] = 1024 + 50
    folder = tmp_path / "dicom"
    write_ct_slice(folder / "s.dcm", raw, position=(0, 0, 0), spacing=(0.75, 0.75), **tags)
    image = load_image(folder)
    label = np.zeros(image.hu.shape, dtype=np.uint8)
    label[image.hu > 0] = L.MUSCLE
    save_label(label, image, tmp_path / "label.nii.gz")
    return folder, tmp_path / "label.nii.gz"


def test_bmi_from_dicom_tags_and_manual_override(tmp_path, capsys):
    folder, label_path = _dicom_scan(
        tmp_path, PatientSex="M", PatientAge="045Y", PatientSize="1.75", PatientWeight="80"
    )
    assert cli(["quantify", "--image", str(folder), "--label", str(label_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    patient = result["patient"]
    assert (patient["sex"], patient["age"], patient["height_cm"], patient["weight_kg"]) == ("M", 45.0, 175.0, 80.0)
    assert patient["bmi"] == pytest.approx(80 / 1.75**2)
    assert patient["source"] == {"sex": "dicom", "age": "dicom", "height_cm": "dicom",
                                 "weight_kg": "dicom", "bmi": "computed"}
    sma = 400 * 0.75 * 0.75 / 100
    assert result["tissues"]["muscle"]["pixels"] == 400
    assert result["indices"]["smi_cm2_m2"] == pytest.approx(sma / 1.75**2)

    out = tmp_path / "q.json"
    assert cli(["quantify", "--image", str(folder), "--label", str(label_path),
                "--height-cm", "160", "--sex", "F", "--json", str(out)]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    patient = result["patient"]
    assert (patient["sex"], patient["height_cm"], patient["weight_kg"]) == ("F", 160.0, 80.0)
    assert patient["source"]["height_cm"] == "manual" and patient["source"]["weight_kg"] == "dicom"
    assert patient["source"]["sex"] == "manual"
    assert patient["bmi"] == pytest.approx(80 / 1.6**2)
    assert result["indices"]["smi_cm2_m2"] == pytest.approx(sma / 1.6**2)
    # Scored against women now.
    women = load_reference().stat("F", "sma_cm2")
    assert result["t_scores"]["sma_cm2"] == pytest.approx((sma - women.mean) / women.sd)


def test_manual_values_fill_gaps_of_untagged_dicom(tmp_path, capsys):
    folder, label_path = _dicom_scan(tmp_path)
    assert cli(["quantify", "--image", str(folder), "--label", str(label_path),
                "--weight-kg", "70", "--height-cm", "170"]) == 0
    patient = json.loads(capsys.readouterr().out)["patient"]
    assert patient["bmi"] == pytest.approx(70 / 1.7**2)
    assert patient["source"]["sex"] is None and patient["sex"] is None


def test_missing_height_gives_null_smi_with_reason():
    image, label = scan({L.MUSCLE: 12000, L.SAT: 3000}, patient=PatientInfo(sex="M", weight_kg=70))
    result = quantify_scan(image, label)
    assert result["indices"]["smi_cm2_m2"] is None
    assert result["reasons"]["smi_cm2_m2"] == "height unknown"
    assert result["patient"]["bmi"] is None and "height" in result["reasons"]["patient.bmi"]
    assert result["indices"]["sma_per_bmi"] is None
    assert result["indices"]["sma_per_weight"] == pytest.approx(120.0 / 70)
    assert result["t_scores"]["smi_cm2_m2"] is None and result["categories"]["smi_cm2_m2"] is None
    assert result["t_scores"]["sma_cm2"] == pytest.approx((120.0 - 186.54) / 32.98)
    assert result["flags"]["prado2008_sarcopenia"] is None
    assert result["reasons"]["flags.prado2008_sarcopenia"] == "smi_cm2_m2 unknown"
    assert result["flags"]["martin2013_sarcopenia"] is None  # needs BMI for men


def test_unknown_sex_gives_null_t_scores_with_reason():
    image, label = scan({L.MUSCLE: 12000}, patient=PatientInfo(height_cm=170, weight_kg=60))
    result = quantify_scan(image, label)
    assert all(t is None for t in result["t_scores"].values())
    assert result["reasons"]["t_scores.sma_cm2"] == "sex unknown"
    assert result["flags"]["prado2008_sarcopenia"] is None
    # Myosteatosis depends on BMI only (both sexes), so it is still decided.
    assert result["flags"]["martin2013_myosteatosis"] is not None


# --------------------------------------------------------------------------- cut-off flags


def _with_muscle_hu(image, label, hu_value):
    image.hu[label == L.MUSCLE] = hu_value
    return image, label


@pytest.mark.parametrize(
    "sex, height, weight, pixels, muscle_hu, prado, martin, myo",
    [
        # man, BMI 70/1.8^2 = 21.6 (< 25): SMI 45 -> Prado (52.4) yes, Martin (43) no
        ("M", 180.0, 70.0, 14580, 45.0, True, False, False),
        # man, BMI 90/1.8^2 = 27.8 (>= 25): SMI 50 -> Martin (53) yes; muscle 35 HU >= 33 -> no
        ("M", 180.0, 90.0, 16200, 35.0, True, True, False),
        # man, BMI 21.6: SMI 55 -> neither; muscle 40 HU < 41 -> myosteatosis
        ("M", 180.0, 70.0, 17820, 40.0, False, False, True),
        # woman, BMI 60/1.6^2 = 23.4: SMI 40 -> Prado (38.5) no, Martin (41) yes
        ("F", 160.0, 60.0, 10240, 50.0, False, True, False),
        # woman, BMI 80/1.6^2 = 31.3: SMI 38 -> both; muscle 30 HU < 33 -> myosteatosis
        ("F", 160.0, 80.0, 9728, 30.0, True, True, True),
    ],
)
def test_published_cutoff_flags(sex, height, weight, pixels, muscle_hu, prado, martin, myo):
    image, label = scan({L.MUSCLE: pixels}, patient=PatientInfo(sex=sex, height_cm=height, weight_kg=weight))
    image, label = _with_muscle_hu(image, label, muscle_hu)
    result = quantify_scan(image, label)
    smi = pixels / 100 / (height / 100) ** 2
    assert result["indices"]["smi_cm2_m2"] == pytest.approx(smi)
    assert result["flags"] == {
        "prado2008_sarcopenia": prado,
        "martin2013_sarcopenia": martin,
        "martin2013_myosteatosis": myo,
    }
    assert "Lancet Oncol" in result["cutoff_references"]["prado2008"]
    assert "J Clin Oncol" in result["cutoff_references"]["martin2013"]
    assert result["flag_criteria"]["martin2013_sarcopenia"].startswith("smi_cm2_m2 <")


def test_cutoffs_come_from_data_file():
    cutoffs = load_cutoffs()
    thresholds = {(r.key, r.sex, r.bmi_min, r.bmi_max): r.below for r in cutoffs.rules}
    assert thresholds[("prado2008_sarcopenia", "M", None, None)] == 52.4
    assert thresholds[("martin2013_sarcopenia", "M", 25.0, None)] == 53
    assert thresholds[("martin2013_myosteatosis", None, None, 25.0)] == 41
    assert "10.1200/JCO.2012.45.2722" in cutoffs.citations["martin2013"]


# --------------------------------------------------------------------------- slices and errors


def test_3d_slice_choice_and_errors():
    hu = np.full((30, 20, 5), -1000.0, dtype=np.float32)
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[2:12, 2:12, 3] = L.MUSCLE
    hu[2:12, 2:12, 3] = 40.0
    image = make_image(hu, (1.0, 1.0, 3.0), PatientInfo(sex="M"))
    assert quantify_scan(image, label)["slice_index"] == 3  # the only labelled slice
    assert quantify_scan(image, label, slice_index=-2)["slice_index"] == 3
    unlabelled = quantify_scan(image, label, slice_index=0)
    assert unlabelled["tissues"]["muscle"]["pixels"] == 0
    # No muscle labelled is no measurement, not an SMA of 0 and a "sarcopenia" category.
    assert unlabelled["indices"]["sma_cm2"] is None and unlabelled["t_scores"]["sma_cm2"] is None
    assert unlabelled["categories"]["sma_cm2"] is None
    assert unlabelled["reasons"]["sma_cm2"] == "no muscle labelled on the slice"
    with pytest.raises(SarcoError, match="out of range"):
        quantify_scan(image, label, slice_index=5)
    label[0, 0, 1] = L.SAT
    with pytest.raises(SarcoError, match="--slice"):
        quantify_scan(image, label)
    with pytest.raises(SarcoError, match="shape"):
        quantify_scan(image, label[:, :, :4])
    label[0, 0, 0] = 7
    with pytest.raises(SarcoError, match="outside 0-4"):
        quantify_scan(image, label, slice_index=3)


def test_cli_errors_are_one_line(tmp_path, capsys):
    image, label = scan({L.MUSCLE: 100}, shape=(20, 20))
    save_image(image, tmp_path / "a.nii.gz")
    other = make_image(np.zeros((20, 21), np.float32), (1.0, 1.0))
    save_label(np.zeros((20, 21), np.uint8), other, tmp_path / "wrong.nii.gz")
    code = cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "wrong.nii.gz")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: label wrong.nii.gz has shape") and err.count("\n") == 1
    code = cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "none.nii.gz")])
    assert code != 0 and "no such file" in capsys.readouterr().err
    save_label(label, image, tmp_path / "ok.nii.gz")
    code = cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "ok.nii.gz"),
                "--slice", "3"])
    err = capsys.readouterr().err
    assert code != 0 and "out of range" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli(["quantify", "--image", "a", "--label", "b", "--height-cm", "-170"])


def test_cli_overlay_png(tmp_path, capsys):
    image, label = scan({L.MUSCLE: 3000, L.SAT: 4000, L.VAT: 2000, L.IMAT: 200}, shape=(120, 100))
    save_image(image, tmp_path / "a.nii.gz")
    save_label(label, image, tmp_path / "a_label.nii.gz")
    png = tmp_path / "a.png"
    assert cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "a_label.nii.gz"),
                "--overlay", str(png)]) == 0
    capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- user / derived tables


def _cohort_csv(path, rng):
    """A cohort export: 12 young men, 10 young women, plus old and failed rows to be dropped."""
    rows = []
    for sex, n, base in (("M", 12, 170.0), ("F", 10, 110.0)):
        for i in range(n):
            sma = base + rng.normal(0, 20)
            height = rng.uniform(155, 190)
            weight = rng.uniform(50, 95)
            bmi = weight / (height / 100) ** 2
            rows.append({"id": f"{sex}{i}", "status": "ok", "sex": sex, "age": rng.uniform(20, 39),
                         "sma_cm2": sma, "smi_cm2_m2": sma / (height / 100) ** 2,
                         "sma_per_weight": sma / weight, "sma_per_bmi": sma / bmi})
    rows.append({"id": "old", "status": "ok", "sex": "M", "age": 70, "sma_cm2": 10.0,
                 "smi_cm2_m2": 1.0, "sma_per_weight": 0.1, "sma_per_bmi": 0.1})
    rows.append({"id": "bad", "status": "error: label missing", "sex": "F", "age": 25})
    rows.append({"id": "noage", "status": "ok", "sex": "F", "age": None, "sma_cm2": 5.0,
                 "smi_cm2_m2": 1.0, "sma_per_weight": 0.1, "sma_per_bmi": 0.1})
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def test_reference_command_derives_table(tmp_path, capsys):
    frame = _cohort_csv(tmp_path / "cohort.csv", np.random.default_rng(7))
    out = tmp_path / "ours.csv"
    assert cli(["reference", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(out), "--age-max", "39"]) == 0
    capsys.readouterr()
    table = load_reference(out)
    young = frame[(frame.status == "ok") & (frame.age <= 39)]
    for sex in ("M", "F"):
        for index in ("sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi"):
            values = young[young.sex == sex][index].to_numpy(dtype=float)
            stat = table.stat(sex, index)
            assert stat.n == len(values) == (12 if sex == "M" else 10)
            assert stat.mean == pytest.approx(values.mean(), rel=1e-5)
            assert stat.sd == pytest.approx(values.std(ddof=1), rel=1e-5)
    text = out.read_text()
    assert text.startswith("# name:") and "age <= 39" in text
    written = pd.read_csv(out, comment="#")
    assert list(written.columns) == ["sex", "index", "n", "mean", "sd", "t_minus1", "t_minus2"]
    assert np.allclose(written["t_minus1"], written["mean"] - written["sd"], rtol=1e-5)
    assert np.allclose(written["t_minus2"], written["mean"] - 2 * written["sd"], rtol=1e-5)


def test_user_reference_table_is_used(tmp_path, capsys):
    table = tmp_path / "mine.csv"
    table.write_text("# name: my group\nsex,index,n,mean,sd\nM,sma_cm2,5,150,10\nF,SMA,5,100,10\n")
    image, label = scan({L.MUSCLE: 13000}, patient=PatientInfo(sex="M"))
    save_image(image, tmp_path / "a.nii.gz")
    save_label(label, image, tmp_path / "l.nii.gz")
    assert cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "l.nii.gz"),
                "--reference", str(table)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "my group"
    assert result["t_scores"] == {"sma_cm2": pytest.approx(-2.0)}
    assert result["categories"] == {"sma_cm2": "sarcopenia"}
    assert cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "l.nii.gz"),
                "--reference", "lee2022_young_adults"]) == 0  # a bundled table by name
    assert json.loads(capsys.readouterr().out)["reference"] == load_reference().describe()
    assert cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "l.nii.gz"),
                "--reference", "nonexistent_table"]) != 0
    assert "unknown reference table" in capsys.readouterr().err
    table.write_text("sex,index,mean,sd\nM,sma_cm2,150,0\n")
    assert cli(["quantify", "--image", str(tmp_path / "a.nii.gz"), "--label", str(tmp_path / "l.nii.gz"),
                "--reference", str(table)]) != 0
    assert "sd must be a positive number" in capsys.readouterr().err


def test_reference_command_needs_enough_rows(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("sex,age,sma_cm2\nM,30,150\nF,70,100\n")
    assert cli(["reference", "--cohort", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o.csv"),
                "--indices", "sma_cm2"]) != 0
    assert "fewer than two" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_phantom_areas_and_martin_flag_agree():
    """Cross-check with the independent phantom generator: its exact areas and its
    sarcopenic flag (drawn against Martin 2013) must match what quantify measures."""
    phantom = pytest.importorskip("sarco_app.synthesis.phantom")
    for seed, sarcopenic in ((3, True), (4, False)):
        p = phantom.generate(seed, sex="M", height_cm=178, weight_kg=92, sarcopenic=sarcopenic,
                             muscle_hu=25, size=256)
        result = quantify_scan(p.to_image(), p.label)
        for tissue, area in p.areas_cm2().items():
            assert result["tissues"][tissue]["area_cm2"] == pytest.approx(area, rel=1e-12)
        assert result["flags"]["martin2013_sarcopenia"] is sarcopenic
        assert result["flags"]["martin2013_myosteatosis"] is True  # muscle ~25 HU < 33 (BMI 29)


def test_3d_scan_labelled_on_every_slice_is_measured_at_l3():
    """Without --slice, a volume labelled on all slices is measured at the L3 slice."""
    from sarco_app.spine.l3 import locate_l3
    from sarco_app.synthesis.phantom3d.build import make_volume_phantom

    image, truth = make_volume_phantom(21, slice_thickness=3.0, variants=[], matrix=160, pixel_spacing=2.4)
    label = np.where((image.hu > -29) & (image.hu < 150), 1, 0).astype(np.uint8)
    expected = locate_l3(image)
    assert expected.found
    result = quantify_scan(image, label, None, None, None)
    assert result["slice_index"] == expected.slice_index
    assert abs(expected.z_mm - truth.l3_z_mm) <= 5.0
    chest, _ = make_volume_phantom(22, slice_thickness=3.0, variants=[], coverage="chest",
                                   matrix=160, pixel_spacing=2.4)
    chest_label = np.ones(chest.hu.shape, np.uint8)
    with pytest.raises(SarcoError, match="give the slice"):
        quantify_scan(chest, chest_label, None, None, None)


def test_height_in_metres_is_refused_not_measured(tmp_path, capsys):
    """A height of 1.7 'cm' is a unit mix-up: a one-line error, not an SMI of 500000."""
    from sarco_app.measurement.quantify import patient_from_params

    folder, label_path = _dicom_scan(tmp_path, PatientSex="M", PatientWeight="80")
    code = cli(["quantify", "--image", str(folder), "--label", str(label_path),
                "--height-cm", "1.7", "--weight-kg", "70"])
    err = capsys.readouterr().err
    assert code == 1 and "height_cm 1.7 is outside" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SarcoError, match="weight_kg 7000 is outside"):
        patient_from_params({"weight_kg": "7000"})
    assert patient_from_params({"height_cm": "172", "weight_kg": "70"}).height_cm == 172.0


def test_cli_refuses_outputs_that_would_overwrite_inputs_or_final_labels(tmp_path, capsys):
    """An output option naming an input, another output, a data file inside an input folder or a
    stored final label is refused before the command runs, and the files stay as they were."""
    out = tmp_path / "studies"
    assert cli(["phantom", "--count", "1", "--seed", "2", "--size", "64", "--out", str(out)]) == 0
    image, label = out / "phantom_0000.nii.gz", out / "labels" / "final" / "phantom_0000.nii.gz"
    before = {p: p.read_bytes() for p in (image, label, out / "manifest.csv")}
    capsys.readouterr()
    cases = [
        (["quantify", "--image", str(image), "--label", str(label), "--json", str(label)], "is the input --label"),
        (["segment", str(image), "--out", str(image), "--method", "threshold"], "is the input image"),
        (["segment", str(image), "--out", str(label), "--method", "threshold"], "is a stored final label"),
        (["evaluate", "--pred", str(label), "--truth", str(label), "--csv", str(label)], "is the input --pred"),
        (["reference", "--cohort", str(out / "manifest.csv"), "--out", str(out / "manifest.csv")], "is the input --cohort"),
        (["train", "--data", str(out), "--out", str(image), "--epochs", "1"], "lies inside the input --data"),
        (["quantify", "--image", str(image), "--label", str(label), "--json", str(tmp_path / "x"),
          "--overlay", str(tmp_path / "x")], "--json and --overlay name the same file"),
    ]
    for argv, reason in cases:
        assert cli(argv) != 0, argv
        err = capsys.readouterr().err
        assert "refusing to overwrite" in err and reason in err, (argv, err)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "x").exists()
    # Distinct outputs still work.
    assert cli(["quantify", "--image", str(image), "--label", str(label), "--json", str(tmp_path / "q.json")]) == 0


def test_float_labels_with_nan_or_fractions_are_refused(tmp_path, capsys):
    """A float label holding NaN or fractions (resampled with interpolation) is refused by
    quantify and evaluate instead of NaN being cast to some class; whole-number floats load."""
    hu = np.full((40, 30), -1000.0, dtype=np.float32)
    hu[5:30, 5:25] = 40.0
    image = make_image(hu, (1.0, 1.0), PatientInfo(sex="F", height_cm=160, weight_kg=60))
    save_image(image, tmp_path / "ct.nii.gz")
    label = np.zeros(hu.shape, dtype=np.uint8)
    label[5:30, 5:25] = L.MUSCLE
    save_label(label, image, tmp_path / "whole.nii.gz")
    assert cli(["quantify", "--image", str(tmp_path / "ct.nii.gz"), "--label", str(tmp_path / "whole.nii.gz")]) == 0
    import nibabel as nib

    stored = nib.load(str(tmp_path / "whole.nii.gz"))
    for value, reason in ((np.nan, "NaN"), (1.5, "fraction")):
        bad = np.asarray(stored.dataobj).astype(np.float32)
        bad.flat[0] = value
        nib.save(nib.Nifti1Image(bad, stored.affine), str(tmp_path / "bad.nii.gz"))
        capsys.readouterr()
        assert cli(["quantify", "--image", str(tmp_path / "ct.nii.gz"), "--label", str(tmp_path / "bad.nii.gz")]) != 0
        assert reason in capsys.readouterr().err
        assert cli(["evaluate", "--pred", str(tmp_path / "bad.nii.gz"), "--truth", str(tmp_path / "whole.nii.gz")]) != 0
        assert reason in capsys.readouterr().err


def test_cli_output_file_types_are_checked_before_the_command_runs(tmp_path, capsys):
    """A label output must be NIfTI and an L3 figure PNG: a wrong name is one line up front, not
    a nibabel or OpenCV traceback after the work."""
    out = tmp_path / "studies"
    assert cli(["phantom", "--count", "1", "--seed", "2", "--size", "64", "--out", str(out)]) == 0
    image = out / "phantom_0000.nii.gz"
    capsys.readouterr()
    for argv, text in ((["segment", str(image), "--out", str(tmp_path / "seg.txt"), "--method", "threshold"],
                        "--out"), (["l3", str(image), "--png", str(tmp_path / "l3.txt")], "--png")):
        assert cli(argv) != 0
        err = capsys.readouterr().err
        assert err.startswith(f"error: {text}") and "must end in" in err
    assert not (tmp_path / "seg.txt").exists() and not (tmp_path / "l3.txt").exists()
