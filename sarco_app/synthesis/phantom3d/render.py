"""Rendering of the volume phantom: the HU of one axial plane (soft tissue, then bone on finer
sub-planes) and the rib tubes painted into the whole volume."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sarco_app.synthesis.phantom3d.spine import VERTEBRA_LABELS, Vertebra


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Pixels (boolean) inside the axis-aligned ellipse of centre (cx, cy) and semi-axes (ax, ay), mm."""
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


class Grid:
    """Pixel-centre coordinates (mm) of one axial plane, with cheap rectangular windows."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray):
        self.xs = xs.astype(np.float32)
        self.ys = ys.astype(np.float32)

    def window(self, x0: float, x1: float, y0: float, y1: float):
        """(index slices, xx column, yy row) of the pixels inside [x0, x1] x [y0, y1] mm."""
        i0, i1 = np.searchsorted(self.xs, [x0, x1])
        j0, j1 = np.searchsorted(self.ys, [y0, y1])
        if i1 <= i0 or j1 <= j0:
            return None
        return (slice(i0, i1), slice(j0, j1)), self.xs[i0:i1, None], self.ys[None, j0:j1]


def render_soft(z: float, grid: Grid, anatomy: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissues of the plane at height ``z`` mm: HU and the trunk mask."""
    p = anatomy
    lm = p["landmarks"]
    xx, yy = grid.xs[:, None], grid.ys[None, :]
    pelvis = np.clip((lm["crest_z"] - z) / 60.0, 0.0, 1.0)
    rx = p["trunk"][0] * (1.0 + 0.08 * pelvis)
    ry = p["trunk"][1]
    trunk = _ellipse(xx, yy, 0.0, 0.0, rx, ry)
    hu = np.where(trunk, np.float32(p["fat_hu"]), np.float32(-1000.0))
    sat = p["sat_mm"]
    inner = _ellipse(xx, yy, 0.0, 0.0, rx - sat, ry - sat)
    hu[inner] = p["muscle_hu"]
    wall = p["wall_mm"]
    cavity = _ellipse(xx, yy, 0.0, -8.0, rx - sat - wall, ry - sat - wall - 8.0)
    hu[cavity] = p["visceral_fat_hu"]
    # Organs and bowel blobs (3D ellipsoids) inside the cavity.
    for cx, cy, cz, ax, ay, az, value in p["blobs"]:
        dz = (z - cz) / az
        if abs(dz) < 1.0:
            k = math.sqrt(1.0 - dz * dz)
            win = grid.window(cx - ax * k, cx + ax * k, cy - ay * k, cy + ay * k)
            if win is None:
                continue
            idx, wx, wy = win
            blob = _ellipse(wx, wy, cx, cy, ax * k, ay * k) & cavity[idx]
            hu[idx][blob] = value
    # Lung bases: above the diaphragm, posterolateral first.
    dome = lm["diaphragm_z"]
    if z > dome - 25.0:
        grow = float(np.clip((z - dome + 25.0) / 80.0, 0.0, 1.0))
        for side in (-1, 1):
            lung = _ellipse(xx, yy, side * 0.45 * rx, 0.25 * ry, 0.35 * rx * (0.3 + 0.7 * grow),
                            0.45 * ry * (0.3 + 0.7 * grow)) & cavity
            hu[lung] = p["lung_hu"]
    # Paraspinal muscles behind the spine and psoas beside the lumbar bodies.
    x_spine, y_spine = lm["x_spine"], p["y_spine_at"](z)
    for side in (-1, 1):
        cx = x_spine + side * 30.0
        win = grid.window(cx - 26, cx + 26, y_spine + 21, y_spine + 69)
        if win is not None:
            idx, wx, wy = win
            hu[idx][_ellipse(wx, wy, cx, y_spine + 45.0, 26.0, 24.0) & inner[idx]] = p["muscle_hu"]
        growth = float(np.clip((lm["psoas_top"] - z) / 100.0, 0.0, 1.0))
        if growth > 0 and z > lm["acetabulum_z"]:
            r = 6.0 + 14.0 * growth
            cx = x_spine + side * (30.0 + r * 0.6)
            win = grid.window(cx - r, cx + r, y_spine - 2 - r, y_spine - 2 + r)
            if win is not None:
                idx, wx, wy = win
                hu[idx][_ellipse(wx, wy, cx, y_spine - 2.0, r, r * 0.9)] = p["muscle_hu"]
    return hu, trunk


def render_bone(z: float, grid: Grid, anatomy: dict[str, Any], hu: np.ndarray,
                 label: np.ndarray | None) -> None:
    """Draw discs, vertebrae, sacrum, ilium and femoral heads of plane ``z`` into ``hu``."""
    p = anatomy
    lm = p["landmarks"]
    verts: list[Vertebra] = p["vertebrae"]
    x_spine = lm["x_spine"]
    # Discs between consecutive free bodies, filling the gap along the column.
    for lower, upper in zip(verts[:-1], verts[1:]):
        if upper.sacral:
            continue
        z_lo = lower.center[2] + lower.height / 2 * math.cos(lower.tilt)
        z_hi = upper.center[2] - upper.height / 2 * math.cos(upper.tilt)
        if not z_lo - 25 < z < z_hi + 25:
            continue
        cx = 0.5 * (lower.center[0] + upper.center[0])
        cyy = 0.5 * (lower.center[1] + upper.center[1])
        czz = 0.5 * (z_lo + z_hi)
        tilt = 0.5 * (lower.tilt + upper.tilt)
        thick = max(z_hi - z_lo, 1.0) / max(math.cos(tilt), 0.5)
        a = 1.05 * 0.5 * (lower.half_width + upper.half_width)
        b = 1.05 * 0.5 * (lower.half_depth + upper.half_depth)
        win = grid.window(cx - a, cx + a, cyy - b - 2, cyy + b + 2)
        if win is None:
            continue
        idx, xx, yy = win
        u = (yy - cyy) * math.sin(tilt) + (z - czz) * math.cos(tilt)
        w = (yy - cyy) * math.cos(tilt) - (z - czz) * math.sin(tilt)
        disc = (np.abs(u) <= thick / 2 + 0.5) & (((xx - cx) / a) ** 2 + (w / b) ** 2 <= 1.0)
        hu[idx][disc] = p["disc_hu"]
    # Bodies, endplates, posterior elements.
    for v in verts:
        cx, cy, cz = v.center
        if abs(z - cz) > v.height / 2 + v.half_depth + 50:
            continue
        s, c = math.sin(v.tilt), math.cos(v.tilt)
        code = VERTEBRA_LABELS["S"] if (v.sacral and v.name != "L5") else VERTEBRA_LABELS[v.name]
        half = v.height / 2
        reach_x = max(v.half_width, v.transverse, lm["ala_reach"] if v.sacral else 0.0) + 2
        win = grid.window(cx - reach_x, cx + reach_x, cy - v.half_depth - 30, cy + v.half_depth + 70)
        if win is None:
            continue
        idx, xx, yy = win
        u = (yy - cy) * s + (z - cz) * c  # along the body axis
        w = (yy - cy) * c - (z - cz) * s  # antero-posterior, in the body's plane
        block = hu[idx]
        lblock = label[idx] if label is not None else None
        r2 = ((xx - cx) / v.half_width) ** 2 + (w / v.half_depth) ** 2
        body = (np.abs(u) <= half) & (r2 <= 1.0)
        if body.any():
            block[body] = p["cancellous_hu"] if not v.sacral else p["cancellous_hu"] + 30
            # Lateral shell ~1-2 mm; endplates are thinner (0.4-0.9 mm, as measured on CT: a 3 mm
            # slice through an endplate reads ~200-300 HU, not cortical HU).
            shell = body & ((r2 >= (1.0 - 2.0 * p["cortex_mm"] / v.half_width)) | (np.abs(u) >= half - p["endplate_mm"]))
            block[shell] = p["cortical_hu"]
            if lblock is not None:
                lblock[body] = code
        if v.sacral:
            # The upper sacral segments carry the alae; all carry a thin dorsal plate.
            if v.name in p["ala_segments"]:
                ala = (np.abs(u) <= half) & (np.abs(xx - cx) <= lm["ala_reach"]) & (w >= -0.3 * v.half_depth) & (w <= 1.6 * v.half_depth)
                block[ala & (block < p["cancellous_hu"])] = p["cancellous_hu"] + 40
                if lblock is not None:
                    lblock[ala & (lblock == 0)] = code
            dorsal = (np.abs(u) <= half) & (np.abs(xx - cx) <= 0.8 * v.half_width) & (w > v.half_depth + 6) & (w < v.half_depth + 14)
            block[dorsal] = p["cortical_hu"] * 0.7
            continue
        # Neural arch: ring behind the body, shifted down along the axis by a quarter height.
        ua = u + 0.25 * v.height
        arch_z = np.abs(ua) <= 0.45 * v.height
        canal_r = 9.0
        acy = v.half_depth + canal_r + 2.0
        rr = np.hypot(xx - cx, w - acy)
        arch = arch_z & (rr >= canal_r) & (rr <= canal_r + 6.0) & (w >= v.half_depth - 2)
        spinous = arch_z & (np.abs(xx - cx) <= 4.0) & (w >= acy + canal_r) & (w <= acy + canal_r + 32.0)
        tp = (np.abs(u - 0.05 * v.height) <= 6.0) & (np.abs(xx - cx) <= v.transverse) & (np.abs(w - acy + 2.0) <= 5.0)
        block[arch_z & (rr < canal_r) & (w >= v.half_depth)] = p["csf_hu"]
        posterior = (arch | spinous | tp) & (block < 150)
        block[posterior] = p["posterior_hu"]
        if lblock is not None:
            lblock[posterior] = code
    # Iliac wings: plates from the crest down to the acetabulum, meeting the alae at the SI joints.
    if lm["acetabulum_z"] - 20 < z < lm["crest_z"]:
        t = float(np.clip((lm["crest_z"] - z) / (lm["crest_z"] - lm["acetabulum_z"]), 0.0, 1.0))
        y_sac = p["y_spine_at"](z)
        for side in (-1, 1):
            px = x_spine + side * (lm["ala_reach"] + 3.0 + 20.0 * (1 - t) ** 2)
            py = y_sac + 18.0 + 10.0 * (1 - t)
            ax_ = x_spine + side * (lm["wing_reach"] - 45.0 * t)
            ay_ = y_sac - 40.0 - 25.0 * t
            thick = 5.0 + 6.0 * t
            win = grid.window(min(px, ax_) - thick, max(px, ax_) + thick, min(py, ay_) - thick, max(py, ay_) + thick)
            if win is None:
                continue
            idx, xx, yy = win
            dx, dy = ax_ - px, ay_ - py
            tt = np.clip(((xx - px) * dx + (yy - py) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
            dist = np.hypot(xx - (px + tt * dx), yy - (py + tt * dy))
            wing = dist <= thick
            block = hu[idx]
            block[wing] = p["cancellous_hu"] + 120
            block[wing & (dist >= thick - 2.0)] = p["cortical_hu"]
    # Femoral heads.
    fz = lm["acetabulum_z"] - 10.0
    r = 24.0
    if abs(z - fz) < r:
        rr = math.sqrt(r * r - (z - fz) ** 2)
        y_head = lm["y_spine0"] - 45.0
        for side in (-1, 1):
            fx = x_spine + side * 92.0
            win = grid.window(fx - rr, fx + rr, y_head - rr, y_head + rr)
            if win is None:
                continue
            idx, xx, yy = win
            head = _ellipse(xx, yy, fx, y_head, rr, rr)
            block = hu[idx]
            block[head] = p["cancellous_hu"] + 80
            block[head & ~_ellipse(xx, yy, fx, y_head, max(rr - 2.0, 0.1), max(rr - 2.0, 0.1))] = p["cortical_hu"]


def paint_ribs(hu: np.ndarray, z_planes: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                ribs: list[np.ndarray], rib_hu: float, radius: float = 5.0) -> None:
    """Paint rib tubes (spheres every 2 mm along each path) into ``hu`` (x, y, z) in place."""
    dx = float(xs[1] - xs[0])
    dy = float(ys[1] - ys[0])
    for path in ribs:
        for x, y, z in path:
            kz = np.nonzero(np.abs(z_planes - z) < radius)[0]
            if kz.size == 0:
                continue
            i0 = int(np.searchsorted(xs, x - radius))
            i1 = int(np.searchsorted(xs, x + radius))
            j0 = int(np.searchsorted(ys, y - radius))
            j1 = int(np.searchsorted(ys, y + radius))
            if i1 <= i0 or j1 <= j0:
                continue
            gx = xs[i0:i1, None]
            gy = ys[None, j0:j1]
            for k in kz:
                r2 = radius * radius - (z_planes[k] - z) ** 2
                disk = (gx - x) ** 2 + (gy - y) ** 2 <= max(r2, (0.5 * min(dx, dy)) ** 2)
                block = hu[i0:i1, j0:j1, k]
                block[disk] = np.maximum(block[disk], rib_hu)
