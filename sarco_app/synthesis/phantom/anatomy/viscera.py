"""Viscera: diaphragm and lung bases, great and mesenteric vessels, solid organs, stomach,
duodenum, colon and small bowel, packed into the visceral fat (which stays VAT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from sarco_app.synthesis.phantom.anatomy.musculoskeletal import SpineLayout
from sarco_app.synthesis.phantom.anatomy.scene import Scene
from sarco_app.synthesis.phantom.geometry import blob, smooth_field, smooth_polyline
from sarco_app.synthesis.phantom.plan import Plan
from sarco_app.synthesis.phantom.tissues import MUSCLES, T


@dataclass(frozen=True)
class Vessels:
    """Aorta centre (u, v mm) and radius, and the root of the mesenteric vessels (SMA)."""

    aorta_c: tuple[float, float]
    r_ao: float
    sma: tuple[float, float]


@dataclass(frozen=True)
class Organs:
    """What the organ drawing chose that later steps need: the contrast phase (``none``,
    ``portal``, ``arterial``), oral contrast, and the kidney masks."""

    contrast: str
    oral_contrast: bool
    kidneys: list[np.ndarray]


def diaphragm_and_lungs(s: Scene, plan: Plan, rng: np.random.Generator) -> None:
    """Upper abdomen (T11-L2): lung bases (posterior costophrenic recesses) inside the ribs,
    then the diaphragm, a 2-7 mm muscle-dense band that is not trunk muscle (label
    background), lining the wall and back muscles from inside over the lateral and posterior
    arc; the liver and spleen drawn next lie against it."""
    lv, cv, tissue = plan.lv, s.cv, s.tissue
    s.params["diaphragm"] = bool(rng.random() < lv["dia"])
    if not s.params["diaphragm"]:
        return
    half = s.envelope.perimeter / 2
    a = np.abs(s.arc)
    near_wall = s.d_in < rng.uniform(35, 60)
    if rng.random() < lv["lung"]:
        free = s.free()
        dist = cv.distance_inside(free)
        reach = rng.uniform(0.45, 0.7) * half  # arc beyond which the recess lies
        depth = rng.uniform(4, 22) * np.clip((a - reach) / 40.0, 0, 1)
        lung = free & near_wall & (dist < depth)
        tissue[lung] = T.LUNG
        s.params["lung_cm2"] = round(float(lung.sum() * cv.pixel_mm2 / 100.0), 2)
    free = s.free()
    dist = cv.distance_inside(free)
    gap = 0.0 if rng.random() < 0.6 else rng.uniform(1.0, 4.0)  # extraperitoneal fat
    thick = rng.uniform(2.0, 7.0)
    start = {"T11": 0.05, "T12": 0.15, "L1": 0.4, "L2": 0.6}.get(plan.level, 0.7) * half
    start *= rng.uniform(0.8, 1.2)
    band = free & near_wall & (dist >= gap) & (dist < gap + thick) & (a > start)
    tissue[band] = T.DIAPHRAGM


def crura(s: Scene, plan: Plan, spine: SpineLayout, vessels: Vessels, rng: np.random.Generator) -> None:
    """Diaphragm crura: muscle-dense bands (label background) from the front of the
    vertebral body up around the aorta, the right one longer (T11-L2)."""
    cv, tissue = s.cv, s.tissue
    if rng.random() >= plan.lv["crus"]:
        return
    cx, cy = spine.vb_c
    ax, ay = vessels.aorta_c
    for side in (-1, 1):
        width = rng.uniform(3.0, 8.0) * (1.25 if side < 0 else 1.0)
        start = (cx + side * plan.vb_w * rng.uniform(0.5, 0.85), cy - plan.vb_d * rng.uniform(0.2, 0.6))
        mid = (ax + side * (vessels.r_ao + width * 0.5 + rng.uniform(0.5, 3)), ay + rng.uniform(-3, 3))
        end = (ax + side * rng.uniform(0, 0.6) * vessels.r_ao,
               ay - vessels.r_ao - rng.uniform(3, 15) * (1.5 if side < 0 else 1.0))
        pts = smooth_polyline(np.array([start, mid, end]), 24)
        tissue[cv.line(pts, width) & s.free()] = T.DIAPHRAGM


def great_vessels(s: Scene, plan: Plan, spine: SpineLayout, rng: np.random.Generator) -> Vessels:
    """Aorta (calcified plaque, rarely an aneurysm with thrombus) and IVC in front of the
    vertebra, or the iliac vessels at L4; superior mesenteric artery and vein."""
    cv, tissue = s.cv, s.tissue
    cx, cy = spine.vb_c
    front = cy - plan.vb_d
    r_ao = rng.uniform(8, 11.5) * (1 + 0.004 * (plan.age - 50)) * (1.08 if plan.sex == "M" else 0.95)
    aneurysm = plan.level in ("L2", "L3", "L4") and rng.random() < 0.02
    if aneurysm:
        r_ao = rng.uniform(18, 30)
    ao_c = (cx + rng.uniform(0.15, 0.55) * plan.vb_w, front - r_ao - rng.uniform(1, 4))
    ivc_c = (cx - rng.uniform(0.45, 0.95) * plan.vb_w, front - rng.uniform(5, 11))
    iliac = plan.level == "L4" and rng.random() < plan.lv["iliac_p"]
    free = s.free()
    if iliac:
        for side in (-1, 1):
            c = (cx + side * rng.uniform(9, 16), front - rng.uniform(7, 12))
            tissue[cv.poly(blob(rng, c, rng.uniform(5, 7), rng.uniform(5, 7))) & free] = T.ARTERY
            c = (cx + side * rng.uniform(12, 22), front - rng.uniform(1, 5))
            tissue[cv.poly(blob(rng, c, rng.uniform(7, 10), rng.uniform(5, 7), 0.3 * side)) & free] = T.VEIN
    else:
        outer = cv.poly(blob(rng, ao_c, r_ao, r_ao * rng.uniform(0.92, 1.05), wobble=0.02))
        tissue[outer & free] = T.ARTERY
        if aneurysm:
            lumen = cv.poly(blob(rng, (ao_c[0] + rng.uniform(-4, 4), ao_c[1] + rng.uniform(-4, 4)),
                                  r_ao * 0.55, r_ao * 0.5))
            tissue[outer & ~lumen & free] = T.THROMBUS
        # Calcified plaque with age.
        n_calc = rng.poisson(max(0.0, (plan.age - 45) / 8))
        for _ in range(int(min(n_calc, 8))):
            ang = rng.uniform(0, 2 * np.pi)
            c = (ao_c[0] + r_ao * 0.95 * math.cos(ang), ao_c[1] + r_ao * 0.95 * math.sin(ang))
            tissue[cv.poly(blob(rng, c, rng.uniform(0.8, 2.5), rng.uniform(0.5, 1.2), ang + np.pi / 2)) & (free | outer)] = T.CALCIFICATION
        ivc = cv.poly(blob(rng, ivc_c, rng.uniform(10, 15), rng.uniform(6, 11), rng.normal(0, 0.2)))
        tissue[ivc & free] = T.VEIN
    # Superior mesenteric artery and vein in front of the aorta.
    if rng.random() < plan.lv["sma_p"]:
        sma = (ao_c[0] + rng.uniform(-6, 2), ao_c[1] - r_ao - rng.uniform(12, 30))
        free = s.free()
        tissue[cv.poly(blob(rng, sma, rng.uniform(2.5, 4), rng.uniform(2.5, 4))) & free] = T.ARTERY
        smv = (sma[0] - rng.uniform(8, 14), sma[1] + rng.uniform(-4, 4))
        tissue[cv.poly(blob(rng, smv, rng.uniform(4, 6.5), rng.uniform(4, 6))) & s.free()] = T.VEIN
    else:
        sma = (ao_c[0], ao_c[1] - r_ao - 20)
    return Vessels(aorta_c=ao_c, r_ao=r_ao, sma=sma)


def abdominal_organs(s: Scene, plan: Plan, spine: SpineLayout, vessels: Vessels, psoas_lat: dict[int, float],
                     kidney_anchor: dict[int, tuple[float, float]], rng: np.random.Generator) -> Organs:
    """Contrast phase, kidneys, liver with gallbladder, spleen, stomach, pancreas and duodenum
    where the level makes them plausible."""
    cv, tissue, lv = s.cv, s.tissue, plan.lv
    cx, cy = spine.vb_c
    a_f, b = plan.a_f, (plan.b_ant + plan.b_post) / 2
    contrast = rng.choice(["none", "portal", "arterial"], p=[0.3, 0.55, 0.15])
    s.params["contrast"] = str(contrast)
    oral_contrast = bool(rng.random() < 0.25)
    s.params["oral_contrast"] = oral_contrast
    # Kidneys: right kidney sits lower, so at L3 it is the likelier one.
    kidneys = []
    for side in (-1, 1):
        p = lv["kidney_p"] * (1.0 if side < 0 else 0.85)
        if rng.random() > p:
            continue
        scale = lv["kidney"] * rng.uniform(0.7, 1.05)
        ra, rb = rng.uniform(30, 38) * scale, rng.uniform(19, 25) * max(scale, 0.55)
        ra = max(ra, rb * 1.25)
        ang = -side * rng.uniform(0.35, 0.9)
        anchor = kidney_anchor[side]
        centre = (anchor[0] + side * rng.uniform(-2, 12) - side * 0.1 * ra,
                  anchor[1] - rb * rng.uniform(0.55, 0.9))
        centre = (side * max(side * centre[0], psoas_lat[side] + ra * 0.55), centre[1])
        outline = blob(rng, centre, ra, rb, ang, wobble=0.04)
        kid = cv.poly(outline) & s.free()
        if not kid.any():
            continue
        tissue[kid] = T.KIDNEY_CORTEX
        # Medulla / sinus.
        px = min(cv.sx, cv.sy)
        k = max(1, int(round(rng.uniform(3.5, 6.5) / px)))
        inner = cv2.erode(kid.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))).view(bool)
        tissue[inner] = T.KIDNEY_MEDULLA
        if rng.random() < lv["hilum_p"] and scale > 0.6:
            # Hilum opens antero-medially: a wedge of sinus fat with the pelvis inside.
            direction = np.array([-side * 0.75, -0.66])
            apex = np.array(centre) + direction * ra * 0.05
            spread = rng.uniform(0.35, 0.6)
            base_ang = math.atan2(direction[1], direction[0])
            pts = [apex]
            for da in np.linspace(-spread, spread, 9):
                pts.append(apex + 1.4 * ra * np.array([math.cos(base_ang + da), math.sin(base_ang + da)]))
            wedge = cv.poly(np.array(pts)) & cv.poly(blob(rng, centre, ra * 1.05, rb * 1.05, ang, wobble=0.0))
            tissue[wedge & kid] = T.VAT_FAT  # renal sinus fat
            pelvis_c = apex + direction * ra * rng.uniform(0.25, 0.45)
            pel = cv.poly(blob(rng, pelvis_c, rng.uniform(4, 9), rng.uniform(3, 6), base_ang)) & wedge
            tissue[pel] = T.URINE
            vessel_c = apex + direction * ra * rng.uniform(0.55, 0.8)
            tissue[cv.poly(blob(rng, vessel_c, rng.uniform(3, 5), rng.uniform(2.5, 4))) & s.free()] = T.VEIN
        kidneys.append(kid)
    # Liver (patient's right), spleen (left), stomach, pancreas, gallbladder, duodenum.
    if lv["liver"] > 0 and rng.random() < (1.0 if lv["liver"] >= 0.5 else 0.5):
        size = lv["liver"] * rng.uniform(0.7, 1.15)
        ra, rb = a_f * 0.6 * size, b * 0.8 * size
        centre = (-(a_f - ra * rng.uniform(0.55, 0.8)), b * rng.uniform(-0.35, 0.25))
        liver = cv.poly(blob(rng, centre, ra, rb, rng.normal(0, 0.3), wobble=0.08)) & s.free()
        tissue[liver] = T.LIVER
        _organ_vessels(s, liver, 3 + int(9 * size), rng)
        if rng.random() < lv["gallbladder_p"]:
            gc = (centre[0] + ra * rng.uniform(0.3, 0.7), centre[1] - rb * rng.uniform(0.2, 0.6))
            gb = cv.poly(blob(rng, gc, rng.uniform(12, 22), rng.uniform(10, 18), rng.normal(0, 0.5)))
            tissue[gb & (s.free() | liver)] = T.GALLBLADDER
    if rng.random() < lv["spleen_p"]:
        size = rng.uniform(0.6, 1.1) * {"T11": 1.25, "T12": 1.15, "L1": 1.0}.get(plan.level, 0.6)
        centre = (a_f * rng.uniform(0.55, 0.8), plan.b_post * rng.uniform(0.0, 0.5))
        sp = cv.poly(blob(rng, centre, a_f * 0.3 * size, b * 0.45 * size, rng.uniform(-0.9, -0.3), wobble=0.06)) & s.free()
        tissue[sp] = T.SPLEEN
    if rng.random() < lv["stomach_p"]:
        centre = (a_f * rng.uniform(0.15, 0.45), -plan.b_ant * rng.uniform(0.25, 0.55))
        ra, rb = a_f * rng.uniform(0.25, 0.4), plan.b_ant * rng.uniform(0.25, 0.4)
        _lumen_organ(s, centre, ra, rb, rng.uniform(2.5, 5), T.STOMACH_WALL, oral_contrast, rng)
    if rng.random() < lv["pancreas_p"]:
        start = (vessels.sma[0] - rng.uniform(25, 40), vessels.sma[1] + rng.uniform(-8, 8))
        mid = (vessels.sma[0] + rng.uniform(-2, 6), vessels.sma[1] - rng.uniform(6, 14))
        end = (a_f * rng.uniform(0.3, 0.5), cy - plan.vb_d - rng.uniform(0, 20))
        pts = smooth_polyline(np.array([start, mid, end]), 30)
        pan = cv.line(pts, rng.uniform(13, 22)) & s.free()
        # Fatty lobulation with age.
        lob = smooth_field(rng, s.size, 3.0 / cv.sx) > (1.6 - 0.015 * max(0.0, plan.age - 40))
        tissue[pan & ~lob] = T.PANCREAS
    if rng.random() < lv["duodenum_p"]:
        y = cy - plan.vb_d - rng.uniform(12, 30)
        pts = smooth_polyline(np.array([(-a_f * rng.uniform(0.25, 0.4), y + rng.uniform(-10, 10)),
                                         (cx, y), (a_f * rng.uniform(0.1, 0.2), y - rng.uniform(0, 15))]), 30)
        wall_t = rng.uniform(2, 3.5)
        r = rng.uniform(6, 11)
        duo = cv.line(pts, 2 * r) & s.free()
        lumen = cv.line(pts, max(2 * (r - wall_t), 1.0)) & duo
        tissue[duo] = T.BOWEL_WALL
        tissue[lumen] = _content(oral_contrast, small=True, rng=rng)
        if rng.random() < 0.3:  # a little gas along the front wall
            rows = np.flatnonzero(lumen.any(axis=1))
            if rows.size:
                level = rows.min() + rng.uniform(0.1, 0.35) * (rows.max() - rows.min() + 1)
                tissue[lumen & (np.arange(s.size)[:, None] < level)] = T.BOWEL_AIR
    return Organs(contrast=contrast, oral_contrast=oral_contrast, kidneys=kidneys)


def _organ_vessels(s: Scene, organ: np.ndarray, count: int, rng: np.random.Generator) -> None:
    cv, tissue = s.cv, s.tissue
    idx = np.flatnonzero(organ)
    if idx.size == 0:
        return
    lines = np.zeros_like(organ)
    for i in rng.choice(idx, size=min(count, idx.size), replace=False):
        u0, v0 = s.cv.U.flat[i], s.cv.V.flat[i]
        if rng.random() < 0.6:  # vessel crossing the slice: a dot
            r = rng.uniform(1.5, 5)
            lines |= cv.poly(blob(rng, (u0, v0), r, r * rng.uniform(0.6, 1.0), rng.uniform(0, 3)))
            continue
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(5, 20)
        pts = np.array([[u0, v0], [u0 + length * math.cos(ang), v0 + length * math.sin(ang)]])
        lines |= cv.line(pts, rng.uniform(1.5, 4))
    tissue[lines & organ] = T.VEIN


def _lumen_organ(s: Scene, centre, ra, rb, wall_t, wall_tid, oral_contrast: bool, rng: np.random.Generator) -> None:
    """A hollow organ (stomach) with wall and contents (air rises to the front)."""
    cv, tissue = s.cv, s.tissue
    free = s.free()
    outer = cv.poly(blob(rng, centre, ra, rb, rng.normal(0, 0.3), wobble=0.1)) & free
    inner = cv.poly(blob(rng, centre, ra - wall_t, rb - wall_t, rng.normal(0, 0.3), wobble=0.1)) & outer
    tissue[outer] = wall_tid
    content = _content(oral_contrast, small=False, rng=rng)
    tissue[inner] = content
    if rng.random() < 0.7:
        rows = np.flatnonzero(inner.any(axis=1))
        if rows.size:
            level = rows.min() + rng.uniform(0.15, 0.6) * (rows.max() - rows.min())
            tissue[inner & (np.arange(s.size)[:, None] < level)] = T.BOWEL_AIR


def _content(oral_contrast: bool, small: bool, rng: np.random.Generator) -> int:
    if oral_contrast and rng.random() < (0.6 if small else 0.4):
        return T.BOWEL_CONTRAST
    return rng.choice([T.BOWEL_FLUID, T.BOWEL_WALL], p=[0.55, 0.45])

# ------------------------------------------------------------------ bowel


def bowel(s: Scene, plan: Plan, organs: Organs, rng: np.random.Generator) -> None:
    """Colon and small-bowel loops packed into the peritoneal cavity until the remaining
    fat is about the planned VAT."""
    cv, tissue = s.cv, s.tissue
    px_mm2 = cv.pixel_mm2
    free = s.free()
    # Keep retroperitoneal fat around the kidneys, psoas, spine and great vessels.
    excl = np.zeros_like(free)
    for kid in organs.kidneys:
        excl |= kid
    excl |= np.isin(tissue, (T.PSOAS, T.QUADRATUS, T.ARTERY, T.VEIN, T.BONE_CORTEX,
                             T.BONE_MARROW, T.CALCIFICATION, T.THROMBUS))
    margin_mm = rng.uniform(2, 6) + 0.02 * plan.vat_target
    k = max(1, int(round(margin_mm / cv.sx)))
    excl = cv2.dilate(excl.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))).view(bool)
    allowed = free & ~excl
    # Thin preperitoneal fat under the wall muscles.
    pre = rng.uniform(0.5, 2.0) + 0.025 * plan.vat_target ** 0.8
    muscle_band = np.isin(tissue, MUSCLES + (T.IMAT_FAT,))
    kk = max(1, int(round(pre / cv.sx)))
    allowed &= ~cv2.dilate(muscle_band.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kk + 1, 2 * kk + 1))).view(bool)
    if not allowed.any():
        return
    room = cv.distance_inside(allowed)
    fat_now = free.sum() * px_mm2
    target_bowel = max(0.0, fat_now - plan.vat_target * 100.0)
    s.params["bowel_target_cm2"] = round(target_bowel / 100, 1)
    cand = np.flatnonzero(room.ravel() > 3.0)
    if cand.size == 0:
        return
    cand = rng.permutation(cand)[:6000]
    # Lean abdomens are packed with bowel (loops touch and deform), fat ones are not.
    packing = float(np.clip(0.72 + 0.0012 * plan.vat_target, 0.72, 1.0))
    placed: list[tuple[float, float, float]] = []
    area = 0.0
    loops = []
    # Colon first: ascending colon on the right flank, descending on the left, sometimes the
    # transverse colon in front.
    colon_spots = [(-1, rng.uniform(-0.3, 0.35)), (1, rng.uniform(-0.1, 0.45))]
    if plan.level in ("L2", "L3") and rng.random() < 0.55:
        colon_spots.append((0, -0.7))
    if plan.level == "L4" and rng.random() < 0.5:
        colon_spots.append((0.5, -0.5))  # sigmoid
    for side, vfrac in colon_spots:
        target = np.array([side * plan.a_f * 0.72, vfrac * (plan.b_ant if vfrac < 0 else plan.b_post)])
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
    folds_field = smooth_field(rng, s.size, 1.5 / cv.sx)
    bubble_field = 0.6 * smooth_field(rng, s.size, 4.5 / cv.sx) + 0.8 * smooth_field(rng, s.size, 1.8 / cv.sx)
    wall_t = rng.uniform(1.2, 2.8)
    rows_idx = np.arange(s.size)[:, None]
    for cu, cvv, r, colon in loops:
        if colon:
            kind = rng.choice(["feces", "air", "fluid"], p=[0.45, 0.43, 0.12])
        else:
            kind = rng.choice(["contrast", "fluid", "collapsed", "air"],
                              p=[0.45, 0.27, 0.26, 0.02] if organs.oral_contrast else [0.0, 0.5, 0.46, 0.04])
        if not colon and rng.random() < 0.4:
            # A loop running in the slice plane: a curved tube.
            ang = rng.uniform(0, 2 * np.pi)
            length = r * rng.uniform(1.5, 3.5)
            bend = rng.normal(0, 0.6) * r
            d = np.array([math.cos(ang), math.sin(ang)])
            nrm = np.array([-d[1], d[0]])
            ctrl = np.array([[cu, cvv] - d * length / 2, [cu, cvv] + nrm * bend, [cu, cvv] + d * length / 2])
            path = smooth_polyline(ctrl, 16)
            rt = r * rng.uniform(0.55, 0.75)
            outer = cv.line(path, 2 * rt) & allowed
            lumen = cv.line(path, max(2 * (rt - wall_t), 1.0)) & outer
        else:
            elong = rng.uniform(1.0, 1.8) if not colon else rng.uniform(1.0, 1.3)
            ang = rng.uniform(0, np.pi)
            ra, rb = r * math.sqrt(elong), r / math.sqrt(elong)
            wob = 0.15 if not colon else 0.1
            outer = cv.poly(blob(rng, (cu, cvv), ra, rb, ang, wobble=wob)) & allowed
            wt = wall_t * (0.8 if colon else 1.0)
            lumen = cv.poly(blob(rng, (cu, cvv), max(ra - wt, 1), max(rb - wt, 1), ang, wobble=wob)) & outer
        tissue[outer] = T.BOWEL_WALL
        # Every loop has its own wall enhancement and content density.
        s.hu_offset[outer] = rng.normal(0, 8)
        s.hu_offset[lumen] = rng.normal(0, 7) if kind != "contrast" else rng.normal(0, 60)
        if kind == "collapsed":
            # Collapsed loop: soft tissue with a feathery pattern of fluid between folds.
            folds = folds_field > rng.uniform(0.4, 1.0)
            tissue[lumen & folds] = T.BOWEL_CONTRAST if organs.oral_contrast and rng.random() < 0.5 else T.BOWEL_FLUID
            continue
        if kind == "feces":
            tissue[lumen] = T.FECES
            bubbles = bubble_field > rng.uniform(1.0, 1.7)
            tissue[lumen & bubbles] = T.BOWEL_AIR
            if rng.random() < 0.5:  # gas collects in front
                rows = np.flatnonzero(lumen.any(axis=1))
                level = rows.min() + rng.uniform(0.05, 0.4) * (rows.max() - rows.min() + 1)
                tissue[lumen & (rows_idx < level)] = T.BOWEL_AIR
            continue
        tissue[lumen] = T.BOWEL_CONTRAST if kind == "contrast" else T.BOWEL_FLUID
        if kind == "air" or rng.random() < 0.08:
            rows = np.flatnonzero(lumen.any(axis=1))
            if rows.size:
                frac = rng.uniform(0.5, 1.0) if kind == "air" else rng.uniform(0.1, 0.35)
                level = rows.min() + frac * (rows.max() - rows.min() + 1)
                tissue[lumen & (rows_idx < level)] = T.BOWEL_AIR
    s.params["bowel_loops"] = len(loops)


def small_vessels(s: Scene, plan: Plan, vessels: Vessels, rng: np.random.Generator) -> None:
    """Mesenteric vessels: dots and short in-plane segments in the visceral fat."""
    cv, tissue = s.cv, s.tissue
    free = s.free()
    n = int(rng.integers(15, 60) + 0.15 * plan.vat_target)
    lines = np.zeros_like(free)
    root = np.array(vessels.sma)
    for _ in range(n):
        c = root + rng.normal(0, 1, 2) * np.array([plan.a_f * 0.45, (plan.b_ant + plan.b_post) * 0.25])
        if rng.random() < 0.75:
            lines |= cv.poly(blob(rng, c, rng.uniform(0.6, 2.2), rng.uniform(0.6, 2.0)))
        else:  # a short curved stretch running in the slice
            ang = rng.uniform(0, 2 * np.pi)
            ln = rng.uniform(3, 12)
            d = np.array([math.cos(ang), math.sin(ang)])
            ctrl = np.array([c, c + d * ln / 2 + rng.normal(0, ln / 4, 2), c + d * ln])
            lines |= cv.line(smooth_polyline(ctrl, 8), rng.uniform(0.5, 1.5))
    tissue[lines & free] = T.SMALL_VESSEL
