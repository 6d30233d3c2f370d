"""Cohort from raw scans: find L3, segment, quantify every series of a folder (no labels yet).

Used by ``python -m sarco_app cohort --input DIR``. The folder may hold NIfTI files and DICOM
studies (sub-folders, searched recursively, or zip files; a folder of loose ``.dcm`` files
directly in DIR counts as one study). Every series gives one row of the ``scans`` sheet with
``status``:

* ``ok`` -- L3 found (or a single-slice image taken as it is), segmented and quantified;
* ``no L3: <reason>`` -- the locator answered "not in field of view";
* ``unreadable: <reason>`` -- the file or series could not be read;
* ``skipped: <reason>`` -- not CT, or not axial;
* ``error: <reason>`` -- segmentation or quantification failed.

One bad study never stops the run. The workbook has the same sheets as
:func:`sarco_app.measurement.cohort.quantify_studies` (``scans``, ``summary``, ``reference``), plus the
L3 columns ``l3_slice_index`` (file voxel order), ``l3_z_mm`` and ``l3_confidence``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import NIFTI_SUFFIXES, CTImage, image_stem

#: Smallest |cos| between the slice normal and the head-feet axis for an axial series.
AXIAL_COS = 0.8


@dataclass
class RawInput:
    """One series to process: ``load()`` returns a CTImage or raises; ``skip`` is a reason."""

    name: str
    path: Path
    series: int | None = None
    skip: str | None = None
    error: str | None = None
    files: list[Path] | None = None  # loose DICOM files read together (``path`` is their folder)


def _stem(path: Path) -> str:
    return image_stem(path, NIFTI_SUFFIXES + (".zip",))


def find_raw_inputs(input_dir: str | Path) -> list[RawInput]:
    """Every NIfTI file, and every series of every DICOM study (folder or zip), in ``input_dir``."""

    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise SarcoError(f"--input {input_dir}: no such folder")
    entries: list[RawInput] = []
    loose_files = []
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
            entries.append(RawInput(_stem(path), path))
        elif path.is_dir() or (path.is_file() and zipfile.is_zipfile(path)):
            entries.extend(_dicom_entries(path, _stem(path)))
        elif path.is_file() and path.suffix.lower() not in (".json", ".txt", ".csv", ".md", ".xlsx", ".png"):
            loose_files.append(path)
    if loose_files:
        # Loose files directly in the folder: read them as DICOM together, one row per series
        # (sub-folders are studies of their own, so the folder itself is not read recursively).
        entries.extend(_dicom_entries(input_dir, input_dir.name or "dicom", files=loose_files))
    return entries


def _dicom_entries(path: Path, name: str, files: list[Path] | None = None) -> list[RawInput]:
    from sarco_app.inputs import dicom

    try:
        found = dicom.list_series(files if files is not None else path)
    except SarcoError as exc:
        return [RawInput(name, path, error=str(exc))]
    entries = [_series_entry(name if len(found) == 1 else f"{name}#{i}", path, s, i) for i, s in enumerate(found)]
    for entry in entries:
        entry.files = files
    return entries


def _series_entry(name: str, path: Path, series: Any, index: int) -> RawInput:
    if isinstance(series, Exception):
        return RawInput(name, path, error=str(series))
    entry = RawInput(name, path, series=index)
    if series.modality not in ("CT", ""):
        entry.skip = f"not CT (modality {series.modality}, series {series.description!r})"
        return entry
    iop = series.datasets[0].get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
        if abs(normal[2]) < AXIAL_COS:
            entry.skip = "not an axial series (slice normal is not head-feet)"
    return entry


def _not_axial(image: CTImage) -> bool:
    """True when the file's slice axis (its third voxel axis) is not head-feet."""
    affine = image.original_affine if image.original_affine is not None else image.affine
    if image.original_shape is None or len(image.original_shape) < 3:
        return False
    axis = affine[:3, 2]
    return abs(axis[2]) / max(float(np.linalg.norm(axis)), 1e-9) < AXIAL_COS


def process_input(entry: RawInput, method: str = "unet", model: Any = None,
                  reference: Any = None, cutoffs: Any = None,
                  seconds: dict[str, float] | None = None,
                  load_model: Any = None) -> tuple[dict[str, Any], Any]:
    """Row (status, L3 columns, measures) and ``(image, label, result)`` for the overlay.

    ``load_model``, when ``model`` is None, is called for the model only when a scan gets as
    far as segmentation (unreadable or L3-less scans load none); ``seconds``, when given,
    receives the wall time of the steps ``read``, ``l3``, ``segment`` and ``quantify`` in s."""
    from sarco_app.inputs import ingest
    from sarco_app.measurement.cohort_parts import timed
    from sarco_app.measurement.cohort import flatten_result
    from sarco_app.spine.l3 import choose_slice, file_slice_index
    from sarco_app.measurement.quantify import quantify_scan
    from sarco_app.segmentation.segment import segment_image

    row: dict[str, Any] = {"id": entry.name, "status": "ok", "image": str(entry.path)}
    if entry.error:
        row["status"] = f"unreadable: {entry.error}"
        return row, None
    if entry.skip:
        row["status"] = f"skipped: {entry.skip}"
        return row, None
    try:
        with timed(seconds, "read"):
            image = ingest.load_image(entry.files or entry.path, series=entry.series)
    except (ValueError, OSError) as exc:
        row["status"] = f"unreadable: {exc}"
        return row, None
    if str(image.meta.get("modality", "CT") or "CT").upper() != "CT":
        row["status"] = f"skipped: not CT (modality {image.meta.get('modality')})"
        return row, None
    if _not_axial(image):
        row["status"] = "skipped: not an axial series (slice axis is not head-feet)"
        return row, None
    if image.hu.ndim == 3:
        with timed(seconds, "l3"):
            choice = choose_slice(image, middle=False)  # measured at L3 or not at all
        if choice.l3 is not None:
            row.update({"l3_confidence": choice.l3.confidence, "l3_reason": choice.l3.reason})
        if choice.index is None:
            row["status"] = f"no L3: {choice.reason}"
            return row, None
        k = choice.index
        row.update({"l3_slice_index": file_slice_index(image, k), "l3_z_mm": round(choice.l3.z_mm, 2)})
    else:
        k = None
        row["l3_reason"] = "single slice: measured as given"
    try:
        if model is None and load_model is not None and method == "unet":
            model = load_model()
        with timed(seconds, "segment"):
            seg = segment_image(image, [k] if k is not None else None, method=method, model=model)
        with timed(seconds, "quantify"):
            result = quantify_scan(image, seg.label, k, None, reference, cutoffs)
    except (ValueError, OSError, RuntimeError) as exc:
        row["status"] = f"error: {exc}"
        return row, None
    row["segmentation"] = seg.method
    row.update(flatten_result(result))
    return row, (image, seg.label, result)


@functools.lru_cache(maxsize=2)
def worker_model(path: str, mtime_ns: int) -> Any:
    """The U-Net at ``path``, loaded once per process (a Dask worker keeps it for all its scans;
    ``mtime_ns`` in the key loads a rewritten checkpoint again). ``worker_model.cache_info().misses``
    counts the loads."""
    from sarco_app.segmentation.segment import get_model

    return get_model(path)


def measure_raw(entry: RawInput, method: str, model_path: str | None, reference: Any, cutoffs: Any,
                overlay_dir: str | None) -> dict[str, Any]:
    """One scan of ``cohort --input`` as a task: its row, the time per step and the worker's
    memory (see :func:`sarco_app.measurement.cohort_parts.run_scans`). Runs in a worker process."""
    from sarco_app.measurement.cohort import write_overlay
    from sarco_app.measurement.cohort_parts import timed
    from sarco_app.parallel import process_memory

    seconds: dict[str, float] = {}

    def load_model():
        return worker_model(model_path, os.stat(model_path).st_mtime_ns)

    try:
        row, measured = process_input(entry, method, None, reference, cutoffs, seconds=seconds,
                                      load_model=load_model if model_path else None)
        if measured is not None and overlay_dir is not None:
            image, label, result = measured
            safe = entry.name.replace("/", "_").replace("#", "_")
            with timed(seconds, "write"):
                row["overlay"] = str(write_overlay(image, label, result, Path(overlay_dir) / f"{safe}.png",
                                                   entry.name))
    except Exception as exc:  # one bad study must not stop the run
        row = failed_raw_row(entry.name, entry, f"error: {type(exc).__name__}: {exc}")
    worker = {**process_memory(), "model_loads": worker_model.cache_info().misses}
    return {"row": row, "seconds": seconds, "worker": worker}


def failed_raw_row(scan_id: str, entry: RawInput, status: str) -> dict[str, Any]:
    """The row of a series whose task failed as a whole."""
    return {"id": scan_id, "status": status, "image": str(entry.path)}


def quantify_raw_folder(
    input_dir: str | Path,
    out_path: str | Path,
    reference: Any = None,
    cutoffs: Any = None,
    method: str | None = None,
    overlays: bool = True,
    overlay_dir: str | Path | None = None,
    progress: bool = True,
    workers: int | None = 1,
    scheduler: str | None = None,
    force: bool = False,
    announce: Any = None,
) -> dict[str, Any]:
    """Find L3, segment and quantify every series under ``input_dir``; write the workbook.

    Parameters
    ----------
    input_dir : path
        Folder of NIfTI files and DICOM studies (see module docstring).
    out_path : path
        Excel workbook (``.xlsx``); ``<stem>.csv`` and ``<stem>_summary.csv`` beside it, and one
        part file per series in ``<out_path>.parts/`` (see
        :mod:`sarco_app.measurement.cohort_parts`).
    method : {"unet", "threshold"}, optional
        Segmentation; default the U-Net when a checkpoint is available, else the HU rules.
    overlays : bool
        Write one overlay PNG per measured scan into ``overlay_dir``
        (default ``<out stem>_overlays/``).
    workers, scheduler : optional
        One task per series on :class:`sarco_app.parallel.Executor`: 1 worker (the default) runs
        in this process, N a local Dask cluster (``None``: the CPU cores), ``scheduler`` an
        existing Dask cluster.
    force : bool
        Measure every series again instead of reusing the parts of an earlier run.

    Returns
    -------
    dict with ``rows``, ``xlsx``, ``csv``, ``summary_csv``, ``overlay_dir``, ``failed`` (rows
    whose status is not ``ok``), ``method``, and from
    :func:`~sarco_app.measurement.cohort_parts.run_scans` ``records``, ``measured``, ``reused``,
    ``executor``, ``dashboard``, ``wall_s`` and ``parts``.
    """
    from sarco_app.measurement.cohort import resolve_outputs, write_workbook
    from sarco_app.measurement.cohort_parts import file_signature, run_scans

    out_path, reference, cutoffs = resolve_outputs(out_path, reference, cutoffs)
    model_path = None
    if method is None:
        from sarco_app.segmentation.segment import default_model_path

        method = "unet" if Path(default_model_path()).is_file() else "threshold"
    if method == "unet":
        from sarco_app.segmentation.segment import default_model_path

        model_path = str(Path(default_model_path()).resolve())
        if not Path(model_path).is_file():
            raise SarcoError(f"{model_path}: model checkpoint not found (train one, or use --method threshold)")
    entries = find_raw_inputs(input_dir)
    if not entries:
        raise SarcoError(f"--input {input_dir}: no NIfTI file or DICOM study found")
    overlay_dir = Path(overlay_dir) if overlay_dir else out_path.with_name(out_path.stem + "_overlays")
    tables = hashlib.sha1(repr((reference, cutoffs)).encode()).hexdigest()[:12]
    common = {"mode": "input", "method": method, "model": file_signature(model_path), "tables": tables,
              "overlays": str(overlay_dir) if overlays else None}

    def settings(entry: RawInput) -> dict[str, Any]:
        return {**common, "input": file_signature(entry.path), "series": entry.series}

    run = run_scans(
        [(entry.name, entry) for entry in entries], measure_raw, out_path, settings, failed_raw_row,
        source=lambda entry: entry.path, force=force, workers=workers, scheduler=scheduler, progress=progress,
        desc="cohort", unit="series",
        announce=announce, method=method, model_path=model_path, reference=reference, cutoffs=cutoffs,
        overlay_dir=str(overlay_dir) if overlays else None,
    )
    written = write_workbook(
        run["rows"], out_path, reference, cutoffs,
        lead_columns=("id", "status", "l3_slice_index", "l3_z_mm", "l3_confidence", "segmentation"),
    )
    return {**run, **written, "overlay_dir": overlay_dir if overlays else None, "method": method}
