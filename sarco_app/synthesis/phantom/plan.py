"""The plan of a phantom: every patient and body parameter, drawn before any pixel exists.

:func:`draw_plan` draws, in this order from the main random stream: the patient (sex, age,
stature, BMI, sarcopenia, muscle HU), the sizes in mm of muscles, fat, spine and the muscle
envelope, the slice thickness, the envelope outline, the SAT thickness profile, the arms, and
the pixel geometry (spacing, rotation, shift, supersampling). The anatomy drawing
(:mod:`sarco_app.synthesis.phantom.anatomy`) and the rendering (:mod:`sarco_app.synthesis.phantom.render`) then
read the :class:`Plan` and never change it. Moving or adding a draw here shifts every later
random number: new random structures belong at the end of a stream (see ``rng_upper`` in
:func:`sarco_app.synthesis.phantom.build.generate`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sarco_app import labels
from sarco_app.errors import SarcoError
from sarco_app.inputs.patient import PatientInfo
from sarco_app.synthesis.phantom.geometry import half_superellipse_area
from sarco_app.synthesis.phantom.tissues import LEVEL_ANATOMY

LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4")
#: The lumbar levels (``write_cohort``'s ``mixed`` draws from these).
LUMBAR_LEVELS = ("L1", "L2", "L3", "L4")
#: Tissue names in label order (the keys of :meth:`Phantom.areas_cm2`).
TISSUES = tuple(labels.NAMES[v] for v in sorted(labels.NAMES))
#: Default pixel-spacing range (mm) for a 512 matrix; other matrix sizes scale it so the field
#: of view stays that of a clinical 512 reconstruction.
DEFAULT_SPACING_RANGE = (0.6, 1.0)
#: Any explicitly requested pixel spacing must lie in this range (mm).
SPACING_LIMITS = (0.5, 3.0)
SIZE_LIMITS = (64, 2048)
#: Table position (mm) of the slice at each level, for the image origin.
LEVEL_Z_MM = {"T11": -50.0, "T12": -85.0, "L1": -120.0, "L2": -155.0, "L3": -190.0, "L4": -225.0}
#: Skeletal muscle index at each level relative to L3 (fewer psoas fibres higher up).
_SMI_LEVEL_FACTOR = {"T11": 0.86, "T12": 0.9, "L1": 0.95, "L2": 0.97, "L3": 1.0, "L4": 1.02}


@functools.lru_cache(maxsize=1)
def _martin_rules():
    from sarco_app.measurement.reference import load_cutoffs

    rules = [r for r in load_cutoffs().rules
             if r.source == "martin2013" and r.flag == "sarcopenia" and r.index == "smi_cm2_m2"]
    if not rules:
        raise SarcoError("cutoffs.json holds no martin2013 sarcopenia rule for smi_cm2_m2")
    return tuple(rules)


def smi_cutoff(sex: str, bmi: float) -> float:
    """Sarcopenia cut-off of the L3 skeletal muscle index (cm²/m²), Martin et al. 2013, read
    from ``sarco_app/measurement/references/cutoffs.json``: men < 43 (BMI < 25) or < 53 (BMI >= 25), women
    < 41."""
    for rule in _martin_rules():
        if rule.applies(sex, bmi):
            return rule.below
    raise SarcoError(f"no Martin 2013 cut-off for sex {sex!r}, BMI {bmi!r}")


def check_inputs(seed, size, level, spacing_mm):
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise SarcoError(f"seed must be a non-negative integer, got {seed!r}") from None
    if seed < 0:
        raise SarcoError(f"seed must be a non-negative integer, got {seed}")
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise SarcoError(f"size must be an integer, got {size!r}") from None
    if not SIZE_LIMITS[0] <= size <= SIZE_LIMITS[1]:
        raise SarcoError(f"size must be {SIZE_LIMITS[0]}-{SIZE_LIMITS[1]} pixels, got {size}")
    lev = str(level).strip().upper()
    if lev not in LEVELS:
        raise SarcoError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    spacing = None
    if spacing_mm is not None:
        values = np.atleast_1d(np.asarray(spacing_mm, dtype=float)).ravel()
        if values.size == 1:
            values = np.repeat(values, 2)
        if values.size != 2 or not np.all(np.isfinite(values)) or \
                np.any(values < SPACING_LIMITS[0]) or np.any(values > SPACING_LIMITS[1]):
            raise SarcoError(
                f"spacing_mm must be {SPACING_LIMITS[0]}-{SPACING_LIMITS[1]} mm, got {spacing_mm!r}")
        spacing = (float(values[0]), float(values[1]))
    return seed, size, lev, spacing


@dataclass(frozen=True)
class SatProfile:
    """Thickness of the subcutaneous fat (mm) around the body: thicker at the flanks and back,
    a few random modes, sometimes a pannus in front."""

    lateral: float
    posterior: float
    anterior: float
    #: (amplitude, phase) of the modes k = 2, 3, ...
    modes: tuple[tuple[float, float], ...]
    #: Mean thickness (mm) that gives the planned SAT area.
    mean_mm: float
    skin_mm: float
    norm: float = field(init=False)

    def __post_init__(self):
        theta = np.linspace(-np.pi, np.pi, 361)
        object.__setattr__(self, "norm", float(np.mean(self.shape(theta))))

    def shape(self, theta):
        """Relative thickness at polar angle ``theta`` (rad) around the envelope centre."""
        s, c = np.sin(theta), np.cos(theta)
        prof = 1 + self.lateral * c * c + self.posterior * np.clip(s, 0, None) ** 2 \
            + self.anterior * np.clip(-s, 0, None) ** 3
        for k, (amp, ph) in enumerate(self.modes, start=2):
            prof = prof + amp * np.cos(k * theta + ph)
        return np.clip(prof, 0.25, None)

    def thickness(self, theta):
        """SAT thickness (mm) at polar angle ``theta`` around the envelope centre."""
        t = self.mean_mm * self.shape(theta) / self.norm
        return np.maximum(t, self.skin_mm + 1.5)


@dataclass(frozen=True)
class Plan:
    """Everything drawn before the pixels: patient, sizes (mm), outline and pixel geometry.

    Lengths are in mm in patient coordinates (``u`` toward the patient's left, ``v`` toward
    posterior, origin at the centre of the muscle envelope); areas ``*_a`` in mm² per side.
    """

    seed: int
    level: str
    #: Per-level anatomy table (:data:`sarco_app.synthesis.phantom.tissues.LEVEL_ANATOMY`).
    lv: dict[str, Any]
    # Patient.
    patient: PatientInfo
    sex: str
    age: float
    height_cm: float
    weight_kg: float
    bmi: float
    sarcopenic: bool
    muscle_hu: float
    # Targets of the compartments.
    imat_frac: float
    vat_target: float  # cm²
    sat_target: float  # cm²
    # Spine: scale with stature, vertebral body half width / depth, canal half width / depth,
    # transverse-process axis behind the body centre, body centre behind the envelope centre.
    k_sp: float
    vb_w: float
    vb_d: float
    canal_hw: float
    canal_hd: float
    tp_v_off: float
    vb_off: float
    # Muscles: erector spinae box (per side) and areas per side.
    w_es: float
    h_es: float
    psoas_a: float
    ql_a: float
    rectus_a: float
    wall_a: float
    # Muscle envelope (outer fascia): half width, anterior / posterior depth, superellipse
    # exponents, and the outline (n, 2) from the anterior midline round the patient's left.
    a_f: float
    b_ant: float
    b_post: float
    n_ant: float
    n_post: float
    envelope: np.ndarray
    sat: SatProfile
    slice_thickness_mm: float
    # Arms beside the body (radius and gap to the body, mm).
    arms: bool
    arm_r: float
    arm_gap: float
    # Pixel geometry: output matrix, spacing (mm), rotation (rad), shift (mm) and the
    # supersampling factor (the anatomy is drawn on a grid ``supersampling`` times finer).
    out_size: int
    spacing: tuple[float, float]
    angle: float
    shift: tuple[float, float]
    supersampling: int
    #: What the plan records in ``Phantom.params`` (in the order it was drawn).
    params: dict[str, Any]


def draw_plan(rng: np.random.Generator, seed: int, size: int, level: str,
              spacing: tuple[float, float] | None, sex, age, height_cm, weight_kg, sarcopenic,
              muscle_hu, gain: float = 1.0) -> Plan:
    """Draw the plan of one phantom (arguments as :func:`sarco_app.synthesis.phantom.generate`, already
    checked; ``gain`` scales the drawn muscle area, see there)."""
    params: dict[str, Any] = {"seed": seed, "level": level, "size": size}
    patient = _draw_patient(rng, params, sex, age, height_cm, weight_kg, sarcopenic, muscle_hu)
    lv = LEVEL_ANATOMY[level]
    sizes = _draw_sizes(rng, params, lv, level, gain, patient["sex"], patient["age"],
                        patient["height_cm"], patient["bmi"], patient["muscle_hu"], patient["sarcopenic"])
    params["slice_thickness_mm"] = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    env = _envelope_polygon(rng, sizes["a_f"], sizes["b_ant"], sizes["b_post"], sizes["n_ant"], sizes["n_post"])
    # SAT thickness around the body: thicker at the flanks and back, random modes, pannus.
    sat_lat = rng.uniform(0.15, 0.6)
    sat_post = rng.uniform(-0.1, 0.45)
    sat_ant = rng.uniform(-0.2, 0.35) + (0.25 if patient["bmi"] > 32 and rng.random() < 0.5 else 0.0)
    sat_modes = tuple((rng.normal(0, 0.12) / k, rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    perim = float(np.sum(np.hypot(*np.diff(np.vstack([env, env[:1]]), axis=0).T)))
    sat_mm2 = sizes["sat_target"] * 100.0
    t_mean = (-perim + math.sqrt(perim * perim + 4 * math.pi * sat_mm2)) / (2 * math.pi)
    skin_t = rng.uniform(1.2, 2.6)
    sat = SatProfile(lateral=sat_lat, posterior=sat_post, anterior=sat_ant, modes=sat_modes,
                     mean_mm=max(t_mean, skin_t + 2.0), skin_mm=skin_t)
    theta = np.linspace(-np.pi, np.pi, 361)
    t_max = float(np.max(sat.thickness(theta)))
    arms = rng.random() < 0.13
    arm_r = rng.uniform(38, 52) * (1 + 0.015 * (patient["bmi"] - 25))
    arm_gap = rng.uniform(-2, 25)
    half_w = float(np.max(np.abs(env[:, 0]))) + t_max
    if arms:
        half_w += arm_gap + 2 * arm_r
    depth = sizes["b_ant"] + sizes["b_post"] + 2 * t_max
    px_spacing, angle, shift = _choose_geometry(rng, params, size, spacing, half_w, depth)
    # Coarse pixels are rendered on a finer grid and averaged (partial volume of thin
    # structures such as skin, fascia and fat planes); labels take the majority class.
    f = int(min(4, max(1, math.ceil(px_spacing[0] / 1.1 - 0.05)), max(1, 2048 // size)))
    params["supersampling"] = f
    return Plan(seed=seed, level=level, lv=lv, **patient, **sizes, envelope=env, sat=sat,
                slice_thickness_mm=params["slice_thickness_mm"], arms=arms, arm_r=arm_r,
                arm_gap=arm_gap, out_size=size, spacing=px_spacing, angle=angle, shift=shift,
                supersampling=f, params=params)


def _draw_patient(rng, params, sex, age, height_cm, weight_kg, sarcopenic, muscle_hu) -> dict[str, Any]:
    # Every default is drawn even when given, so the random stream never shifts.
    u_sex, z_age, z_h, z_bmi, u_sarc, z_hu = rng.random(), rng.normal(), rng.normal(), \
        rng.normal(), rng.random(), rng.normal()
    sex = sex or ("M" if u_sex < 0.5 else "F")
    age = float(age) if age is not None else float(np.clip(61 + 14 * z_age, 20, 92))
    if height_cm is None:
        height_cm = (176.0 + 7.0 * z_h) if sex == "M" else (163.0 + 6.5 * z_h)
        height_cm = float(np.clip(height_cm, 145, 205))
    height_cm = float(height_cm)
    h_m = height_cm / 100.0
    if weight_kg is None:
        bmi = float(np.clip(math.exp(math.log(26.5) + 0.19 * z_bmi), 16.5, 48.0))
        weight_kg = round(bmi * h_m * h_m, 1)
    weight_kg = float(weight_kg)
    bmi = weight_kg / (h_m * h_m)
    if sarcopenic is None:
        p = np.clip(0.12 + 0.006 * (age - 45) + (0.12 if bmi < 22 else 0.0), 0.05, 0.5)
        sarcopenic = bool(u_sarc < p)
    sarcopenic = bool(sarcopenic)
    if muscle_hu is None:
        mean = 45 - 0.22 * (age - 40) - 0.5 * (bmi - 25) - (4 if sarcopenic else 0)
        muscle_hu = float(np.clip(mean + 9 * z_hu, -5, 68))
    patient = PatientInfo(sex=sex, age=round(age, 1), height_cm=round(height_cm, 1),
                          weight_kg=round(weight_kg, 1))
    params.update(sex=sex, age=round(age, 1), height_cm=round(height_cm, 1),
                  weight_kg=round(weight_kg, 1), bmi=round(bmi, 2),
                  sarcopenic=sarcopenic, muscle_hu=round(float(muscle_hu), 1))
    return dict(patient=patient, sex=sex, age=age, height_cm=height_cm, weight_kg=weight_kg,
                bmi=bmi, sarcopenic=sarcopenic, muscle_hu=float(muscle_hu))


def _draw_sizes(rng, params, lv, level, gain, sex, age, height_cm, bmi, muscle_hu,
                sarcopenic) -> dict[str, float]:
    """Sizes of everything, in mm, before any pixel exists."""
    male = sex == "M"
    h_m = height_cm / 100.0
    # Skeletal muscle index drawn on the right side of the cut-off.
    cut = smi_cutoff(sex, bmi)
    if sarcopenic:
        smi = cut * rng.uniform(0.72, 0.92)
    else:
        smi = cut * rng.uniform(1.06, 1.30) * (1 + 0.004 * max(0.0, bmi - 25))
    # Level: the muscles at L1 are fewer than at L3 (psoas), so the index shifts.
    smi_level = smi * _SMI_LEVEL_FACTOR[level]
    sma_mm2 = smi_level * h_m * h_m * 100.0  # cm² -> mm²
    # IMAT share grows with age, BMI and low muscle HU (myosteatosis).
    imat_frac = np.clip(0.02 + 0.0008 * (age - 40) + 0.002 * (bmi - 25)
                        + 0.0015 * max(0.0, 40 - muscle_hu), 0.006, 0.15)
    imat_frac *= math.exp(rng.normal(0, 0.3))
    shares = np.array([lv["es"], lv["psoas"], lv["ql"], lv["rectus"], lv["wall"]])
    shares = shares * np.exp(rng.normal(0, 0.12, 5))
    shares /= shares.sum()
    # Muscle drawn includes its IMAT (both lie inside the muscle fascia).
    gross = sma_mm2 * (1 + imat_frac) * gain
    es_a, psoas_a, ql_a, rectus_a, wall_a = (gross * s / 2 for s in shares)  # per side
    # Fat amounts (cm²) from BMI, sex and age; log-normal scatter.
    age_f = np.clip(0.55 + 0.013 * (age - 30), 0.5, 1.45)
    vat = (11.5 if male else 6.5) * max(bmi - 17.5, 1.0) * age_f * math.exp(rng.normal(0, 0.32))
    sat = (12.5 if male else 19.0) * max(bmi - 15.5, 0.8) * math.exp(rng.normal(0, 0.22))
    vat, sat = float(np.clip(vat, 8, 650)), float(np.clip(sat, 12, 900))
    params.update(smi_target=round(smi, 1), vat_target_cm2=round(vat, 1),
                  sat_target_cm2=round(sat, 1), imat_fraction=round(float(imat_frac), 4))

    # Spine size with stature and sex.
    k_sp = (height_cm / (176 if male else 163)) ** 0.8 * (1.0 if male else 0.92)
    k_sp *= rng.uniform(0.93, 1.07)
    vb_w = lv["vb_w"] * k_sp
    vb_d = lv["vb_d"] * k_sp * rng.uniform(0.93, 1.07)
    # Erector spinae (incl. multifidus) per side: rounded box of width w_es, depth h_es.
    aspect = rng.uniform(1.15, 1.55)
    h_es = math.sqrt(es_a / (0.86 * aspect))
    w_es = aspect * h_es
    # Posterior elements: the transverse processes sit about one vertebral half depth +
    # canal behind the body's centre.
    canal_hw = rng.uniform(9.5, 12.5) * k_sp
    canal_hd = rng.uniform(6.5, 8.5) * k_sp
    tp_v_off = vb_d + canal_hd * 1.1  # from VB centre to TP axis
    vb_off = rng.uniform(-6, 14)  # VB centre behind the envelope centre (mm)
    b_post = vb_off + tp_v_off + 4.0 + h_es

    # Muscle envelope (outer fascia) area: muscles + retroperitoneum + bowel/organs + VAT.
    organs = (175 if male else 150) * h_m * h_m / (1.72 ** 2) * lv["cavity"] * rng.uniform(0.85, 1.15)
    spine = 22.0 * k_sp ** 2
    area_f = (gross / 100.0 + organs + spine + vat) * 100.0  # mm²
    # Shape: lean people are wide and flat, visceral obesity makes the belly round.
    ratio = np.clip(1.62 - 0.018 * (bmi - 22) - 0.0012 * (vat - 100) + rng.normal(0, 0.08), 1.12, 1.9)
    n_ant = rng.uniform(1.8, 2.4)
    n_post = rng.uniform(1.9, 2.7)
    c_ant, c_post = half_superellipse_area(n_ant), half_superellipse_area(n_post)
    # Solve a * (b_ant c_ant + b_post c_post) = area with a = ratio (b_ant + b_post) / 2.
    qa = ratio / 2 * c_ant
    qb = ratio / 2 * (b_post * c_ant + b_post * c_post)
    qc = ratio / 2 * b_post * b_post * c_post - area_f
    b_ant = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
    if b_ant < 0.85 * b_post:  # tiny cavity: keep a plausible front
        b_ant = 0.85 * b_post
    a_f = ratio * (b_ant + b_post) / 2
    params.update(envelope_mm=[round(2 * a_f, 1), round(b_ant + b_post, 1)])
    return dict(imat_frac=float(imat_frac), vat_target=vat, sat_target=sat, k_sp=k_sp, vb_w=vb_w,
                vb_d=vb_d, canal_hw=canal_hw, canal_hd=canal_hd, tp_v_off=tp_v_off, vb_off=vb_off,
                w_es=w_es, h_es=h_es, psoas_a=psoas_a, ql_a=ql_a, rectus_a=rectus_a, wall_a=wall_a,
                a_f=a_f, b_ant=b_ant, b_post=b_post, n_ant=n_ant, n_post=n_post)


def _envelope_polygon(rng, a_f, b_ant, b_post, n_ant, n_post, n: int = 720) -> np.ndarray:
    """Outer fascia of the muscle wall and back muscles, from the anterior midline
    (t = -pi/2) round the patient's left, back and right."""
    t = np.linspace(-np.pi / 2, 3 * np.pi / 2, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    nn = np.where(s > 0, n_post, n_ant)
    bb = np.where(s > 0, b_post, b_ant)
    u = a_f * np.sign(c) * np.abs(c) ** (2 / nn)
    v = bb * np.sign(s) * np.abs(s) ** (2 / nn)
    r = np.ones_like(t)
    for k in range(2, 7):  # mostly left-right symmetric shape noise
        r += rng.normal(0, 0.022) / (k - 1) ** 0.7 * np.cos(k * (t - np.pi / 2))
        r += rng.normal(0, 0.006) * np.sin(k * (t - np.pi / 2))
    u, v = u * r, v * r
    # Midline groove of the back between the erector spinae.
    groove = rng.uniform(0, 7) * np.exp(-(u / rng.uniform(10, 22)) ** 2) * (s > 0)
    v = v - groove
    return np.stack([u, v], axis=1)


def _choose_geometry(rng, params, size, req_spacing, body_half_w: float, body_depth: float):
    """Pixel spacing, rotation and shift (uses the requested spacing when given)."""
    lo, hi = (x * 512 / size for x in DEFAULT_SPACING_RANGE)
    hi = float(np.clip(hi, SPACING_LIMITS[0], SPACING_LIMITS[1]))
    lo = float(np.clip(lo, SPACING_LIMITS[0], hi))
    mode = rng.random()
    fit_fov = max(2 * body_half_w, body_depth + 60) * rng.uniform(1.04, 1.32)
    trunc_fov = 2 * body_half_w * rng.uniform(0.8, 0.97)
    random_s = rng.uniform(lo, hi)
    if req_spacing is not None:
        spacing, how = req_spacing, "given"
    elif mode < 0.72:
        s = float(np.clip(fit_fov / size, lo, hi))
        spacing, how = (s, s), "fit"
    elif mode < 0.9:
        s = float(np.clip(trunc_fov / size, lo, hi))
        spacing, how = (s, s), "truncating"
    else:
        spacing, how = (random_s, random_s), "random"
    angle = math.radians(float(np.clip(rng.normal(0, 4.0), -10, 10)))
    fov = size * spacing[0]
    shift = (rng.uniform(-1, 1) * min(20.0, 0.06 * fov), rng.uniform(-0.08, 0.05) * fov)
    params.update(spacing_mm=round(spacing[0], 4), spacing_choice=how,
                  rotation_deg=round(math.degrees(angle), 2),
                  shift_mm=[round(shift[0], 1), round(shift[1], 1)])
    return spacing, angle, shift
