"""Musculoskeletal anatomy: vertebra, ribs, back muscles, abdominal wall, psoas and quadratus
lumborum, intercostal muscles and the fat inside the muscles (IMAT)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from sarco_app.synthesis.phantom.anatomy.scene import Scene
from sarco_app.synthesis.phantom.geometry import blob, profile, ramp, smooth_polyline
from sarco_app.synthesis.phantom.plan import Plan
from sarco_app.synthesis.phantom.tissues import MUSCLES, T


@dataclass(frozen=True)
class SpineLayout:
    """Where the vertebra lies (patient mm): body centre ``vb_c`` (u, v), axial rotation
    ``angle`` (rad), transverse-process axis ``tp_v``, pedicle width, transverse-process length
    and root, spinous-process half width, concavity of the body's back and canal centre ``v``."""

    vb_c: np.ndarray
    angle: float
    tp_v: float
    ped_w: float
    tp_len: float
    tp_root: float
    sp_half: float
    conc: float
    canal_c_v: float


def spine_layout(plan: Plan, rng: np.random.Generator) -> SpineLayout:
    """Where the vertebra and its processes lie (drawn before any muscle, which hangs on them)."""
    vb_c = np.array([rng.normal(0, 2.0), plan.vb_off])
    angle = float(np.clip(rng.normal(0, 0.04), -0.1, 0.1))  # rad
    tp_v = vb_c[1] + plan.tp_v_off
    ped_w = rng.uniform(7.0, 9.5) * plan.k_sp
    tp_len = rng.uniform(0.8, 1.15) * 30.0 * plan.k_sp * plan.lv["tp"]
    tp_root = plan.canal_hw + ped_w * 0.6
    sp_half = rng.uniform(3.8, 5.8) * plan.k_sp
    conc = rng.uniform(0.12, 0.25)
    canal_c_v = vb_c[1] + plan.vb_d * (1 - conc * 0.8) + plan.canal_hd * 0.95
    return SpineLayout(vb_c=vb_c, angle=angle, tp_v=tp_v, ped_w=ped_w, tp_len=tp_len,
                       tp_root=tp_root, sp_half=sp_half, conc=conc, canal_c_v=canal_c_v)


def back_muscles(s: Scene, plan: Plan, spine: SpineLayout, rng: np.random.Generator) -> dict[int, float]:
    """Erector spinae + multifidus: rounded boxes behind the transverse processes, clipped by
    the envelope so their back surface is its fascia."""
    cv, tissue = s.cv, s.tissue
    inside = s.env_mask & s.body
    es_lat = {}
    for side in (-1, 1):
        w, h = plan.w_es * rng.uniform(0.94, 1.06), plan.h_es
        x0 = spine.vb_c[0]
        top = spine.tp_v + rng.uniform(3.0, 5.0)
        x_lat = spine.sp_half * 0.3 + w
        rx = w * rng.uniform(0.35, 0.5)
        ry = (plan.b_post + 20 - top) / 2
        t = np.linspace(-np.pi / 2, np.pi * 0.42, 14)
        lateral = np.stack([x_lat - rx + rx * np.cos(t), top + ry + ry * np.sin(t)], axis=1)
        lam_v = spine.canal_c_v + plan.canal_hd + 6
        pts = np.vstack([[[0.0, lam_v], [spine.tp_root, top]], lateral,
                         [[x_lat - rx * 1.1, plan.b_post + 25], [0.0, plan.b_post + 25]]])
        pts[:, 0] = x0 + side * pts[:, 0]
        pts = pts + rng.normal(0, 0.8, pts.shape)
        mask = cv.poly(pts) & inside
        tissue[mask] = T.ERECTOR
        es_lat[side] = x0 + side * x_lat
        # Fat plane between multifidus and longissimus (IMAT).
        if rng.random() < 0.85:
            mu = spine.tp_root * rng.uniform(0.8, 1.1) + w * rng.uniform(0.05, 0.2)
            pts = np.array([[mu, top + 1], [mu + rng.uniform(-4, 4), top + h * 0.5],
                            [mu + rng.uniform(-8, 2), plan.b_post + 10]])
            pts[:, 0] = x0 + side * pts[:, 0]
            plane = cv.line(smooth_polyline(pts, 20), rng.uniform(0.5, 1.3)) & mask
            tissue[plane] = T.IMAT_FAT
    # Interspinous ligament / supraspinous fascia at the midline behind the spinous process.
    mid = np.array([[spine.vb_c[0], spine.tp_v], [spine.vb_c[0], plan.b_post + 20]])
    tissue[cv.line(mid, rng.uniform(1.0, 2.5)) & inside & (tissue == T.ERECTOR)] = T.FASCIA
    return es_lat


def abdominal_wall(s: Scene, plan: Plan, es_lat: dict[int, float], rng: np.random.Generator) -> None:
    """Rectus pair and the three lateral layers as bands under the envelope, in
    (arc position, depth) coordinates; thin fat planes (IMAT) between layers."""
    cv, tissue = s.cv, s.tissue
    d, arc = s.d_in, s.arc
    half = s.envelope.perimeter / 2
    grid = np.linspace(0, half, 800)
    male = plan.sex == "M"
    la = rng.uniform(2.5, 7.0)
    if rng.random() < 0.12 + 0.01 * max(0.0, plan.bmi - 28):
        la += rng.uniform(6, 25)  # diastasis recti
    s.params["linea_alba_mm"] = round(2 * la, 1)
    zone = s.env_mask & (tissue == T.VAT_FAT)
    for side in (-1, 1):
        sel = zone & ((arc > 0) if side > 0 else (arc <= 0))
        a = np.abs(arc[sel])
        dd = d[sel]
        # Posterior end of the lateral wall: where the erector spinae meet the envelope.
        end = abs(s.envelope.arc_of_point(es_lat[side], plan.b_post * 0.6))
        end = min(end, half - 20)
        w_r = rng.uniform(55, 80) * (1.0 if male else 0.9) * (plan.height_cm / 170) ** 0.5
        t_r = plan.rectus_a / (0.72 * w_r)
        rect = t_r * np.clip(np.sin(np.pi * np.clip((grid - la) / w_r, 0, 1)), 0, None) ** 0.55
        rect *= profile(rng, grid, 0.05, 3, half)
        start = la + w_r * rng.uniform(0.72, 1.0)
        length = max(end - start, 40.0)
        # Layer thickness profiles (external oblique ends before the others).
        eo_end = end - rng.uniform(10, 55)
        shapes = {
            "eo": ramp(grid, start, rng.uniform(15, 35)) * (1 - ramp(grid, eo_end - 30, 30)),
            "io": ramp(grid, start + rng.uniform(0, 10), rng.uniform(15, 35))
            * (1 - ramp(grid, end - rng.uniform(10, 35), 25)),
            "ta": ramp(grid, la + w_r * rng.uniform(0.55, 0.9), rng.uniform(15, 30))
            * (1 - ramp(grid, end - rng.uniform(0, 15), 20)),
        }
        rel = {"eo": rng.uniform(0.8, 1.2), "io": rng.uniform(0.9, 1.4), "ta": rng.uniform(0.45, 0.8)}
        # Scale so the band area matches the planned wall area (integral over arc).
        step = grid[1] - grid[0]
        unit = sum(rel[k] * shapes[k] for k in shapes).sum() * step
        scale = plan.wall_a / max(unit, 1.0) * (1 + 0.05 * (length < 120))
        thick = {k: rel[k] * shapes[k] * scale * profile(rng, grid, 0.08, 4, half) for k in shapes}
        if plan.lv["latissimus_p"] > rng.random():
            ld = (ramp(grid, end - rng.uniform(60, 110), 25) * (1 - ramp(grid, end + 15, 20))
                  * rng.uniform(1.5, 6.0) * (1.6 if plan.level in ("T11", "T12", "L1") else 1.0))
        else:
            ld = np.zeros_like(grid)
        gap_w = rng.uniform(0.3, 1.4)
        layers = [("ld", ld, T.LATISSIMUS), ("eo", thick["eo"], T.WALL_MUSCLE),
                  ("rectus", rect, T.RECTUS), ("io", thick["io"], T.WALL_MUSCLE),
                  ("ta", thick["ta"], T.WALL_MUSCLE)]
        tt = [np.interp(a, grid, th) for _, th, _ in layers]
        out = np.full(a.shape, T.VAT_FAT, dtype=np.uint8)
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
            onoff = np.clip((profile(rng, grid, 1.2, 4, half) - 0.8) * 3, 0, 1)
            g = gap_w * np.interp(a, grid, onoff)
            ingap = gap & (dd >= top) & (dd < top + g)
            out[ingap] = T.IMAT_FAT
            top = top + np.where(gap, g, 0.0)
        # Linea alba: fibrous band between the recti.
        out[(a < la) & (dd < rng.uniform(1.5, 3.5))] = T.FASCIA
        cur = tissue[sel]
        keep = cur != T.VAT_FAT
        out[keep] = cur[keep]
        tissue[sel] = out
    s.params["rectus_width_mm"] = round(w_r, 1)
    # Transversalis / thoracolumbar fascia: wherever no muscle lines the envelope, a thin
    # fibrous layer still separates the subcutaneous from the visceral compartment.
    ring = s.env_mask & (d <= 1.5 * max(cv.sx, cv.sy)) & (tissue == T.VAT_FAT)
    tissue[ring] = T.FASCIA


def psoas_and_quadratus(s: Scene, plan: Plan, spine: SpineLayout, rng: np.random.Generator):
    """Psoas and quadratus lumborum pairs. Returns the lateral edge of each psoas (|u|, mm) and
    where each kidney rests (the front of the quadratus), per side (-1 right, +1 left)."""
    cv, tissue = s.cv, s.tissue
    inside = s.env_mask & s.body
    psoas_lat, kidney_anchor = {}, {}
    for side in (-1, 1):
        area = plan.psoas_a * rng.uniform(0.9, 1.1)
        asp = rng.uniform(1.05, 1.5)
        rb = math.sqrt(area / (math.pi * asp))
        ra = asp * rb
        ang = side * rng.uniform(0.4, 1.1)
        centre = (spine.vb_c[0] + side * (plan.vb_w * 0.85 + ra * 0.55),
                  spine.vb_c[1] - plan.vb_d * rng.uniform(-0.1, 0.45))
        if plan.level == "L4":
            centre = (centre[0] + side * rng.uniform(2, 8), centre[1] - rng.uniform(0, 8))
        poly = blob(rng, centre, ra, rb, ang, wobble=0.07)
        m = cv.poly(poly) & inside & np.isin(tissue, (T.VAT_FAT, T.IMAT_FAT))
        tissue[m] = T.PSOAS
        psoas_lat[side] = abs(centre[0]) + ra * 0.9
        # Quadratus lumborum: oval lateral to the psoas at the transverse process tip, in
        # front of the erector spinae, its lateral end turned forward.
        area = plan.ql_a * rng.uniform(0.85, 1.15)
        asp = rng.uniform(1.6, 2.6)
        rb = math.sqrt(area / (math.pi * asp))
        ra = asp * rb
        ang_q = -side * rng.uniform(0.1, 0.5)
        tip = spine.vb_c[0] + side * (spine.tp_root + spine.tp_len)
        centre_q = (tip + side * ra * rng.uniform(0.1, 0.5),
                    spine.tp_v + 4 - rb * rng.uniform(0.8, 1.0))
        poly = blob(rng, centre_q, ra, rb, ang_q, wobble=0.05)
        m = cv.poly(poly) & inside & np.isin(tissue, (T.VAT_FAT, T.IMAT_FAT))
        tissue[m] = T.QUADRATUS
        kidney_anchor[side] = (centre_q[0], centre_q[1] - rb)
    return psoas_lat, kidney_anchor


def vertebra(s: Scene, plan: Plan, spine: SpineLayout, rng: np.random.Generator) -> None:
    """Vertebra: body with cortical shell, canal with thecal sac, posterior elements."""
    cv, tissue = s.cv, s.tissue
    cx, cy = spine.vb_c
    # Slight axial rotation of the whole vertebra (scoliosis, positioning).
    c_rot, s_rot = math.cos(spine.angle), math.sin(spine.angle)

    def rotate(pts):
        d = np.asarray(pts, dtype=float) - (cx, cy)
        return np.stack([c_rot * d[:, 0] - s_rot * d[:, 1] + cx,
                         s_rot * d[:, 0] + c_rot * d[:, 1] + cy], axis=1)

    w, dpt = plan.vb_w, plan.vb_d
    t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    # Kidney-bean body: posterior border pushed forward in the middle.
    conc = spine.conc
    pu = w * ct
    pv = dpt * st * (1 - conc * np.exp(-(ct ** 2) / 0.08) * (st > 0))
    # Osteophytes at the front corners in older patients.
    if plan.age > 55 and rng.random() < 0.03 * (plan.age - 50):
        bump = rng.uniform(1.5, 4)
        r_ost = 1 + bump / w * np.exp(-((t - 1.25 * np.pi) ** 2) / 0.02) + bump / w * np.exp(-((t - 1.75 * np.pi) ** 2) / 0.02)
        pu, pv = pu * r_ost, pv * r_ost
    body_poly = np.stack([pu + cx, pv + cy], axis=1)
    body_mask = cv.poly(body_poly)  # (a rotated oval barely changes: not rotated)
    canal_c = (cx, spine.canal_c_v)
    canal = blob(rng, canal_c, plan.canal_hw, plan.canal_hd, 0.0, wobble=0.03)
    canal[:, 1] = np.where(canal[:, 1] < canal_c[1], canal_c[1] - (canal_c[1] - canal[:, 1]) * 0.8, canal[:, 1])
    canal_mask = cv.poly(rotate(canal))
    back = canal_c[1] + plan.canal_hd
    ped_front = cy + dpt * 0.45
    elements = []
    for side in (-1, 1):
        x_in, x_out = cx + side * (plan.canal_hw - 1.5), cx + side * (plan.canal_hw + spine.ped_w)
        elements.append(np.array([[x_in, ped_front], [x_out, ped_front],
                                  [x_out, back + 1], [x_in, back + 1]]))  # pedicle
        lam_t = rng.uniform(6.0, 9.0)
        elements.append(np.array([[x_out, back - lam_t], [x_out, back + 2],
                                  [cx + side * spine.sp_half, back + 5 + lam_t],
                                  [cx + side * spine.sp_half, back + 4]]))  # lamina
        # Transverse process: tapering, tilted slightly backward, round tip.
        if spine.tp_len > 3:
            root = cx + side * spine.tp_root
            tip = root + side * spine.tp_len
            tilt = rng.uniform(-1, 7)
            tw = rng.uniform(7, 10) * plan.k_sp
            tip_w = tw * rng.uniform(0.45, 0.7)
            elements.append(np.array([[root - side * 2, spine.tp_v - tw / 2], [tip, spine.tp_v + tilt - tip_w / 2],
                                      [tip + side * tip_w * 0.4, spine.tp_v + tilt],
                                      [tip, spine.tp_v + tilt + tip_w / 2], [root - side * 2, spine.tp_v + tw / 2]]))
        # Articular processes.
        elements.append(blob(rng, (cx + side * (plan.canal_hw + spine.ped_w * 0.55), back + rng.uniform(1, 5)),
                              rng.uniform(5, 7.5), rng.uniform(6, 9), side * 0.5, wobble=0.08))
    # Spinous process to just under the back fascia.
    sp_end = plan.b_post - rng.uniform(3, 14)
    sp_end = max(sp_end, back + 15)
    sp = np.array([[cx - spine.sp_half, back + 3], [cx + spine.sp_half, back + 3],
                   [cx + spine.sp_half * 0.8, sp_end - 4], [cx + spine.sp_half * 1.25, sp_end],
                   [cx - spine.sp_half * 1.25, sp_end], [cx - spine.sp_half * 0.8, sp_end - 4]])
    elements.append(sp)
    post = np.zeros_like(body_mask)
    for poly in elements:
        post |= cv.poly(rotate(poly))
    post &= ~canal_mask
    # Epidural fat and thecal sac.
    tissue[canal_mask] = T.EPIDURAL_FAT
    sac = blob(rng, (canal_c[0], canal_c[1] + rng.uniform(-1, 1)), plan.canal_hw * rng.uniform(0.55, 0.75),
                plan.canal_hd * rng.uniform(0.65, 0.85), 0.0, wobble=0.03)
    tissue[cv.poly(rotate(sac)) & canal_mask] = T.CSF
    bone = body_mask | post
    px = min(cv.sx, cv.sy)
    k_cort = max(1, int(round(rng.uniform(0.9, 1.6) / px)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k_cort + 1, 2 * k_cort + 1))
    inner_body = cv2.erode(body_mask.view(np.uint8), kernel).view(bool)
    k_post = max(1, int(round(rng.uniform(0.9, 1.6) / px)))
    kernel_p = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k_post + 1, 2 * k_post + 1))
    inner_post = cv2.erode(post.view(np.uint8), kernel_p).view(bool)
    tissue[bone] = T.BONE_CORTEX
    tissue[inner_body | inner_post] = T.BONE_MARROW
    # Basivertebral vein notch at the back of the body.
    notch = blob(rng, (cx, cy + dpt * (1 - conc) - 1.5), rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.5))
    tissue[cv.poly(notch) & body_mask] = T.VEIN


def ribs(s: Scene, plan: Plan, rng: np.random.Generator, rng_upper: np.random.Generator) -> None:
    """Rib cross-sections in the lateral wall at L1-L2 (sometimes the 12th rib tip at L3)."""
    cv, tissue = s.cv, s.tissue
    n_ribs = plan.lv["ribs"]
    if n_ribs <= 0:
        return
    half = s.envelope.perimeter / 2
    for side in (-1, 1):
        count = rng.poisson(n_ribs)
        for _ in range(int(min(count, 6))):
            arc = side * rng.uniform(*plan.lv["rib_arc"]) * half
            p, normal = s.envelope.point_at_arc(arc)
            depth = rng.uniform(4, 14)
            centre = p + normal * depth
            ra, rb = rng.uniform(5, 8), rng.uniform(2.5, 4.5)
            ang = math.atan2(normal[1], normal[0]) + np.pi / 2 + rng.normal(0, 0.3)
            outer = cv.poly(blob(rng, centre, ra, rb, ang, wobble=0.04))
            inner = cv.poly(blob(rng, centre, ra - 1.6, max(rb - 1.6, 0.6), ang, wobble=0.02))
            where = s.env_mask & np.isin(tissue, MUSCLES + (T.VAT_FAT, T.IMAT_FAT))
            cartilage = arc * side < 0.4 * half and rng.random() < 0.6
            tissue[outer & where] = T.CARTILAGE if cartilage else T.BONE_CORTEX
            tissue[inner & where] = T.CARTILAGE if cartilage else T.BONE_MARROW
    if n_ribs >= 3:
        _intercostals(s, rng_upper)


def _intercostals(s: Scene, rng: np.random.Generator) -> None:
    """Intercostal muscles at T11-T12: a muscle band at the ribs' depth joining them along
    the lateral and posterior wall (skeletal muscle of the trunk, label muscle)."""
    tissue = s.tissue
    ribs = np.isin(tissue, (T.BONE_CORTEX, T.BONE_MARROW, T.CARTILAGE)) & s.env_mask & (s.d_in < 30)
    if not ribs.any():
        return
    depth = s.d_in[ribs]
    lo, hi = np.percentile(depth, 15), np.percentile(depth, 85)
    a = np.abs(s.arc[ribs])
    half = s.envelope.perimeter / 2
    band = (s.env_mask & (tissue == T.VAT_FAT) & (s.d_in >= lo - rng.uniform(0.5, 2.5))
            & (s.d_in <= hi + rng.uniform(0.5, 2.5)) & (np.abs(s.arc) >= a.min() - 10)
            & (np.abs(s.arc) <= min(a.max() + 10, half - 15)))
    tissue[band] = T.WALL_MUSCLE


def imat(s: Scene, plan: Plan, rng: np.random.Generator) -> None:
    """Fat specks inside the muscles (round in the back muscles and psoas, whose fibres run
    cranio-caudally; streaks along the layers of the abdominal wall)."""
    cv, tissue = s.cv, s.tissue
    muscle = np.isin(tissue, MUSCLES)
    idx = np.flatnonzero(muscle)
    if idx.size == 0:
        return
    already = (tissue == T.IMAT_FAT).sum()
    target_px = plan.imat_frac * idx.size - already
    if target_px <= 0:
        return
    canvas = np.zeros((s.size, s.size), np.uint8)
    px = cv.sx
    picks = rng.choice(idx, size=min(idx.size, 6000), replace=True)
    # Fat infiltrates the back muscles most, the psoas least.
    weight = {T.ERECTOR: 1.0, T.QUADRATUS: 0.6, T.WALL_MUSCLE: 0.45, T.RECTUS: 0.4,
              T.LATISSIMUS: 0.5, T.PSOAS: 0.2}
    accept = rng.random(picks.size)
    for n, (i, u_acc) in enumerate(zip(picks, accept)):
        # Count what was really drawn (a speck is at least one pixel).
        if n % 25 == 0 and (canvas.view(bool) & muscle).sum() >= target_px:
            break
        tid = tissue.flat[i]
        if u_acc > weight.get(int(tid), 0.5):
            continue
        row, col = divmod(int(i), s.size)
        if tid in (T.ERECTOR, T.PSOAS, T.QUADRATUS) and rng.random() < 0.8:
            a = rng.uniform(0.6, 2.2) / px  # fibres run cranio-caudally: fat as dots
            b = a * rng.uniform(0.5, 1.0)
            ang = rng.uniform(0, 180)
        elif tid in (T.ERECTOR, T.PSOAS, T.QUADRATUS):
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
    tissue[(canvas > 0) & muscle] = T.IMAT_FAT
