"""Small synthetic DICOM CT files for ingest tests (no patient data, written into tmp dirs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from sarco_app.phantom.writing import new_ct_dataset, save_dataset, set_int16_pixels


def write_ct_slice(path: Path, raw: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0),
                   spacing=(0.8, 0.8), series_uid: str | None = "1.2.3.4", modality: str = "CT",
                   slope: float = 1.0, intercept: float = -1024.0, pixel_data: bool = True,
                   **tags) -> Path:
    """Write one slice. ``raw`` is (rows, columns) stored values (int16)."""
    ds = new_ct_dataset(path, generate_uid())
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
        set_int16_pixels(ds, raw)
    save_dataset(ds, path)
    return path


def write_series(folder: Path, volume_raw: np.ndarray, z_positions, names=None, **kwargs) -> list[Path]:
    """Write ``volume_raw`` (slices, rows, columns) as one slice per file at ``z_positions``."""
    paths = []
    for i, (raw, z) in enumerate(zip(volume_raw, z_positions)):
        name = names[i] if names else f"slice{i:03d}.dcm"
        paths.append(write_ct_slice(folder / name, raw, position=(-100.0, -120.0, float(z)), **kwargs))
    return paths
