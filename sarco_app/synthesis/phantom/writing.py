"""Writing phantoms to disk: NIfTI or DICOM images with their label maps, and cohorts with a
manifest. The CT Image Storage helpers (:func:`new_ct_dataset`, :func:`set_int16_pixels`,
:func:`save_dataset`) are shared with the DICOM files the tests write (``tests/dicom_factory.py``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import save_image, save_label
from sarco_app.synthesis.phantom.build import Phantom, generate
from sarco_app.synthesis.phantom.plan import LUMBAR_LEVELS, TISSUES, check_inputs

FORMATS = ("nifti", "dicom")
MANIFEST_COLUMNS = (
    "id", "sex", "age", "height_cm", "weight_kg", "level", "spacing_mm", "muscle_hu",
    "sarcopenic", "muscle_cm2", "sat_cm2", "vat_cm2", "imat_cm2", "seed",
)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- DICOM datasets


def new_ct_dataset(path: str | Path, sop_uid: str, implementation_name: str | None = None):
    """An empty CT Image Storage dataset (explicit VR little endian, 128-byte preamble) with
    its SOP class and instance UID set; the caller adds the other attributes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if implementation_name:
        meta.ImplementationVersionName = implementation_name
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    return ds


def set_int16_pixels(ds, raw: np.ndarray) -> None:
    """Store ``raw`` (rows, columns) as signed 16-bit MONOCHROME2 pixel data."""
    raw = np.asarray(raw, dtype=np.int16)
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = raw.tobytes()


def save_dataset(ds, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM file (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), write_like_original=False)
    return path


# --------------------------------------------------------------------------- phantoms


def set_patient(ds, case_id: str, patient, height_decimals: int = 2) -> None:
    """The patient tags of a phantom's DICOM: name and ID from ``case_id``; sex, age, height
    (m, ``height_decimals``) and weight (kg) from ``patient`` where known; supine head first,
    abdomen."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"Phantom^{case_id}", case_id, ""
    ds.PatientSex = patient.sex or ""
    ds.PatientAge = f"{int(round(patient.age)):03d}Y" if patient.age is not None else ""
    if patient.height_cm is not None:
        ds.PatientSize = f"{patient.height_cm / 100.0:.{height_decimals}f}"
    if patient.weight_kg is not None:
        ds.PatientWeight = f"{patient.weight_kg:.1f}"
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "ABDOMEN"


def phantom_uid(seed: int, case_id: str, what: str) -> str:
    """A DICOM UID that depends only on the phantom's seed, case id and ``what`` (study, series, ...)."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["sarco-phantom", str(seed), case_id, what])


def write_phantom(phantom: Phantom, out_dir: str | Path, case_id: str, format: str = "nifti",
                  organs: bool = False) -> Path:
    """Write a phantom into a studies folder; returns the image path.

    ``nifti``: ``<out>/<id>.nii.gz`` (int16 HU) with the patient sidecar ``<out>/<id>.json``.
    ``dicom``: a folder ``<out>/<id>/`` holding one CT Image Storage file (int16 with rescale
    slope/intercept, patient sex/age/size/weight, axial geometry, UIDs derived from the seed).
    Either way the label goes to ``<out>/labels/final/<id>.nii.gz`` on the grid that
    :func:`sarco_app.inputs.ingest.load_image` gives for the image. With ``organs`` the organ map
    (``phantom.organ_label``) goes to ``<out>/labels/organs/<id>.nii.gz`` the same way: the extra
    training classes of ``python -m sarco_app train --organ-classes``.
    """
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SarcoError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    case_id = str(case_id)
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise SarcoError(f"bad case id {case_id!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SarcoError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    label_path = out / "labels" / "final" / f"{case_id}.nii.gz"
    organ_path = out / "labels" / "organs" / f"{case_id}.nii.gz"
    if fmt == "nifti":
        image = phantom.to_image()
        path = save_image(image, out / f"{case_id}.nii.gz")
        save_label(phantom.label, image, label_path)
        if organs:
            save_label(phantom.organ_label, image, organ_path)
        return path
    from sarco_app.inputs.ingest import load_image

    folder = out / case_id
    folder.mkdir(parents=True, exist_ok=True)
    _write_dicom(phantom, folder / "IM000001.dcm", case_id)
    image = load_image(folder)
    if image.hu.shape[:2] != phantom.hu.shape:
        raise SarcoError(f"{folder}: DICOM read back with shape {image.hu.shape}")
    save_label(phantom.label.reshape(image.hu.shape), image, label_path)
    if organs:
        save_label(phantom.organ_label.reshape(image.hu.shape), image, organ_path)
    return folder


def _write_dicom(phantom: Phantom, path: Path, case_id: str) -> None:
    """One CT Image Storage file of the phantom (int16 with rescale slope/intercept, patient
    data, axial geometry, UIDs derived from the seed and case id)."""
    seed = int(phantom.params.get("seed", 0))
    ds = new_ct_dataset(path, phantom_uid(seed, case_id, "sop"), implementation_name="SARCO_PHANTOM")
    ds.StudyInstanceUID = phantom_uid(seed, case_id, "study")
    ds.SeriesInstanceUID = phantom_uid(seed, case_id, "series")
    ds.FrameOfReferenceUID = phantom_uid(seed, case_id, "frame")
    ds.Modality = "CT"
    ds.Manufacturer = "sarco synthetic phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"Synthetic abdomen {phantom.params.get('level', 'L3')}"
    set_patient(ds, case_id, phantom.patient)
    ds.KVP = "120"
    ds.SliceThickness = f"{float(phantom.params.get('slice_thickness_mm', 2.5)):.2f}"
    ds.ConvolutionKernel = "B30f"
    sx, sy = phantom.spacing
    nx, ny = phantom.hu.shape
    z = float(phantom.params.get("z_mm", 0.0))
    # Canonical (X=left, Y=posterior) = DICOM LPS with axial orientation: rows run along +x.
    ds.ImagePositionPatient = [f"{-(nx - 1) / 2 * sx:.4f}", f"{-(ny - 1) / 2 * sy:.4f}", f"{z:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.4f}"
    ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, column spacing
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    # Stored (rows, columns) = (ny, nx): the canonical image transposed.
    set_int16_pixels(ds, np.clip(np.round(phantom.hu.T) + 1024, -32768, 32767).astype(np.int16))
    save_dataset(ds, path)


def write_cohort(out_dir: str | Path, count: int, seed: int, format: str = "nifti", *,
                 size: int = 512, level: str = "L3", organs: bool = False, force: bool = False) -> Path:
    """Write ``count`` phantoms (alternating sex, a third sarcopenic, random BMI) and
    ``manifest.csv`` into ``out_dir``; returns the manifest path.

    ``level`` is one of :data:`LEVELS` or ``"mixed"`` (random level per phantom, mostly L3).
    The manifest has one row per phantom with the columns :data:`MANIFEST_COLUMNS`; the areas
    are those of the written label maps. ``organs`` also writes the organ maps
    (:func:`write_phantom`). A folder that already holds a manifest or any of the files to be
    written (images, final labels: perhaps corrected by an annotator) is refused unless ``force``.
    """
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise SarcoError(f"count must be an integer, got {count!r}") from None
    if count < 1:
        raise SarcoError(f"count must be at least 1, got {count}")
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SarcoError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    seed, size, _, _ = check_inputs(seed, size, "L3", None)
    mixed = str(level).strip().lower() == "mixed"
    if not mixed:
        level = check_inputs(seed, size, level, None)[2]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SarcoError(f"{out}: exists and is not a folder")
    if not force and out.is_dir():
        ids = [f"phantom_{i:04d}" for i in range(count)]
        taken = [p for p in (out / "manifest.csv", *(out / f"{i}.nii.gz" for i in ids), *(out / i for i in ids),
                             *(out / "labels" / "final" / f"{i}.nii.gz" for i in ids)) if p.exists()]
        if taken:
            raise SarcoError(f"{out} already holds {len(taken)} of the files this would write "
                             f"({', '.join(str(p.relative_to(out)) for p in taken[:3])}{', ...' if len(taken) > 3 else ''}); "
                             "choose an empty folder, or --force to replace them and their final labels")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    # Progress on stderr when it is a terminal (disable=None), silent in logs and tests.
    for i in tqdm(range(count), desc="phantoms", unit="phantom", disable=None):
        child = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        lev = level
        if mixed:
            lev = LUMBAR_LEVELS[int(np.random.default_rng(child).choice(4, p=[0.15, 0.2, 0.45, 0.2]))]
        ph = generate(child, sex="M" if i % 2 == 0 else "F", sarcopenic=(i % 3 == 2), size=size, level=lev)
        case_id = f"phantom_{i:04d}"
        write_phantom(ph, out, case_id, fmt, organs=organs)
        areas = ph.areas_cm2()
        p = ph.patient
        rows.append({
            "id": case_id, "sex": p.sex, "age": p.age, "height_cm": p.height_cm,
            "weight_kg": p.weight_kg, "level": ph.params["level"],
            "spacing_mm": round(ph.spacing[0], 6), "muscle_hu": ph.params["muscle_hu"],
            "sarcopenic": bool(ph.params["sarcopenic"]),
            **{f"{name}_cm2": round(areas[name], 4) for name in TISSUES}, "seed": child,
        })
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
