"""Body-composition measures of one labelled axial slice (areas, HU, indices, T-scores, flags).

The result of :func:`quantify_scan` is a JSON-ready dict with stable keys (documented in
``docs/quantification.md``)::

    {"slice_index", "pixel_spacing_mm",
     "tissues": {"muscle"|"sat"|"vat"|"imat": {"pixels", "area_cm2", "hu_min", "hu_max",
                                               "hu_mean", "hu_sd", "hu_median"}},
     "patient": {"sex", "age", "height_cm", "weight_kg", "bmi", "source"},
     "indices": {"sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi", "muscle_hu_mean",
                 "vat_sat_ratio", "total_adipose_cm2"},
     "t_scores": {...}, "categories": {...}, "flags": {...}, "flag_criteria": {...},
     "reference": "...", "cutoff_references": {...}, "reasons": {...}}

Anything that cannot be computed (no height, empty tissue, unknown sex) is ``None`` with an
entry in ``reasons`` saying why; only unusable input (slice out of range, label and image of
different shapes, label values outside 0-4) raises :class:`SarcoError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sarco_app import labels as L
from sarco_app.errors import SarcoError, reason
from sarco_app.inputs.ingest import CTImage, take_slice
from sarco_app.inputs.patient import PatientInfo
from sarco_app.measurement.reference import (
    Cutoffs,
    ReferenceTable,
    category,
    evaluate_flags,
    load_cutoffs,
    load_reference,
)

TISSUES = ("muscle", "sat", "vat", "imat")
TISSUE_KEYS = ("pixels", "area_cm2", "hu_min", "hu_max", "hu_mean", "hu_sd", "hu_median")
PATIENT_FIELDS = ("sex", "age", "height_cm", "weight_kg")
INDEX_KEYS = (
    "sma_cm2",
    "smi_cm2_m2",
    "sma_per_weight",
    "sma_per_bmi",
    "muscle_hu_mean",
    "vat_sat_ratio",
    "total_adipose_cm2",
)


# --------------------------------------------------------------------------- label loading


def load_label(path: str | Path, image: CTImage, max_value: int | None = None) -> np.ndarray:
    """A label NIfTI stored on ``image``'s own grid, as a canonical ``uint8`` array.

    Parameters
    ----------
    path : str or Path
        Label file (``.nii``/``.nii.gz``) with the same voxel grid as the image file
        (what :func:`sarco_app.inputs.ingest.save_label` and MONAI Label write).
    image : CTImage
        The image the label belongs to.

    Returns
    -------
    ndarray of uint8, shape ``image.hu.shape``, values 0-4 (see :mod:`sarco_app.labels`).

    Raises :class:`SarcoError` when the file cannot be read, its shape differs from the image,
    or it holds values other than 0-4 (0..``max_value`` when given: organ maps).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise SarcoError(f"label {path}: no such file")
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise SarcoError(f"label {path.name}: not a readable NIfTI file ({reason(exc, path)})") from exc
    expected = tuple(image.original_shape or image.hu.shape)
    while data.ndim > len(expected) and data.shape[-1] == 1:  # (X, Y, 1) label of a 2D image
        data = data[..., 0]
    if tuple(data.shape) != expected:
        raise SarcoError(
            f"label {path.name} has shape {tuple(data.shape)} but the image has shape {expected}"
        )
    try:
        L.check_whole_numbers(data)
    except SarcoError as exc:
        raise SarcoError(f"label {path.name}: {exc}") from None
    data = image.from_original(np.rint(data).astype(np.int16))
    if max_value is not None:
        if data.size and (data.min() < 0 or data.max() > max_value):
            raise SarcoError(f"label {path.name} holds values outside 0-{max_value}")
        return data.astype(np.uint8)
    return check_label(data, where=f"label {path.name}")


def check_label(label: np.ndarray, where: str = "label") -> np.ndarray:
    """``label`` as uint8 after checking that it only holds background and tissue values."""
    values = np.unique(label)
    bad = [int(v) for v in values if int(v) not in (0, *L.NAMES)]
    if bad:
        raise SarcoError(
            f"{where} holds values {bad[:5]} outside 0-4 (0 background, "
            + ", ".join(f"{v} {n}" for v, n in L.NAMES.items())
            + ")"
        )
    return label.astype(np.uint8)


# --------------------------------------------------------------------------- measurements


def tissue_measures(hu_xy: np.ndarray, label_xy: np.ndarray, spacing: tuple[float, float]) -> dict[str, dict]:
    """Pixel count, area and HU statistics of every tissue on one slice.

    Parameters
    ----------
    hu_xy : ndarray, shape (X, Y)
        The slice in Hounsfield units.
    label_xy : ndarray, shape (X, Y)
        Label values (:mod:`sarco_app.labels`).
    spacing : (float, float)
        Pixel size (sx, sy) in mm.

    Returns
    -------
    dict
        ``{tissue: {"pixels", "area_cm2", "hu_min", "hu_max", "hu_mean", "hu_sd", "hu_median"}}``;
        area in cm² (pixels × sx × sy / 100), HU in HU, SD the population SD (ddof = 0).
        HU statistics are None for a tissue without pixels.
    """
    if hu_xy.shape != label_xy.shape:
        raise SarcoError(f"label slice shape {label_xy.shape} differs from image slice {hu_xy.shape}")
    pixel_area_cm2 = float(spacing[0]) * float(spacing[1]) / 100.0
    out: dict[str, dict] = {}
    for name in TISSUES:
        values = hu_xy[label_xy == L.tissue_value(name)].astype(np.float64)
        count = int(values.size)
        stats: dict[str, Any] = {"pixels": count, "area_cm2": count * pixel_area_cm2}
        if count:
            stats.update(
                hu_min=float(values.min()),
                hu_max=float(values.max()),
                hu_mean=float(values.mean()),
                hu_sd=float(values.std()),
                hu_median=float(np.median(values)),
            )
        else:
            stats.update(hu_min=None, hu_max=None, hu_mean=None, hu_sd=None, hu_median=None)
        out[name] = stats
    return out


def resolve_patient(
    image_patient: PatientInfo | None,
    image_source: str | None,
    manual: PatientInfo | dict | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Patient data with the origin of each value; manual values override or fill gaps.

    Parameters
    ----------
    image_patient : PatientInfo or None
        What the image carries (DICOM tags, or the NIfTI sidecar).
    image_source : str or None
        Where the image's values came from: ``"dicom"`` or ``"sidecar"``.
    manual : PatientInfo or dict, optional
        Values given by the user; ``None`` fields are ignored.

    Returns
    -------
    (patient, reasons)
        ``patient`` has ``sex`` ('M'/'F'), ``age`` (years), ``height_cm``, ``weight_kg``,
        ``bmi`` (kg/m²) and ``source`` (field -> "manual" | "dicom" | "sidecar" | "computed" |
        None); ``reasons`` names what is unknown.
    """
    if isinstance(manual, dict):
        manual = PatientInfo.from_dict(manual)
    manual = manual or PatientInfo()
    image_patient = image_patient or PatientInfo()
    patient: dict[str, Any] = {}
    source: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for name in PATIENT_FIELDS:
        given, stored = getattr(manual, name), getattr(image_patient, name)
        if given is not None:
            patient[name], source[name] = given, "manual"
        elif stored is not None:
            patient[name], source[name] = stored, image_source
        else:
            patient[name], source[name] = None, None
            reasons[f"patient.{name}"] = f"{name.replace('_', ' ')} not in the image data and not given"
    height, weight = patient["height_cm"], patient["weight_kg"]
    if height and weight:
        patient["bmi"] = weight / (height / 100.0) ** 2
        source["bmi"] = "computed"
    else:
        patient["bmi"], source["bmi"] = None, None
        reasons["patient.bmi"] = _unknown(height=height, weight=weight)
    patient["source"] = source
    return patient, reasons


def _unknown(**values: Any) -> str:
    missing = [name for name, value in values.items() if value is None]
    return " and ".join(missing) + " unknown"


def body_indices(tissues: dict[str, dict], patient: dict[str, Any]) -> tuple[dict, dict[str, str]]:
    """Muscle and fat indices from tissue areas (cm²) and patient data.

    ``sma_cm2`` skeletal muscle area; ``smi_cm2_m2`` = SMA / height² (cm²/m²);
    ``sma_per_weight`` (cm²/kg); ``sma_per_bmi`` (cm² per kg/m²); ``muscle_hu_mean`` muscle
    radiation attenuation (HU); ``vat_sat_ratio`` VAT area / SAT area; ``total_adipose_cm2``
    SAT + VAT + IMAT. Returns ``(indices, reasons)``.
    """
    height, weight, bmi = patient["height_cm"], patient["weight_kg"], patient["bmi"]
    reasons: dict[str, str] = {}
    # No muscle labelled is a missing label, not a muscle area of 0: an SMI of 0 would read as
    # the most sarcopenic patient of the cohort.
    sma = tissues["muscle"]["area_cm2"] if tissues["muscle"]["pixels"] > 0 else None
    indices: dict[str, Any] = {"sma_cm2": sma}
    if sma is None:
        for name in ("sma_cm2", "smi_cm2_m2", "sma_per_weight", "sma_per_bmi"):
            reasons[name] = "no muscle labelled on the slice"
    indices["smi_cm2_m2"] = sma / (height / 100.0) ** 2 if height and sma is not None else None
    if height is None:
        reasons["smi_cm2_m2"] = "height unknown"
    indices["sma_per_weight"] = sma / weight if weight and sma is not None else None
    if weight is None:
        reasons["sma_per_weight"] = "weight unknown"
    indices["sma_per_bmi"] = sma / bmi if bmi and sma is not None else None
    if bmi is None:
        reasons["sma_per_bmi"] = "BMI unknown (" + _unknown(height=height, weight=weight) + ")"
    indices["muscle_hu_mean"] = tissues["muscle"]["hu_mean"]
    if indices["muscle_hu_mean"] is None:
        reasons["muscle_hu_mean"] = "no muscle pixels on the slice"
    sat, vat = tissues["sat"]["area_cm2"], tissues["vat"]["area_cm2"]
    indices["vat_sat_ratio"] = vat / sat if sat > 0 else None
    if sat <= 0:
        reasons["vat_sat_ratio"] = "no SAT pixels on the slice"
    indices["total_adipose_cm2"] = sat + vat + tissues["imat"]["area_cm2"]
    return indices, reasons


def _decimal_spacing(value: float) -> float:
    """NIfTI stores spacing as float32: a value that is exactly a float32 is given its shortest
    decimal form (0.8, not 0.800000011920929) so areas from known spacings come out exact.
    Other values (DICOM, in-memory images) are kept as they are."""
    single = np.float32(value)
    return float(str(single)) if float(single) == float(value) else float(value)


def choose_slice(image: CTImage, label: np.ndarray, slice_index: int | None) -> int:
    """The axial slice to measure: ``slice_index`` (negative counts from the end), the only
    slice of a 2D image, the only labelled slice of a 3D label, or else the labelled L3 slice
    found by :func:`sarco_app.spine.l3.locate_l3`; :class:`SarcoError` when none applies."""
    if image.hu.ndim == 2:
        take_slice(image.hu, slice_index)  # raises for an index other than 0
        return 0
    depth = image.hu.shape[2]
    if slice_index is None:
        labelled = np.flatnonzero(label.reshape(-1, depth).any(axis=0))
        if depth == 1:
            return 0
        if labelled.size == 1:
            return int(labelled[0])
        if labelled.size > 1:
            from sarco_app.spine.l3 import choose_slice  # a 3D scan measured at L3, never elsewhere

            choice = choose_slice(image, middle=False)
            if choice.index is not None and choice.index in set(labelled.tolist()):
                return int(choice.index)
            why = choice.reason if choice.index is None else f"L3 (slice {choice.index}) is not labelled"
        else:
            why = "no slice is labelled"
        raise SarcoError(
            f"the image has {depth} slices and {labelled.size} of them are labelled ({why}): "
            "give the slice to measure (--slice K)"
        )
    take_slice(image.hu, slice_index)  # raises SarcoError when out of range
    return int(slice_index) % depth


def quantify_scan(
    image: CTImage,
    label: np.ndarray,
    slice_index: int | None = None,
    manual_patient: PatientInfo | dict | None = None,
    reference: ReferenceTable | str | Path | None = None,
    cutoffs: Cutoffs | str | Path | None = None,
) -> dict[str, Any]:
    """All measures of one scan's axial slice as a JSON-ready dict (see module docstring).

    Parameters
    ----------
    image : CTImage
        Canonical image in HU (:func:`sarco_app.inputs.ingest.load_image`).
    label : ndarray
        Canonical label map of the same shape (:func:`load_label`).
    slice_index : int, optional
        Axial slice to measure; see :func:`choose_slice`.
    manual_patient : PatientInfo or dict, optional
        Sex / age / height (cm) / weight (kg) that override or fill the image's values.
    reference : ReferenceTable or path, optional
        T-score table; the paper's Table 4 by default.
    cutoffs : Cutoffs or path, optional
        Published cut-off rules; Prado 2008 and Martin 2013 by default.
    """
    if label.shape != image.hu.shape:
        raise SarcoError(f"label shape {label.shape} differs from image shape {image.hu.shape}")
    label = check_label(np.asarray(label))
    if not isinstance(reference, ReferenceTable):
        reference = load_reference(reference)
    if not isinstance(cutoffs, Cutoffs):
        cutoffs = load_cutoffs(cutoffs)
    k = choose_slice(image, label, slice_index)
    hu_xy = image.hu if image.hu.ndim == 2 else image.hu[:, :, k]
    label_xy = label if label.ndim == 2 else label[:, :, k]
    spacing = tuple(_decimal_spacing(s) for s in image.pixel_spacing)
    reasons: dict[str, str] = {}

    tissues = tissue_measures(hu_xy, label_xy, spacing)
    for name, stats in tissues.items():
        if stats["pixels"] == 0:
            reasons[f"tissues.{name}"] = f"no {name} pixels on slice {k}: HU statistics are null"

    image_source = "dicom" if image.meta.get("format") == "dicom" else "sidecar"
    patient, patient_reasons = resolve_patient(image.patient, image_source, manual_patient)
    reasons.update(patient_reasons)

    indices, index_reasons = body_indices(tissues, patient)
    reasons.update(index_reasons)

    t_scores: dict[str, float | None] = {}
    categories: dict[str, str | None] = {}
    for index in reference.indices:
        value = indices.get(index)
        t = reference.t_score(patient["sex"], index, value)
        t_scores[index] = t
        categories[index] = category(t)
        if t is None:
            if patient["sex"] is None:
                why = "sex unknown"
            elif value is None:
                why = f"{index} unknown"
            else:
                why = f"no {patient['sex']} row for {index} in the reference table"
            reasons[f"t_scores.{index}"] = why

    flags, criteria, flag_reasons = evaluate_flags(cutoffs, patient["sex"], patient["bmi"], indices)
    reasons.update({f"flags.{key}": why for key, why in flag_reasons.items()})

    return {
        "slice_index": k,
        "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
        "tissues": tissues,
        "patient": patient,
        "indices": indices,
        "t_scores": t_scores,
        "categories": categories,
        "flags": flags,
        "flag_criteria": criteria,
        "reference": reference.describe(),
        "cutoff_references": dict(cutoffs.citations),
        "reasons": reasons,
    }


def quantify_files(
    image_path: str | Path,
    label_path: str | Path,
    slice_index: int | None = None,
    manual_patient: PatientInfo | dict | None = None,
    reference: ReferenceTable | str | Path | None = None,
) -> dict[str, Any]:
    """:func:`quantify_scan` on an image file (NIfTI or DICOM) and its label NIfTI."""
    from sarco_app.inputs.ingest import load_image

    image = load_image(image_path)
    label = load_label(label_path, image)
    return quantify_scan(image, label, slice_index, manual_patient, reference)


def _param_number(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SarcoError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise SarcoError(f"{key} must be a positive number, got {value!r}")
    return number


def patient_from_params(params: dict[str, Any]) -> PatientInfo:
    """Manual patient data from request params ``sex``, ``age``, ``height_cm``, ``weight_kg``
    (empty strings mean "not given"); bad values raise :class:`SarcoError`."""
    from sarco_app.inputs.patient import normalise_sex

    sex_text = params.get("sex")
    sex = None
    if sex_text is not None and str(sex_text).strip():
        sex = normalise_sex(sex_text)
        if sex is None:
            raise SarcoError(f"sex must be M or F, got {sex_text!r}")
    from sarco_app.inputs.patient import PLAUSIBLE_PATIENT, check_plausible

    return PatientInfo(
        sex=sex, **{key: check_plausible(key, _param_number(params, key)) for key in PLAUSIBLE_PATIENT}
    )


def quantify_request(
    image_path: str | Path,
    label_path: str | Path,
    params: dict[str, Any],
    reference_dirs: list[str | Path] | tuple = (),
) -> dict[str, Any]:
    """:func:`quantify_scan` driven by a dict of request parameters (the server task's entry).

    ``params`` may hold ``sex``, ``age``, ``height_cm``, ``weight_kg`` (see
    :func:`patient_from_params`), ``slice`` (int) and ``reference`` (see
    :func:`sarco_app.measurement.reference.find_reference`).
    """
    from sarco_app.inputs.ingest import load_image
    from sarco_app.measurement.reference import find_reference

    manual = patient_from_params(params)
    slice_text = params.get("slice")
    slice_index = None
    if slice_text is not None and str(slice_text).strip() != "":
        try:
            slice_index = int(str(slice_text).strip())
        except ValueError:
            raise SarcoError(f"slice must be an integer, got {slice_text!r}") from None
    reference = find_reference(params.get("reference"), reference_dirs)
    image = load_image(image_path)
    label = load_label(label_path, image)
    return quantify_scan(image, label, slice_index, manual, reference)


def clean_json(value: Any) -> Any:
    """Replace NaN / infinity by None and numpy scalars by Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
