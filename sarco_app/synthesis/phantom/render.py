"""Rendering: tissue map -> HU image.

Per-tissue mean HU for a random contrast phase, smooth and fine texture, partial-volume blur
of the point-spread function, the average over each output pixel (supersampling), the muscle
attenuation set to the planned ``muscle_hu``, correlated noise, photon-starvation streaks, the
bright rim of truncation and the padding outside a circular field of view.
"""

from __future__ import annotations

import cv2
import numpy as np

from sarco_app import labels
from sarco_app.synthesis.phantom.anatomy import Scene
from sarco_app.synthesis.phantom.geometry import circle_mask, smooth_field
from sarco_app.synthesis.phantom.plan import Plan
from sarco_app.synthesis.phantom.tissues import BOWEL, MUSCLES, TISSUE_NAMES, T


def render(s: Scene, plan: Plan, anatomical_label: np.ndarray, contrast: str, rng: np.random.Generator,
           rng_upper: np.random.Generator) -> np.ndarray:
    """HU image (float32, output grid, ``[row, col]``) of the drawn tissue map.

    ``anatomical_label`` is the majority label of each output pixel (the muscle HU is set on
    it); ``contrast`` the phase chosen with the organs. Continues the main stream ``rng`` after
    the anatomy, and the upper-abdomen stream ``rng_upper``.
    """
    cv, tissue = s.cv, s.tissue
    n = len(TISSUE_NAMES)
    mean = np.zeros(n, np.float32)
    tex = np.zeros(n, np.float32)  # amplitude of smooth texture (HU)
    fine = np.zeros(n, np.float32)  # amplitude of fine texture (HU)
    sat = rng.uniform(-118, -88)
    mean[T.AIR] = -1000
    mean[T.OUTSIDE_FOV] = -1000
    mean[T.SKIN] = rng.uniform(10, 60)
    mean[T.SAT_FAT] = sat
    mean[T.VAT_FAT] = sat + rng.uniform(-3, 12)
    mean[T.IMAT_FAT] = sat + rng.uniform(0, 15)
    mean[T.EPIDURAL_FAT] = sat + rng.uniform(0, 20)
    mean[T.ARM_FAT] = sat + rng.uniform(-5, 5)
    mean[T.FASCIA] = rng.uniform(0, 50)
    mean[T.SAT_SEPTUM] = sat + rng.uniform(20, 60)
    tex[[T.SAT_FAT, T.VAT_FAT, T.IMAT_FAT, T.ARM_FAT]] = rng.uniform(2, 7)
    mhu = plan.muscle_hu
    for tid, off in ((T.RECTUS, 0), (T.WALL_MUSCLE, 0), (T.PSOAS, 4), (T.QUADRATUS, 0),
                     (T.ERECTOR, -3 - 0.1 * max(0.0, plan.age - 50)), (T.LATISSIMUS, -2),
                     (T.ARM_MUSCLE, 2)):
        mean[tid] = mhu + off + rng.normal(0, 3)
    tex[list(MUSCLES) + [T.ARM_MUSCLE]] = rng.uniform(2, 6)
    # Bone: denser in the young; cortical shell and cancellous bone.
    young = np.clip((80 - plan.age) / 50, 0.1, 1.2)
    mean[T.BONE_CORTEX] = rng.uniform(350, 600) + 250 * young
    mean[T.BONE_MARROW] = rng.uniform(70, 140) + 110 * young
    fine[T.BONE_MARROW] = rng.uniform(25, 60)
    mean[T.CARTILAGE] = rng.uniform(90, 220)
    mean[T.CSF] = rng.uniform(2, 15)
    mean[T.CALCIFICATION] = rng.uniform(350, 1000)
    # Phase dependent soft tissue.
    ph = {"none": 0, "portal": 1, "arterial": 2}[contrast]
    pick = lambda lo_hi: rng.uniform(*lo_hi[ph])  # noqa: E731
    mean[T.ARTERY] = pick([(35, 50), (130, 210), (230, 380)])
    mean[T.VEIN] = pick([(35, 50), (110, 170), (45, 90)])
    mean[T.SMALL_VESSEL] = (mean[T.ARTERY] + mean[T.VEIN]) / 2
    mean[T.THROMBUS] = rng.uniform(30, 55)
    mean[T.LIVER] = pick([(48, 66), (95, 135), (60, 85)])
    mean[T.SPLEEN] = pick([(40, 52), (100, 135), (80, 150)])
    mean[T.PANCREAS] = pick([(35, 50), (80, 115), (90, 135)])
    cortex = pick([(28, 40), (140, 200), (160, 260)])
    mean[T.KIDNEY_CORTEX] = cortex
    mean[T.KIDNEY_MEDULLA] = cortex if ph != 2 else rng.uniform(50, 100)
    mean[T.URINE] = rng.uniform(0, 15) if rng.random() < 0.85 or ph == 0 else rng.uniform(300, 900)
    mean[T.GALLBLADDER] = rng.uniform(0, 25)
    mean[T.BOWEL_WALL] = pick([(30, 45), (60, 110), (55, 95)])
    mean[T.STOMACH_WALL] = mean[T.BOWEL_WALL]
    mean[T.BOWEL_FLUID] = rng.uniform(-5, 25)
    mean[T.BOWEL_AIR] = -1000
    mean[T.BOWEL_CONTRAST] = rng.uniform(130, 400)
    mean[T.FECES] = rng.uniform(-80, 30)
    fine[T.FECES] = rng.uniform(40, 90)
    fine[T.BOWEL_CONTRAST] = rng.uniform(10, 40)
    tex[[T.LIVER, T.SPLEEN, T.KIDNEY_CORTEX]] = rng.uniform(2, 5)
    tex[[T.BOWEL_FLUID, T.BOWEL_WALL, T.FECES]] = rng.uniform(3, 10)
    tex[T.PANCREAS] = 6
    mean[T.ARM_SKIN] = mean[T.SKIN]
    # Upper-abdomen structures (own stream, see build.generate): the diaphragm is as dense as the
    # trunk muscles; lung bases are aerated; liver and spleen get a fine mottle.
    up = rng_upper
    mean[T.DIAPHRAGM] = mhu + up.normal(3, 6)
    tex[T.DIAPHRAGM] = tex[T.WALL_MUSCLE]
    mean[T.LUNG] = up.uniform(-900, -760)
    fine[T.LUNG] = up.uniform(15, 45)
    fine[[T.LIVER, T.SPLEEN]] = up.uniform(2, 9)
    mean[T.TABLE_SHELL] = rng.uniform(100, 500)
    mean[T.TABLE_CORE] = rng.uniform(-950, -700)
    mean[T.PAD] = rng.uniform(-960, -820)
    fine[T.PAD] = 15
    # Tissue map -> HU with smooth and fine texture.
    field_smooth = smooth_field(rng, s.size, rng.uniform(4, 9) / cv.sx)
    field_fine = cv2.GaussianBlur(rng.standard_normal((s.size, s.size)).astype(np.float32),
                                  (0, 0), 0.8)
    field_fine /= field_fine.std() + 1e-6
    field_bone = cv2.GaussianBlur(rng.standard_normal((s.size, s.size)).astype(np.float32),
                                  (0, 0), max(0.6, 0.9 / cv.sx))
    field_bone /= field_bone.std() + 1e-6
    hu = mean[tissue] + tex[tissue] * field_smooth + fine[tissue] * field_fine
    hu += s.hu_offset * np.isin(tissue, BOWEL)  # (not where bowel was painted over)
    marrow = tissue == T.BONE_MARROW
    hu[marrow] += (fine[T.BONE_MARROW] * (field_bone[marrow] - field_fine[marrow])).astype(np.float32)
    # Partial-volume blur of the scanner's point-spread function (thicker slices blur more),
    # then the average over each output pixel.
    blur_mm = rng.uniform(0.3, 0.65) + 0.06 * s.params["slice_thickness_mm"]
    hu = cv2.GaussianBlur(hu, (0, 0), blur_mm / cv.sx)
    n, f = plan.out_size, plan.supersampling
    body = s.body
    muscle_w = cv2.GaussianBlur(np.isin(tissue, MUSCLES).astype(np.float32), (0, 0), blur_mm / cv.sx)
    if f > 1:
        hu = hu.reshape(n, f, n, f).mean(axis=(1, 3))
        body = body.reshape(n, f, n, f).mean(axis=(1, 3)) > 0.5
        muscle_w = muscle_w.reshape(n, f, n, f).mean(axis=(1, 3))
    # Partial volume with IMAT specks and borders darkens the muscle pixels; shifting the
    # muscle tissue mean (a linear change of the blurred image) makes the median HU inside
    # the muscle label equal the requested muscle_hu.
    in_muscle = anatomical_label == labels.MUSCLE
    for _ in range(2 if in_muscle.any() else 0):
        delta = float(np.clip(plan.muscle_hu - np.median(hu[in_muscle]), -20, 20))
        hu += delta * muscle_w
    # Correlated noise: band-pass filtered white noise.
    noise_sd = float(np.clip(rng.uniform(6, 20) * (1 + 0.012 * (plan.bmi - 25)), 5, 25))
    sigma_c = max(0.5, rng.uniform(0.5, 1.2) / (cv.sx * f))  # noise grain ~0.5-1.2 mm
    white = rng.standard_normal((n, n)).astype(np.float32)
    noise = cv2.GaussianBlur(white, (0, 0), sigma_c)
    noise -= rng.uniform(0.2, 0.6) * cv2.GaussianBlur(white, (0, 0), 3 * sigma_c)
    noise *= noise_sd / (noise.std() + 1e-6)
    hu += noise
    # Photon-starvation streaks across wide bodies.
    if rng.random() < 0.25 + 0.01 * max(0.0, plan.bmi - 30):
        streak = cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32),
                                  (0, 0), sigmaX=8.0, sigmaY=0.7)
        streak *= rng.uniform(3, 10) / (streak.std() + 1e-6)
        rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), rng.normal(0, 8), 1.0)
        streak = cv2.warpAffine(streak, rot, (n, n), borderMode=cv2.BORDER_REFLECT)
        hu += streak * body
        s.params["streaks"] = True
    else:
        s.params["streaks"] = False
    # Truncation: bright rim where the body leaves the field of view.
    fov = circle_mask(n) if s.params.get("fov_circle") else np.ones((n, n), bool)
    if s.params.get("truncated") and s.params.get("fov_circle"):
        r_px = (n - 1) / 2
        edge = r_px - np.hypot(np.arange(n)[:, None] - r_px, np.arange(n)[None, :] - r_px)
        hu += (rng.uniform(20, 90) * np.exp(-np.clip(edge, 0, None) * cv.sx * f / rng.uniform(4, 12))
               * body).astype(np.float32)
    # Nothing is darker than air: scanner padding (-2048, -3024) reads -1024 through
    # sarco_app.inputs.ingest, so the phantom holds what the library sees.
    np.maximum(hu, -1024, out=hu)
    pad = -1024.0
    hu[~fov] = pad
    s.params.update(noise_sd=round(noise_sd, 1), blur_mm=round(blur_mm, 2),
                       pad_hu=pad if s.params.get("fov_circle") else None,
                       sat_hu=round(float(sat), 1), arms=bool(plan.arms))
    return np.round(hu).astype(np.float32)
