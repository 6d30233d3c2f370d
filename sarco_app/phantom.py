"""Synthetic axial CT slices of the abdomen at L1-L4 with exact body-composition labels.

No public expert labels of muscle / SAT / VAT / IMAT exist, so these phantoms are the training
and test bed of the segmentation network, which must then work on real CT. Following the
SynthSeg idea, every anatomical size, shape and intensity is strongly randomised; the anatomy is
nonetheless laid out like a real slice at the lumbar level:

* body outline with a thin dense skin, subcutaneous fat (SAT) whose thickness varies around the
  body (fibrous septa, Scarpa's fascia, umbilicus), lying on a curved CT table or foam pad;
* abdominal wall muscles as layered bands (rectus pair beside the linea alba; external oblique,
  internal oblique and transversus abdominis with thin fat planes between them), latissimus
  dorsi higher up, psoas, quadratus lumborum and erector spinae / multifidus pairs;
* a lumbar vertebra (cortical shell, cancellous body, pedicles, laminae, spinous, articular and
  transverse processes, spinal canal), ribs at L1-L2;
* kidneys (hilum with sinus fat and pelvis), liver, spleen, stomach, pancreas, duodenum,
  gallbladder where the level makes them plausible, aorta (with calcified plaque) and IVC,
  iliac vessels at L4, mesenteric vessels, colon and small-bowel loops with gas (air-fluid
  levels in the scanner's vertical), fluid, oral contrast or faeces; visceral fat between them;
* fat specks and streaks inside the muscles (IMAT), lower muscle HU with myosteatosis;
* realistic HU per tissue for a random contrast phase, smooth tissue texture, partial-volume
  blur, correlated CT noise, occasional lateral streaks, the arms beside the body, a circular
  reconstruction field of view with padding outside, and truncation of wide bodies.

Geometry is drawn in patient millimetres (``u`` toward the patient's left, ``v`` toward
posterior) and rasterised on the pixel grid through a random rotation and shift. The label map
comes from that partial-volume-free tissue map; intensities, blur and noise are added on top.
Pixels coarser than 1.1 mm are rendered on a 2-4x finer grid: the image is the average over
each output pixel (partial volume of skin, fascia, fat planes) and the anatomical label the
majority class. The muscle attenuation is adjusted after blurring so that the median HU inside
the muscle label equals ``muscle_hu``. The returned ``label`` then follows the clinical protocol
(outline, then threshold): inside the muscle compartment, muscle is -29..150 HU and IMAT
-190..-30 HU of the final image; SAT and VAT outside -190..-30 HU (fibrous septa, partial volume
with skin or organs) are background. ``anatomical_label`` keeps the majority map.

Label values are those of :mod:`sarco_app.labels`: 1 skeletal muscle of the trunk (arms are not
part of the L3 measurement and stay 0), 2 SAT (fat between skin and the outer fascia of the
muscle wall / back muscles), 3 VAT (fat inside the muscle wall: intra-abdominal and
retroperitoneal, renal sinus), 4 IMAT (fat inside muscle fascia, including the thin planes
between the abdominal wall layers); everything else is 0 (skin, fascia and septa, bone, organs,
bowel, vessels, epidural fat, air, table).

Arrays are returned in the canonical orientation of ``docs/CONVENTIONS.md``: shape ``(X, Y)``,
axis 0 toward the patient's left, axis 1 toward posterior, so ``hu.T`` is the radiological view.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from sarco_app import labels
from sarco_app.errors import SarcoError
from sarco_app.ingest import CTImage, PatientInfo, make_image, save_image, save_label

LEVELS = ("T11", "T12", "L1", "L2", "L3", "L4")
#: The lumbar levels (``write_cohort``'s ``mixed`` draws from these).
LUMBAR_LEVELS = ("L1", "L2", "L3", "L4")
FORMATS = ("nifti", "dicom")
#: Tissue names in label order (the keys of :meth:`Phantom.areas_cm2`).
TISSUES = tuple(labels.NAMES[v] for v in sorted(labels.NAMES))
#: Default pixel-spacing range (mm) for a 512 matrix; other matrix sizes scale it so the field
#: of view stays that of a clinical 512 reconstruction.
DEFAULT_SPACING_RANGE = (0.6, 1.0)
#: Any explicitly requested pixel spacing must lie in this range (mm).
SPACING_LIMITS = (0.5, 3.0)
SIZE_LIMITS = (64, 2048)
MANIFEST_COLUMNS = (
    "id", "sex", "age", "height_cm", "weight_kg", "level", "spacing_mm", "muscle_hu",
    "sarcopenic", "muscle_cm2", "sat_cm2", "vat_cm2", "imat_cm2", "seed",
)
#: Skeletal muscle index (cm²/m²) cut-offs of Martin et al. 2013, used for the sarcopenic flag:
#: men < 43 (BMI < 25) or < 53 (BMI >= 25), women < 41.
def smi_cutoff(sex: str, bmi: float) -> float:
    """Sarcopenia cut-off of the L3 skeletal muscle index (cm²/m²), Martin et al. 2013."""
    if sex == "F":
        return 41.0
    return 43.0 if bmi < 25 else 53.0


# --------------------------------------------------------------------------- tissue classes

_TISSUE_NAMES = (
    "air", "outside_fov", "skin", "sat_fat", "sat_septum", "vat_fat", "imat_fat", "fascia",
    "rectus", "wall_muscle", "psoas", "quadratus", "erector", "latissimus",
    "bone_cortex", "bone_marrow", "csf", "epidural_fat", "cartilage",
    "kidney_cortex", "kidney_medulla", "urine", "liver", "spleen", "pancreas", "gallbladder",
    "artery", "vein", "small_vessel", "calcification", "thrombus",
    "bowel_wall", "bowel_fluid", "bowel_air", "bowel_contrast", "feces", "stomach_wall",
    "table_shell", "table_core", "pad",
    "arm_skin", "arm_fat", "arm_muscle",
    "diaphragm", "lung",
)


class _T:
    """Integer id of every tissue class of the tissue map."""


for _i, _name in enumerate(_TISSUE_NAMES):
    setattr(_T, _name.upper(), _i)

_MUSCLES = (_T.RECTUS, _T.WALL_MUSCLE, _T.PSOAS, _T.QUADRATUS, _T.ERECTOR, _T.LATISSIMUS)
_BOWEL = (_T.BOWEL_WALL, _T.BOWEL_FLUID, _T.BOWEL_AIR, _T.BOWEL_CONTRAST, _T.FECES)
#: Tissue id -> label value.
_LABEL_OF = np.zeros(len(_TISSUE_NAMES), dtype=np.uint8)
_LABEL_OF[list(_MUSCLES)] = labels.MUSCLE
_LABEL_OF[_T.SAT_FAT] = labels.SAT
_LABEL_OF[_T.SAT_SEPTUM] = labels.SAT  # thin septa are part of the fat compartment
_LABEL_OF[_T.VAT_FAT] = labels.VAT
_LABEL_OF[_T.IMAT_FAT] = labels.IMAT
#: Tissue id -> organ class (position in ``labels.ORGAN_NAMES`` + 1; 0 none).
_ORGAN_OF = np.zeros(len(_TISSUE_NAMES), dtype=np.uint8)
for _names, _organ in (
    (("liver", "gallbladder"), "liver"),
    (("spleen",), "spleen"),
    (("kidney_cortex", "kidney_medulla", "urine"), "kidney"),
    (("bowel_wall", "bowel_fluid", "bowel_air", "bowel_contrast", "feces", "stomach_wall"), "bowel"),
    (("bone_cortex", "bone_marrow", "cartilage", "csf", "epidural_fat"), "bone"),
    (("diaphragm",), "diaphragm"),
    (("pancreas", "artery", "vein", "calcification", "thrombus", "lung"), "other_organ"),
):
    _ORGAN_OF[[_TISSUE_NAMES.index(n) for n in _names]] = labels.ORGAN_NAMES.index(_organ) + 1

# Per level: relative sizes / probabilities of the structures that change along the spine.
_LEVEL_ANATOMY: dict[str, dict[str, Any]] = {
    #        share of the skeletal muscle area          vertebra half width/depth (mm)
    # T11/T12: the liver and spleen fill the cavity and lie on the diaphragm against the ribs and
    # intercostal muscles; lung bases behind the diaphragm; hardly any psoas yet.
    "T11": dict(es=0.52, psoas=0.004, ql=0.01, rectus=0.07, wall=0.40, vb_w=17.5, vb_d=13.5,
                tp=0.35, kidney=0.45, kidney_p=0.25, hilum_p=0.0, liver=1.3, spleen_p=0.95,
                stomach_p=0.9, pancreas_p=0.1, gallbladder_p=0.3, duodenum_p=0.0, ribs=5,
                latissimus_p=1.0, cavity=1.35, iliac_p=0.0, sma_p=0.1,
                dia=1.0, crus=1.0, lung=0.85, rib_arc=(0.12, 0.92)),
    "T12": dict(es=0.47, psoas=0.012, ql=0.025, rectus=0.075, wall=0.42, vb_w=18.5, vb_d=14.0,
                tp=0.4, kidney=0.7, kidney_p=0.7, hilum_p=0.15, liver=1.2, spleen_p=0.95,
                stomach_p=0.9, pancreas_p=0.45, gallbladder_p=0.35, duodenum_p=0.05, ribs=4.5,
                latissimus_p=1.0, cavity=1.28, iliac_p=0.0, sma_p=0.5,
                dia=0.95, crus=1.0, lung=0.5, rib_arc=(0.15, 0.9)),
    "L1": dict(es=0.38, psoas=0.035, ql=0.045, rectus=0.08, wall=0.46, vb_w=20.0, vb_d=14.5,
               tp=0.45, kidney=1.0, kidney_p=0.97, hilum_p=0.55, liver=1.0, spleen_p=0.9,
               stomach_p=0.85, pancreas_p=0.75, gallbladder_p=0.3, duodenum_p=0.2, ribs=4,
               latissimus_p=1.0, cavity=1.18, iliac_p=0.0, sma_p=0.9,
               dia=0.7, crus=0.9, lung=0.0, rib_arc=(0.3, 0.85)),
    "L2": dict(es=0.34, psoas=0.075, ql=0.06, rectus=0.08, wall=0.445, vb_w=21.5, vb_d=15.5,
               tp=0.8, kidney=0.95, kidney_p=0.95, hilum_p=0.7, liver=0.55, spleen_p=0.35,
               stomach_p=0.3, pancreas_p=0.55, gallbladder_p=0.25, duodenum_p=0.45, ribs=1.5,
               latissimus_p=0.8, cavity=1.07, iliac_p=0.0, sma_p=0.85,
               dia=0.3, crus=0.6, lung=0.0, rib_arc=(0.3, 0.85)),
    "L3": dict(es=0.30, psoas=0.125, ql=0.045, rectus=0.09, wall=0.44, vb_w=23.0, vb_d=16.5,
               tp=1.0, kidney=0.8, kidney_p=0.75, hilum_p=0.2, liver=0.25, spleen_p=0.06,
               stomach_p=0.0, pancreas_p=0.0, gallbladder_p=0.05, duodenum_p=0.5, ribs=0.2,
               latissimus_p=0.45, cavity=1.0, iliac_p=0.0, sma_p=0.7,
               dia=0.0, crus=0.0, lung=0.0, rib_arc=(0.3, 0.85)),
    "L4": dict(es=0.27, psoas=0.18, ql=0.05, rectus=0.08, wall=0.42, vb_w=24.0, vb_d=17.0,
               tp=0.85, kidney=0.35, kidney_p=0.2, hilum_p=0.0, liver=0.0, spleen_p=0.0,
               stomach_p=0.0, pancreas_p=0.0, gallbladder_p=0.0, duodenum_p=0.15, ribs=0.0,
               latissimus_p=0.1, cavity=0.95, iliac_p=0.6, sma_p=0.3,
               dia=0.0, crus=0.0, lung=0.0, rib_arc=(0.3, 0.85)),
}


#: Calibrated ratio planned / drawn muscle area (bone overlap, envelope clipping, IMAT).
_MUSCLE_GAIN = 1.0 / 0.90

# --------------------------------------------------------------------------- result type


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
        """The slice as a canonical 2D :class:`~sarco_app.ingest.CTImage` (world origin at the
        image centre, z = the table position of the slice)."""
        sx, sy = self.spacing
        nx, ny = self.hu.shape
        origin = ((nx - 1) / 2 * sx, (ny - 1) / 2 * sy, float(self.params.get("z_mm", 0.0)))
        meta = {"format": "phantom", "modality": "CT", "phantom": dict(self.params)}
        return make_image(self.hu, (sx, sy), self.patient, origin=origin, meta=meta)


# --------------------------------------------------------------------------- small helpers


class _Canvas:
    """Pixel grid of the slice and the rigid map between patient mm and pixels.

    Picture arrays are indexed ``[row, col]``: rows run toward posterior (scanner Y), columns
    toward the patient's left (scanner X). Patient coordinates ``(u, v)`` are scanner
    coordinates rotated by ``angle`` about, and shifted by, the body centre ``shift``.
    """

    def __init__(self, size: int, spacing: tuple[float, float], angle: float, shift: tuple[float, float]):
        self.size = size
        self.sx, self.sy = spacing
        self.angle = angle
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.shift = shift
        self.centre = (size - 1) / 2.0
        x = ((np.arange(size) - self.centre) * self.sx).astype(np.float32)
        y = ((np.arange(size) - self.centre) * self.sy).astype(np.float32)
        self.X, self.Y = np.meshgrid(x, y)  # scanner mm, [row, col]
        dx, dy = self.X - shift[0], self.Y - shift[1]
        self.U = self.cos * dx + self.sin * dy
        self.V = -self.sin * dx + self.cos * dy
        self.pixel_mm2 = self.sx * self.sy

    def to_pixels(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) patient (u, v) mm -> (N, 2) pixel (col, row) floats."""
        u, v = pts[:, 0], pts[:, 1]
        x = self.cos * u - self.sin * v + self.shift[0]
        y = self.sin * u + self.cos * v + self.shift[1]
        return np.stack([x / self.sx + self.centre, y / self.sy + self.centre], axis=1)

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        px = np.clip(self.to_pixels(np.asarray(pts, dtype=float)), -4 * self.size, 5 * self.size)
        return np.round(px * 16).astype(np.int32)  # cv2 sub-pixel vertices (shift=4)

    def poly(self, pts: np.ndarray) -> np.ndarray:
        """Boolean mask of the filled polygon ``pts`` (patient mm)."""
        mask = np.zeros((self.size, self.size), np.uint8)
        cv2.fillPoly(mask, [self._fixed(pts)], 1, lineType=cv2.LINE_8, shift=4)
        return mask.view(bool)

    def line(self, pts: np.ndarray, width_mm: float, closed: bool = False) -> np.ndarray:
        """Boolean mask of a polyline of about ``width_mm`` (at least one pixel)."""
        mask = np.zeros((self.size, self.size), np.uint8)
        thickness = max(1, int(round(width_mm / min(self.sx, self.sy))))
        cv2.polylines(mask, [self._fixed(pts)], closed, 1, thickness=thickness,
                      lineType=cv2.LINE_8, shift=4)
        return mask.view(bool)

    def distance_inside(self, mask: np.ndarray) -> np.ndarray:
        """Euclidean distance (mm) of each pixel of ``mask`` to the nearest pixel outside."""
        if abs(self.sx - self.sy) < 1e-6:
            return cv2.distanceTransform(mask.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * self.sx
        return ndi.distance_transform_edt(mask, sampling=(self.sy, self.sx)).astype(np.float32)

    def nearest_outside(self, mask: np.ndarray) -> np.ndarray:
        """Flat index of the (approximately) nearest pixel outside ``mask`` for every pixel."""
        src = mask.view(np.uint8)
        if abs(self.sx - self.sy) < 1e-6:
            _, lab = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
            # With DIST_LABEL_PIXEL the zero pixels are labelled 1, 2, ... in row-major order.
            zeros = np.flatnonzero(src.ravel() == 0)
            if zeros.size == 0:
                return np.arange(src.size).reshape(src.shape)
            return zeros[np.clip(lab - 1, 0, zeros.size - 1)]
        _, (iy, ix) = ndi.distance_transform_edt(mask, sampling=(self.sy, self.sx), return_indices=True)
        return iy * self.size + ix


def _blob(rng: np.random.Generator, centre, ra: float, rb: float, angle: float = 0.0,
          wobble: float = 0.06, n: int = 72, modes: int = 5) -> np.ndarray:
    """Closed polygon (n, 2) mm: an ellipse with half axes ``ra``, ``rb`` rotated by ``angle``
    (rad, from +u toward +v) whose radius is perturbed by a few random Fourier modes."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, modes + 2):
        r += wobble * rng.normal() / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    u, v = ra * np.cos(t) * r, rb * np.sin(t) * r
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * u - s * v + centre[0], s * u + c * v + centre[1]], axis=1)


def _smooth_field(rng: np.random.Generator, size: int, corr_px: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length about ``corr_px``."""
    m = int(np.clip(round(size / max(corr_px, 1.0)), 3, size))
    low = rng.standard_normal((m, m)).astype(np.float32)
    field_ = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _profile(rng: np.random.Generator, x: np.ndarray, amp: float, kmax: int = 5, period: float = 2 * np.pi) -> np.ndarray:
    """Smooth random periodic function of ``x`` (1 + small Fourier terms, relative ``amp``)."""
    out = np.ones_like(x, dtype=float)
    for k in range(1, kmax + 1):
        out += amp * rng.normal() / k * np.cos(2 * np.pi * k * x / period + rng.uniform(0, 2 * np.pi))
    return out


def _ramp(x: np.ndarray, start: float, length: float) -> np.ndarray:
    """0 before ``start``, smooth rise to 1 over ``length``."""
    t = np.clip((x - start) / max(length, 1e-3), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _half_superellipse_area(n: float) -> float:
    """Area of half a unit superellipse |x|^n + |y|^n <= 1."""
    return 2 * math.gamma(1 + 1 / n) ** 2 / math.gamma(1 + 2 / n)


# --------------------------------------------------------------------------- generation


def _check_inputs(seed, size, level, spacing_mm):
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
    seed, size, level, spacing = _check_inputs(seed, size, level, spacing_mm)
    if sex is not None and sex not in ("M", "F"):
        from sarco_app.ingest import normalise_sex

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
    gain = _MUSCLE_GAIN
    for _attempt in range(3):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x53A2C0]))
        builder = _Builder(rng, seed, size, level, spacing, sex, age, height_cm, weight_kg,
                           sarcopenic, muscle_hu, gain)
        result = builder.build()
        p = result.params
        cut = smi_cutoff(p["sex"], p["bmi"])
        if p["truncated"] or (p["smi"] < cut) == p["sarcopenic"]:
            break  # (a body cut by the field of view cannot show the patient's muscle index)
        gain *= p["smi_target"] / max(p["smi"], 1e-3)
    return result


class _Builder:
    """Draws the random anatomy of one phantom and renders it (see :func:`generate`)."""

    def __init__(self, rng, seed, size, level, spacing, sex, age, height_cm, weight_kg,
                 sarcopenic, muscle_hu, gain=1.0):
        self.rng = rng
        # The upper-abdomen structures (diaphragm, crura, lung bases, intercostal muscles) draw
        # from their own stream, so adding them left the lumbar phantoms' random stream as it was.
        self.rng_upper = np.random.default_rng([int(seed), 0x7112])
        self.gain = gain
        self.seed = seed
        self.size = size
        self.level = level
        self.lv = _LEVEL_ANATOMY[level]
        self.req_spacing = spacing
        self.params: dict[str, Any] = {"seed": seed, "level": level, "size": size}
        self._draw_patient(sex, age, height_cm, weight_kg, sarcopenic, muscle_hu)

    # ------------------------------------------------------------------ patient

    def _draw_patient(self, sex, age, height_cm, weight_kg, sarcopenic, muscle_hu):
        rng = self.rng
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
        self.sex, self.age, self.height_cm, self.weight_kg = sex, age, height_cm, weight_kg
        self.bmi, self.sarcopenic, self.muscle_hu = bmi, sarcopenic, float(muscle_hu)
        self.patient = PatientInfo(sex=sex, age=round(age, 1), height_cm=round(height_cm, 1),
                                   weight_kg=round(weight_kg, 1))
        self.params.update(sex=sex, age=round(age, 1), height_cm=round(height_cm, 1),
                           weight_kg=round(weight_kg, 1), bmi=round(bmi, 2),
                           sarcopenic=sarcopenic, muscle_hu=round(self.muscle_hu, 1))

    # ------------------------------------------------------------------ body plan (mm)

    def _plan(self):
        """Sizes of everything, in mm, before any pixel exists."""
        rng, lv = self.rng, self.lv
        male = self.sex == "M"
        h_m = self.height_cm / 100.0
        # Skeletal muscle index drawn on the right side of the cut-off.
        cut = smi_cutoff(self.sex, self.bmi)
        if self.sarcopenic:
            smi = cut * rng.uniform(0.72, 0.92)
        else:
            smi = cut * rng.uniform(1.06, 1.30) * (1 + 0.004 * max(0.0, self.bmi - 25))
        # Level: the muscles at L1 are fewer than at L3 (psoas), so the index shifts.
        smi_level = smi * {"T11": 0.86, "T12": 0.9, "L1": 0.95, "L2": 0.97, "L3": 1.0, "L4": 1.02}[self.level]
        sma_mm2 = smi_level * h_m * h_m * 100.0  # cm² -> mm²
        # IMAT share grows with age, BMI and low muscle HU (myosteatosis).
        imat_frac = np.clip(0.02 + 0.0008 * (self.age - 40) + 0.002 * (self.bmi - 25)
                            + 0.0015 * max(0.0, 40 - self.muscle_hu), 0.006, 0.15)
        imat_frac *= math.exp(rng.normal(0, 0.3))
        shares = np.array([lv["es"], lv["psoas"], lv["ql"], lv["rectus"], lv["wall"]])
        shares = shares * np.exp(rng.normal(0, 0.12, 5))
        shares /= shares.sum()
        # Muscle drawn includes its IMAT (both lie inside the muscle fascia).
        gross = sma_mm2 * (1 + imat_frac) * self.gain
        es_a, psoas_a, ql_a, rectus_a, wall_a = (gross * s / 2 for s in shares)  # per side
        # Fat amounts (cm²) from BMI, sex and age; log-normal scatter.
        age_f = np.clip(0.55 + 0.013 * (self.age - 30), 0.5, 1.45)
        vat = (11.5 if male else 6.5) * max(self.bmi - 17.5, 1.0) * age_f * math.exp(rng.normal(0, 0.32))
        sat = (12.5 if male else 19.0) * max(self.bmi - 15.5, 0.8) * math.exp(rng.normal(0, 0.22))
        vat, sat = float(np.clip(vat, 8, 650)), float(np.clip(sat, 12, 900))
        self.params.update(smi_target=round(smi, 1), vat_target_cm2=round(vat, 1),
                           sat_target_cm2=round(sat, 1), imat_fraction=round(float(imat_frac), 4))
        self.imat_frac, self.vat_target, self.sat_target = float(imat_frac), vat, sat

        # Spine size with stature and sex.
        k_sp = (self.height_cm / (176 if male else 163)) ** 0.8 * (1.0 if male else 0.92)
        k_sp *= rng.uniform(0.93, 1.07)
        self.vb_w = lv["vb_w"] * k_sp
        self.vb_d = lv["vb_d"] * k_sp * rng.uniform(0.93, 1.07)
        self.k_sp = k_sp
        # Erector spinae (incl. multifidus) per side: rounded box of width w_es, depth h_es.
        aspect = rng.uniform(1.15, 1.55)
        self.h_es = math.sqrt(es_a / (0.86 * aspect))
        self.w_es = aspect * self.h_es
        # Posterior elements: the transverse processes sit about one vertebral half depth +
        # canal behind the body's centre.
        self.canal_hw = rng.uniform(9.5, 12.5) * k_sp
        self.canal_hd = rng.uniform(6.5, 8.5) * k_sp
        self.tp_v_off = self.vb_d + self.canal_hd * 1.1  # from VB centre to TP axis
        self.vb_off = rng.uniform(-6, 14)  # VB centre behind the envelope centre (mm)
        self.b_post = self.vb_off + self.tp_v_off + 4.0 + self.h_es

        self.psoas_a, self.ql_a, self.rectus_a, self.wall_a = psoas_a, ql_a, rectus_a, wall_a

        # Muscle envelope (outer fascia) area: muscles + retroperitoneum + bowel/organs + VAT.
        organs = (175 if male else 150) * h_m * h_m / (1.72 ** 2) * lv["cavity"] * rng.uniform(0.85, 1.15)
        spine = 22.0 * k_sp ** 2
        area_f = (gross / 100.0 + organs + spine + vat) * 100.0  # mm²
        # Shape: lean people are wide and flat, visceral obesity makes the belly round.
        ratio = np.clip(1.62 - 0.018 * (self.bmi - 22) - 0.0012 * (vat - 100) + rng.normal(0, 0.08), 1.12, 1.9)
        self.n_ant = rng.uniform(1.8, 2.4)
        self.n_post = rng.uniform(1.9, 2.7)
        c_ant, c_post = _half_superellipse_area(self.n_ant), _half_superellipse_area(self.n_post)
        # Solve a * (b_ant c_ant + b_post c_post) = area with a = ratio (b_ant + b_post) / 2.
        b_post = self.b_post
        qa = ratio / 2 * c_ant
        qb = ratio / 2 * (b_post * c_ant + b_post * c_post)
        qc = ratio / 2 * b_post * b_post * c_post - area_f
        b_ant = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        if b_ant < 0.85 * b_post:  # tiny cavity: keep a plausible front
            b_ant = 0.85 * b_post
        self.b_ant = b_ant
        self.a_f = ratio * (b_ant + b_post) / 2
        self.params.update(envelope_mm=[round(2 * self.a_f, 1), round(b_ant + b_post, 1)])

    def _envelope_polygon(self, n: int = 720) -> np.ndarray:
        """Outer fascia of the muscle wall and back muscles, from the anterior midline
        (t = -pi/2) round the patient's left, back and right."""
        rng = self.rng
        t = np.linspace(-np.pi / 2, 3 * np.pi / 2, n, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        nn = np.where(s > 0, self.n_post, self.n_ant)
        bb = np.where(s > 0, self.b_post, self.b_ant)
        u = self.a_f * np.sign(c) * np.abs(c) ** (2 / nn)
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

    def _choose_geometry(self, body_half_w: float, body_depth: float):
        """Pixel spacing, rotation and shift (uses the requested spacing when given)."""
        rng = self.rng
        lo, hi = (x * 512 / self.size for x in DEFAULT_SPACING_RANGE)
        hi = float(np.clip(hi, SPACING_LIMITS[0], SPACING_LIMITS[1]))
        lo = float(np.clip(lo, SPACING_LIMITS[0], hi))
        mode = rng.random()
        fit_fov = max(2 * body_half_w, body_depth + 60) * rng.uniform(1.04, 1.32)
        trunc_fov = 2 * body_half_w * rng.uniform(0.8, 0.97)
        random_s = rng.uniform(lo, hi)
        if self.req_spacing is not None:
            spacing, how = self.req_spacing, "given"
        elif mode < 0.72:
            s = float(np.clip(fit_fov / self.size, lo, hi))
            spacing, how = (s, s), "fit"
        elif mode < 0.9:
            s = float(np.clip(trunc_fov / self.size, lo, hi))
            spacing, how = (s, s), "truncating"
        else:
            spacing, how = (random_s, random_s), "random"
        angle = math.radians(float(np.clip(rng.normal(0, 4.0), -10, 10)))
        fov = self.size * spacing[0]
        shift = (rng.uniform(-1, 1) * min(20.0, 0.06 * fov), rng.uniform(-0.08, 0.05) * fov)
        self.params.update(spacing_mm=round(spacing[0], 4), spacing_choice=how,
                           rotation_deg=round(math.degrees(angle), 2),
                           shift_mm=[round(shift[0], 1), round(shift[1], 1)])
        return spacing, angle, shift

    # ------------------------------------------------------------------ build

    def build(self) -> Phantom:
        rng = self.rng
        self._plan()
        self.params["slice_thickness_mm"] = float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
        env = self._envelope_polygon()
        # SAT thickness around the body: thicker at the flanks and back, random modes, pannus.
        self.sat_lat = rng.uniform(0.15, 0.6)
        self.sat_post = rng.uniform(-0.1, 0.45)
        self.sat_ant = rng.uniform(-0.2, 0.35) + (0.25 if self.bmi > 32 and rng.random() < 0.5 else 0.0)
        self.sat_modes = [(rng.normal(0, 0.12) / k, rng.uniform(0, 2 * np.pi)) for k in range(2, 7)]
        perim = float(np.sum(np.hypot(*np.diff(np.vstack([env, env[:1]]), axis=0).T)))
        sat_mm2 = self.sat_target * 100.0
        t_mean = (-perim + math.sqrt(perim * perim + 4 * math.pi * sat_mm2)) / (2 * math.pi)
        self.skin_t = rng.uniform(1.2, 2.6)
        self.t_sat_mean = max(t_mean, self.skin_t + 2.0)
        theta = np.linspace(-np.pi, np.pi, 361)
        self.sat_norm = float(np.mean(self._sat_shape(theta)))
        t_max = float(np.max(self._sat_profile(theta)))
        self.arms = rng.random() < 0.13
        arm_r = rng.uniform(38, 52) * (1 + 0.015 * (self.bmi - 25))
        arm_gap = rng.uniform(-2, 25)
        half_w = float(np.max(np.abs(env[:, 0]))) + t_max
        if self.arms:
            half_w += arm_gap + 2 * arm_r
        depth = self.b_ant + self.b_post + 2 * t_max
        spacing, angle, shift = self._choose_geometry(half_w, depth)
        # Coarse pixels are rendered on a finer grid and averaged (partial volume of thin
        # structures such as skin, fascia and fat planes); labels take the majority class.
        self.out_size = self.size
        self.f = int(min(4, max(1, math.ceil(spacing[0] / 1.1 - 0.05)), max(1, 2048 // self.size)))
        self.size = self.out_size * self.f
        self.params["supersampling"] = self.f
        cv = _Canvas(self.size, (spacing[0] / self.f, spacing[1] / self.f), angle, shift)
        self.cv = cv
        tissue = np.full((self.size, self.size), _T.AIR, dtype=np.uint8)
        self.hu_offset = np.zeros((self.size, self.size), np.float32)  # per-object HU shifts
        self.tissue = tissue

        # Envelope and body.
        env_mask = cv.poly(env)
        self.env_mask = env_mask
        d_out = cv.distance_inside(~env_mask)
        theta_pix = np.arctan2(cv.V, cv.U)
        body = env_mask | (d_out < self._sat_profile(theta_pix))
        self._umbilicus(body)
        # Flatten the back where it lies on the table (scanner vertical).
        rows_env = np.flatnonzero(env_mask.any(axis=1))
        rows_body = np.flatnonzero(body.any(axis=1))
        if rows_body.size and rows_env.size:
            env_bottom = rows_env.max() * cv.sy
            body_bottom = rows_body.max() * cv.sy
            cut = body_bottom - rng.uniform(0, 0.5) * max(0.0, body_bottom - env_bottom - 3 * self.skin_t)
            body &= (np.arange(self.size)[:, None] * cv.sy) <= cut
        tissue[body] = _T.SAT_FAT
        self.body = body
        tissue[env_mask & body] = _T.VAT_FAT

        # Curvilinear coordinates inside the envelope: depth and arc position of the nearest
        # envelope point (mm from the anterior midline, positive toward the patient's left).
        d_in = cv.distance_inside(env_mask)
        near = cv.nearest_outside(env_mask)
        arc = self._arc_position(env, cv.U.ravel()[near], cv.V.ravel()[near])
        self.d_in, self.arc = d_in, arc

        self._spine_layout()
        self._back_muscles(env)
        self._wall(env)
        self._psoas_ql()
        self._spine()
        self._ribs(env)
        self._diaphragm_and_lungs()
        self._vessels()
        self._crura()
        self._organs()
        self._bowel()
        self._small_vessels()
        self._imat()
        self._sat_details()
        skin = body & (cv.distance_inside(body) < self.skin_t)
        tissue[skin] = _T.SKIN
        if self.arms:
            self._arms(arm_r, arm_gap)
        self._table()
        self._fov()
        hu = self._render()
        label = self.label_out
        if self.params["fov_circle"]:
            label[~_circle_mask(self.out_size)] = labels.BACKGROUND  # nothing outside the field
        # The truth is what the clinical protocol measures on this image: the exact compartments,
        # with tissue by HU (a 1-px fat plane blurred into the muscle range is muscle, a muscle
        # border pixel in the fat range IMAT), as an expert thresholding in SliceOmatic gets.
        anatomical = label
        label = labels.apply_hu_ranges(anatomical, hu)
        organs = _block_mode(_ORGAN_OF[tissue], self.f, len(labels.ORGAN_NAMES) + 1)
        organs[label != labels.BACKGROUND] = 0
        if self.params["fov_circle"]:
            organs[~_circle_mask(self.out_size)] = 0
        counts = np.bincount(tissue.ravel(), minlength=len(_TISSUE_NAMES)) * (cv.pixel_mm2 / 100.0)
        self.params["structures_cm2"] = {
            "psoas": round(float(counts[_T.PSOAS]), 2),
            "erector": round(float(counts[_T.ERECTOR]), 2),
            "quadratus": round(float(counts[_T.QUADRATUS]), 2),
            "abdominal_wall": round(float(counts[_T.WALL_MUSCLE] + counts[_T.RECTUS] + counts[_T.LATISSIMUS]), 2),
            "liver": round(float(counts[_T.LIVER]), 2),
            "spleen": round(float(counts[_T.SPLEEN]), 2),
            "kidneys": round(float(counts[_T.KIDNEY_CORTEX] + counts[_T.KIDNEY_MEDULLA]), 2),
            "bowel": round(float(sum(counts[t] for t in _BOWEL)), 2),
            "bone": round(float(counts[_T.BONE_CORTEX] + counts[_T.BONE_MARROW]), 2),
        }
        areas = {name: float((label == value).sum() * spacing[0] * spacing[1] / 100.0)
                 for name, value in labels.LABELS.items()}
        smi = areas["muscle"] / (self.height_cm / 100.0) ** 2
        self.params.update(smi=round(smi, 2), z_mm=float({"T11": -50.0, "T12": -85.0, "L1": -120.0, "L2": -155.0, "L3": -190.0, "L4": -225.0}[self.level]))
        return Phantom(hu=np.ascontiguousarray(hu.T), label=np.ascontiguousarray(label.T),
                       spacing=(float(spacing[0]), float(spacing[1])), patient=self.patient,
                       params=self.params, anatomical_label=np.ascontiguousarray(anatomical.T),
                       organ_label=np.ascontiguousarray(organs.T))

    # ------------------------------------------------------------------ SAT

    def _sat_shape(self, theta):
        s, c = np.sin(theta), np.cos(theta)
        prof = 1 + self.sat_lat * c * c + self.sat_post * np.clip(s, 0, None) ** 2 \
            + self.sat_ant * np.clip(-s, 0, None) ** 3
        for k, (amp, ph) in enumerate(self.sat_modes, start=2):
            prof = prof + amp * np.cos(k * theta + ph)
        return np.clip(prof, 0.25, None)

    def _sat_profile(self, theta):
        """SAT thickness (mm) at polar angle ``theta`` around the envelope centre."""
        t = self.t_sat_mean * self._sat_shape(theta) / self.sat_norm
        return np.maximum(t, self.skin_t + 1.5)

    def _umbilicus(self, body):
        """Navel at L3/L4: a narrow air-filled pit through the anterior SAT."""
        rng = self.rng
        if self.level not in ("L3", "L4") or rng.random() > 0.3:
            return
        t_front = float(self._sat_profile(np.array([-np.pi / 2]))[0])
        depth = min(t_front * rng.uniform(0.15, 0.6), 25.0)
        width = rng.uniform(8, 20)
        bottom = width * rng.uniform(0.25, 0.5)
        front = -(self.b_ant + t_front) - 6
        # A funnel with a rounded floor and flared rim.
        t = np.linspace(0, np.pi, 12)
        floor = np.stack([bottom / 2 * np.cos(t), front + 6 + depth + bottom * 0.4 * np.sin(t)], axis=1)
        rim = front + 6 + depth * 0.25
        pts = np.vstack([[[-width, front], [-width / 2, rim]], floor[::-1], [[width / 2, rim], [width, front]]])
        pts[:, 0] += rng.uniform(-6, 6)
        body &= ~self.cv.poly(pts)

    def _sat_details(self):
        """Fibrous septa and Scarpa's fascia inside the SAT. They are thinner than a pixel in
        reality and belong to the SAT compartment (label SAT); they only raise the HU a little."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        sat = tissue == _T.SAT_FAT
        lines = np.zeros_like(sat)
        n_septa = int(rng.integers(2, 10) + 0.3 * self.t_sat_mean)
        for _ in range(n_septa):
            th0 = rng.uniform(-np.pi, np.pi)
            span = rng.uniform(15, 70) / max(self.a_f, 50)
            th = th0 + np.linspace(0, span, 12)
            frac = np.clip(rng.uniform(0.1, 0.9) + np.linspace(0, rng.normal(0, 0.25), 12), 0.03, 0.97)
            pts = self._polar_offset(th, frac)
            lines |= cv.line(pts, 0.5)
        # Scarpa's fascia: a long, broken line in the anterior and lateral SAT.
        if self.t_sat_mean > 12 and rng.random() < 0.7:
            frac0 = rng.uniform(0.3, 0.55)
            for _ in range(int(rng.integers(2, 5))):
                th0 = rng.uniform(-np.pi * 0.95, -np.pi * 0.05)
                th = th0 + np.linspace(0, rng.uniform(0.3, 0.9), 30)
                frac = np.clip(frac0 + np.cumsum(rng.normal(0, 0.01, 30)), 0.1, 0.9)
                lines |= cv.line(self._polar_offset(th, frac), 0.6)
        tissue[lines & sat] = _T.SAT_SEPTUM

    def _polar_offset(self, theta, frac):
        """Points at fraction ``frac`` of the SAT depth at polar angles ``theta`` (approx.)."""
        u_e, v_e = self.env_polar(theta)
        r_e = np.hypot(u_e, v_e)
        r = r_e + frac * self._sat_profile(theta)
        return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)

    def env_polar(self, theta):
        """Envelope point at polar angle ``theta`` (interpolated on the polygon)."""
        ang = np.unwrap(np.arctan2(self._env[:, 1], self._env[:, 0]))
        rad = np.hypot(self._env[:, 0], self._env[:, 1])
        th = (np.asarray(theta) - ang[0]) % (2 * np.pi) + ang[0]
        r = np.interp(th, np.append(ang, ang[0] + 2 * np.pi), np.append(rad, rad[0]))
        return r * np.cos(theta), r * np.sin(theta)

    # ------------------------------------------------------------------ envelope coordinates

    def _arc_position(self, env, u, v):
        """Signed arc length (mm) along the envelope from the anterior midline of the envelope
        point nearest to the polar angle of (u, v); positive on the patient's left."""
        self._env = env
        seg = np.hypot(*np.diff(np.vstack([env, env[:1]]), axis=0).T)
        s = np.concatenate([[0.0], np.cumsum(seg)])  # len n+1, s[-1] = perimeter
        self.perimeter = float(s[-1])
        ang = np.unwrap(np.arctan2(env[:, 1], env[:, 0]))
        ang = np.append(ang, ang[0] + 2 * np.pi)
        th = (np.arctan2(v, u) - ang[0]) % (2 * np.pi) + ang[0]
        arc = np.interp(th, ang, s)
        half = self.perimeter / 2
        self._arc_table = (ang, s)
        return np.where(arc <= half, arc, arc - self.perimeter).astype(np.float32)

    def _env_point_at_arc(self, arc_signed):
        """Envelope point (u, v) and inward unit normal at a signed arc position."""
        _, s = self._arc_table
        env = self._env
        a = arc_signed % self.perimeter
        idx = int(np.clip(np.searchsorted(s, a), 1, len(env) - 1))
        p = env[idx % len(env)]
        tangent = env[(idx + 1) % len(env)] - env[(idx - 1) % len(env)]
        tangent = tangent / (np.linalg.norm(tangent) + 1e-9)
        normal = np.array([-tangent[1], tangent[0]])  # polygon runs counter-clockwise in (u, v)
        if normal @ (-p) < 0:
            normal = -normal
        return p, normal

    def _arc_of_point(self, u, v):
        return float(self._arc_position(self._env, np.array([u]), np.array([v]))[0])

    # ------------------------------------------------------------------ spine and back

    def _spine_layout(self):
        rng = self.rng
        self.vb_c = np.array([rng.normal(0, 2.0), self.vb_off])
        self.spine_angle = float(np.clip(rng.normal(0, 0.04), -0.1, 0.1))  # rad
        self.tp_v = self.vb_c[1] + self.tp_v_off
        self.ped_w = rng.uniform(7.0, 9.5) * self.k_sp
        self.tp_len = rng.uniform(0.8, 1.15) * 30.0 * self.k_sp * self.lv["tp"]
        self.tp_root = self.canal_hw + self.ped_w * 0.6
        self.sp_half = rng.uniform(3.8, 5.8) * self.k_sp
        self.conc = rng.uniform(0.12, 0.25)
        self.canal_c_v = self.vb_c[1] + self.vb_d * (1 - self.conc * 0.8) + self.canal_hd * 0.95

    def _back_muscles(self, env):
        """Erector spinae + multifidus: rounded boxes behind the transverse processes, clipped by
        the envelope so their back surface is its fascia."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        inside = self.env_mask & self.body
        self.es_lat = {}
        for side in (-1, 1):
            w, h = self.w_es * rng.uniform(0.94, 1.06), self.h_es
            x0 = self.vb_c[0]
            top = self.tp_v + rng.uniform(3.0, 5.0)
            x_lat = self.sp_half * 0.3 + w
            rx = w * rng.uniform(0.35, 0.5)
            ry = (self.b_post + 20 - top) / 2
            t = np.linspace(-np.pi / 2, np.pi * 0.42, 14)
            lateral = np.stack([x_lat - rx + rx * np.cos(t), top + ry + ry * np.sin(t)], axis=1)
            lam_v = self.canal_c_v + self.canal_hd + 6
            pts = np.vstack([[[0.0, lam_v], [self.tp_root, top]], lateral,
                             [[x_lat - rx * 1.1, self.b_post + 25], [0.0, self.b_post + 25]]])
            pts[:, 0] = x0 + side * pts[:, 0]
            pts = pts + rng.normal(0, 0.8, pts.shape)
            mask = cv.poly(pts) & inside
            tissue[mask] = _T.ERECTOR
            self.es_lat[side] = x0 + side * x_lat
            # Fat plane between multifidus and longissimus (IMAT).
            if rng.random() < 0.85:
                mu = self.tp_root * rng.uniform(0.8, 1.1) + w * rng.uniform(0.05, 0.2)
                pts = np.array([[mu, top + 1], [mu + rng.uniform(-4, 4), top + h * 0.5],
                                [mu + rng.uniform(-8, 2), self.b_post + 10]])
                pts[:, 0] = x0 + side * pts[:, 0]
                plane = cv.line(_smooth_polyline(pts, 20), rng.uniform(0.5, 1.3)) & mask
                tissue[plane] = _T.IMAT_FAT
        # Interspinous ligament / supraspinous fascia at the midline behind the spinous process.
        mid = np.array([[self.vb_c[0], self.tp_v], [self.vb_c[0], self.b_post + 20]])
        tissue[cv.line(mid, rng.uniform(1.0, 2.5)) & inside & (tissue == _T.ERECTOR)] = _T.FASCIA

    def _wall(self, env):
        """Rectus pair and the three lateral layers as bands under the envelope, in
        (arc position, depth) coordinates; thin fat planes (IMAT) between layers."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        d, arc = self.d_in, self.arc
        half = self.perimeter / 2
        grid = np.linspace(0, half, 800)
        male = self.sex == "M"
        la = rng.uniform(2.5, 7.0)
        if rng.random() < 0.12 + 0.01 * max(0.0, self.bmi - 28):
            la += rng.uniform(6, 25)  # diastasis recti
        self.params["linea_alba_mm"] = round(2 * la, 1)
        zone = self.env_mask & (tissue == _T.VAT_FAT)
        for side in (-1, 1):
            sel = zone & ((arc > 0) if side > 0 else (arc <= 0))
            a = np.abs(arc[sel])
            dd = d[sel]
            # Posterior end of the lateral wall: where the erector spinae meet the envelope.
            end = abs(self._arc_of_point(self.es_lat[side], self.b_post * 0.6))
            end = min(end, half - 20)
            w_r = rng.uniform(55, 80) * (1.0 if male else 0.9) * (self.height_cm / 170) ** 0.5
            t_r = self.rectus_a / (0.72 * w_r)
            rect = t_r * np.clip(np.sin(np.pi * np.clip((grid - la) / w_r, 0, 1)), 0, None) ** 0.55
            rect *= _profile(rng, grid, 0.05, 3, half)
            start = la + w_r * rng.uniform(0.72, 1.0)
            length = max(end - start, 40.0)
            # Layer thickness profiles (external oblique ends before the others).
            eo_end = end - rng.uniform(10, 55)
            shapes = {
                "eo": _ramp(grid, start, rng.uniform(15, 35)) * (1 - _ramp(grid, eo_end - 30, 30)),
                "io": _ramp(grid, start + rng.uniform(0, 10), rng.uniform(15, 35))
                * (1 - _ramp(grid, end - rng.uniform(10, 35), 25)),
                "ta": _ramp(grid, la + w_r * rng.uniform(0.55, 0.9), rng.uniform(15, 30))
                * (1 - _ramp(grid, end - rng.uniform(0, 15), 20)),
            }
            rel = {"eo": rng.uniform(0.8, 1.2), "io": rng.uniform(0.9, 1.4), "ta": rng.uniform(0.45, 0.8)}
            # Scale so the band area matches the planned wall area (integral over arc).
            step = grid[1] - grid[0]
            unit = sum(rel[k] * shapes[k] for k in shapes).sum() * step
            scale = self.wall_a / max(unit, 1.0) * (1 + 0.05 * (length < 120))
            thick = {k: rel[k] * shapes[k] * scale * _profile(rng, grid, 0.08, 4, half) for k in shapes}
            if self.lv["latissimus_p"] > rng.random():
                ld = (_ramp(grid, end - rng.uniform(60, 110), 25) * (1 - _ramp(grid, end + 15, 20))
                      * rng.uniform(1.5, 6.0) * (1.6 if self.level in ("T11", "T12", "L1") else 1.0))
            else:
                ld = np.zeros_like(grid)
            gap_w = rng.uniform(0.3, 1.4)
            layers = [("ld", ld, _T.LATISSIMUS), ("eo", thick["eo"], _T.WALL_MUSCLE),
                      ("rectus", rect, _T.RECTUS), ("io", thick["io"], _T.WALL_MUSCLE),
                      ("ta", thick["ta"], _T.WALL_MUSCLE)]
            tt = [np.interp(a, grid, th) for _, th, _ in layers]
            out = np.full(a.shape, _T.VAT_FAT, dtype=np.uint8)
            top = np.zeros_like(a)
            for k, (name, _, tid) in enumerate(layers):
                thick_k = tt[k]
                present = thick_k > 0.4
                inlayer = present & (dd >= top) & (dd < top + thick_k)
                out[inlayer] = tid
                top = top + np.where(present, thick_k, 0.0)
                deeper = sum(tt[j] for j in range(k + 1, len(layers)))
                gap = present & (deeper > 0.4)
                # Fat planes come and go along the wall.
                onoff = np.clip((_profile(rng, grid, 1.2, 4, half) - 0.8) * 3, 0, 1)
                g = gap_w * np.interp(a, grid, onoff)
                ingap = gap & (dd >= top) & (dd < top + g)
                out[ingap] = _T.IMAT_FAT
                top = top + np.where(gap, g, 0.0)
            # Linea alba: fibrous band between the recti.
            out[(a < la) & (dd < rng.uniform(1.5, 3.5))] = _T.FASCIA
            cur = tissue[sel]
            keep = cur != _T.VAT_FAT
            out[keep] = cur[keep]
            tissue[sel] = out
        self.params["rectus_width_mm"] = round(w_r, 1)
        # Transversalis / thoracolumbar fascia: wherever no muscle lines the envelope, a thin
        # fibrous layer still separates the subcutaneous from the visceral compartment.
        ring = self.env_mask & (d <= 1.5 * max(cv.sx, cv.sy)) & (tissue == _T.VAT_FAT)
        tissue[ring] = _T.FASCIA

    def _psoas_ql(self):
        rng, cv, tissue = self.rng, self.cv, self.tissue
        inside = self.env_mask & self.body
        self.psoas_lat, self.kidney_anchor = {}, {}
        for side in (-1, 1):
            area = self.psoas_a * rng.uniform(0.9, 1.1)
            asp = rng.uniform(1.05, 1.5)
            rb = math.sqrt(area / (math.pi * asp))
            ra = asp * rb
            ang = side * rng.uniform(0.4, 1.1)
            centre = (self.vb_c[0] + side * (self.vb_w * 0.85 + ra * 0.55),
                      self.vb_c[1] - self.vb_d * rng.uniform(-0.1, 0.45))
            if self.level == "L4":
                centre = (centre[0] + side * rng.uniform(2, 8), centre[1] - rng.uniform(0, 8))
            poly = _blob(rng, centre, ra, rb, ang, wobble=0.07)
            m = cv.poly(poly) & inside & np.isin(tissue, (_T.VAT_FAT, _T.IMAT_FAT))
            tissue[m] = _T.PSOAS
            self.psoas_lat[side] = abs(centre[0]) + ra * 0.9
            # Quadratus lumborum: oval lateral to the psoas at the transverse process tip, in
            # front of the erector spinae, its lateral end turned forward.
            area = self.ql_a * rng.uniform(0.85, 1.15)
            asp = rng.uniform(1.6, 2.6)
            rb = math.sqrt(area / (math.pi * asp))
            ra = asp * rb
            ang_q = -side * rng.uniform(0.1, 0.5)
            tip = self.vb_c[0] + side * (self.tp_root + self.tp_len)
            centre_q = (tip + side * ra * rng.uniform(0.1, 0.5),
                        self.tp_v + 4 - rb * rng.uniform(0.8, 1.0))
            poly = _blob(rng, centre_q, ra, rb, ang_q, wobble=0.05)
            m = cv.poly(poly) & inside & np.isin(tissue, (_T.VAT_FAT, _T.IMAT_FAT))
            tissue[m] = _T.QUADRATUS
            self.kidney_anchor[side] = (centre_q[0], centre_q[1] - rb)

    def _spine(self):
        """Vertebra: body with cortical shell, canal with thecal sac, posterior elements."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        cx, cy = self.vb_c
        # Slight axial rotation of the whole vertebra (scoliosis, positioning).
        c_rot, s_rot = math.cos(self.spine_angle), math.sin(self.spine_angle)

        def rotate(pts):
            d = np.asarray(pts, dtype=float) - (cx, cy)
            return np.stack([c_rot * d[:, 0] - s_rot * d[:, 1] + cx,
                             s_rot * d[:, 0] + c_rot * d[:, 1] + cy], axis=1)

        w, dpt = self.vb_w, self.vb_d
        t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        ct, st = np.cos(t), np.sin(t)
        # Kidney-bean body: posterior border pushed forward in the middle.
        conc = self.conc
        pu = w * ct
        pv = dpt * st * (1 - conc * np.exp(-(ct ** 2) / 0.08) * (st > 0))
        # Osteophytes at the front corners in older patients.
        if self.age > 55 and rng.random() < 0.03 * (self.age - 50):
            bump = rng.uniform(1.5, 4)
            r_ost = 1 + bump / w * np.exp(-((t - 1.25 * np.pi) ** 2) / 0.02) + bump / w * np.exp(-((t - 1.75 * np.pi) ** 2) / 0.02)
            pu, pv = pu * r_ost, pv * r_ost
        body_poly = np.stack([pu + cx, pv + cy], axis=1)
        body_mask = cv.poly(body_poly)  # (a rotated oval barely changes: not rotated)
        canal_c = (cx, self.canal_c_v)
        canal = _blob(rng, canal_c, self.canal_hw, self.canal_hd, 0.0, wobble=0.03)
        canal[:, 1] = np.where(canal[:, 1] < canal_c[1], canal_c[1] - (canal_c[1] - canal[:, 1]) * 0.8, canal[:, 1])
        canal_mask = cv.poly(rotate(canal))
        back = canal_c[1] + self.canal_hd
        ped_front = cy + dpt * 0.45
        elements = []
        for side in (-1, 1):
            x_in, x_out = cx + side * (self.canal_hw - 1.5), cx + side * (self.canal_hw + self.ped_w)
            elements.append(np.array([[x_in, ped_front], [x_out, ped_front],
                                      [x_out, back + 1], [x_in, back + 1]]))  # pedicle
            lam_t = rng.uniform(6.0, 9.0)
            elements.append(np.array([[x_out, back - lam_t], [x_out, back + 2],
                                      [cx + side * self.sp_half, back + 5 + lam_t],
                                      [cx + side * self.sp_half, back + 4]]))  # lamina
            # Transverse process: tapering, tilted slightly backward, round tip.
            if self.tp_len > 3:
                root = cx + side * self.tp_root
                tip = root + side * self.tp_len
                tilt = rng.uniform(-1, 7)
                tw = rng.uniform(7, 10) * self.k_sp
                tip_w = tw * rng.uniform(0.45, 0.7)
                elements.append(np.array([[root - side * 2, self.tp_v - tw / 2], [tip, self.tp_v + tilt - tip_w / 2],
                                          [tip + side * tip_w * 0.4, self.tp_v + tilt],
                                          [tip, self.tp_v + tilt + tip_w / 2], [root - side * 2, self.tp_v + tw / 2]]))
            # Articular processes.
            elements.append(_blob(rng, (cx + side * (self.canal_hw + self.ped_w * 0.55), back + rng.uniform(1, 5)),
                                  rng.uniform(5, 7.5), rng.uniform(6, 9), side * 0.5, wobble=0.08))
        # Spinous process to just under the back fascia.
        sp_end = self.b_post - rng.uniform(3, 14)
        sp_end = max(sp_end, back + 15)
        sp = np.array([[cx - self.sp_half, back + 3], [cx + self.sp_half, back + 3],
                       [cx + self.sp_half * 0.8, sp_end - 4], [cx + self.sp_half * 1.25, sp_end],
                       [cx - self.sp_half * 1.25, sp_end], [cx - self.sp_half * 0.8, sp_end - 4]])
        elements.append(sp)
        post = np.zeros_like(body_mask)
        for poly in elements:
            post |= cv.poly(rotate(poly))
        post &= ~canal_mask
        # Epidural fat and thecal sac.
        tissue[canal_mask] = _T.EPIDURAL_FAT
        sac = _blob(rng, (canal_c[0], canal_c[1] + rng.uniform(-1, 1)), self.canal_hw * rng.uniform(0.55, 0.75),
                    self.canal_hd * rng.uniform(0.65, 0.85), 0.0, wobble=0.03)
        tissue[cv.poly(rotate(sac)) & canal_mask] = _T.CSF
        bone = body_mask | post
        px = min(cv.sx, cv.sy)
        k_cort = max(1, int(round(rng.uniform(0.9, 1.6) / px)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k_cort + 1, 2 * k_cort + 1))
        inner_body = cv2.erode(body_mask.view(np.uint8), kernel).view(bool)
        k_post = max(1, int(round(rng.uniform(0.9, 1.6) / px)))
        kernel_p = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k_post + 1, 2 * k_post + 1))
        inner_post = cv2.erode(post.view(np.uint8), kernel_p).view(bool)
        tissue[bone] = _T.BONE_CORTEX
        tissue[inner_body | inner_post] = _T.BONE_MARROW
        # Basivertebral vein notch at the back of the body.
        notch = _blob(rng, (cx, cy + dpt * (1 - conc) - 1.5), rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.5))
        tissue[cv.poly(notch) & body_mask] = _T.VEIN
        self.spine_mask = bone | canal_mask
        self.canal_c = canal_c

    def _ribs(self, env):
        """Rib cross-sections in the lateral wall at L1-L2 (sometimes the 12th rib tip at L3)."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        n_ribs = self.lv["ribs"]
        if n_ribs <= 0:
            return
        half = self.perimeter / 2
        for side in (-1, 1):
            count = rng.poisson(n_ribs)
            for _ in range(int(min(count, 6))):
                arc = side * rng.uniform(*self.lv["rib_arc"]) * half
                p, normal = self._env_point_at_arc(arc)
                depth = rng.uniform(4, 14)
                centre = p + normal * depth
                ra, rb = rng.uniform(5, 8), rng.uniform(2.5, 4.5)
                ang = math.atan2(normal[1], normal[0]) + np.pi / 2 + rng.normal(0, 0.3)
                outer = cv.poly(_blob(rng, centre, ra, rb, ang, wobble=0.04))
                inner = cv.poly(_blob(rng, centre, ra - 1.6, max(rb - 1.6, 0.6), ang, wobble=0.02))
                where = self.env_mask & np.isin(tissue, _MUSCLES + (_T.VAT_FAT, _T.IMAT_FAT))
                cartilage = arc * side < 0.4 * half and rng.random() < 0.6
                tissue[outer & where] = _T.CARTILAGE if cartilage else _T.BONE_CORTEX
                tissue[inner & where] = _T.CARTILAGE if cartilage else _T.BONE_MARROW
        if n_ribs >= 3:
            self._intercostals()

    def _intercostals(self):
        """Intercostal muscles at T11-T12: a muscle band at the ribs' depth joining them along
        the lateral and posterior wall (skeletal muscle of the trunk, label muscle)."""
        rng, tissue = self.rng_upper, self.tissue
        ribs = np.isin(tissue, (_T.BONE_CORTEX, _T.BONE_MARROW, _T.CARTILAGE)) & self.env_mask & (self.d_in < 30)
        if not ribs.any():
            return
        depth = self.d_in[ribs]
        lo, hi = np.percentile(depth, 15), np.percentile(depth, 85)
        a = np.abs(self.arc[ribs])
        half = self.perimeter / 2
        band = (self.env_mask & (tissue == _T.VAT_FAT) & (self.d_in >= lo - rng.uniform(0.5, 2.5))
                & (self.d_in <= hi + rng.uniform(0.5, 2.5)) & (np.abs(self.arc) >= a.min() - 10)
                & (np.abs(self.arc) <= min(a.max() + 10, half - 15)))
        tissue[band] = _T.WALL_MUSCLE

    def _diaphragm_and_lungs(self):
        """Upper abdomen (T11-L2): lung bases (posterior costophrenic recesses) inside the ribs,
        then the diaphragm, a 2-7 mm muscle-dense band that is not trunk muscle (label
        background), lining the wall and back muscles from inside over the lateral and posterior
        arc; the liver and spleen drawn next lie against it."""
        lv, cv, tissue = self.lv, self.cv, self.tissue
        rng = self.rng_upper
        self.params["diaphragm"] = bool(rng.random() < lv["dia"])
        if not self.params["diaphragm"]:
            return
        half = self.perimeter / 2
        a = np.abs(self.arc)
        near_wall = self.d_in < rng.uniform(35, 60)
        if rng.random() < lv["lung"]:
            free = self._free()
            dist = cv.distance_inside(free)
            reach = rng.uniform(0.45, 0.7) * half  # arc beyond which the recess lies
            depth = rng.uniform(4, 22) * np.clip((a - reach) / 40.0, 0, 1)
            lung = free & near_wall & (dist < depth)
            tissue[lung] = _T.LUNG
            self.params["lung_cm2"] = round(float(lung.sum() * cv.pixel_mm2 / 100.0), 2)
        free = self._free()
        dist = cv.distance_inside(free)
        gap = 0.0 if rng.random() < 0.6 else rng.uniform(1.0, 4.0)  # extraperitoneal fat
        thick = rng.uniform(2.0, 7.0)
        start = {"T11": 0.05, "T12": 0.15, "L1": 0.4, "L2": 0.6}.get(self.level, 0.7) * half
        start *= rng.uniform(0.8, 1.2)
        band = free & near_wall & (dist >= gap) & (dist < gap + thick) & (a > start)
        tissue[band] = _T.DIAPHRAGM

    def _crura(self):
        """Diaphragm crura: muscle-dense bands (label background) from the front of the
        vertebral body up around the aorta, the right one longer (T11-L2)."""
        rng, cv, tissue = self.rng_upper, self.cv, self.tissue
        if rng.random() >= self.lv["crus"]:
            return
        cx, cy = self.vb_c
        ax, ay = self.aorta_c
        for side in (-1, 1):
            width = rng.uniform(3.0, 8.0) * (1.25 if side < 0 else 1.0)
            start = (cx + side * self.vb_w * rng.uniform(0.5, 0.85), cy - self.vb_d * rng.uniform(0.2, 0.6))
            mid = (ax + side * (self.r_ao + width * 0.5 + rng.uniform(0.5, 3)), ay + rng.uniform(-3, 3))
            end = (ax + side * rng.uniform(0, 0.6) * self.r_ao,
                   ay - self.r_ao - rng.uniform(3, 15) * (1.5 if side < 0 else 1.0))
            pts = _smooth_polyline(np.array([start, mid, end]), 24)
            tissue[cv.line(pts, width) & self._free()] = _T.DIAPHRAGM

    # ------------------------------------------------------------------ retroperitoneum

    def _free(self):
        return self.tissue == _T.VAT_FAT

    def _vessels(self):
        rng, cv, tissue = self.rng, self.cv, self.tissue
        cx, cy = self.vb_c
        front = cy - self.vb_d
        r_ao = rng.uniform(8, 11.5) * (1 + 0.004 * (self.age - 50)) * (1.08 if self.sex == "M" else 0.95)
        aneurysm = self.level in ("L2", "L3", "L4") and rng.random() < 0.02
        if aneurysm:
            r_ao = rng.uniform(18, 30)
        ao_c = (cx + rng.uniform(0.15, 0.55) * self.vb_w, front - r_ao - rng.uniform(1, 4))
        ivc_c = (cx - rng.uniform(0.45, 0.95) * self.vb_w, front - rng.uniform(5, 11))
        self.aorta_c, self.r_ao = ao_c, r_ao
        iliac = self.level == "L4" and rng.random() < self.lv["iliac_p"]
        free = self._free()
        if iliac:
            for side in (-1, 1):
                c = (cx + side * rng.uniform(9, 16), front - rng.uniform(7, 12))
                tissue[cv.poly(_blob(rng, c, rng.uniform(5, 7), rng.uniform(5, 7))) & free] = _T.ARTERY
                c = (cx + side * rng.uniform(12, 22), front - rng.uniform(1, 5))
                tissue[cv.poly(_blob(rng, c, rng.uniform(7, 10), rng.uniform(5, 7), 0.3 * side)) & free] = _T.VEIN
        else:
            outer = cv.poly(_blob(rng, ao_c, r_ao, r_ao * rng.uniform(0.92, 1.05), wobble=0.02))
            tissue[outer & free] = _T.ARTERY
            if aneurysm:
                lumen = cv.poly(_blob(rng, (ao_c[0] + rng.uniform(-4, 4), ao_c[1] + rng.uniform(-4, 4)),
                                      r_ao * 0.55, r_ao * 0.5))
                tissue[outer & ~lumen & free] = _T.THROMBUS
            # Calcified plaque with age.
            n_calc = rng.poisson(max(0.0, (self.age - 45) / 8))
            for _ in range(int(min(n_calc, 8))):
                ang = rng.uniform(0, 2 * np.pi)
                c = (ao_c[0] + r_ao * 0.95 * math.cos(ang), ao_c[1] + r_ao * 0.95 * math.sin(ang))
                tissue[cv.poly(_blob(rng, c, rng.uniform(0.8, 2.5), rng.uniform(0.5, 1.2), ang + np.pi / 2)) & (free | outer)] = _T.CALCIFICATION
            ivc = cv.poly(_blob(rng, ivc_c, rng.uniform(10, 15), rng.uniform(6, 11), rng.normal(0, 0.2)))
            tissue[ivc & free] = _T.VEIN
        # Superior mesenteric artery and vein in front of the aorta.
        if rng.random() < self.lv["sma_p"]:
            sma = (ao_c[0] + rng.uniform(-6, 2), ao_c[1] - r_ao - rng.uniform(12, 30))
            free = self._free()
            tissue[cv.poly(_blob(rng, sma, rng.uniform(2.5, 4), rng.uniform(2.5, 4))) & free] = _T.ARTERY
            smv = (sma[0] - rng.uniform(8, 14), sma[1] + rng.uniform(-4, 4))
            tissue[cv.poly(_blob(rng, smv, rng.uniform(4, 6.5), rng.uniform(4, 6))) & self._free()] = _T.VEIN
            self.sma = sma
        else:
            self.sma = (ao_c[0], ao_c[1] - r_ao - 20)

    def _organs(self):
        rng, cv, tissue, lv = self.rng, self.cv, self.tissue, self.lv
        cx, cy = self.vb_c
        a_f, b = self.a_f, (self.b_ant + self.b_post) / 2
        contrast = self.contrast = rng.choice(["none", "portal", "arterial"], p=[0.3, 0.55, 0.15])
        self.params["contrast"] = str(contrast)
        self.oral_contrast = bool(rng.random() < 0.25)
        self.params["oral_contrast"] = self.oral_contrast
        # Kidneys: right kidney sits lower, so at L3 it is the likelier one.
        self.kidneys = []
        for side in (-1, 1):
            p = lv["kidney_p"] * (1.0 if side < 0 else 0.85)
            if rng.random() > p:
                continue
            scale = lv["kidney"] * rng.uniform(0.7, 1.05)
            ra, rb = rng.uniform(30, 38) * scale, rng.uniform(19, 25) * max(scale, 0.55)
            ra = max(ra, rb * 1.25)
            ang = -side * rng.uniform(0.35, 0.9)
            anchor = self.kidney_anchor[side]
            centre = (anchor[0] + side * rng.uniform(-2, 12) - side * 0.1 * ra,
                      anchor[1] - rb * rng.uniform(0.55, 0.9))
            centre = (side * max(side * centre[0], self.psoas_lat[side] + ra * 0.55), centre[1])
            outline = _blob(rng, centre, ra, rb, ang, wobble=0.04)
            kid = cv.poly(outline) & self._free()
            if not kid.any():
                continue
            tissue[kid] = _T.KIDNEY_CORTEX
            # Medulla / sinus.
            px = min(cv.sx, cv.sy)
            k = max(1, int(round(rng.uniform(3.5, 6.5) / px)))
            inner = cv2.erode(kid.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))).view(bool)
            tissue[inner] = _T.KIDNEY_MEDULLA
            if rng.random() < lv["hilum_p"] and scale > 0.6:
                # Hilum opens antero-medially: a wedge of sinus fat with the pelvis inside.
                direction = np.array([-side * 0.75, -0.66])
                apex = np.array(centre) + direction * ra * 0.05
                spread = rng.uniform(0.35, 0.6)
                base_ang = math.atan2(direction[1], direction[0])
                pts = [apex]
                for da in np.linspace(-spread, spread, 9):
                    pts.append(apex + 1.4 * ra * np.array([math.cos(base_ang + da), math.sin(base_ang + da)]))
                wedge = cv.poly(np.array(pts)) & cv.poly(_blob(rng, centre, ra * 1.05, rb * 1.05, ang, wobble=0.0))
                tissue[wedge & kid] = _T.VAT_FAT  # renal sinus fat
                pelvis_c = apex + direction * ra * rng.uniform(0.25, 0.45)
                pel = cv.poly(_blob(rng, pelvis_c, rng.uniform(4, 9), rng.uniform(3, 6), base_ang)) & wedge
                tissue[pel] = _T.URINE
                vessel_c = apex + direction * ra * rng.uniform(0.55, 0.8)
                tissue[cv.poly(_blob(rng, vessel_c, rng.uniform(3, 5), rng.uniform(2.5, 4))) & self._free()] = _T.VEIN
            self.kidneys.append(kid)
        # Liver (patient's right), spleen (left), stomach, pancreas, gallbladder, duodenum.
        if lv["liver"] > 0 and rng.random() < (1.0 if lv["liver"] >= 0.5 else 0.5):
            size = lv["liver"] * rng.uniform(0.7, 1.15)
            ra, rb = a_f * 0.6 * size, b * 0.8 * size
            centre = (-(a_f - ra * rng.uniform(0.55, 0.8)), b * rng.uniform(-0.35, 0.25))
            liver = cv.poly(_blob(rng, centre, ra, rb, rng.normal(0, 0.3), wobble=0.08)) & self._free()
            tissue[liver] = _T.LIVER
            self._organ_vessels(liver, 3 + int(9 * size))
            if rng.random() < lv["gallbladder_p"]:
                gc = (centre[0] + ra * rng.uniform(0.3, 0.7), centre[1] - rb * rng.uniform(0.2, 0.6))
                gb = cv.poly(_blob(rng, gc, rng.uniform(12, 22), rng.uniform(10, 18), rng.normal(0, 0.5)))
                tissue[gb & (self._free() | liver)] = _T.GALLBLADDER
        if rng.random() < lv["spleen_p"]:
            size = rng.uniform(0.6, 1.1) * {"T11": 1.25, "T12": 1.15, "L1": 1.0}.get(self.level, 0.6)
            centre = (a_f * rng.uniform(0.55, 0.8), self.b_post * rng.uniform(0.0, 0.5))
            sp = cv.poly(_blob(rng, centre, a_f * 0.3 * size, b * 0.45 * size, rng.uniform(-0.9, -0.3), wobble=0.06)) & self._free()
            tissue[sp] = _T.SPLEEN
        if rng.random() < lv["stomach_p"]:
            centre = (a_f * rng.uniform(0.15, 0.45), -self.b_ant * rng.uniform(0.25, 0.55))
            ra, rb = a_f * rng.uniform(0.25, 0.4), self.b_ant * rng.uniform(0.25, 0.4)
            self._lumen_organ(centre, ra, rb, rng.uniform(2.5, 5), _T.STOMACH_WALL)
        if rng.random() < lv["pancreas_p"]:
            start = (self.sma[0] - rng.uniform(25, 40), self.sma[1] + rng.uniform(-8, 8))
            mid = (self.sma[0] + rng.uniform(-2, 6), self.sma[1] - rng.uniform(6, 14))
            end = (a_f * rng.uniform(0.3, 0.5), cy - self.vb_d - rng.uniform(0, 20))
            pts = _smooth_polyline(np.array([start, mid, end]), 30)
            pan = cv.line(pts, rng.uniform(13, 22)) & self._free()
            # Fatty lobulation with age.
            lob = _smooth_field(rng, self.size, 3.0 / cv.sx) > (1.6 - 0.015 * max(0.0, self.age - 40))
            tissue[pan & ~lob] = _T.PANCREAS
        if rng.random() < lv["duodenum_p"]:
            y = cy - self.vb_d - rng.uniform(12, 30)
            pts = _smooth_polyline(np.array([(-a_f * rng.uniform(0.25, 0.4), y + rng.uniform(-10, 10)),
                                             (cx, y), (a_f * rng.uniform(0.1, 0.2), y - rng.uniform(0, 15))]), 30)
            wall_t = rng.uniform(2, 3.5)
            r = rng.uniform(6, 11)
            duo = cv.line(pts, 2 * r) & self._free()
            lumen = cv.line(pts, max(2 * (r - wall_t), 1.0)) & duo
            tissue[duo] = _T.BOWEL_WALL
            tissue[lumen] = self._content(small=True, rng=rng)
            if rng.random() < 0.3:  # a little gas along the front wall
                rows = np.flatnonzero(lumen.any(axis=1))
                if rows.size:
                    level = rows.min() + rng.uniform(0.1, 0.35) * (rows.max() - rows.min() + 1)
                    tissue[lumen & (np.arange(self.size)[:, None] < level)] = _T.BOWEL_AIR

    def _organ_vessels(self, organ, count):
        rng, cv, tissue = self.rng, self.cv, self.tissue
        idx = np.flatnonzero(organ)
        if idx.size == 0:
            return
        lines = np.zeros_like(organ)
        for i in rng.choice(idx, size=min(count, idx.size), replace=False):
            u0, v0 = self.cv.U.flat[i], self.cv.V.flat[i]
            if rng.random() < 0.6:  # vessel crossing the slice: a dot
                r = rng.uniform(1.5, 5)
                lines |= cv.poly(_blob(rng, (u0, v0), r, r * rng.uniform(0.6, 1.0), rng.uniform(0, 3)))
                continue
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(5, 20)
            pts = np.array([[u0, v0], [u0 + length * math.cos(ang), v0 + length * math.sin(ang)]])
            lines |= cv.line(pts, rng.uniform(1.5, 4))
        tissue[lines & organ] = _T.VEIN

    def _lumen_organ(self, centre, ra, rb, wall_t, wall_tid):
        """A hollow organ (stomach) with wall and contents (air rises to the front)."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        free = self._free()
        outer = cv.poly(_blob(rng, centre, ra, rb, rng.normal(0, 0.3), wobble=0.1)) & free
        inner = cv.poly(_blob(rng, centre, ra - wall_t, rb - wall_t, rng.normal(0, 0.3), wobble=0.1)) & outer
        tissue[outer] = wall_tid
        content = self._content(small=False, rng=rng)
        tissue[inner] = content
        if rng.random() < 0.7:
            rows = np.flatnonzero(inner.any(axis=1))
            if rows.size:
                level = rows.min() + rng.uniform(0.15, 0.6) * (rows.max() - rows.min())
                tissue[inner & (np.arange(self.size)[:, None] < level)] = _T.BOWEL_AIR

    def _content(self, small: bool, rng) -> int:
        if self.oral_contrast and rng.random() < (0.6 if small else 0.4):
            return _T.BOWEL_CONTRAST
        return rng.choice([_T.BOWEL_FLUID, _T.BOWEL_WALL], p=[0.55, 0.45])

    # ------------------------------------------------------------------ bowel

    def _bowel(self):
        """Colon and small-bowel loops packed into the peritoneal cavity until the remaining
        fat is about the planned VAT."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        px_mm2 = cv.pixel_mm2
        free = self._free()
        # Keep retroperitoneal fat around the kidneys, psoas, spine and great vessels.
        excl = np.zeros_like(free)
        for kid in self.kidneys:
            excl |= kid
        excl |= np.isin(tissue, (_T.PSOAS, _T.QUADRATUS, _T.ARTERY, _T.VEIN, _T.BONE_CORTEX,
                                 _T.BONE_MARROW, _T.CALCIFICATION, _T.THROMBUS))
        margin_mm = rng.uniform(2, 6) + 0.02 * self.vat_target
        k = max(1, int(round(margin_mm / cv.sx)))
        excl = cv2.dilate(excl.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))).view(bool)
        allowed = free & ~excl
        # Thin preperitoneal fat under the wall muscles.
        pre = rng.uniform(0.5, 2.0) + 0.025 * self.vat_target ** 0.8
        muscle_band = np.isin(tissue, _MUSCLES + (_T.IMAT_FAT,))
        kk = max(1, int(round(pre / cv.sx)))
        allowed &= ~cv2.dilate(muscle_band.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kk + 1, 2 * kk + 1))).view(bool)
        if not allowed.any():
            return
        room = cv.distance_inside(allowed)
        fat_now = free.sum() * px_mm2
        target_bowel = max(0.0, fat_now - self.vat_target * 100.0)
        self.params["bowel_target_cm2"] = round(target_bowel / 100, 1)
        cand = np.flatnonzero(room.ravel() > 3.0)
        if cand.size == 0:
            return
        cand = rng.permutation(cand)[:6000]
        # Lean abdomens are packed with bowel (loops touch and deform), fat ones are not.
        packing = float(np.clip(0.72 + 0.0012 * self.vat_target, 0.72, 1.0))
        placed: list[tuple[float, float, float]] = []
        area = 0.0
        loops = []
        # Colon first: ascending colon on the right flank, descending on the left, sometimes the
        # transverse colon in front.
        colon_spots = [(-1, rng.uniform(-0.3, 0.35)), (1, rng.uniform(-0.1, 0.45))]
        if self.level in ("L2", "L3") and rng.random() < 0.55:
            colon_spots.append((0, -0.7))
        if self.level == "L4" and rng.random() < 0.5:
            colon_spots.append((0.5, -0.5))  # sigmoid
        for side, vfrac in colon_spots:
            target = np.array([side * self.a_f * 0.72, vfrac * (self.b_ant if vfrac < 0 else self.b_post)])
            r = rng.uniform(16, 30) if side != 0 else rng.uniform(20, 36)
            sel = cand[:3000]
            du, dv = cv.U.flat[sel] - target[0], cv.V.flat[sel] - target[1]
            ok = room.flat[sel] > 0.5 * r
            if not ok.any():
                continue
            best = sel[ok][np.argmin((du * du + dv * dv)[ok])]
            cu, cvv = float(cv.U.flat[best]), float(cv.V.flat[best])
            r = min(r, room.flat[best] * 1.3 + 2)
            placed.append((cu, cvv, r))
            loops.append((cu, cvv, r, True))
            area += math.pi * r * r
        radii = rng.uniform(8, 17, cand.size)
        centres = np.zeros((len(cand) + len(placed), 3))
        if placed:
            centres[: len(placed)] = placed
        n_placed = len(placed)
        cu_all, cv_all, room_all = cv.U.flat[cand], cv.V.flat[cand], room.flat[cand]
        misses = 0
        for j in range(cand.size):
            if area >= target_bowel or misses > 300:
                break
            r = min(radii[j], room_all[j] * 1.3 + 1.5)
            if r < 4:
                continue
            cu, cvv = float(cu_all[j]), float(cv_all[j])
            if n_placed:
                arr = centres[:n_placed]
                gap = np.hypot(arr[:, 0] - cu, arr[:, 1] - cvv) - packing * (arr[:, 2] + r)
                if gap.min() < 0:
                    misses += 1
                    continue
            misses = 0
            centres[n_placed] = (cu, cvv, r)
            n_placed += 1
            loops.append((cu, cvv, r, False))
            area += math.pi * r * r
        # Shared texture fields for folds of collapsed loops and gas bubbles in faeces.
        folds_field = _smooth_field(rng, self.size, 1.5 / cv.sx)
        bubble_field = 0.6 * _smooth_field(rng, self.size, 4.5 / cv.sx) + 0.8 * _smooth_field(rng, self.size, 1.8 / cv.sx)
        wall_t = rng.uniform(1.2, 2.8)
        rows_idx = np.arange(self.size)[:, None]
        for cu, cvv, r, colon in loops:
            if colon:
                kind = rng.choice(["feces", "air", "fluid"], p=[0.45, 0.43, 0.12])
            else:
                kind = rng.choice(["contrast", "fluid", "collapsed", "air"],
                                  p=[0.45, 0.27, 0.26, 0.02] if self.oral_contrast else [0.0, 0.5, 0.46, 0.04])
            if not colon and rng.random() < 0.4:
                # A loop running in the slice plane: a curved tube.
                ang = rng.uniform(0, 2 * np.pi)
                length = r * rng.uniform(1.5, 3.5)
                bend = rng.normal(0, 0.6) * r
                d = np.array([math.cos(ang), math.sin(ang)])
                nrm = np.array([-d[1], d[0]])
                ctrl = np.array([[cu, cvv] - d * length / 2, [cu, cvv] + nrm * bend, [cu, cvv] + d * length / 2])
                path = _smooth_polyline(ctrl, 16)
                rt = r * rng.uniform(0.55, 0.75)
                outer = cv.line(path, 2 * rt) & allowed
                lumen = cv.line(path, max(2 * (rt - wall_t), 1.0)) & outer
            else:
                elong = rng.uniform(1.0, 1.8) if not colon else rng.uniform(1.0, 1.3)
                ang = rng.uniform(0, np.pi)
                ra, rb = r * math.sqrt(elong), r / math.sqrt(elong)
                wob = 0.15 if not colon else 0.1
                outer = cv.poly(_blob(rng, (cu, cvv), ra, rb, ang, wobble=wob)) & allowed
                wt = wall_t * (0.8 if colon else 1.0)
                lumen = cv.poly(_blob(rng, (cu, cvv), max(ra - wt, 1), max(rb - wt, 1), ang, wobble=wob)) & outer
            tissue[outer] = _T.BOWEL_WALL
            # Every loop has its own wall enhancement and content density.
            self.hu_offset[outer] = rng.normal(0, 8)
            self.hu_offset[lumen] = rng.normal(0, 7) if kind != "contrast" else rng.normal(0, 60)
            if kind == "collapsed":
                # Collapsed loop: soft tissue with a feathery pattern of fluid between folds.
                folds = folds_field > rng.uniform(0.4, 1.0)
                tissue[lumen & folds] = _T.BOWEL_CONTRAST if self.oral_contrast and rng.random() < 0.5 else _T.BOWEL_FLUID
                continue
            if kind == "feces":
                tissue[lumen] = _T.FECES
                bubbles = bubble_field > rng.uniform(1.0, 1.7)
                tissue[lumen & bubbles] = _T.BOWEL_AIR
                if rng.random() < 0.5:  # gas collects in front
                    rows = np.flatnonzero(lumen.any(axis=1))
                    level = rows.min() + rng.uniform(0.05, 0.4) * (rows.max() - rows.min() + 1)
                    tissue[lumen & (rows_idx < level)] = _T.BOWEL_AIR
                continue
            tissue[lumen] = _T.BOWEL_CONTRAST if kind == "contrast" else _T.BOWEL_FLUID
            if kind == "air" or rng.random() < 0.08:
                rows = np.flatnonzero(lumen.any(axis=1))
                if rows.size:
                    frac = rng.uniform(0.5, 1.0) if kind == "air" else rng.uniform(0.1, 0.35)
                    level = rows.min() + frac * (rows.max() - rows.min() + 1)
                    tissue[lumen & (rows_idx < level)] = _T.BOWEL_AIR
        self.params["bowel_loops"] = len(loops)

    def _small_vessels(self):
        """Mesenteric vessels: dots and short in-plane segments in the visceral fat."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        free = self._free()
        n = int(rng.integers(15, 60) + 0.15 * self.vat_target)
        lines = np.zeros_like(free)
        root = np.array(self.sma)
        for _ in range(n):
            c = root + rng.normal(0, 1, 2) * np.array([self.a_f * 0.45, (self.b_ant + self.b_post) * 0.25])
            if rng.random() < 0.75:
                lines |= cv.poly(_blob(rng, c, rng.uniform(0.6, 2.2), rng.uniform(0.6, 2.0)))
            else:  # a short curved stretch running in the slice
                ang = rng.uniform(0, 2 * np.pi)
                ln = rng.uniform(3, 12)
                d = np.array([math.cos(ang), math.sin(ang)])
                ctrl = np.array([c, c + d * ln / 2 + rng.normal(0, ln / 4, 2), c + d * ln])
                lines |= cv.line(_smooth_polyline(ctrl, 8), rng.uniform(0.5, 1.5))
        tissue[lines & free] = _T.SMALL_VESSEL

    # ------------------------------------------------------------------ IMAT

    def _imat(self):
        """Fat specks inside the muscles (round in the back muscles and psoas, whose fibres run
        cranio-caudally; streaks along the layers of the abdominal wall)."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        muscle = np.isin(tissue, _MUSCLES)
        idx = np.flatnonzero(muscle)
        if idx.size == 0:
            return
        already = (tissue == _T.IMAT_FAT).sum()
        target_px = self.imat_frac * idx.size - already
        if target_px <= 0:
            return
        canvas = np.zeros((self.size, self.size), np.uint8)
        px = cv.sx
        picks = rng.choice(idx, size=min(idx.size, 6000), replace=True)
        # Fat infiltrates the back muscles most, the psoas least.
        weight = {_T.ERECTOR: 1.0, _T.QUADRATUS: 0.6, _T.WALL_MUSCLE: 0.45, _T.RECTUS: 0.4,
                  _T.LATISSIMUS: 0.5, _T.PSOAS: 0.2}
        accept = rng.random(picks.size)
        for n, (i, u_acc) in enumerate(zip(picks, accept)):
            # Count what was really drawn (a speck is at least one pixel).
            if n % 25 == 0 and (canvas.view(bool) & muscle).sum() >= target_px:
                break
            tid = tissue.flat[i]
            if u_acc > weight.get(int(tid), 0.5):
                continue
            row, col = divmod(int(i), self.size)
            if tid in (_T.ERECTOR, _T.PSOAS, _T.QUADRATUS) and rng.random() < 0.8:
                a = rng.uniform(0.6, 2.2) / px  # fibres run cranio-caudally: fat as dots
                b = a * rng.uniform(0.5, 1.0)
                ang = rng.uniform(0, 180)
            elif tid in (_T.ERECTOR, _T.PSOAS, _T.QUADRATUS):
                a = rng.uniform(1.5, 4.0) / px  # thin fatty septa between fascicles
                b = rng.uniform(0.4, 0.8) / px
                ang = rng.normal(90, 25) + math.degrees(cv.angle)
            else:
                a = rng.uniform(1.5, 5.0) / px
                b = rng.uniform(0.4, 0.9) / px
                # Along the layer: perpendicular to the radius, in picture (scanner) axes.
                theta = math.degrees(math.atan2(cv.V.flat[i], cv.U.flat[i]) + cv.angle)
                ang = theta + 90 + rng.normal(0, 10)
            cv2.ellipse(canvas, ((col, row), (2 * a, 2 * b), float(ang)), 1, -1)
        tissue[(canvas > 0) & muscle] = _T.IMAT_FAT

    # ------------------------------------------------------------------ outside the body

    def _arms(self, arm_r, gap):
        rng, cv, tissue = self.rng, self.cv, self.tissue
        body = self.body
        for side in (-1, 1):
            v_arm = rng.uniform(-0.2, 0.5) * self.b_post
            band = body & (np.abs(cv.V - v_arm) < 15)
            if not band.any():
                continue
            x_edge = float(np.max(side * cv.U[band]))
            ra = arm_r * rng.uniform(1.0, 1.25)
            rb = arm_r * rng.uniform(0.7, 0.95)
            centre = (side * (x_edge + gap + ra), v_arm)
            ang = side * rng.uniform(0.6, 1.4)  # forearm long axis runs antero-posteriorly
            air = tissue == _T.AIR
            outer = cv.poly(_blob(rng, centre, ra, rb, ang, wobble=0.05)) & air
            tissue[outer] = _T.ARM_SKIN
            skin = rng.uniform(1.2, 2.2)
            fat_t = rng.uniform(3, 9) * (1 + 0.04 * (self.bmi - 25))
            tissue[cv.poly(_blob(rng, centre, ra - skin, rb - skin, ang, wobble=0.04)) & outer] = _T.ARM_FAT
            muscle = cv.poly(_blob(rng, centre, ra - skin - fat_t, rb - skin - fat_t, ang, wobble=0.1)) & outer
            tissue[muscle] = _T.ARM_MUSCLE
            for _ in range(int(rng.integers(2, 5))):  # fat planes between the forearm muscles
                a0 = rng.uniform(0, 2 * np.pi)
                pts = np.array([centre, (centre[0] + ra * math.cos(a0), centre[1] + ra * math.sin(a0))])
                tissue[cv.line(pts, rng.uniform(0.6, 1.8)) & muscle] = _T.ARM_FAT
            n_bones = 1 if rng.random() < 0.4 else 2
            for j in range(n_bones):
                off = (j - (n_bones - 1) / 2) * ra * 0.5
                bc = (centre[0] + off * math.cos(ang) + rng.normal(0, 2), centre[1] + off * math.sin(ang) + rng.normal(0, 2))
                r_b = rng.uniform(6, 11) if n_bones == 1 else rng.uniform(5, 8)
                bone = cv.poly(_blob(rng, bc, r_b, r_b * rng.uniform(0.7, 1.0), rng.uniform(0, 3)))
                tissue[bone & outer] = _T.BONE_CORTEX
                tissue[cv.poly(_blob(rng, bc, r_b * 0.6, r_b * 0.5, 0)) & outer] = _T.BONE_MARROW

    def _table(self):
        """Curved table (two thin shells, sometimes a foam pad) under the patient."""
        rng, cv, tissue = self.rng, self.cv, self.tissue
        self.params["table"] = False
        if rng.random() > 0.7:
            return
        occupied = tissue != _T.AIR
        rows = np.flatnonzero(occupied.any(axis=1))
        if rows.size == 0:
            return
        body_cols = np.flatnonzero(occupied.any(axis=0))
        xc = float(cv.X[0, body_cols].mean()) + rng.uniform(-10, 10)
        radius = rng.uniform(500, 1400)
        width = rng.uniform(380, 500)
        bottom_y = np.where(occupied.any(axis=0), np.argmax(np.cumsum(occupied[::-1], axis=0) > 0, axis=0), 0)
        bottom_row = self.size - 1 - bottom_y
        col_x = cv.X[0]
        sag = (col_x - xc) ** 2 / (2 * radius)
        rel = (bottom_row * cv.sy - (self.size - 1) / 2 * cv.sy) + sag
        ok = occupied.any(axis=0)
        y_top0 = float(np.max(rel[ok])) + rng.uniform(0.5, 2.5)
        pad_t = rng.uniform(15, 45) if rng.random() < 0.4 else 0.0
        X, Y = cv.X, cv.Y
        top = y_top0 + pad_t - (X - xc) ** 2 / (2 * radius)
        inside_w = np.abs(X - xc) < width / 2
        air = tissue == _T.AIR
        if pad_t > 0:
            pad = inside_w & (Y >= top - pad_t) & (Y < top) & air & (np.abs(X - xc) < width / 2 - 15)
            tissue[pad] = _T.PAD
        shell = max(rng.uniform(1.0, 2.5), 1.6 * cv.sy)
        gap = rng.uniform(12, 40)
        lower_w = width * rng.uniform(0.75, 1.0)
        upper = inside_w & (Y >= top) & (Y < top + shell) & air
        lower = (np.abs(X - xc) < lower_w / 2) & (Y >= top + gap) & (Y < top + gap + shell * rng.uniform(0.8, 1.5)) & air
        tissue[upper | lower] = _T.TABLE_SHELL
        if rng.random() < 0.5:
            core = inside_w & (Y >= top + shell) & (Y < top + gap) & air & (np.abs(X - xc) < lower_w / 2)
            tissue[core] = _T.TABLE_CORE
        self.params["table"] = True

    def _fov(self):
        """Circular reconstruction field of view (pad value outside) on most scans."""
        rng, tissue = self.rng, self.tissue
        self.params["fov_circle"] = False
        fov = np.ones((self.size, self.size), bool)
        if rng.random() < 0.55:
            fov = _circle_mask(self.size)
            tissue[~fov] = _T.OUTSIDE_FOV
            self.params["fov_circle"] = True
        truncated = bool((self.body & ~fov).any() or self.body[0].any() or self.body[-1].any()
                         or self.body[:, 0].any() or self.body[:, -1].any())
        self.params["truncated"] = truncated

    # ------------------------------------------------------------------ intensities

    def _render(self):
        rng, cv, tissue = self.rng, self.cv, self.tissue
        n = len(_TISSUE_NAMES)
        mean = np.zeros(n, np.float32)
        tex = np.zeros(n, np.float32)  # amplitude of smooth texture (HU)
        fine = np.zeros(n, np.float32)  # amplitude of fine texture (HU)
        contrast = self.contrast
        sat = rng.uniform(-118, -88)
        mean[_T.AIR] = -1000
        mean[_T.OUTSIDE_FOV] = -1000
        mean[_T.SKIN] = rng.uniform(10, 60)
        mean[_T.SAT_FAT] = sat
        mean[_T.VAT_FAT] = sat + rng.uniform(-3, 12)
        mean[_T.IMAT_FAT] = sat + rng.uniform(0, 15)
        mean[_T.EPIDURAL_FAT] = sat + rng.uniform(0, 20)
        mean[_T.ARM_FAT] = sat + rng.uniform(-5, 5)
        mean[_T.FASCIA] = rng.uniform(0, 50)
        mean[_T.SAT_SEPTUM] = sat + rng.uniform(20, 60)
        tex[[_T.SAT_FAT, _T.VAT_FAT, _T.IMAT_FAT, _T.ARM_FAT]] = rng.uniform(2, 7)
        mhu = self.muscle_hu
        for tid, off in ((_T.RECTUS, 0), (_T.WALL_MUSCLE, 0), (_T.PSOAS, 4), (_T.QUADRATUS, 0),
                         (_T.ERECTOR, -3 - 0.1 * max(0.0, self.age - 50)), (_T.LATISSIMUS, -2),
                         (_T.ARM_MUSCLE, 2)):
            mean[tid] = mhu + off + rng.normal(0, 3)
        tex[list(_MUSCLES) + [_T.ARM_MUSCLE]] = rng.uniform(2, 6)
        # Bone: denser in the young; cortical shell and cancellous bone.
        young = np.clip((80 - self.age) / 50, 0.1, 1.2)
        mean[_T.BONE_CORTEX] = rng.uniform(350, 600) + 250 * young
        mean[_T.BONE_MARROW] = rng.uniform(70, 140) + 110 * young
        fine[_T.BONE_MARROW] = rng.uniform(25, 60)
        mean[_T.CARTILAGE] = rng.uniform(90, 220)
        mean[_T.CSF] = rng.uniform(2, 15)
        mean[_T.CALCIFICATION] = rng.uniform(350, 1000)
        # Phase dependent soft tissue.
        ph = {"none": 0, "portal": 1, "arterial": 2}[contrast]
        pick = lambda lo_hi: rng.uniform(*lo_hi[ph])  # noqa: E731
        mean[_T.ARTERY] = pick([(35, 50), (130, 210), (230, 380)])
        mean[_T.VEIN] = pick([(35, 50), (110, 170), (45, 90)])
        mean[_T.SMALL_VESSEL] = (mean[_T.ARTERY] + mean[_T.VEIN]) / 2
        mean[_T.THROMBUS] = rng.uniform(30, 55)
        mean[_T.LIVER] = pick([(48, 66), (95, 135), (60, 85)])
        mean[_T.SPLEEN] = pick([(40, 52), (100, 135), (80, 150)])
        mean[_T.PANCREAS] = pick([(35, 50), (80, 115), (90, 135)])
        cortex = pick([(28, 40), (140, 200), (160, 260)])
        mean[_T.KIDNEY_CORTEX] = cortex
        mean[_T.KIDNEY_MEDULLA] = cortex if ph != 2 else rng.uniform(50, 100)
        mean[_T.URINE] = rng.uniform(0, 15) if rng.random() < 0.85 or ph == 0 else rng.uniform(300, 900)
        mean[_T.GALLBLADDER] = rng.uniform(0, 25)
        mean[_T.BOWEL_WALL] = pick([(30, 45), (60, 110), (55, 95)])
        mean[_T.STOMACH_WALL] = mean[_T.BOWEL_WALL]
        mean[_T.BOWEL_FLUID] = rng.uniform(-5, 25)
        mean[_T.BOWEL_AIR] = -1000
        mean[_T.BOWEL_CONTRAST] = rng.uniform(130, 400)
        mean[_T.FECES] = rng.uniform(-80, 30)
        fine[_T.FECES] = rng.uniform(40, 90)
        fine[_T.BOWEL_CONTRAST] = rng.uniform(10, 40)
        tex[[_T.LIVER, _T.SPLEEN, _T.KIDNEY_CORTEX]] = rng.uniform(2, 5)
        tex[[_T.BOWEL_FLUID, _T.BOWEL_WALL, _T.FECES]] = rng.uniform(3, 10)
        tex[_T.PANCREAS] = 6
        mean[_T.ARM_SKIN] = mean[_T.SKIN]
        # Upper-abdomen structures (own stream, see __init__): the diaphragm is as dense as the
        # trunk muscles; lung bases are aerated; liver and spleen get a fine mottle.
        up = self.rng_upper
        mean[_T.DIAPHRAGM] = mhu + up.normal(3, 6)
        tex[_T.DIAPHRAGM] = tex[_T.WALL_MUSCLE]
        mean[_T.LUNG] = up.uniform(-900, -760)
        fine[_T.LUNG] = up.uniform(15, 45)
        fine[[_T.LIVER, _T.SPLEEN]] = up.uniform(2, 9)
        mean[_T.TABLE_SHELL] = rng.uniform(100, 500)
        mean[_T.TABLE_CORE] = rng.uniform(-950, -700)
        mean[_T.PAD] = rng.uniform(-960, -820)
        fine[_T.PAD] = 15
        # Tissue map -> HU with smooth and fine texture.
        field_smooth = _smooth_field(rng, self.size, rng.uniform(4, 9) / cv.sx)
        field_fine = cv2.GaussianBlur(rng.standard_normal((self.size, self.size)).astype(np.float32),
                                      (0, 0), 0.8)
        field_fine /= field_fine.std() + 1e-6
        field_bone = cv2.GaussianBlur(rng.standard_normal((self.size, self.size)).astype(np.float32),
                                      (0, 0), max(0.6, 0.9 / cv.sx))
        field_bone /= field_bone.std() + 1e-6
        hu = mean[tissue] + tex[tissue] * field_smooth + fine[tissue] * field_fine
        hu += self.hu_offset * np.isin(tissue, _BOWEL)  # (not where bowel was painted over)
        marrow = tissue == _T.BONE_MARROW
        hu[marrow] += (fine[_T.BONE_MARROW] * (field_bone[marrow] - field_fine[marrow])).astype(np.float32)
        # Partial-volume blur of the scanner's point-spread function (thicker slices blur more),
        # then the average over each output pixel.
        blur_mm = rng.uniform(0.3, 0.65) + 0.06 * self.params["slice_thickness_mm"]
        hu = cv2.GaussianBlur(hu, (0, 0), blur_mm / cv.sx)
        n, f = self.out_size, self.f
        body = self.body
        muscle_w = cv2.GaussianBlur(np.isin(tissue, _MUSCLES).astype(np.float32), (0, 0), blur_mm / cv.sx)
        if f > 1:
            hu = hu.reshape(n, f, n, f).mean(axis=(1, 3))
            body = body.reshape(n, f, n, f).mean(axis=(1, 3)) > 0.5
            muscle_w = muscle_w.reshape(n, f, n, f).mean(axis=(1, 3))
        # Partial volume with IMAT specks and borders darkens the muscle pixels; shifting the
        # muscle tissue mean (a linear change of the blurred image) makes the median HU inside
        # the muscle label equal the requested muscle_hu.
        self.label_out = _block_mode(_LABEL_OF[tissue], f, labels.NUM_CLASSES)
        in_muscle = self.label_out == labels.MUSCLE
        for _ in range(2 if in_muscle.any() else 0):
            delta = float(np.clip(self.muscle_hu - np.median(hu[in_muscle]), -20, 20))
            hu += delta * muscle_w
        # Correlated noise: band-pass filtered white noise.
        noise_sd = float(np.clip(rng.uniform(6, 20) * (1 + 0.012 * (self.bmi - 25)), 5, 25))
        sigma_c = max(0.5, rng.uniform(0.5, 1.2) / (cv.sx * f))  # noise grain ~0.5-1.2 mm
        white = rng.standard_normal((n, n)).astype(np.float32)
        noise = cv2.GaussianBlur(white, (0, 0), sigma_c)
        noise -= rng.uniform(0.2, 0.6) * cv2.GaussianBlur(white, (0, 0), 3 * sigma_c)
        noise *= noise_sd / (noise.std() + 1e-6)
        hu += noise
        # Photon-starvation streaks across wide bodies.
        if rng.random() < 0.25 + 0.01 * max(0.0, self.bmi - 30):
            streak = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32),
                                      (0, 0), sigmaX=8.0, sigmaY=0.7)
            streak *= rng.uniform(3, 10) / (streak.std() + 1e-6)
            rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), rng.normal(0, 8), 1.0)
            streak = cv2.warpAffine(streak, rot, (n, n), borderMode=cv2.BORDER_REFLECT)
            hu += streak * body
            self.params["streaks"] = True
        else:
            self.params["streaks"] = False
        # Truncation: bright rim where the body leaves the field of view.
        fov = _circle_mask(n) if self.params.get("fov_circle") else np.ones((n, n), bool)
        if self.params.get("truncated") and self.params.get("fov_circle"):
            r_px = (n - 1) / 2
            edge = r_px - np.hypot(np.arange(n)[:, None] - r_px, np.arange(n)[None, :] - r_px)
            hu += (rng.uniform(20, 90) * np.exp(-np.clip(edge, 0, None) * cv.sx * f / rng.uniform(4, 12))
                   * body).astype(np.float32)
        # Nothing is darker than air: scanner padding (-2048, -3024) reads -1024 through
        # sarco_app.ingest, so the phantom holds what the library sees.
        np.maximum(hu, -1024, out=hu)
        pad = -1024.0
        hu[~fov] = pad
        self.params.update(noise_sd=round(noise_sd, 1), blur_mm=round(blur_mm, 2),
                           pad_hu=pad if self.params.get("fov_circle") else None,
                           sat_hu=round(float(sat), 1), arms=bool(self.arms))
        return np.round(hu).astype(np.float32)


def _circle_mask(n: int) -> np.ndarray:
    """Pixels of an n x n grid inside the inscribed circle (the reconstruction field)."""
    r = (n - 1) / 2
    return np.hypot(np.arange(n)[:, None] - r, np.arange(n)[None, :] - r) <= r + 0.5


def _block_mode(label: np.ndarray, f: int, n_classes: int) -> np.ndarray:
    """Majority value of every f x f block of a small-integer label map."""
    if f == 1:
        return label
    n = label.shape[0] // f
    blocks = label.reshape(n, f, n, f).transpose(0, 2, 1, 3).reshape(n, n, f * f)
    counts = np.stack([(blocks == k).sum(axis=2) for k in range(n_classes)], axis=2)
    return counts.argmax(axis=2).astype(np.uint8)


def _smooth_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points on a quadratic-ish smooth curve through the control ``points``."""
    points = np.asarray(points, dtype=float)
    t = np.linspace(0, 1, len(points))
    tt = np.linspace(0, 1, n)
    deg = min(len(points) - 1, 2)
    cu = np.polyfit(t, points[:, 0], deg)
    cvv = np.polyfit(t, points[:, 1], deg)
    return np.stack([np.polyval(cu, tt), np.polyval(cvv, tt)], axis=1)


# --------------------------------------------------------------------------- writing


def _uid(seed: int, case_id: str, what: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["sarco-phantom", str(seed), case_id, what])


def write_phantom(phantom: Phantom, out_dir: str | Path, case_id: str, format: str = "nifti",
                  organs: bool = False) -> Path:
    """Write a phantom into a studies folder; returns the image path.

    ``nifti``: ``<out>/<id>.nii.gz`` (int16 HU) with the patient sidecar ``<out>/<id>.json``.
    ``dicom``: a folder ``<out>/<id>/`` holding one CT Image Storage file (int16 with rescale
    slope/intercept, patient sex/age/size/weight, axial geometry, UIDs derived from the seed).
    Either way the label goes to ``<out>/labels/final/<id>.nii.gz`` on the grid that
    :func:`sarco_app.ingest.load_image` gives for the image. With ``organs`` the organ map
    (``phantom.organ_label``) goes to ``<out>/labels/organs/<id>.nii.gz`` the same way: the extra
    training classes of ``python -m sarco_app train --organ-classes``.
    """
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SarcoError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    case_id = str(case_id)
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise SarcoError(f"bad case id {case_id!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SarcoError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    label_path = out / "labels" / "final" / f"{case_id}.nii.gz"
    organ_path = out / "labels" / "organs" / f"{case_id}.nii.gz"
    if fmt == "nifti":
        image = phantom.to_image()
        path = save_image(image, out / f"{case_id}.nii.gz")
        save_label(phantom.label, image, label_path)
        if organs:
            save_label(phantom.organ_label, image, organ_path)
        return path
    from sarco_app.ingest import load_image

    folder = out / case_id
    folder.mkdir(parents=True, exist_ok=True)
    _write_dicom(phantom, folder / "IM000001.dcm", case_id)
    image = load_image(folder)
    if image.hu.shape[:2] != phantom.hu.shape:
        raise SarcoError(f"{folder}: DICOM read back with shape {image.hu.shape}")
    save_label(phantom.label.reshape(image.hu.shape), image, label_path)
    if organs:
        save_label(phantom.organ_label.reshape(image.hu.shape), image, organ_path)
    return folder


def _write_dicom(phantom: Phantom, path: Path, case_id: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    seed = int(phantom.params.get("seed", 0))
    sop_class = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    sop_uid = _uid(seed, case_id, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "SARCO_PHANTOM"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    p = phantom.patient
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, case_id, "study")
    ds.SeriesInstanceUID = _uid(seed, case_id, "series")
    ds.FrameOfReferenceUID = _uid(seed, case_id, "frame")
    ds.Modality = "CT"
    ds.Manufacturer = "sarco synthetic phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = f"Synthetic abdomen {phantom.params.get('level', 'L3')}"
    ds.PatientName = f"Phantom^{case_id}"
    ds.PatientID = case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = p.sex or ""
    ds.PatientAge = f"{int(round(p.age)):03d}Y" if p.age is not None else ""
    if p.height_cm is not None:
        ds.PatientSize = f"{p.height_cm / 100.0:.2f}"
    if p.weight_kg is not None:
        ds.PatientWeight = f"{p.weight_kg:.1f}"
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "ABDOMEN"
    ds.KVP = "120"
    ds.SliceThickness = f"{float(phantom.params.get('slice_thickness_mm', 2.5)):.2f}"
    ds.ConvolutionKernel = "B30f"
    sx, sy = phantom.spacing
    nx, ny = phantom.hu.shape
    z = float(phantom.params.get("z_mm", 0.0))
    # Canonical (X=left, Y=posterior) = DICOM LPS with axial orientation: rows run along +x.
    ds.ImagePositionPatient = [f"{-(nx - 1) / 2 * sx:.4f}", f"{-(ny - 1) / 2 * sy:.4f}", f"{z:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.4f}"
    ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing, column spacing
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    raw = np.clip(np.round(phantom.hu.T) + 1024, -32768, 32767).astype(np.int16)
    ds.PixelData = raw.tobytes()
    ds.save_as(str(path), write_like_original=False)


def write_cohort(out_dir: str | Path, count: int, seed: int, format: str = "nifti", *,
                 size: int = 512, level: str = "L3", organs: bool = False) -> Path:
    """Write ``count`` phantoms (alternating sex, a third sarcopenic, random BMI) and
    ``manifest.csv`` into ``out_dir``; returns the manifest path.

    ``level`` is one of :data:`LEVELS` or ``"mixed"`` (random level per phantom, mostly L3).
    The manifest has one row per phantom with the columns :data:`MANIFEST_COLUMNS`; the areas
    are those of the written label maps. ``organs`` also writes the organ maps
    (:func:`write_phantom`).
    """
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise SarcoError(f"count must be an integer, got {count!r}") from None
    if count < 1:
        raise SarcoError(f"count must be at least 1, got {count}")
    fmt = str(format).strip().lower()
    if fmt not in FORMATS:
        raise SarcoError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    seed, size, _, _ = _check_inputs(seed, size, "L3", None)
    mixed = str(level).strip().lower() == "mixed"
    if not mixed:
        level = _check_inputs(seed, size, level, None)[2]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SarcoError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        child = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        lev = level
        if mixed:
            lev = LUMBAR_LEVELS[int(np.random.default_rng(child).choice(4, p=[0.15, 0.2, 0.45, 0.2]))]
        ph = generate(child, sex="M" if i % 2 == 0 else "F", sarcopenic=(i % 3 == 2), size=size, level=lev)
        case_id = f"phantom_{i:04d}"
        write_phantom(ph, out, case_id, fmt, organs=organs)
        areas = ph.areas_cm2()
        p = ph.patient
        rows.append({
            "id": case_id, "sex": p.sex, "age": p.age, "height_cm": p.height_cm,
            "weight_kg": p.weight_kg, "level": ph.params["level"],
            "spacing_mm": round(ph.spacing[0], 6), "muscle_hu": ph.params["muscle_hu"],
            "sarcopenic": bool(ph.params["sarcopenic"]),
            **{f"{name}_cm2": round(areas[name], 4) for name in TISSUES}, "seed": child,
        })
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
