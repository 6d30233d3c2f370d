"""Size limits on input images, checked from file headers before any pixel data is read.

A 2 MB gzip NIfTI can unpack to gigabytes and a 10,000 x 10,000 slice takes minutes and
gigabytes through the network, so the server looks at what a file *says* it holds first:

* a NIfTI-1/2 header (plain or gzip; only the first 540 bytes are decompressed) gives the
  dimensions and data type, hence the decompressed size and the in-plane matrix;
* a DICOM file's header gives Rows x Columns (pixel data is not read);
* a zip's directory gives the unpacked size of its members.

:func:`check_image_file` raises :class:`InputTooLarge` (HTTP 413) when a limit is exceeded and
:class:`~sarco_app.errors.SarcoError` (HTTP 400) when a gzip stream is not a NIfTI image (its
unpacked size cannot be bounded from a header).
"""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from sarco_app.errors import SarcoError

MIB = 1024 * 1024
NIFTI2_HEADER_BYTES = 540  # the larger of the two NIfTI header sizes (NIfTI-1: 348)


class InputTooLarge(SarcoError):
    """An input over a configured size limit (the server answers 413)."""


@dataclass(frozen=True)
class InputLimits:
    """Upper bounds for one request's image data.

    max_upload_bytes : bytes of one request body (compressed, as sent).
    max_decompressed_bytes : bytes of an image's voxel data once unpacked (dims x data type).
    max_matrix : pixels along each in-plane axis of a slice (default 2048, i.e. 2048 x 2048).
    """

    max_upload_bytes: int = 512 * MIB
    max_decompressed_bytes: int = 1024 * MIB
    max_matrix: int = 2048

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_decompressed_bytes", "max_matrix"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SarcoError(f"{name} must be a positive integer (got {value!r})")


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says about its pixel data."""

    kind: str  # "nifti", "dicom", "zip" or "other"
    shape: tuple[int, ...] = ()
    in_plane: tuple[int, ...] = ()  # the two axes of an axial slice ((rows, columns) for DICOM)
    data_bytes: int = 0  # unpacked voxel data (zip: all members)


def _nifti_header(raw: bytes):
    """A nibabel NIfTI-1/2 header parsed from the first bytes of a file, or None."""
    import nibabel as nib

    for header_class, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if len(raw) < size:
            continue
        for order in ("<", ">"):
            if int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) == size:
                try:
                    return header_class.from_fileobj(io.BytesIO(raw[:size]))
                except Exception:  # nibabel raises several types for a damaged header
                    return None
    return None


def _in_plane_axes(header) -> tuple[int, int]:
    """The two voxel axes of an axial slice: those not along the patient's S-I axis."""
    import nibabel as nib

    shape = header.get_data_shape()
    if len(shape) < 3 or shape[2] == 1:
        return 0, 1
    try:
        codes = nib.aff2axcodes(header.get_best_affine())
    except Exception:  # a degenerate affine: fall back to the file's first two axes
        return 0, 1
    axial = [i for i in range(3) if codes[i] not in ("S", "I")]
    return (axial[0], axial[1]) if len(axial) == 2 else (0, 1)


def read_image_header(stream: BinaryIO) -> ImageHeader:
    """Inspect an image file's header; ``stream`` is left at its start.

    Decompresses at most :data:`NIFTI2_HEADER_BYTES` of a gzip stream. Raises
    :class:`SarcoError` for a gzip stream that is not a NIfTI image or a NIfTI header that
    cannot be read.
    """
    stream.seek(0)
    head = stream.read(NIFTI2_HEADER_BYTES)
    stream.seek(0)
    try:
        if head[:2] == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=stream, mode="rb") as unpacked:
                    raw = unpacked.read(NIFTI2_HEADER_BYTES)
            except (OSError, EOFError) as exc:
                raise SarcoError(f"damaged gzip data ({exc})") from None
            header = _nifti_header(raw)
            if header is None:
                raise SarcoError("a gzip upload must be a NIfTI image (.nii.gz); its size cannot be checked otherwise")
        else:
            header = _nifti_header(head)
        if header is not None:
            shape = tuple(int(n) for n in header.get_data_shape())
            voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
            axes = _in_plane_axes(header)
            in_plane = tuple(shape[a] for a in axes if a < len(shape))
            return ImageHeader("nifti", shape, in_plane, voxels * header.get_data_dtype().itemsize)
        if head[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(stream) as archive:
                    total = sum(member.file_size for member in archive.infolist())
            except zipfile.BadZipFile as exc:
                raise SarcoError(f"damaged zip file ({exc})") from None
            return ImageHeader("zip", data_bytes=total)
        if head[128:132] == b"DICM":
            import pydicom

            try:
                ds = pydicom.dcmread(stream, stop_before_pixels=True)
            except Exception as exc:  # pydicom raises many types for a damaged file
                raise SarcoError(f"unreadable DICOM header ({exc})") from None
            rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            bits = int(ds.get("BitsAllocated", 16) or 16)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            return ImageHeader("dicom", (rows, columns, frames), (rows, columns),
                               rows * columns * frames * samples * max(1, bits // 8))
        return ImageHeader("other")
    finally:
        stream.seek(0)


def check_image_header(header: ImageHeader, limits: InputLimits, name: str = "image") -> None:
    """Raise :class:`InputTooLarge` when ``header`` exceeds ``limits``."""
    if header.data_bytes > limits.max_decompressed_bytes:
        raise InputTooLarge(
            f"{name}: {header.data_bytes / MIB:.0f} MiB of pixel data once unpacked (shape {list(header.shape)}) "
            f"exceeds the limit of {limits.max_decompressed_bytes / MIB:.0f} MiB")
    if any(n > limits.max_matrix for n in header.in_plane):
        raise InputTooLarge(
            f"{name}: a {' x '.join(str(n) for n in header.in_plane)} slice exceeds the matrix limit of "
            f"{limits.max_matrix} x {limits.max_matrix}")


def check_image_file(stream: BinaryIO, limits: InputLimits, name: str = "image") -> ImageHeader:
    """Read ``stream``'s header (:func:`read_image_header`) and check it against ``limits``."""
    header = read_image_header(stream)
    check_image_header(header, limits, name)
    return header


def check_image_path(path, limits: InputLimits, name: str = "image") -> ImageHeader | None:
    """:func:`check_image_file` on a file path; None for a folder (a DICOM series: each file
    is checked) or a path that does not exist."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        total = 0
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            with open(child, "rb") as fh:
                header = check_image_file(fh, limits, name)
            total += header.data_bytes
            if total > limits.max_decompressed_bytes:
                check_image_header(ImageHeader("dicom", data_bytes=total), limits, name)
        return None
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return check_image_file(fh, limits, name)
