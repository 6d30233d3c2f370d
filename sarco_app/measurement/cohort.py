"""Quantify every labelled scan of a studies folder into one table (Excel + CSV + overlays).

Layout read (MONAI Label's local datastore, see docs/CONVENTIONS.md): ``DIR/<id>.nii[.gz]``
images with ``DIR/<id>.json`` patient sidecars and ``DIR/labels/final/<id>.nii[.gz]`` labels.
Every image with a final label gives one row; a scan that fails gets ``status`` = the reason
and the run goes on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import NIFTI_SUFFIXES, CTImage, image_stem
from sarco_app.measurement.quantify import INDEX_KEYS, PATIENT_FIELDS, TISSUE_KEYS, TISSUES, load_label, quantify_scan
from sarco_app.measurement.reference import Cutoffs, ReferenceTable, load_cutoffs, load_reference

__all__ = ["find_labelled_studies", "flatten_result", "quantify_studies", "quantify_scan", "summary_by_sex"]


def find_labelled_studies(studies_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``([(id, image, final label), ...], [ids of images without a final label])``."""
    studies_dir = Path(studies_dir)
    if not studies_dir.is_dir():
        raise SarcoError(f"studies folder {studies_dir}: no such folder")
    label_dir = studies_dir / "labels" / "final"
    labels = {}
    if label_dir.is_dir():
        labels = {image_stem(p): p for p in label_dir.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)}
    found, unlabelled = [], []
    for image in sorted(studies_dir.iterdir()):
        if not (image.is_file() and image.name.lower().endswith(NIFTI_SUFFIXES)):
            continue
        study_id = image_stem(image)
        if study_id in labels:
            found.append((study_id, image, labels[study_id]))
        else:
            unlabelled.append(study_id)
    return found, unlabelled


def flatten_result(result: dict[str, Any]) -> dict[str, Any]:
    """One flat row (column -> value) from a :func:`quantify_scan` result.

    Columns: ``slice_index``, ``pixel_spacing_x_mm``/``_y_mm``; patient fields (``sex``, ``age``,
    ``height_cm``, ``weight_kg``, ``bmi``) and ``<field>_source``; ``<tissue>_<measure>`` for
    every tissue; the index keys as they are (``sma_cm2``, ``smi_cm2_m2``, ...);
    ``t_<index>``, ``category_<index>``; one column per flag; ``reference``; ``reasons``.
    """
    row: dict[str, Any] = {
        "slice_index": result["slice_index"],
        "pixel_spacing_x_mm": result["pixel_spacing_mm"][0],
        "pixel_spacing_y_mm": result["pixel_spacing_mm"][1],
    }
    patient = result["patient"]
    for name in (*PATIENT_FIELDS, "bmi"):
        row[name] = patient.get(name)
    for name in (*PATIENT_FIELDS, "bmi"):
        row[f"{name}_source"] = patient["source"].get(name)
    for tissue in TISSUES:
        for key in TISSUE_KEYS:
            row[f"{tissue}_{key}"] = result["tissues"][tissue][key]
    for key in INDEX_KEYS:
        row[key] = result["indices"].get(key)
    for key, value in result["t_scores"].items():
        row[f"t_{key}"] = value
    for key, value in result["categories"].items():
        row[f"category_{key}"] = value
    for key, value in result["flags"].items():
        row[key] = value
    row["reference"] = result["reference"]
    row["reasons"] = "; ".join(f"{k}: {v}" for k, v in result["reasons"].items())
    return row


def summary_by_sex(frame, measures: Iterable[str]):
    """Long table ``measure, group, n, mean, sd, mean_sd`` for groups M, F and all.

    ``sd`` is the sample SD (ddof = 1); ``mean_sd`` is the "mean ± SD" text shown in reports.
    Only scans with ``status == "ok"`` count.
    """
    import pandas as pd

    ok = frame[frame["status"] == "ok"] if "status" in frame.columns else frame
    records = []
    groups = [("M", ok[ok["sex"] == "M"]), ("F", ok[ok["sex"] == "F"]), ("all", ok)]
    for measure in measures:
        if measure not in ok.columns:
            continue
        for group_name, group in groups:
            values = pd.to_numeric(group[measure], errors="coerce").dropna()
            n = int(len(values))
            mean = float(values.mean()) if n else None
            sd = float(values.std(ddof=1)) if n > 1 else None
            if mean is None:
                text = ""
            elif sd is None:
                text = f"{mean:.2f}"
            else:
                text = f"{mean:.2f} ± {sd:.2f}"
            records.append({"measure": measure, "group": group_name, "n": n, "mean": mean, "sd": sd, "mean_sd": text})
    return pd.DataFrame.from_records(records, columns=["measure", "group", "n", "mean", "sd", "mean_sd"])


def _reference_frame(reference: ReferenceTable, cutoffs: Cutoffs):
    """The reference table and cut-off rules used, as one sheet."""
    import pandas as pd

    rows = [{"kind": "t-score table", "name": reference.name, "detail": reference.describe()}]
    for key, value in reference.provenance.items():
        rows.append({"kind": "provenance", "name": key, "detail": value})
    for row in reference.rows():
        rows.append(
            {
                "kind": "young-adult reference",
                "name": f"{row['sex']} {row['index']}",
                "n": row["n"],
                "mean": row["mean"],
                "sd": row["sd"],
                "t_minus1": row["t_minus1"],
                "t_minus2": row["t_minus2"],
            }
        )
    for source, citation in cutoffs.citations.items():
        rows.append({"kind": "cut-off source", "name": source, "detail": citation})
    for rule in cutoffs.rules:
        rows.append({"kind": "cut-off rule", "name": rule.key, "detail": rule.describe()})
    columns = ["kind", "name", "detail", "n", "mean", "sd", "t_minus1", "t_minus2"]
    return pd.DataFrame.from_records(rows, columns=columns)


def quantify_studies(
    studies_dir: str | Path,
    out_path: str | Path,
    reference: ReferenceTable | str | Path | None = None,
    cutoffs: Cutoffs | str | Path | None = None,
    slice_index: int | None = None,
    overlays: bool = True,
    overlay_dir: str | Path | None = None,
    progress: bool = True,
    workers: int | None = 1,
    scheduler: str | None = None,
    force: bool = False,
    announce: Any = None,
) -> dict[str, Any]:
    """Quantify every image with a final label; write the workbook, the CSV and overlays.

    Parameters
    ----------
    studies_dir : path
        Studies folder (see module docstring).
    out_path : path
        Excel workbook (``.xlsx``) with sheets ``scans`` (one row per scan, see
        :func:`flatten_result`, plus ``id``, ``status``, ``image``, ``label``, ``overlay``),
        ``summary`` (:func:`summary_by_sex`) and ``reference``. The ``scans`` sheet is also
        written as ``<out stem>.csv`` and the summary as ``<out stem>_summary.csv``; each scan's
        row is first written to ``<out_path>.parts/`` (:mod:`sarco_app.measurement.cohort_parts`).
    reference, cutoffs : optional
        T-score table and cut-off rules (defaults: the paper's Table 4; Prado 2008, Martin 2013).
    slice_index : int, optional
        Slice to measure in 3D images; by default the only labelled slice.
    overlays : bool
        Write one PNG per scan into ``overlay_dir`` (default ``<out stem>_overlays/``).
    workers, scheduler : optional
        One task per scan on :class:`sarco_app.parallel.Executor`: 1 worker (the default) runs
        in this process, N a local Dask cluster (``None``: the CPU cores), ``scheduler`` an
        existing Dask cluster.
    force : bool
        Measure every scan again instead of reusing the parts of an earlier run.

    Returns
    -------
    dict with ``rows`` (list of dicts), ``xlsx``, ``csv``, ``summary_csv``, ``overlay_dir``,
    ``unlabelled`` (ids of images without a final label), ``failed`` (count), and from
    :func:`~sarco_app.measurement.cohort_parts.run_scans` ``records``, ``measured``, ``reused``,
    ``executor``, ``dashboard``, ``wall_s`` and ``parts``.
    """
    from sarco_app.measurement.cohort_parts import file_signature, run_scans

    out_path, reference, cutoffs = resolve_outputs(out_path, reference, cutoffs)
    studies, unlabelled = find_labelled_studies(studies_dir)
    if not studies:
        raise SarcoError(f"studies folder {studies_dir}: no image has a final label in labels/final/")
    overlay_dir = Path(overlay_dir) if overlay_dir else out_path.with_name(out_path.stem + "_overlays")
    tables = hashlib.sha1(repr((reference, cutoffs)).encode()).hexdigest()[:12]
    common = {"mode": "studies", "slice_index": slice_index, "tables": tables,
              "overlays": str(overlay_dir) if overlays else None}

    def settings(study: tuple[str, Path, Path]) -> dict[str, Any]:
        return {**common, "image": file_signature(study[1]), "label": file_signature(study[2])}

    run = run_scans(
        [(study[0], study) for study in studies], measure_labelled, out_path, settings, failed_labelled_row,
        source=lambda study: study[1], force=force, workers=workers, scheduler=scheduler, progress=progress,
        desc="quantify", unit="scan",
        announce=announce, slice_index=slice_index, reference=reference, cutoffs=cutoffs,
        overlay_dir=str(overlay_dir) if overlays else None,
    )
    written = write_workbook(run["rows"], out_path, reference, cutoffs)
    return {**run, **written, "overlay_dir": overlay_dir if overlays else None, "unlabelled": unlabelled}


def measure_labelled(study: tuple[str, Path, Path], slice_index: int | None, reference: ReferenceTable,
                     cutoffs: Cutoffs, overlay_dir: str | None) -> dict[str, Any]:
    """One labelled scan of ``cohort --studies`` as a task: its row (a failure goes into
    ``status``), the time per step (``read``, ``quantify``, ``write``; s) and the worker's memory."""
    from sarco_app.measurement.cohort_parts import timed
    from sarco_app.parallel import process_memory

    study_id, image_path, label_path = study
    seconds: dict[str, float] = {}
    row: dict[str, Any] = {"id": study_id, "status": "ok", "image": str(image_path), "label": str(label_path)}
    try:
        with timed(seconds, "read"):
            image, label = _load_pair(image_path, label_path)
        with timed(seconds, "quantify"):
            result = quantify_scan(image, label, slice_index, None, reference, cutoffs)
        if not any(stats["pixels"] for stats in result["tissues"].values()):
            # An empty final label is a scan not labelled yet, not a patient without muscle.
            raise SarcoError(f"the final label holds no tissue on slice {result['slice_index']}")
        row.update(flatten_result(result))
        if overlay_dir is not None:
            with timed(seconds, "write"):
                row["overlay"] = str(write_overlay(image, label, result, Path(overlay_dir) / f"{study_id}.png",
                                                   study_id))
    except (ValueError, OSError) as exc:  # one bad scan must not stop the run
        row["status"] = f"error: {exc}"
    except Exception as exc:  # an unexpected failure is recorded too, with its type
        row["status"] = f"error: {type(exc).__name__}: {exc}"
    return {"row": row, "seconds": seconds, "worker": process_memory()}


def failed_labelled_row(study_id: str, study: tuple[str, Path, Path], status: str) -> dict[str, Any]:
    """The row of a scan whose task failed as a whole (e.g. its worker died)."""
    return {"id": study_id, "status": status, "image": str(study[1]), "label": str(study[2])}


def resolve_outputs(out_path, reference, cutoffs) -> tuple[Path, ReferenceTable, Cutoffs]:
    """Check the workbook path and load the reference table and cut-offs (names, paths or
    ``None`` for the defaults)."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".xlsx":
        raise SarcoError(f"--out {out_path}: the workbook must end in .xlsx")
    if not isinstance(reference, ReferenceTable):
        reference = load_reference(reference)
    if not isinstance(cutoffs, Cutoffs):
        cutoffs = load_cutoffs(cutoffs)
    return out_path, reference, cutoffs


def summary_measures(reference: ReferenceTable) -> list[str]:
    """The columns the summary sheet gives as mean ± SD by sex."""
    measures = [
        "age",
        "height_cm",
        "weight_kg",
        "bmi",
        *[f"{t}_area_cm2" for t in TISSUES],
        *[f"{t}_hu_mean" for t in TISSUES],
        *INDEX_KEYS,
        *[f"t_{i}" for i in reference.indices],
    ]
    return list(dict.fromkeys(measures))  # muscle_hu_mean is listed twice


def workbook_companions(out_path: Path) -> tuple[Path, Path]:
    """The CSV files written beside the workbook: ``<stem>.csv`` (scans) and ``<stem>_summary.csv``."""
    out_path = Path(out_path)
    return out_path.with_suffix(".csv"), out_path.with_name(out_path.stem + "_summary.csv")


def write_workbook(
    rows: list[dict[str, Any]],
    out_path: Path,
    reference: ReferenceTable,
    cutoffs: Cutoffs,
    lead_columns: Iterable[str] = ("id", "status"),
):
    """Write the cohort's workbook (sheets ``scans``, ``summary``, ``reference``) to ``out_path``
    and the scans and summary as ``<stem>.csv`` and ``<stem>_summary.csv`` beside it.

    Returns what the cohort commands report: ``rows``, ``xlsx``, ``csv``, ``summary_csv`` and
    ``failed`` (rows whose status is not ``ok``)."""
    import pandas as pd

    frame = _order_columns(pd.DataFrame.from_records(rows))
    lead = [c for c in lead_columns if c in frame.columns]
    frame = frame[lead + [c for c in frame.columns if c not in lead]]
    if "sex" in frame.columns:
        summary = summary_by_sex(frame, [m for m in summary_measures(reference) if m in frame.columns])
    else:  # no scan could be measured
        summary = summary_by_sex(frame.iloc[0:0].assign(sex=None), [])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with pd.ExcelWriter(out_path, engine="openpyxl") as writer:
        # The workbook is for people: units in the headers (the CSV keeps the bare names).
        frame.rename(columns=excel_header).to_excel(writer, sheet_name="scans", index=False)
        summary.to_excel(writer, sheet_name="summary", index=False)
        _reference_frame(reference, cutoffs).to_excel(writer, sheet_name="reference", index=False)
        for sheet in writer.sheets.values():
            format_sheet(sheet)
    csv_path, summary_csv = workbook_companions(out_path)
    frame.to_csv(csv_path, index=False)
    summary.to_csv(summary_csv, index=False)
    return {"rows": rows, "xlsx": out_path, "csv": csv_path, "summary_csv": summary_csv,
            "failed": int((frame["status"] != "ok").sum())}


#: Units of the columns whose names do not spell one (``_cm2``, ``_mm``, ``_hu``, ``_kg`` ... do).
_UNITS = {"age": "years", "bmi": "kg/m²", "sma_per_weight": "cm²/kg", "sma_per_bmi": "cm² per kg/m²"}


def excel_header(column: str) -> str:
    """The workbook header of a scans column: the name, with its unit in parentheses when the
    name does not already end in one (``age (years)``, ``muscle_pixels (pixels)``,
    ``t_smi_cm2_m2 (SD)``); :func:`column_from_header` undoes it."""
    if column.startswith("t_") and not column.endswith("_source"):
        return f"{column} (SD)"  # a T-score counts young-adult SDs, whatever the measure's unit
    if column.endswith("_pixels"):
        return f"{column} (pixels)"
    unit = _UNITS.get(column)
    return f"{column} ({unit})" if unit else column


def column_from_header(header: str) -> str:
    """The scans column (as in the CSV) of a workbook header from :func:`excel_header`."""
    return str(header).split(" (", 1)[0]


def _number_format(header: str) -> str:
    """Decimals a reader needs: areas 0.01 cm², HU and body measures 0.1, mm and ratios 0.001."""
    name = column_from_header(header)
    if name.endswith(("_pixels", "slice_index", "_n")) or name in ("n", "age"):
        return "0"
    if name.endswith(("_cm2", "_cm2_m2")) or name.startswith("t_") or name in ("mean", "sd"):
        return "0.00"
    if "hu" in name.split("_") or name.endswith(("_kg", "_cm")) or name == "bmi":
        return "0.0"
    return "0.000"


def format_sheet(sheet) -> None:
    """Frozen header row (and first column), an autofilter, column widths that fit the text
    (at most 40 characters) and number formats with sensible decimals, on an openpyxl sheet."""
    from openpyxl.utils import get_column_letter

    if sheet.max_row < 1 or sheet.max_column < 1:
        return
    sheet.freeze_panes = "B2"
    sheet.auto_filter.ref = sheet.dimensions
    for index, cells in enumerate(sheet.iter_cols(min_row=1, max_row=sheet.max_row), start=1):
        header = str(cells[0].value or "")
        fmt = _number_format(header)
        width = len(header)
        for cell in cells[1:]:
            if isinstance(cell.value, float):
                cell.number_format = fmt
                text = f"{cell.value:.{len(fmt) - 2 if '.' in fmt else 0}f}"
            else:
                text = "" if cell.value is None else str(cell.value)
            width = max(width, len(text))
        sheet.column_dimensions[get_column_letter(index)].width = min(width + 2, 40)


def _load_pair(image_path: Path, label_path: Path) -> tuple[CTImage, np.ndarray]:
    from sarco_app.inputs.ingest import load_image

    image = load_image(image_path)
    return image, load_label(label_path, image)


def write_overlay(image: CTImage, label: np.ndarray, result: dict, path: Path, title: str) -> Path:
    from sarco_app.figures.overlay import overlay_png

    k = result["slice_index"]
    hu_xy = image.hu if image.hu.ndim == 2 else image.hu[:, :, k]
    label_xy = label if label.ndim == 2 else label[:, :, k]
    areas = {t: result["tissues"][t]["area_cm2"] for t in TISSUES}
    smi = result["indices"].get("smi_cm2_m2")
    caption = f"{title} — slice {k}" + (f", SMI {smi:.1f} cm²/m²" if smi is not None else "")
    return overlay_png(hu_xy, label_xy, result["pixel_spacing_mm"], path, title=caption, areas=areas)


def _order_columns(frame):
    first = ["id", "status"]
    last = ["reference", "reasons", "image", "label", "overlay"]
    middle = [c for c in frame.columns if c not in first and c not in last]
    return frame[[c for c in first + middle + last if c in frame.columns]]

