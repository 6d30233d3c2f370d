"""Read CT from DICOM (file, folder, zip) or NIfTI into HU arrays with geometry and patient data.

Every image comes back as a :class:`CTImage` in one canonical orientation, so the rest of the
library never has to think about HFS/FFS, flipped z or transposed NIfTI files:

* ``hu`` has shape ``(X, Y)`` (a 2D NIfTI) or ``(X, Y, Z)``; axis 0 runs toward the patient's
  left, axis 1 toward posterior, axis 2 toward superior (nibabel axis codes ``L, P, S``).
  ``hu[:, :, k].T`` is therefore the usual radiological axial view: anterior at the top, the
  patient's right on the left of the picture.
* ``affine`` maps canonical voxel indices to RAS world millimetres (the NIfTI convention).
* ``to_original(array)`` puts a canonical array back in the voxel order of the file it came
  from, so labels are written on the image's own grid with its own affine (:func:`save_label`).

DICOM slices are grouped into series by SeriesInstanceUID (or, when that is empty, by frame of
reference + orientation + pixel geometry) and sorted by ImagePositionPatient projected on the
slice normal, never by file name or InstanceNumber.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from sarco_app.errors import IngestError, SarcoError, reason

#: HU written for padding and anything below air.
AIR_HU = -1024.0
CANONICAL_AXCODES = ("L", "P", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

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


#: Plausible ranges of manual patient data; a value outside is a unit mix-up (m vs cm).
PLAUSIBLE_PATIENT = {"age": (0.0, 130.0), "height_cm": (50.0, 260.0), "weight_kg": (2.0, 400.0)}


def check_plausible(field_name: str, value: float | None) -> float | None:
    """``value`` when it lies in the plausible range of ``field_name``; else a SarcoError that
    names the unit expected (a height of 1.7 is metres, not cm)."""
    if value is None or field_name not in PLAUSIBLE_PATIENT:
        return value
    low, high = PLAUSIBLE_PATIENT[field_name]
    if not low <= float(value) <= high:
        unit = {"age": "years", "height_cm": "cm", "weight_kg": "kg"}[field_name]
        raise SarcoError(f"{field_name} {value:g} is outside {low:g}..{high:g} {unit}: check the unit")
    return float(value)


@dataclass
class PatientInfo:
    """Patient data; every field is ``None`` when unknown."""

    sex: str | None = None  # "M" or "F"
    age: float | None = None  # years
    height_cm: float | None = None
    weight_kg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatientInfo":
        return cls(
            sex=normalise_sex(data.get("sex")),
            **{key: check_plausible(key, _positive_or_none(data.get(key))) for key in PLAUSIBLE_PATIENT},
        )


@dataclass
class CTImage:
    """A CT image in HU, canonical orientation (see module docstring)."""

    hu: np.ndarray
    affine: np.ndarray
    patient: PatientInfo = field(default_factory=PatientInfo)
    meta: dict[str, Any] = field(default_factory=dict)
    # Orientation transform canonical -> original voxel order, and the original grid.
    original_affine: np.ndarray | None = None
    original_shape: tuple[int, ...] | None = None
    _to_original: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm for each axis of ``hu``."""
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) for z in zooms[: self.hu.ndim])

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """In-plane voxel size (mm) along axes 0 and 1."""
        return self.spacing[0], self.spacing[1]

    @property
    def num_slices(self) -> int:
        return 1 if self.hu.ndim == 2 else int(self.hu.shape[2])

    def slice2d(self, index: int | None = None) -> np.ndarray:
        """The axial slice ``index`` as an ``(X, Y)`` array; ``None`` is allowed when there is
        only one slice."""
        return take_slice(self.hu, index)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """A canonical-grid array (same shape as ``hu``) in the source file's voxel order."""
        if array.shape != self.hu.shape:
            raise ValueError(f"array shape {array.shape} differs from image shape {self.hu.shape}")
        if self._to_original is None:
            return array
        return _apply_ornt(array, self._to_original)

    def file_slice(self, canonical_index: int) -> int | None:
        """Index in the source file's own slice order of canonical axial slice
        ``canonical_index``; ``None`` when the file's third axis is not head-feet."""
        if self.hu.ndim == 2:
            return 0 if int(canonical_index) == 0 else None
        if self._to_original is None:
            return int(canonical_index)
        target, flip = self._to_original[2]
        if int(target) != 2:
            return None
        return int(canonical_index) if flip > 0 else self.hu.shape[2] - 1 - int(canonical_index)

    def canonical_slice(self, file_index: int) -> int | None:
        """Canonical axial index of slice ``file_index`` of the source file (inverse of
        :meth:`file_slice`); ``None`` when the file's third axis is not head-feet."""
        return self.file_slice(file_index)  # a flip or identity is its own inverse

    def from_original(self, array: np.ndarray) -> np.ndarray:
        """An array on the source file's grid, put in canonical order (inverse of to_original)."""
        if self._to_original is None:
            return array
        if self.original_shape is not None and tuple(array.shape) != tuple(self.original_shape):
            raise ValueError(
                f"array shape {array.shape} differs from the image's shape {self.original_shape}"
            )
        return _apply_ornt(array, _invert_ornt(self._to_original))


def take_slice(volume: np.ndarray, index: int | None = None) -> np.ndarray:
    """Axial slice ``index`` of an ``(X, Y, Z)`` volume (or the array itself when it is 2D)."""
    if volume.ndim == 2:
        if index not in (None, 0):
            raise IngestError(f"slice index {index} out of range: the image is 2D")
        return volume
    if index is None:
        if volume.shape[2] == 1:
            return volume[:, :, 0]
        raise IngestError(f"the image has {volume.shape[2]} slices: give a slice index")
    if not -volume.shape[2] <= int(index) < volume.shape[2]:
        raise IngestError(f"slice index {index} out of range 0..{volume.shape[2] - 1}")
    return volume[:, :, int(index)]


# --------------------------------------------------------------------------- patient data


def normalise_sex(value: Any) -> str | None:
    """'M'/'F' from DICOM PatientSex or a user's entry ('male', 'f', ...); else None."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in ("M", "MALE", "MAN"):
        return "M"
    if text in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    return None


def _positive_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def parse_dicom_age(value: Any) -> float | None:
    """DICOM AS value ('060Y', '018M', '003W', '010D') in years; None when empty or bad."""
    text = str(value or "").strip().upper()
    if not text:
        return None
    unit = text[-1]
    number = _positive_or_none(text[:-1] if unit.isalpha() else text)
    if number is None:
        return None
    return {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}.get(unit, 1.0) * number


def _dicom_date(value: Any) -> date | None:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        return None


def patient_from_dicom(ds: Any) -> PatientInfo:
    """Sex, age (years), height (cm, from PatientSize in m) and weight (kg) of a dataset."""
    age = parse_dicom_age(ds.get("PatientAge", ""))
    if age is None:
        born = _dicom_date(ds.get("PatientBirthDate", ""))
        seen = _dicom_date(ds.get("StudyDate", "")) or _dicom_date(ds.get("SeriesDate", ""))
        if born and seen and seen > born:
            age = (seen - born).days / 365.25
    size = _positive_or_none(ds.get("PatientSize", None))
    height = None
    if size is not None:
        if 0.3 <= size <= 2.6:
            height = size * 100.0  # the standard says metres
        elif 30 <= size <= 260:
            height = size  # entered in cm by mistake; the meaning is unambiguous
    weight = _positive_or_none(ds.get("PatientWeight", None))
    return PatientInfo(
        sex=normalise_sex(ds.get("PatientSex", None)),
        age=round(age, 2) if age is not None else None,
        height_cm=round(height, 2) if height is not None else None,
        weight_kg=weight if weight is not None and 2.0 <= weight <= 400.0 else None,
    )


# --------------------------------------------------------------------------- orientation


def _invert_ornt(transform: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes ``transform`` (row i: axis i goes to axis
    ``transform[i, 0]``, flipped when ``transform[i, 1]`` is -1)."""
    inverse = np.empty_like(transform)
    for axis, (target, flip) in enumerate(transform):
        inverse[int(target)] = [axis, flip]
    return inverse


def _apply_ornt(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.ascontiguousarray(ornt.apply_orientation(array[:, :, None], transform)[:, :, 0])
    return np.ascontiguousarray(ornt.apply_orientation(array, transform))


def _canonicalise(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder ``array`` to L,P,S axes. Returns the array, its affine and the transform back."""
    source = ornt.io_orientation(affine)
    target = ornt.axcodes2ornt(CANONICAL_AXCODES)
    if array.ndim == 2 and (source[2, 0] != 2):
        raise IngestError("2D image whose in-plane axes are not axial; cannot orient it")
    forward = ornt.ornt_transform(source, target)
    shape3 = array.shape if array.ndim == 3 else array.shape + (1,)
    new_affine = affine @ ornt.inv_ornt_aff(forward, shape3)
    backward = ornt.ornt_transform(target, source)
    return _apply_ornt(array, forward), new_affine, backward


def make_image(
    hu: np.ndarray,
    spacing: Iterable[float],
    patient: PatientInfo | None = None,
    origin: Iterable[float] = (0.0, 0.0, 0.0),
    meta: dict[str, Any] | None = None,
) -> CTImage:
    """A canonical :class:`CTImage` from an array already in L,P,S order (e.g. a phantom).

    ``spacing`` is (sx, sy) or (sx, sy, sz) in mm; the slice thickness of a 2D image is 1 mm.
    """
    spacing = [float(s) for s in spacing]
    if hu.ndim not in (2, 3) or len(spacing) not in (2, 3):
        raise ValueError("hu must be 2D or 3D and spacing must have 2 or 3 values")
    sx, sy = spacing[:2]
    sz = spacing[2] if len(spacing) == 3 else 1.0
    # L,P,S voxel axes in RAS world: x and y point the other way.
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = list(origin)
    return CTImage(
        hu=np.asarray(hu, dtype=np.float32),
        affine=affine,
        patient=patient or PatientInfo(),
        meta=dict(meta or {}),
        original_affine=affine.copy(),
        original_shape=tuple(hu.shape),
    )


# --------------------------------------------------------------------------- NIfTI


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def image_stem(path: str | Path, suffixes: Iterable[str] = NIFTI_SUFFIXES) -> str:
    """File name without its image suffix: ``scan.nii.gz`` -> ``scan`` (the MONAI Label id)."""
    name = Path(path).name
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sidecar_path(path: str | Path) -> Path:
    """``scan.nii.gz`` -> ``scan.json``: where patient data of a NIfTI image are kept."""
    path = Path(path)
    return path.with_name(image_stem(path) + ".json")


def load_nifti(path: str | Path) -> CTImage:
    """A 2D or 3D NIfTI in HU; patient data from a sidecar ``<stem>.json`` when present."""
    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise IngestError(f"{path.name}: not a readable NIfTI file ({reason(exc, path)})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 1 and len(img.shape) == 2:
        data = data[:, :, 0]
    if data.ndim not in (2, 3):
        raise IngestError(f"{path.name}: expected a 2D or 3D image, got shape {data.shape}")
    finite = np.isfinite(data)
    if not finite.all():
        # A NaN patch would come out as silently empty labels and NaN measures.
        raise IngestError(f"{path.name}: {int(finite.size - finite.sum())} voxel(s) are NaN or infinite; "
                          "a CT image holds HU everywhere (fill the gap, e.g. with -1024 HU for air)")
    np.maximum(data, AIR_HU, out=data)  # as for DICOM: nothing is darker than air
    hu, affine, back = _canonicalise(data, img.affine.astype(float))
    patient = PatientInfo()
    side = sidecar_path(path)
    if side.exists():
        try:
            patient = PatientInfo.from_dict(json.loads(side.read_text()).get("patient", {}))
        except (ValueError, AttributeError) as exc:
            raise IngestError(f"{side.name}: unreadable patient sidecar ({exc})") from exc
    return CTImage(
        hu=hu,
        affine=affine,
        patient=patient,
        meta={"source": str(path), "format": "nifti", "modality": "CT"},
        original_affine=img.affine.astype(float),
        original_shape=tuple(data.shape),
        _to_original=back,
    )


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype: Any = None) -> Path:
    """Write ``array`` with ``affine`` (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def save_label(label: np.ndarray, image: CTImage, path: str | Path) -> Path:
    """Write a canonical-grid label map on the image's own grid and affine (uint8 NIfTI)."""
    if label.shape != image.hu.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.hu.shape}")
    affine = image.original_affine if image.original_affine is not None else image.affine
    return save_nifti(image.to_original(label).astype(np.uint8), affine, path)


def save_label_nrrd(label: np.ndarray, image: CTImage, path: str | Path, compress: bool = True) -> Path:
    """Write a canonical-grid label map as a uint8 NRRD on the image's own grid (what OHIF's
    MONAI Label panel reads: voxels of the file's grid, first axis fastest; LPS geometry)."""
    import nrrd

    if label.shape != image.hu.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.hu.shape}")
    data = image.to_original(label).astype(np.uint8)
    affine = image.original_affine if image.original_affine is not None else image.affine
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)  # RAS -> LPS
    n = data.ndim
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :n].T.tolist(),
        "space origin": lps[:3, 3].tolist(),
        "encoding": "gzip" if compress else "raw",
    }
    path = Path(path)
    nrrd.write(str(path), data, header, index_order="F")
    return path


def save_image(image: CTImage, path: str | Path, patient_sidecar: bool = True) -> Path:
    """Write the HU image (int16 NIfTI, original grid) and its patient data as a JSON sidecar."""
    affine = image.original_affine if image.original_affine is not None else image.affine
    hu = np.clip(np.round(image.to_original(image.hu)), -32768, 32767).astype(np.int16)
    out = save_nifti(hu, affine, path)
    if patient_sidecar:
        sidecar_path(out).write_text(json.dumps({"patient": image.patient.to_dict()}, indent=2))
    return out


# --------------------------------------------------------------------------- DICOM


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


def _series_key(ds: Any) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    # No UID (anonymisers do this): the geometry identifies the series.
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
        groups.setdefault(_series_key(ds), []).append(ds)
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


def load_dicom(path: str | Path | Sequence[str | Path], series: str | int | None = None) -> CTImage:
    """A DICOM CT series as a canonical :class:`CTImage` in HU.

    ``series`` picks one of :func:`list_series` by index or key/UID; by default the CT series
    with the most slices.
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
    hu, canon_affine, back = _canonicalise(volume, affine)
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
    return CTImage(
        hu=hu,
        affine=canon_affine,
        patient=patient_from_dicom(first),
        meta=meta,
        original_affine=affine,
        original_shape=tuple(volume.shape),
        _to_original=back,
    )


# --------------------------------------------------------------------------- entry point


def load_image(path: str | Path | Sequence[str | Path], series: str | int | None = None) -> CTImage:
    """Load a NIfTI file, or a DICOM file / folder / zip / list of files, as a canonical
    :class:`CTImage`."""
    if isinstance(path, (list, tuple)):
        return load_dicom(path, series=series)
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: no such file or folder")
    if path.is_file() and is_nifti(path):
        return load_nifti(path)
    return load_dicom(path, series=series)


#: SOP Class UID of a DICOM Segmentation object.
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def read_dicom_seg(path: str | Path) -> Any:
    """A DICOM Segmentation file as a pydicom Dataset; :class:`IngestError` for a file that is
    not DICOM or not a SEG."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises many types for a file that is not DICOM
        raise IngestError(f"{path.name}: not a DICOM file ({exc})") from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_SOP_CLASS:
        raise IngestError(f"{path.name}: not a DICOM Segmentation (SOP class {ds.get('SOPClassUID', '?')})")
    ds.filename_for_messages = path.name
    return ds


def load_dicom_seg(path: Any, image: CTImage, segment: int | None = None) -> np.ndarray:
    """A binary DICOM SEG (e.g. dcmqi's) as a boolean mask on ``image``'s canonical grid.

    ``path`` is a file or a Dataset from :func:`read_dicom_seg`. Every set pixel of every frame
    (of segment number ``segment``, or of any segment) is placed by its frame's position and
    orientation (patient coordinates, mm) in the voxel of ``image`` that holds it; pixels
    outside the image are dropped. Raises :class:`IngestError` for a file that is not a DICOM
    SEG or lacks the geometry.
    """
    ds = path if hasattr(path, "SOPClassUID") else read_dicom_seg(path)
    path = Path(getattr(ds, "filename_for_messages", "SEG"))
    frames = np.asarray(ds.pixel_array)
    frames = frames[None] if frames.ndim == 2 else frames
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames.shape[0]:
        raise IngestError(f"{path.name}: {frames.shape[0]} frames but {len(per_frame)} per-frame geometries")

    def item(group, name):
        for source in (group, shared):
            if source is not None and name in source:
                return source[name][0]
        raise IngestError(f"{path.name}: no {name} for a frame")

    to_voxel = np.linalg.inv(np.asarray(image.affine, dtype=float))
    mask = np.zeros(image.hu.shape, dtype=bool)
    for frame, group in zip(frames, per_frame):
        if segment is not None and int(item(group, "SegmentIdentificationSequence").ReferencedSegmentNumber) != segment:
            continue
        rows, cols = np.nonzero(frame)
        if rows.size == 0:
            continue
        position = np.array(item(group, "PlanePositionSequence").ImagePositionPatient, dtype=float)
        cosines = np.array(item(group, "PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
        row_mm, col_mm = (float(v) for v in item(group, "PixelMeasuresSequence").PixelSpacing)
        # DICOM: column index runs along the first cosine, row index along the second (LPS, mm).
        lps = position + np.outer(cols * col_mm, cosines[:3]) + np.outer(rows * row_mm, cosines[3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        if image.hu.ndim == 2:
            voxel = voxel[:, :2]
        inside = np.all((voxel >= 0) & (voxel < np.array(image.hu.shape)), axis=1)
        mask[tuple(voxel[inside].T)] = True
    return mask
