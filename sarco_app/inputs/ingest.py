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

DICOM series are found and read by :mod:`sarco_app.inputs.dicom`, patient data by
:mod:`sarco_app.inputs.patient`; this module holds the image itself, NIfTI files and
:func:`load_image`, which takes either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from sarco_app.errors import IngestError, reason
from sarco_app.inputs import dicom
from sarco_app.inputs.dicom import AIR_HU
from sarco_app.inputs.patient import PatientInfo

CANONICAL_AXCODES = ("L", "P", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


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


def load_dicom(path: str | Path | Sequence[str | Path], series: str | int | None = None) -> CTImage:
    """A DICOM CT series (read by :func:`sarco_app.inputs.dicom.read_series`) as a canonical
    :class:`CTImage` in HU.

    ``series`` picks one of :func:`sarco_app.inputs.dicom.list_series` by index or key/UID; by
    default the CT series with the most slices.
    """
    found = dicom.read_series(path, series=series)
    hu, affine, back = _canonicalise(found.volume, found.affine)
    return CTImage(
        hu=hu,
        affine=affine,
        patient=found.patient,
        meta=found.meta,
        original_affine=found.affine,
        original_shape=tuple(found.volume.shape),
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
