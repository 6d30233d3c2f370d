"""Generation of one phantom: check the request, draw the plan, paint the anatomy, render the
HU image and derive the labels (see the package docstring for what the labels mean)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sarco_app import labels
from sarco_app.errors import SarcoError
from sarco_app.inputs.ingest import CTImage, make_image
from sarco_app.inputs.patient import PatientInfo
from sarco_app.synthesis.phantom.anatomy import draw_anatomy
from sarco_app.synthesis.phantom.geometry import block_mode, circle_mask
from sarco_app.synthesis.phantom.plan import LEVEL_Z_MM, Plan, check_inputs, draw_plan, smi_cutoff
from sarco_app.synthesis.phantom.render import render
from sarco_app.synthesis.phantom.tissues import BOWEL, LABEL_OF, MUSCLE_GAIN, ORGAN_OF, TISSUE_NAMES, T


@dataclass
class Phantom:
    """One synthetic slice. ``hu`` (float32 HU) and ``label`` (uint8) have shape ``(X, Y)`` in
    canonical orientation; ``spacing`` is (sx, sy) in mm. ``label`` is the protocol truth
    (compartments exact, tissue by HU: :func:`sarco_app.labels.apply_hu_ranges`);
    ``anatomical_label`` the majority tissue of each pixel before that rule."""

    hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float]
    patient: PatientInfo
    params: dict[str, Any] = field(default_factory=dict)
    anatomical_label: np.ndarray | None = None
    #: Organ classes (``labels.ORGAN_NAMES`` position + 1, 0 none) of the majority tissue of each
    #: pixel, wherever ``label`` is background: the extra training classes.
    organ_label: np.ndarray | None = None

    def areas_cm2(self) -> dict[str, float]:
        """Area (cm²) of every tissue of the label map: {'muscle', 'sat', 'vat', 'imat'}."""
        pixel_cm2 = self.spacing[0] * self.spacing[1] / 100.0
        counts = np.bincount(self.label.ravel(), minlength=labels.NUM_CLASSES)
        return {name: float(counts[value] * pixel_cm2) for name, value in labels.LABELS.items()}

    def to_image(self) -> CTImage:
        """The slice as a canonical 2D :class:`~sarco_app.inputs.ingest.CTImage` (world origin at the
        image centre, z = the table position of the slice)."""
        sx, sy = self.spacing
        nx, ny = self.hu.shape
        origin = ((nx - 1) / 2 * sx, (ny - 1) / 2 * sy, float(self.params.get("z_mm", 0.0)))
        meta = {"format": "phantom", "modality": "CT", "phantom": dict(self.params)}
        return make_image(self.hu, (sx, sy), self.patient, origin=origin, meta=meta)


def generate(
    seed: int,
    *,
    sex: str | None = None,
    age: float | None = None,
    height_cm: float | None = None,
    weight_kg: float | None = None,
    sarcopenic: bool | None = None,
    muscle_hu: float | None = None,
    spacing_mm: float | tuple[float, float] | None = None,
    size: int = 512,
    level: str = "L3",
) -> Phantom:
    """One synthetic axial CT slice at a lumbar ``level`` with its exact tissue labels.

    Parameters
    ----------
    seed : int
        Non-negative; the same seed and arguments give identical arrays.
    sex : {'M', 'F'}, optional
    age : float, optional
        Years.
    height_cm, weight_kg : float, optional
        Body size; the BMI drives SAT and VAT amounts and the body outline.
    sarcopenic : bool, optional
        When true the skeletal muscle index (muscle label area / height², cm²/m²) is drawn
        below the Martin 2013 cut-off (:func:`smi_cutoff`), otherwise above it. This holds for
        the label whenever the body is not cut by the field of view (``params['truncated']``).
    muscle_hu : float, optional
        Attenuation of skeletal muscle (HU): the median HU inside the muscle label comes out
        within a few HU of it. 30-60 is normal, 0-30 myosteatosis.
    spacing_mm : float or (float, float), optional
        Pixel spacing in mm (0.5-3). By default 0.6-1.0 mm for a 512 matrix (scaled by
        512 / size otherwise), mostly chosen so the body fits the field of view like a
        technologist would, sometimes so that a wide body is truncated.
    size : int
        Matrix size (pixels per side).
    level : {'L1', 'L2', 'L3', 'L4'}

    Returns
    -------
    Phantom
        ``hu`` float32 and ``label`` uint8 arrays of shape ``(size, size)`` in canonical
        (X = patient left, Y = posterior) orientation.
    """
    seed, size, level, spacing = check_inputs(seed, size, level, spacing_mm)
    if sex is not None and sex not in ("M", "F"):
        from sarco_app.inputs.patient import normalise_sex

        sex_norm = normalise_sex(sex)
        if sex_norm is None:
            raise SarcoError(f"sex must be 'M' or 'F', got {sex!r}")
        sex = sex_norm
    for name, value, lo, hi in (("age", age, 1, 120), ("height_cm", height_cm, 100, 230),
                                ("weight_kg", weight_kg, 25, 300), ("muscle_hu", muscle_hu, -60, 120)):
        if value is not None and not (math.isfinite(float(value)) and lo <= float(value) <= hi):
            raise SarcoError(f"{name} must be {lo}-{hi}, got {value!r}")
    # Drawn muscle shapes lose some area to bone, clipping and IMAT; the gain corrects for it.
    # In the rare case the drawn muscle index lands on the wrong side of the sarcopenia
    # cut-off, the same phantom is drawn again with a corrected gain (still deterministic).
    gain = MUSCLE_GAIN
    for _attempt in range(3):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x53A2C0]))
        # The upper-abdomen structures (diaphragm, crura, lung bases, intercostal muscles) draw
        # from their own stream, so adding them left the lumbar phantoms' random stream as it was.
        rng_upper = np.random.default_rng([int(seed), 0x7112])
        plan = draw_plan(rng, seed, size, level, spacing, sex, age, height_cm, weight_kg,
                         sarcopenic, muscle_hu, gain)
        result = _build(plan, rng, rng_upper)
        p = result.params
        cut = smi_cutoff(p["sex"], p["bmi"])
        if p["truncated"] or (p["smi"] < cut) == p["sarcopenic"]:
            break  # (a body cut by the field of view cannot show the patient's muscle index)
        gain *= p["smi_target"] / max(p["smi"], 1e-3)
    return result


def _build(plan: Plan, rng: np.random.Generator, rng_upper: np.random.Generator) -> Phantom:
    """Anatomy, image and labels of one plan (the random streams continue after the plan)."""
    params = dict(plan.params)
    anatomy = draw_anatomy(plan, rng, rng_upper, params)
    s = anatomy.scene
    tissue, n, f = s.tissue, plan.out_size, plan.supersampling
    label = block_mode(LABEL_OF[tissue], f, labels.NUM_CLASSES)  # majority tissue of each pixel
    hu = render(s, plan, label, anatomy.organs.contrast, rng, rng_upper)
    if params["fov_circle"]:
        label[~circle_mask(n)] = labels.BACKGROUND  # nothing outside the field
    # The truth is what the clinical protocol measures on this image: the exact compartments,
    # with tissue by HU (a 1-px fat plane blurred into the muscle range is muscle, a muscle
    # border pixel in the fat range IMAT), as an expert thresholding in SliceOmatic gets.
    anatomical = label
    label = labels.apply_hu_ranges(anatomical, hu)
    organs = block_mode(ORGAN_OF[tissue], f, len(labels.ORGAN_NAMES) + 1)
    organs[label != labels.BACKGROUND] = 0
    if params["fov_circle"]:
        organs[~circle_mask(n)] = 0
    counts = np.bincount(tissue.ravel(), minlength=len(TISSUE_NAMES)) * (s.cv.pixel_mm2 / 100.0)
    params["structures_cm2"] = {
        "psoas": round(float(counts[T.PSOAS]), 2),
        "erector": round(float(counts[T.ERECTOR]), 2),
        "quadratus": round(float(counts[T.QUADRATUS]), 2),
        "abdominal_wall": round(float(counts[T.WALL_MUSCLE] + counts[T.RECTUS] + counts[T.LATISSIMUS]), 2),
        "liver": round(float(counts[T.LIVER]), 2),
        "spleen": round(float(counts[T.SPLEEN]), 2),
        "kidneys": round(float(counts[T.KIDNEY_CORTEX] + counts[T.KIDNEY_MEDULLA]), 2),
        "bowel": round(float(sum(counts[t] for t in BOWEL)), 2),
        "bone": round(float(counts[T.BONE_CORTEX] + counts[T.BONE_MARROW]), 2),
    }
    spacing = plan.spacing
    areas = {name: float((label == value).sum() * spacing[0] * spacing[1] / 100.0)
             for name, value in labels.LABELS.items()}
    smi = areas["muscle"] / (plan.height_cm / 100.0) ** 2
    params.update(smi=round(smi, 2), z_mm=float(LEVEL_Z_MM[plan.level]))
    return Phantom(hu=np.ascontiguousarray(hu.T), label=np.ascontiguousarray(label.T),
                   spacing=(float(spacing[0]), float(spacing[1])), patient=plan.patient,
                   params=params, anatomical_label=np.ascontiguousarray(anatomical.T),
                   organ_label=np.ascontiguousarray(organs.T))
