"""Files of volume phantoms: thick-slice resampling, NIfTI with the truth in its sidecar, and
axial DICOM series (with the CT dataset helpers of :mod:`sarco_app.synthesis.phantom.writing`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import CTImage, save_nifti, sidecar_path
from sarco_app.synthesis.phantom.writing import new_ct_dataset, phantom_uid, save_dataset, set_int16_pixels, set_patient
from sarco_app.synthesis.phantom3d.build import VolumeTruth


def resample_z(image: CTImage, thickness: float) -> CTImage:
    """The image resliced to ``thickness`` mm slices (a thick-slice reconstruction).

    Each new slice covers ``thickness`` mm and is the overlap-weighted mean of the old slices
    (each old slice covering its own spacing); new slices start at the first old slice centre.
    """
    hu = image.hu
    dz = image.spacing[2]
    n_old = hu.shape[2]
    z_old = np.arange(n_old) * dz
    n_new = max(int(math.floor(z_old[-1] / thickness)) + 1, 1)
    z_new = np.arange(n_new) * thickness
    out = np.empty(hu.shape[:2] + (n_new,), dtype=np.float32)
    for k, z in enumerate(z_new):
        lo, hi = z - thickness / 2, z + thickness / 2
        overlap = np.clip(np.minimum(z_old + dz / 2, hi) - np.maximum(z_old - dz / 2, lo), 0.0, None)
        sel = np.nonzero(overlap > 0)[0]
        weights = overlap[sel] / overlap[sel].sum()
        out[:, :, k] = np.tensordot(hu[:, :, sel], weights, axes=([2], [0]))
    affine = image.affine.copy()
    affine[:3, 2] = affine[:3, 2] / dz * thickness
    return CTImage(hu=out, affine=affine, patient=image.patient, meta=dict(image.meta),
                   original_affine=affine.copy(), original_shape=out.shape)


def save_volume(image: CTImage, path: str | Path, flip_z: bool = False, truth: VolumeTruth | None = None) -> Path:
    """Write a canonical phantom as int16 NIfTI (+ patient sidecar, + truth JSON when given).

    ``flip_z`` stores the slices in reverse order (the first voxel plane is the most superior,
    as many scanners write feet-first series); readers that honour the affine see the same
    anatomy.
    """
    hu = np.clip(np.round(image.hu), -32768, 32767).astype(np.int16)
    affine = image.affine.copy()
    if flip_z:
        hu = hu[:, :, ::-1]
        affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (image.hu.shape[2] - 1)
        affine[:3, 2] = -affine[:3, 2]
    path = save_nifti(np.ascontiguousarray(hu), affine, path)
    sidecar = {"patient": image.patient.to_dict()}
    if truth is not None:
        sidecar["phantom_truth"] = truth.to_dict()
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2))
    return path


def write_volume_dicom(image, folder: str | Path, case_id: str, seed: int = 0,
                       description: str = "Synthetic abdomen volume") -> Path:
    """Write a canonical 3D :class:`~sarco_app.inputs.ingest.CTImage` (e.g. from
    :func:`sarco_app.synthesis.phantom3d.build.make_volume_phantom`) as an axial DICOM series: one CT Image
    Storage file per slice in ``folder``, geometry from the image's affine, patient data from
    ``image.patient``, UIDs derived from ``seed`` and ``case_id``. Returns the folder."""
    if image.hu.ndim != 3:
        raise SarcoError(f"a DICOM series needs a 3D image, got shape {image.hu.shape}")
    folder = Path(folder)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=float)  # RAS -> LPS
    spacing = image.spacing
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    for k in range(image.hu.shape[2]):
        ds = new_ct_dataset(folder / f"IM{k + 1:04d}.dcm", phantom_uid(seed, case_id, f"sop-{k}"),
                            implementation_name="SARCO_PHANTOM")
        ds.StudyInstanceUID = phantom_uid(seed, case_id, "study")
        ds.SeriesInstanceUID = phantom_uid(seed, case_id, "series")
        ds.FrameOfReferenceUID = phantom_uid(seed, case_id, "frame")
        ds.Modality, ds.Manufacturer = "CT", "sarco synthetic phantom"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.SeriesDescription = description
        set_patient(ds, case_id, image.patient, height_decimals=3)
        position = lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.SliceThickness = f"{spacing[2]:.2f}"
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        # Stored (rows, columns): the canonical slice transposed.
        hu = image.hu[:, :, k]
        set_int16_pixels(ds, np.clip(np.round(hu.T) + 1024, -32768, 32767).astype(np.int16))
        save_dataset(ds, folder / f"IM{k + 1:04d}.dcm")
    return folder
