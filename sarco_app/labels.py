"""The one label schema used everywhere (files, network outputs, server, reports)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sarco_app.errors import SarcoError

BACKGROUND = 0
MUSCLE = 1
SAT = 2  # subcutaneous adipose tissue
VAT = 3  # visceral adipose tissue
IMAT = 4  # intermuscular adipose tissue

#: Tissue name -> label value, as MONAI Label's ``/info/`` reports it.
LABELS: dict[str, int] = {"muscle": MUSCLE, "sat": SAT, "vat": VAT, "imat": IMAT}
#: Label value -> tissue name.
NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}
#: Number of output classes of a segmentation network (background included).
NUM_CLASSES = len(LABELS) + 1

#: Structures the phantoms know beside the tissues, used as extra training classes (value =
#: position + 1; 0 is none). Teaching the network what an organ is keeps organs pressed against
#: the muscle wall out of the muscle label; served labels never hold these values: an organ is
#: background in the 5-value schema.
ORGAN_NAMES: tuple[str, ...] = ("liver", "spleen", "kidney", "bowel", "bone", "diaphragm", "other_organ")

#: Display colours (RGB, 0-255) for overlays; muscle red, SAT yellow, VAT cyan, IMAT green.
COLORS: dict[int, tuple[int, int, int]] = {
    MUSCLE: (220, 50, 47),
    SAT: (238, 210, 2),
    VAT: (42, 161, 152),
    IMAT: (133, 200, 0),
}

#: Published HU ranges used for thresholding and sanity checks (Mitsiopoulos 1998 et al.).
MUSCLE_HU = (-29.0, 150.0)
FAT_HU = (-190.0, -30.0)


def apply_hu_ranges(label: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The clinical L3 protocol: compartments from ``label``, tissue from HU (Alberta protocol).

    Inside the muscle compartment (muscle or IMAT pixels) a pixel is muscle at -29..150 HU, IMAT
    at -190..-30 HU and background otherwise; SAT and VAT pixels outside -190..-30 HU become
    background. This is how expert L3 labels are made (outline, then threshold) and so how
    published muscle and fat areas are defined. ``label`` and ``hu`` share one shape; returns a
    new uint8 label map.
    """
    label = np.asarray(label)
    hu = np.asarray(hu)
    if label.shape != hu.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {hu.shape}")
    is_fat = (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    is_muscle = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])
    out = label.astype(np.uint8, copy=True)
    compartment = (label == MUSCLE) | (label == IMAT)
    out[compartment] = BACKGROUND
    out[compartment & is_muscle] = MUSCLE
    out[compartment & is_fat] = IMAT
    out[((label == SAT) | (label == VAT)) & ~is_fat] = BACKGROUND
    return out


def tissue_value(name_or_value: str | int) -> int:
    """Label value of a tissue given by name ('muscle', 'sat', 'vat', 'imat') or value (1-4).

    Raises ``ValueError`` with the accepted names for anything else.
    """
    if isinstance(name_or_value, str):
        key = name_or_value.strip().lower()
        if key in LABELS:
            return LABELS[key]
        if key.isdigit():
            name_or_value = int(key)
        else:
            raise ValueError(f"unknown tissue {name_or_value!r}; use one of {sorted(LABELS)}")
    if int(name_or_value) in NAMES:
        return int(name_or_value)
    raise ValueError(f"unknown tissue label {name_or_value!r}; use one of {sorted(LABELS)} or 1-4")


#: Image ids and label tags: letters, digits, '.', '_', '-', at most 128 characters, no leading
#: dot. Such a name is one plain file-name component: it cannot climb out of a folder ('..', '/'),
#: hide a file ('.x'), or carry a NUL, newline or shell metacharacter.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

#: Label value ranges by label tag: organ maps (``labels/organs/``) use ``ORGAN_NAMES``' values,
#: every other tag the tissue schema 0-4.
ORGAN_TAG = "organs"


def check_name(value: object, what: str = "image id") -> str:
    """``value`` if it is a valid image id or label tag (:data:`ID_PATTERN`), else ``SarcoError``."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80] + "...")
        raise SarcoError(f"invalid {what} {shown}: use 1-128 letters, digits, '.', '_' or '-', "
                         "not starting with '.'")
    return value


def max_label_value(tag: str) -> int:
    """The largest value a label stored under ``tag`` may hold."""
    return len(ORGAN_NAMES) if tag == ORGAN_TAG else IMAT


def check_whole_numbers(label: np.ndarray) -> None:
    """``SarcoError`` unless every value of ``label`` is a whole number: a float label holding
    NaN, infinities or fractions (resampled with interpolation) would be cast to some class."""
    label = np.asarray(label)
    if label.dtype.kind in "biu":
        return
    if label.dtype.kind != "f":
        raise SarcoError(f"label values must be numbers, not {label.dtype}")
    finite = np.isfinite(label)
    if not finite.all():
        raise SarcoError(f"label has {int((~finite).sum())} NaN or infinite value(s)")
    if not np.array_equal(label, np.round(label)):
        raise SarcoError("label values must be whole numbers (0-4), not fractions")


def check_label_values(label: np.ndarray, max_value: int = IMAT) -> None:
    """``SarcoError`` unless every value of ``label`` is a whole number in ``0..max_value``
    (NaN and infinities included in the refusal)."""
    label = np.asarray(label)
    if label.dtype.kind == "b":
        return
    check_whole_numbers(label)
    if label.size and (label.min() < 0 or label.max() > max_value):
        bad = np.unique(label[(label < 0) | (label > max_value)])[:5]
        raise SarcoError(f"label values must lie in 0..{max_value}; found {', '.join(f'{v:g}' for v in bad)}")


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing axes of length 1 (a 2D slice saved as (X, Y, 1) is (X, Y))."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_label_file(label_path: str | Path, image_path: str | Path, max_value: int = IMAT,
                     affine_tol_mm: float = 0.01) -> None:
    """``SarcoError`` unless the NIfTI label at ``label_path`` fits the NIfTI image at
    ``image_path``: the same shape (trailing axes of length 1 aside), the same affine within
    ``affine_tol_mm`` (mm, every entry of the 4x4 matrix) and values per :func:`check_label_values`."""
    import nibabel as nib

    try:
        label_img = nib.load(str(label_path))
        label = np.asanyarray(label_img.dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file
        # The reason, not nibabel's message: it names the server's temporary file.
        raise SarcoError(f"label is not a readable NIfTI file ({type(exc).__name__})") from None
    try:
        image_img = nib.load(str(image_path))
    except Exception as exc:
        raise SarcoError(f"the stored image cannot be read ({type(exc).__name__})") from None
    if _squeeze_trailing(label.shape) != _squeeze_trailing(image_img.shape):
        raise SarcoError(f"label shape {tuple(label.shape)} differs from image shape {tuple(image_img.shape)}")
    difference = float(np.abs(np.asarray(label_img.affine, float) - np.asarray(image_img.affine, float)).max())
    if not difference <= affine_tol_mm:  # also refuses a NaN affine
        raise SarcoError(f"label affine differs from the image's by up to {difference:.4g} mm "
                         f"(tolerance {affine_tol_mm:g} mm): the label is on another grid")
    check_label_values(label, max_value)
