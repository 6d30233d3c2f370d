"""Small synthetic DICOM CT files for ingest tests (no patient data, written into tmp dirs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_slice(path: Path, raw: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0),
                   spacing=(0.8, 0.8), series_uid: str | None = "1.2.3.4", modality: str = "CT",
                   slope: float = 1.0, intercept: float = -1024.0, pixel_data: bool = True,
                   **tags) -> Path:
    """Write one slice. ``raw`` is (rows, columns) stored values (int16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or ""
    ds.StudyInstanceUID = "1.2.3"
    ds.FrameOfReferenceUID = "1.2.3.9"
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 2.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        raw = np.asarray(raw, dtype=np.int16)
        ds.Rows, ds.Columns = raw.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = raw.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), write_like_original=False)
    return path


def write_series(folder: Path, volume_raw: np.ndarray, z_positions, names=None, **kwargs) -> list[Path]:
    """Write ``volume_raw`` (slices, rows, columns) as one slice per file at ``z_positions``."""
    paths = []
    for i, (raw, z) in enumerate(zip(volume_raw, z_positions)):
        name = names[i] if names else f"slice{i:03d}.dcm"
        paths.append(write_ct_slice(folder / name, raw, position=(-100.0, -120.0, float(z)), **kwargs))
    return paths
