"""Small synthetic DICOM CT files for ingest tests (no patient data, written into tmp dirs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from sarco_app.synthesis.phantom.writing import new_ct_dataset, save_dataset, set_int16_pixels


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


def compress_jpeg_lossless(path: Path) -> Path:
    """Re-encode a written slice's pixel data as JPEG Lossless, first-order prediction
    (1.2.840.10008.1.2.4.70, common in CT exports), keeping every other tag. The encoder is
    GDCM's, through SimpleITK's DICOM writer (pydicom 2 has no JPEG encoder)."""
    import tempfile

    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import JPEGLosslessSV1

    ds = pydicom.dcmread(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")  # GDCM's JPEG is lossless process 14, selection value 1
        writer.SetFileName(str(Path(tmp) / "encoded.dcm"))
        writer.Execute(sitk.GetImageFromArray(np.asarray(ds.pixel_array, dtype=np.int16)))
        encoded = pydicom.dcmread(str(Path(tmp) / "encoded.dcm"))
    if encoded.file_meta.TransferSyntaxUID != JPEGLosslessSV1:
        raise RuntimeError(f"GDCM wrote {encoded.file_meta.TransferSyntaxUID}, not JPEG Lossless SV1")
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(str(path), write_like_original=False)
    return path


def compress_jpeg_ls(path: Path) -> Path:
    """Re-encode a written slice's pixel data as lossless JPEG-LS (1.2.840.10008.1.2.4.80),
    keeping every other tag; the encoder is CharLS through pillow-jpls. JPEG-LS codes unsigned
    samples, so the stored values must be >= 0 (they are then stored unsigned)."""
    import io

    import pillow_jpls  # noqa: F401  (registers the JPEG-LS format with Pillow)
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(str(path))
    values = np.asarray(ds.pixel_array)
    if values.min() < 0:
        raise ValueError("JPEG-LS needs stored values >= 0")
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="JPEG-LS")
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(str(path), write_like_original=False)
    return path
