"""Read DICOM CT series: find the series under a DICOM file, folder (recursive), zip or list of
files, and read one into a HU volume with its geometry and patient data.

Slices are grouped into series by SeriesInstanceUID (or, when that is empty, by frame of
reference + orientation + pixel geometry, :func:`series_key`) and sorted by
ImagePositionPatient projected on the slice normal, never by file name or InstanceNumber.
:func:`read_series` returns the volume in the series' own voxel order;
:func:`sarco_app.inputs.ingest.load_dicom` puts it in the library's canonical orientation.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sarco_app.errors import IngestError
from sarco_app.inputs.patient import PatientInfo, patient_from_dicom

#: HU written for padding and anything below air (the floor of every image, NIfTI too).
AIR_HU = -1024.0

# Transfer syntaxes that need an optional decoder, and the packages that provide one.
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE
}


@dataclass
class SeriesInfo:
    """One series found by :func:`list_series` (headers only; pixels are read on load)."""

    key: str
    series_uid: str
    modality: str
    description: str
    num_slices: int
    rows: int
    columns: int
    datasets: list = field(repr=False, default_factory=list)


def _read_header(source: Any, name: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # Pixel data of files on disk are read lazily; in-memory (zip) members are read whole.
        defer = "1 KB" if isinstance(source, Path) else None
        return pydicom.dcmread(source, defer_size=defer)
    except InvalidDicomError:
        return None
    except Exception as exc:  # truncated or damaged file
        raise IngestError(f"{name}: damaged DICOM file ({type(exc).__name__}: {exc})") from exc


def _iter_dicom_sources(path: Path | list[Path]) -> Iterable[tuple[Any, str]]:
    """(readable source, display name) for every candidate file under ``path`` (or in a list)."""
    if isinstance(path, list):
        for file in path:
            yield file, file.name
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name.startswith(".") or file.suffix.lower() in (".json", ".txt", ".csv", ".md"):
                continue
            yield file, str(file.relative_to(path))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if not member.is_dir():
                    yield io.BytesIO(archive.read(member)), member.filename
    else:
        yield path, path.name


def series_key(ds: Any) -> str:
    """The key that groups slices into a series: SeriesInstanceUID, or when that is empty (anonymisers
    do this) frame of reference + modality + orientation + pixel geometry."""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    iop = tuple(round(float(v), 4) for v in (ds.get("ImageOrientationPatient") or []))
    spacing = tuple(round(float(v), 4) for v in (ds.get("PixelSpacing") or []))
    return "|".join(
        str(x)
        for x in (
            ds.get("FrameOfReferenceUID", ""),
            ds.get("Modality", ""),
            iop,
            ds.get("Rows", ""),
            ds.get("Columns", ""),
            spacing,
        )
    )


def _as_source(path: str | Path | Sequence[str | Path]) -> Path | list[Path]:
    """A path, or a list of file paths (e.g. loose slices picked from a folder), checked to exist."""
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        if not files:
            raise IngestError("no files given")
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise IngestError(f"{missing}: no such file")
        return files
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    return path


def _source_name(source: Path | list[Path], short: bool = False) -> str:
    """A path or list of files (from :func:`_as_source`) for messages; ``short``: names only."""
    if isinstance(source, list):
        folder = source[0].parent
        return f"{folder.name if short else folder} ({len(source)} files)"
    return source.name if short else str(source)


def list_series(path: str | Path | Sequence[str | Path]) -> list[SeriesInfo]:
    """All image series under a DICOM file, folder (recursive) or zip, or in a list of files,
    largest first.

    Files that are not DICOM are skipped in folders, zips and lists; a single file that is not
    DICOM is an error.
    """
    path = _as_source(path)
    groups: dict[str, list] = {}
    seen_dicom = 0
    single = isinstance(path, Path) and path.is_file() and not zipfile.is_zipfile(path)
    for source, name in _iter_dicom_sources(path):
        ds = _read_header(source, name)
        if ds is None:
            if single:
                raise IngestError(f"{path.name}: not a DICOM file")
            continue
        seen_dicom += 1
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            if single:
                raise IngestError(f"{path.name}: DICOM file without pixel data")
            continue
        ds.filename_for_messages = name
        groups.setdefault(series_key(ds), []).append(ds)
    if not groups:
        what = "DICOM files without pixel data" if seen_dicom else "no DICOM files"
        raise IngestError(f"{_source_name(path)}: {what} found")
    series = []
    for key, datasets in groups.items():
        first = datasets[0]
        series.append(
            SeriesInfo(
                key=key,
                series_uid=str(first.get("SeriesInstanceUID", "") or ""),
                modality=str(first.get("Modality", "") or "").upper(),
                description=str(first.get("SeriesDescription", "") or ""),
                num_slices=len(datasets),
                rows=int(first.get("Rows", 0) or 0),
                columns=int(first.get("Columns", 0) or 0),
                datasets=datasets,
            )
        )
    return sorted(series, key=lambda s: (s.modality != "CT", -s.num_slices))


def _pixels(ds: Any) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        hint = _DECODER_HINTS.get(syntax)
        name = getattr(ds, "filename_for_messages", "DICOM file")
        if hint:
            raise IngestError(
                f"{name}: cannot decode compressed pixel data (transfer syntax {syntax}); "
                f"install a decoder: pip install {hint}"
            ) from exc
        raise IngestError(f"{name}: cannot read pixel data ({type(exc).__name__}: {exc})") from exc


def _to_hu(ds: Any, raw: np.ndarray) -> np.ndarray:
    raw = raw.astype(np.float32)
    padding = np.zeros(raw.shape, dtype=bool)
    if "PixelPaddingValue" in ds:
        low = float(ds.PixelPaddingValue)
        high = float(ds.get("PixelPaddingRangeLimit", low))
        padding = (raw >= min(low, high)) & (raw <= max(low, high))
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = raw * slope + intercept
    hu[padding] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)  # scanner padding below air (-2000, -3024) is air
    return hu


def _geometry(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        spacing = np.array([float(v) for v in ds.PixelSpacing], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise IngestError(
            f"{name}: missing ImageOrientationPatient, ImagePositionPatient or PixelSpacing"
        ) from exc
    if iop.size != 6 or ipp.size != 3 or spacing.size != 2 or np.any(spacing <= 0):
        raise IngestError(f"{name}: malformed slice geometry tags")
    return iop, ipp, spacing


@dataclass
class SeriesVolume:
    """A series read by :func:`read_series`: ``volume`` float32 HU of shape (columns, rows,
    slices) in the series' own order (slices sorted along the normal), ``affine`` its voxel ->
    RAS world (mm) matrix, the first slice's patient data and the series' metadata."""

    volume: np.ndarray
    affine: np.ndarray
    patient: PatientInfo
    meta: dict[str, Any]


def read_series(path: str | Path | Sequence[str | Path], series: str | int | None = None) -> SeriesVolume:
    """One DICOM CT series as a HU volume in its own voxel order, with its RAS affine (mm).

    ``series`` picks one of :func:`list_series` by index or key/UID; by default the CT series
    with the most slices. :func:`sarco_app.inputs.ingest.load_dicom` turns the result into a
    canonical :class:`~sarco_app.inputs.ingest.CTImage`.
    """
    source = _as_source(path)
    found = list_series(source)
    if series is None:
        chosen = found[0]
    elif isinstance(series, int) or str(series).isdigit():
        if not 0 <= int(series) < len(found):
            raise IngestError(f"series {series} out of range: {len(found)} series found")
        chosen = found[int(series)]
    else:
        matches = [s for s in found if series in (s.key, s.series_uid)]
        if not matches:
            raise IngestError(f"series {series!r} not found under {_source_name(source)}")
        chosen = matches[0]
    if chosen.modality not in ("CT", ""):
        raise IngestError(
            f"{_source_name(source, short=True)}: modality {chosen.modality} is not CT (series {chosen.description!r})"
        )
    datasets = chosen.datasets
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise IngestError(f"{_source_name(source, short=True)}: multi-frame (enhanced) CT is not supported yet")
    first_name = getattr(datasets[0], "filename_for_messages", "slice")
    iop0, _, spacing0 = _geometry(datasets[0], first_name)
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise IngestError(f"{first_name}: ImageOrientationPatient is not orthonormal")
    placed = []
    for ds in datasets:
        name = getattr(ds, "filename_for_messages", "slice")
        iop, ipp, spacing = _geometry(ds, name)
        if not np.allclose(iop, iop0, atol=1e-3) or not np.allclose(spacing, spacing0, rtol=1e-3):
            raise IngestError(
                f"inconsistent slice geometry in one series: {name} has a different "
                "orientation or pixel spacing"
            )
        size = (ds.get("Rows"), ds.get("Columns"))
        if None in size:
            raise IngestError(f"{name}: missing Rows/Columns")
        if size != (datasets[0].get("Rows"), datasets[0].get("Columns")):
            raise IngestError(f"inconsistent slice geometry in one series: {name} has another size")
        placed.append((float(ipp @ normal), ipp, ds))
    placed.sort(key=lambda item: item[0])
    positions = np.array([p[0] for p in placed])
    if len(placed) > 1:
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            raise IngestError("inconsistent slice geometry in one series: two slices share a position")
        if gaps.max() - gaps.min() > max(0.1 * np.median(gaps), 0.05):
            raise IngestError(
                "inconsistent slice geometry in one series: slice gaps vary from "
                f"{gaps.min():.2f} to {gaps.max():.2f} mm (missing slices?)"
            )
        dz = float(np.median(gaps))
    else:
        dz = float(datasets[0].get("SliceThickness", 1.0) or 1.0)
    # DICOM pixel_array is (row, column); voxel axis 0 = column index, axis 1 = row index.
    volume = np.stack([_to_hu(ds, _pixels(ds)).T for _, _, ds in placed], axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing0[1]
    affine_lps[:3, 1] = col_dir * spacing0[0]
    affine_lps[:3, 2] = normal * dz
    affine_lps[:3, 3] = placed[0][1]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
    first = placed[0][2]
    meta = {
        "source": _source_name(source),
        "format": "dicom",
        "modality": chosen.modality or "CT",
        "series_uid": chosen.series_uid,
        "series_key": chosen.key,
        "description": chosen.description,
        "study_uid": str(first.get("StudyInstanceUID", "") or ""),
        "patient_id": str(first.get("PatientID", "") or ""),
        "patient_position": str(first.get("PatientPosition", "") or ""),
        "slice_thickness_mm": float(first.get("SliceThickness", dz) or dz),
        "num_series_found": len(found),
        # The series' instances in the file's slice order (axis 2 of ``to_original``): what a
        # DICOM SEG references frame by frame.
        "sop_instance_uids": [str(ds.get("SOPInstanceUID", "") or "") for _, _, ds in placed],
    }
    return SeriesVolume(volume=volume, affine=affine, patient=patient_from_dicom(first), meta=meta)
