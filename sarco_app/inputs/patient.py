"""Patient data of a CT image: sex, age, height and weight, from DICOM tags or a user's entry.

Every field may be unknown (``None``). A value a person typed is checked against a plausible range
(:func:`check_plausible`: a height of 1.7 is metres, not cm); values read from DICOM are
converted (PatientAge ``060Y``, PatientSize in metres) and implausible ones dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from sarco_app.errors import SarcoError


#: Plausible ranges of manual patient data; a value outside is a unit mix-up (m vs cm).
PLAUSIBLE_PATIENT = {"age": (0.0, 130.0), "height_cm": (50.0, 260.0), "weight_kg": (2.0, 400.0)}


def check_plausible(field_name: str, value: float | None) -> float | None:
    """``value`` when it lies in the plausible range of ``field_name``; else a SarcoError that
    names the unit expected (a height of 1.7 is metres, not cm)."""
    if value is None or field_name not in PLAUSIBLE_PATIENT:
        return value
    low, high = PLAUSIBLE_PATIENT[field_name]
    if not low <= float(value) <= high:
        unit = {"age": "years", "height_cm": "cm", "weight_kg": "kg"}[field_name]
        raise SarcoError(f"{field_name} {value:g} is outside {low:g}..{high:g} {unit}: check the unit")
    return float(value)


@dataclass
class PatientInfo:
    """Patient data; every field is ``None`` when unknown."""

    sex: str | None = None  # "M" or "F"
    age: float | None = None  # years
    height_cm: float | None = None
    weight_kg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PatientInfo":
        return cls(
            sex=normalise_sex(data.get("sex")),
            **{key: check_plausible(key, _positive_or_none(data.get(key))) for key in PLAUSIBLE_PATIENT},
        )


def normalise_sex(value: Any) -> str | None:
    """'M'/'F' from DICOM PatientSex or a user's entry ('male', 'f', ...); else None."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in ("M", "MALE", "MAN"):
        return "M"
    if text in ("F", "FEMALE", "W", "WOMAN"):
        return "F"
    return None


def _positive_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def parse_dicom_age(value: Any) -> float | None:
    """DICOM AS value ('060Y', '018M', '003W', '010D') in years; None when empty or bad."""
    text = str(value or "").strip().upper()
    if not text:
        return None
    unit = text[-1]
    number = _positive_or_none(text[:-1] if unit.isalpha() else text)
    if number is None:
        return None
    return {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}.get(unit, 1.0) * number


def _dicom_date(value: Any) -> date | None:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        return None


def patient_from_dicom(ds: Any) -> PatientInfo:
    """Sex, age (years), height (cm, from PatientSize in m) and weight (kg) of a dataset."""
    age = parse_dicom_age(ds.get("PatientAge", ""))
    if age is None:
        born = _dicom_date(ds.get("PatientBirthDate", ""))
        seen = _dicom_date(ds.get("StudyDate", "")) or _dicom_date(ds.get("SeriesDate", ""))
        if born and seen and seen > born:
            age = (seen - born).days / 365.25
    size = _positive_or_none(ds.get("PatientSize", None))
    height = None
    if size is not None:
        if 0.3 <= size <= 2.6:
            height = size * 100.0  # the standard says metres
        elif 30 <= size <= 260:
            height = size  # entered in cm by mistake; the meaning is unambiguous
    weight = _positive_or_none(ds.get("PatientWeight", None))
    return PatientInfo(
        sex=normalise_sex(ds.get("PatientSex", None)),
        age=round(age, 2) if age is not None else None,
        height_cm=round(height, 2) if height is not None else None,
        weight_kg=weight if weight is not None and 2.0 <= weight <= 400.0 else None,
    )
