"""The one label schema used everywhere (files, network outputs, server, reports)."""

from __future__ import annotations

import numpy as np

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
