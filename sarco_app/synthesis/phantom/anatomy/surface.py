"""The body surface and what lies outside it: the body outline with its subcutaneous fat,
navel, septa and skin, the arms, the CT table and the reconstruction field of view."""

from __future__ import annotations

import math

import numpy as np

from sarco_app.synthesis.phantom.anatomy.scene import Envelope, Scene
from sarco_app.synthesis.phantom.geometry import Canvas, blob, circle_mask
from sarco_app.synthesis.phantom.plan import Plan
from sarco_app.synthesis.phantom.tissues import T


def body_outline(plan: Plan, rng: np.random.Generator, params: dict) -> Scene:
    """The supersampled grid with the body: visceral fat inside the muscle envelope,
    subcutaneous fat around it (navel at L3/L4, back flattened on the table)."""
    f = plan.supersampling
    size = plan.out_size * f
    cv = Canvas(size, (plan.spacing[0] / f, plan.spacing[1] / f), plan.angle, plan.shift)
    tissue = np.full((size, size), T.AIR, dtype=np.uint8)
    hu_offset = np.zeros((size, size), np.float32)  # per-object HU shifts
    env = plan.envelope
    env_mask = cv.poly(env)
    d_out = cv.distance_inside(~env_mask)
    theta_pix = np.arctan2(cv.V, cv.U)
    body = env_mask | (d_out < plan.sat.thickness(theta_pix))
    _umbilicus(plan, cv, body, rng)
    # Flatten the back where it lies on the table (scanner vertical).
    rows_env = np.flatnonzero(env_mask.any(axis=1))
    rows_body = np.flatnonzero(body.any(axis=1))
    if rows_body.size and rows_env.size:
        env_bottom = rows_env.max() * cv.sy
        body_bottom = rows_body.max() * cv.sy
        cut = body_bottom - rng.uniform(0, 0.5) * max(0.0, body_bottom - env_bottom - 3 * plan.sat.skin_mm)
        body &= (np.arange(size)[:, None] * cv.sy) <= cut
    tissue[body] = T.SAT_FAT
    tissue[env_mask & body] = T.VAT_FAT

    # Curvilinear coordinates inside the envelope: depth and arc position of the nearest
    # envelope point (mm from the anterior midline, positive toward the patient's left).
    envelope = Envelope(env)
    d_in = cv.distance_inside(env_mask)
    near = cv.nearest_outside(env_mask)
    arc = envelope.arc_position(cv.U.ravel()[near], cv.V.ravel()[near])
    return Scene(cv=cv, size=size, tissue=tissue, hu_offset=hu_offset, envelope=envelope,
                 env_mask=env_mask, body=body, d_in=d_in, arc=arc, params=params)


def _umbilicus(plan: Plan, cv: Canvas, body: np.ndarray, rng: np.random.Generator) -> None:
    """Navel at L3/L4: a narrow air-filled pit through the anterior SAT."""
    if plan.level not in ("L3", "L4") or rng.random() > 0.3:
        return
    t_front = float(plan.sat.thickness(np.array([-np.pi / 2]))[0])
    depth = min(t_front * rng.uniform(0.15, 0.6), 25.0)
    width = rng.uniform(8, 20)
    bottom = width * rng.uniform(0.25, 0.5)
    front = -(plan.b_ant + t_front) - 6
    # A funnel with a rounded floor and flared rim.
    t = np.linspace(0, np.pi, 12)
    floor = np.stack([bottom / 2 * np.cos(t), front + 6 + depth + bottom * 0.4 * np.sin(t)], axis=1)
    rim = front + 6 + depth * 0.25
    pts = np.vstack([[[-width, front], [-width / 2, rim]], floor[::-1], [[width / 2, rim], [width, front]]])
    pts[:, 0] += rng.uniform(-6, 6)
    body &= ~cv.poly(pts)


def sat_details(s: Scene, plan: Plan, rng: np.random.Generator) -> None:
    """Fibrous septa and Scarpa's fascia inside the SAT. They are thinner than a pixel in
    reality and belong to the SAT compartment (label SAT); they only raise the HU a little."""
    cv, tissue = s.cv, s.tissue
    sat = tissue == T.SAT_FAT
    lines = np.zeros_like(sat)
    n_septa = int(rng.integers(2, 10) + 0.3 * plan.sat.mean_mm)
    for _ in range(n_septa):
        th0 = rng.uniform(-np.pi, np.pi)
        span = rng.uniform(15, 70) / max(plan.a_f, 50)
        th = th0 + np.linspace(0, span, 12)
        frac = np.clip(rng.uniform(0.1, 0.9) + np.linspace(0, rng.normal(0, 0.25), 12), 0.03, 0.97)
        pts = _polar_offset(s, plan, th, frac)
        lines |= cv.line(pts, 0.5)
    # Scarpa's fascia: a long, broken line in the anterior and lateral SAT.
    if plan.sat.mean_mm > 12 and rng.random() < 0.7:
        frac0 = rng.uniform(0.3, 0.55)
        for _ in range(int(rng.integers(2, 5))):
            th0 = rng.uniform(-np.pi * 0.95, -np.pi * 0.05)
            th = th0 + np.linspace(0, rng.uniform(0.3, 0.9), 30)
            frac = np.clip(frac0 + np.cumsum(rng.normal(0, 0.01, 30)), 0.1, 0.9)
            lines |= cv.line(_polar_offset(s, plan, th, frac), 0.6)
    tissue[lines & sat] = T.SAT_SEPTUM


def _polar_offset(s: Scene, plan: Plan, theta, frac):
    """Points at fraction ``frac`` of the SAT depth at polar angles ``theta`` (approx.)."""
    u_e, v_e = s.envelope.polar(theta)
    r_e = np.hypot(u_e, v_e)
    r = r_e + frac * plan.sat.thickness(theta)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def skin(s: Scene, plan: Plan) -> None:
    """The dense skin, the outer ``skin_mm`` of the body."""
    s.tissue[s.body & (s.cv.distance_inside(s.body) < plan.sat.skin_mm)] = T.SKIN


def arms(s: Scene, plan: Plan, rng: np.random.Generator) -> None:
    """The forearms beside the body (skin, fat, muscle with fat planes, one or two bones);
    arm muscle is not trunk muscle (label background)."""
    cv, tissue = s.cv, s.tissue
    arm_r, gap = plan.arm_r, plan.arm_gap
    body = s.body
    for side in (-1, 1):
        v_arm = rng.uniform(-0.2, 0.5) * plan.b_post
        band = body & (np.abs(cv.V - v_arm) < 15)
        if not band.any():
            continue
        x_edge = float(np.max(side * cv.U[band]))
        ra = arm_r * rng.uniform(1.0, 1.25)
        rb = arm_r * rng.uniform(0.7, 0.95)
        centre = (side * (x_edge + gap + ra), v_arm)
        ang = side * rng.uniform(0.6, 1.4)  # forearm long axis runs antero-posteriorly
        air = tissue == T.AIR
        outer = cv.poly(blob(rng, centre, ra, rb, ang, wobble=0.05)) & air
        tissue[outer] = T.ARM_SKIN
        skin = rng.uniform(1.2, 2.2)
        fat_t = rng.uniform(3, 9) * (1 + 0.04 * (plan.bmi - 25))
        tissue[cv.poly(blob(rng, centre, ra - skin, rb - skin, ang, wobble=0.04)) & outer] = T.ARM_FAT
        muscle = cv.poly(blob(rng, centre, ra - skin - fat_t, rb - skin - fat_t, ang, wobble=0.1)) & outer
        tissue[muscle] = T.ARM_MUSCLE
        for _ in range(int(rng.integers(2, 5))):  # fat planes between the forearm muscles
            a0 = rng.uniform(0, 2 * np.pi)
            pts = np.array([centre, (centre[0] + ra * math.cos(a0), centre[1] + ra * math.sin(a0))])
            tissue[cv.line(pts, rng.uniform(0.6, 1.8)) & muscle] = T.ARM_FAT
        n_bones = 1 if rng.random() < 0.4 else 2
        for j in range(n_bones):
            off = (j - (n_bones - 1) / 2) * ra * 0.5
            bc = (centre[0] + off * math.cos(ang) + rng.normal(0, 2), centre[1] + off * math.sin(ang) + rng.normal(0, 2))
            r_b = rng.uniform(6, 11) if n_bones == 1 else rng.uniform(5, 8)
            bone = cv.poly(blob(rng, bc, r_b, r_b * rng.uniform(0.7, 1.0), rng.uniform(0, 3)))
            tissue[bone & outer] = T.BONE_CORTEX
            tissue[cv.poly(blob(rng, bc, r_b * 0.6, r_b * 0.5, 0)) & outer] = T.BONE_MARROW


def table(s: Scene, rng: np.random.Generator) -> None:
    """Curved table (two thin shells, sometimes a foam pad) under the patient."""
    cv, tissue = s.cv, s.tissue
    s.params["table"] = False
    if rng.random() > 0.7:
        return
    occupied = tissue != T.AIR
    rows = np.flatnonzero(occupied.any(axis=1))
    if rows.size == 0:
        return
    body_cols = np.flatnonzero(occupied.any(axis=0))
    xc = float(cv.X[0, body_cols].mean()) + rng.uniform(-10, 10)
    radius = rng.uniform(500, 1400)
    width = rng.uniform(380, 500)
    bottom_y = np.where(occupied.any(axis=0), np.argmax(np.cumsum(occupied[::-1], axis=0) > 0, axis=0), 0)
    bottom_row = s.size - 1 - bottom_y
    col_x = cv.X[0]
    sag = (col_x - xc) ** 2 / (2 * radius)
    rel = (bottom_row * cv.sy - (s.size - 1) / 2 * cv.sy) + sag
    ok = occupied.any(axis=0)
    y_top0 = float(np.max(rel[ok])) + rng.uniform(0.5, 2.5)
    pad_t = rng.uniform(15, 45) if rng.random() < 0.4 else 0.0
    X, Y = cv.X, cv.Y
    top = y_top0 + pad_t - (X - xc) ** 2 / (2 * radius)
    inside_w = np.abs(X - xc) < width / 2
    air = tissue == T.AIR
    if pad_t > 0:
        pad = inside_w & (Y >= top - pad_t) & (Y < top) & air & (np.abs(X - xc) < width / 2 - 15)
        tissue[pad] = T.PAD
    shell = max(rng.uniform(1.0, 2.5), 1.6 * cv.sy)
    gap = rng.uniform(12, 40)
    lower_w = width * rng.uniform(0.75, 1.0)
    upper = inside_w & (Y >= top) & (Y < top + shell) & air
    lower = (np.abs(X - xc) < lower_w / 2) & (Y >= top + gap) & (Y < top + gap + shell * rng.uniform(0.8, 1.5)) & air
    tissue[upper | lower] = T.TABLE_SHELL
    if rng.random() < 0.5:
        core = inside_w & (Y >= top + shell) & (Y < top + gap) & air & (np.abs(X - xc) < lower_w / 2)
        tissue[core] = T.TABLE_CORE
    s.params["table"] = True


def field_of_view(s: Scene, rng: np.random.Generator) -> None:
    """Circular reconstruction field of view (pad value outside) on most scans."""
    tissue = s.tissue
    s.params["fov_circle"] = False
    fov = np.ones((s.size, s.size), bool)
    if rng.random() < 0.55:
        fov = circle_mask(s.size)
        tissue[~fov] = T.OUTSIDE_FOV
        s.params["fov_circle"] = True
    truncated = bool((s.body & ~fov).any() or s.body[0].any() or s.body[-1].any()
                     or s.body[:, 0].any() or s.body[:, -1].any())
    s.params["truncated"] = truncated
