"""The one label schema used everywhere (files, network outputs, server, reports)."""

from __future__ import annotations

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
