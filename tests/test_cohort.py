"""The cohort command: workbook, CSV, summary by sex and overlays, checked against quantify_scan."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sarco_app import labels as L
from sarco_app.__main__ import main as cli
from sarco_app.measurement.cohort import column_from_header, quantify_studies
from sarco_app.measurement.cohort_parts import parts_dir
from sarco_app.inputs.ingest import load_image, make_image, save_image, save_label
from sarco_app.inputs.patient import PatientInfo
from sarco_app.measurement.quantify import load_label, quantify_scan


def ring_phantom(nx=160, ny=120, seed=0):
    """An elliptical 'abdomen': SAT ring, muscle ring, VAT core, a few IMAT pixels."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    r = np.sqrt(((x - nx / 2) / (nx * 0.45)) ** 2 + ((y - ny / 2) / (ny * 0.45)) ** 2)
    label = np.zeros((nx, ny), dtype=np.uint8)
    label[r < 1.0] = L.SAT
    label[r < 0.8] = L.MUSCLE
    label[r < 0.65] = L.VAT
    label[(r < 0.8) & (r >= 0.65) & (x % 9 == 0) & (y % 7 == 0)] = L.IMAT
    hu = np.full((nx, ny), -1000.0, dtype=np.float32)
    for value, (mean, sd) in {L.SAT: (-100, 15), L.MUSCLE: (40, 10), L.VAT: (-90, 15), L.IMAT: (-60, 10)}.items():
        mask = label == value
        hu[mask] = rng.normal(mean, sd, size=int(mask.sum()))
    return hu, label


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    people = {
        "p01": PatientInfo(sex="M", age=30, height_cm=180, weight_kg=80),
        "p02": PatientInfo(sex="M", age=65, height_cm=172, weight_kg=90),
        "p03": PatientInfo(sex="F", age=50, height_cm=160, weight_kg=55),
        "p04": PatientInfo(sex="F", age=45),  # no height / weight
        "p05": PatientInfo(sex="M", age=40, height_cm=175, weight_kg=70),  # broken label below
    }
    for i, (study_id, patient) in enumerate(people.items()):
        hu, label = ring_phantom(160 + 4 * i, 120 + 2 * i, seed=i)
        image = make_image(hu, (0.7 + 0.05 * i, 0.75), patient)
        save_image(image, root / f"{study_id}.nii.gz")
        if study_id == "p05":
            save_label(label[:, :-1], make_image(hu[:, :-1], (0.9, 0.75)), root / "labels/final/p05.nii.gz")
        else:
            save_label(label, image, root / "labels" / "final" / f"{study_id}.nii.gz")
    # An image without a final label is skipped.
    hu, _ = ring_phantom(seed=9)
    save_image(make_image(hu, (0.8, 0.8)), root / "p06.nii.gz")
    return root


@pytest.fixture(scope="module")
def exported(studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "results.xlsx"
    code = cli(["cohort", "--studies", str(studies), "--out", str(out)])
    return code, out


def test_workbook_rows_match_quantify_scan(studies, exported):
    code, out = exported
    assert code == 0
    scans = pd.read_excel(out, sheet_name="scans").rename(columns=column_from_header)
    assert list(scans["id"]) == ["p01", "p02", "p03", "p04", "p05"]
    for _, row in scans[scans["status"] == "ok"].iterrows():
        image = load_image(studies / f"{row['id']}.nii.gz")
        label = load_label(studies / "labels" / "final" / f"{row['id']}.nii.gz", image)
        expected = quantify_scan(image, label)
        for tissue in ("muscle", "sat", "vat", "imat"):
            assert row[f"{tissue}_pixels"] == expected["tissues"][tissue]["pixels"]
            assert row[f"{tissue}_area_cm2"] == pytest.approx(expected["tissues"][tissue]["area_cm2"], rel=1e-9)
            assert row[f"{tissue}_hu_mean"] == pytest.approx(expected["tissues"][tissue]["hu_mean"], rel=1e-9)
            assert row[f"{tissue}_hu_sd"] == pytest.approx(expected["tissues"][tissue]["hu_sd"], rel=1e-9)
        for key, value in expected["indices"].items():
            if value is None:
                assert pd.isna(row[key]), key
            else:
                assert row[key] == pytest.approx(value, rel=1e-9), key
        for key, value in expected["t_scores"].items():
            assert (pd.isna(row[f"t_{key}"]) if value is None else row[f"t_{key}"] == pytest.approx(value)), key
            assert (pd.isna(row[f"category_{key}"]) if value is None
                    else row[f"category_{key}"] == expected["categories"][key])
        for key, value in expected["flags"].items():
            assert (pd.isna(row[key]) if value is None else bool(row[key]) == value), key
        assert row["sex"] == expected["patient"]["sex"]
        if expected["patient"]["height_cm"] is None:
            assert pd.isna(row["height_cm_source"])
        else:
            assert row["height_cm_source"] == "sidecar"
        assert row["reference"] == expected["reference"]


def test_bad_scan_recorded_not_fatal(exported):
    _, out = exported
    scans = pd.read_excel(out, sheet_name="scans").rename(columns=column_from_header).set_index("id")
    assert scans.loc["p05", "status"].startswith("error: label p05.nii.gz has shape")
    assert (scans.drop(index="p05")["status"] == "ok").all()
    assert "p06" not in scans.index
    # p04 has no height: null SMI, and the reason is in the row.
    assert pd.isna(scans.loc["p04", "smi_cm2_m2"]) and "height unknown" in scans.loc["p04", "reasons"]


def test_summary_by_sex(exported):
    _, out = exported
    scans = pd.read_excel(out, sheet_name="scans").rename(columns=column_from_header)
    summary = pd.read_excel(out, sheet_name="summary")
    ok = scans[scans["status"] == "ok"]
    for measure in ("muscle_area_cm2", "smi_cm2_m2", "muscle_hu_mean", "t_sma_cm2"):
        for group, rows in (("M", ok[ok.sex == "M"]), ("F", ok[ok.sex == "F"]), ("all", ok)):
            values = rows[measure].dropna().to_numpy(dtype=float)
            line = summary[(summary.measure == measure) & (summary.group == group)].iloc[0]
            assert line["n"] == len(values)
            if len(values):
                assert line["mean"] == pytest.approx(values.mean())
            if len(values) > 1:
                assert line["sd"] == pytest.approx(values.std(ddof=1))
                assert line["mean_sd"] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    # SMI is known for p03 only among the women (p04 has no height).
    line = summary[(summary.measure == "smi_cm2_m2") & (summary.group == "F")].iloc[0]
    assert line["n"] == 1


def test_reference_sheet_csv_and_overlays(exported):
    _, out = exported
    reference = pd.read_excel(out, sheet_name="reference")
    young = reference[reference.kind == "young-adult reference"].set_index("name")
    assert young.loc["M sma_cm2", "t_minus1"] == pytest.approx(153.56)
    assert young.loc["M sma_cm2", "t_minus2"] == pytest.approx(120.58)
    assert set(reference[reference.kind == "cut-off source"]["name"]) == {"prado2008", "martin2013"}
    csv = pd.read_csv(out.with_suffix(".csv"))
    xlsx = pd.read_excel(out, sheet_name="scans").rename(columns=column_from_header)
    assert list(csv.columns) == list(xlsx.columns)
    assert np.allclose(csv["muscle_area_cm2"].dropna(), xlsx["muscle_area_cm2"].dropna())
    assert out.with_name("results_summary.csv").is_file()


def test_workbook_is_formatted_for_people(exported):
    from openpyxl import load_workbook

    _, out = exported
    book = load_workbook(out)
    scans = book["scans"]
    headers = [cell.value for cell in scans[1]]
    assert "age (years)" in headers and "t_smi_cm2_m2 (SD)" in headers and "muscle_pixels (pixels)" in headers
    assert "muscle_area_cm2" in headers  # the unit is already in the name
    for sheet in book.worksheets:
        assert sheet.freeze_panes == "B2" and sheet.auto_filter.ref == sheet.dimensions
    column = {cell.value: cell.column_letter for cell in scans[1]}
    area = scans[f"{column['muscle_area_cm2']}2"]
    assert isinstance(area.value, float) and area.number_format == "0.00"
    assert scans[f"{column['muscle_hu_mean']}2"].number_format == "0.0"
    assert scans.column_dimensions[column["t_smi_cm2_m2 (SD)"]].width >= len("t_smi_cm2_m2 (SD)")
    overlays = sorted(p.name for p in out.with_name("results_overlays").glob("*.png"))
    assert overlays == ["p01.png", "p02.png", "p03.png", "p04.png"]


def test_user_reference_and_library_call(studies, tmp_path):
    table = tmp_path / "ref.csv"
    table.write_text("# name: tiny\nsex,index,n,mean,sd\nM,sma_cm2,3,100,10\nF,sma_cm2,3,80,10\n")
    result = quantify_studies(studies, tmp_path / "r.xlsx", reference=table, overlays=False, progress=False)
    assert result["overlay_dir"] is None and result["failed"] == 1 and result["unlabelled"] == ["p06"]
    scans = pd.read_excel(result["xlsx"], sheet_name="scans").rename(columns=column_from_header)
    ok = scans[scans.status == "ok"]
    expected = np.where(ok.sex == "M", (ok.sma_cm2 - 100) / 10, (ok.sma_cm2 - 80) / 10)
    assert np.allclose(ok["t_sma_cm2"], expected)
    assert "t_smi_cm2_m2" not in scans.columns
    assert set(ok["reference"]) == {"tiny"}


def test_cohort_errors(tmp_path, capsys):
    assert cli(["cohort", "--studies", str(tmp_path / "nope"), "--out", str(tmp_path / "r.xlsx")]) != 0
    assert "no such folder" in capsys.readouterr().err
    assert cli(["cohort", "--studies", str(tmp_path), "--out", str(tmp_path / "r.xlsx")]) != 0
    assert "no image has a final label" in capsys.readouterr().err
    assert cli(["cohort", "--studies", str(tmp_path), "--out", str(tmp_path / "r.csv")]) != 0
    assert ".xlsx" in capsys.readouterr().err


def test_quantify_json_keys_are_stable(studies, capsys):
    """The documented top-level and nested keys (docs/quantification.md)."""
    assert cli(["quantify", "--image", str(studies / "p01.nii.gz"),
                "--label", str(studies / "labels/final/p01.nii.gz")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["slice_index", "pixel_spacing_mm", "tissues", "patient", "indices", "t_scores",
                            "categories", "flags", "flag_criteria", "reference", "cutoff_references", "reasons"]
    assert list(result["tissues"]) == ["muscle", "sat", "vat", "imat"]
    assert list(result["tissues"]["sat"]) == ["pixels", "area_cm2", "hu_min", "hu_max", "hu_mean", "hu_sd",
                                              "hu_median"]
    assert list(result["patient"]) == ["sex", "age", "height_cm", "weight_kg", "bmi", "source"]
    assert list(result["indices"]) == ["sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi",
                                       "muscle_hu_mean", "vat_sat_ratio", "total_adipose_cm2"]
    assert list(result["flags"]) == ["prado2008_sarcopenia", "martin2013_sarcopenia", "martin2013_myosteatosis"]


def test_summary_lists_each_measure_once(exported):
    _, out = exported
    summary = pd.read_excel(out, sheet_name="summary")
    assert not summary.duplicated(["measure", "group"]).any()
    assert {"muscle_hu_mean", "smi_cm2_m2", "vat_sat_ratio", "bmi"} <= set(summary["measure"])


def test_reference_derived_from_cohort_export(exported, tmp_path, capsys):
    """The cohort CSV feeds `reference` directly (the paper's way of building Table 4)."""
    _, out = exported
    table_path = tmp_path / "ours.csv"
    assert cli(["reference", "--cohort", str(out.with_suffix(".csv")), "--out", str(table_path),
                "--age-max", "99", "--indices", "sma_cm2,muscle_hu_mean"]) == 0
    capsys.readouterr()
    scans = pd.read_csv(out.with_suffix(".csv"))
    ok = scans[scans.status == "ok"]
    from sarco_app.measurement.reference import load_reference

    table = load_reference(table_path)
    for sex in ("M", "F"):
        values = ok[ok.sex == sex]["sma_cm2"].to_numpy(dtype=float)
        assert table.stat(sex, "sma_cm2").n == len(values) == 2
        assert table.stat(sex, "sma_cm2").mean == pytest.approx(values.mean(), rel=1e-5)
        assert table.stat(sex, "sma_cm2").sd == pytest.approx(values.std(ddof=1), rel=1e-5)
    assert table.stat("M", "muscle_hu_mean") is not None
    # Only one man is 39 or younger: no table, a clear error.
    assert cli(["reference", "--cohort", str(out.with_suffix(".csv")), "--out", str(tmp_path / "x.csv")]) != 0
    assert "fewer than two" in capsys.readouterr().err


def test_two_images_with_one_id_are_refused_before_anything_is_measured(tmp_path, capsys):
    """``a.nii`` beside ``a.nii.gz`` would share one row and one part file: the command names
    both and writes nothing, rather than report one scan's numbers for the other."""
    hu, label = ring_phantom(seed=3)
    image = make_image(hu, (0.8, 0.8), PatientInfo(sex="F", age=50))
    save_image(image, tmp_path / "a.nii.gz")
    save_image(image, tmp_path / "a.nii")
    save_label(label, image, tmp_path / "labels" / "final" / "a.nii.gz")
    out = tmp_path / "out" / "r.xlsx"
    assert cli(["cohort", "--studies", str(tmp_path), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "name more than one input" in err and "a.nii.gz" in err and str(tmp_path / "a.nii") in err
    assert not out.exists() and not parts_dir(out).exists()


def test_an_empty_final_label_is_a_failed_row_not_a_sarcopenic_patient(tmp_path):
    """A final label with no tissue (saved before anything was drawn) is recorded as a failure
    and left out of the statistics, instead of an SMA of 0 flagged as sarcopenia."""
    for study_id, empty in (("a", False), ("b", True)):
        hu, label = ring_phantom(seed=4)
        image = make_image(hu, (0.8, 0.8), PatientInfo(sex="F", age=50, height_cm=165, weight_kg=60))
        save_image(image, tmp_path / f"{study_id}.nii.gz")
        save_label(np.zeros_like(label) if empty else label, image, tmp_path / "labels" / "final" / f"{study_id}.nii.gz")
    out = tmp_path / "out" / "r.xlsx"
    assert cli(["cohort", "--studies", str(tmp_path), "--out", str(out), "--no-overlays"]) == 0
    scans = pd.read_excel(out, sheet_name="scans").rename(columns=column_from_header).set_index("id")
    assert scans.loc["a", "status"] == "ok"
    assert scans.loc["b", "status"] == "error: the final label holds no tissue on slice 0"
    assert pd.isna(scans.loc["b", "smi_cm2_m2"])


def test_cohort_refuses_to_replace_a_csv_it_did_not_write(tmp_path, capsys):
    """``--out studies/manifest.xlsx`` would write ``manifest.csv`` over the studies folder's
    own manifest: refused while no workbook of that name exists; a rerun (workbook there)
    replaces its own companions."""
    hu, label = ring_phantom(seed=5)
    image = make_image(hu, (0.8, 0.8), PatientInfo(sex="M", age=40, height_cm=175, weight_kg=70))
    save_image(image, tmp_path / "a.nii.gz")
    save_label(label, image, tmp_path / "labels" / "final" / "a.nii.gz")
    (tmp_path / "manifest.csv").write_text("id,sex\na,M\n")
    assert cli(["cohort", "--studies", str(tmp_path), "--out", str(tmp_path / "manifest.xlsx"), "--no-overlays"]) != 0
    assert "no earlier cohort run" in capsys.readouterr().err
    assert (tmp_path / "manifest.csv").read_text() == "id,sex\na,M\n"
    out = tmp_path / "out" / "r.xlsx"
    for _ in range(2):  # the second run finds its own workbook and companions
        assert cli(["cohort", "--studies", str(tmp_path), "--out", str(out), "--no-overlays"]) == 0
    assert "1 of 1 scan(s) quantified" in capsys.readouterr().out
