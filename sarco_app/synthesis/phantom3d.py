"""Synthetic CT volumes of the lower thorax, abdomen and pelvis with vertebra labels as truth.

The phantoms exist to develop and test the L3 locator (:mod:`sarco_app.spine.l3`) without patient
data. They are simple, but carry everything a vertebra-counting method looks at:

* a trunk outline with subcutaneous fat, an abdominal muscle wall, paraspinal muscles and psoas,
  visceral fat with low-contrast organ and bowel blobs (some with gas) and lung bases;
* a curved spine (lumbar lordosis, thoracic kyphosis) of tilted vertebral bodies with a cortical
  shell, cancellous core and endplates, intervertebral discs and posterior elements (neural
  arch, spinous and transverse processes);
* rib pairs on the thoracic vertebrae that run posterolaterally, curve around the trunk and
  descend anteriorly (the 11th and 12th are short floating ribs);
* a curved sacrum with alae meeting the iliac wings at the sacro-iliac joints, iliac wings from
  the crest (near the L4/L5 disc) down to the acetabulum, and femoral heads.

Anatomical variants occur at roughly their published rates and are recorded in the truth:
11 or 13 rib pairs (no ribs on T12 / short ribs on L1), a lumbarised S1 (a free sixth
lumbar-type vertebra) and a sacralised L5 (L5 fused to the sacrum).

All geometry is in millimetres in the canonical frame of :mod:`sarco_app.inputs.ingest`: x toward the
patient's left, y toward posterior, z toward superior. ``make_volume_phantom`` returns a
canonical :class:`~sarco_app.inputs.ingest.CTImage` and a :class:`VolumeTruth` whose z values are world
millimetres (``image.affine``) and whose slice indices are canonical.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarco_app.inputs.ingest import CTImage, make_image, save_nifti, sidecar_path
from sarco_app.inputs.patient import PatientInfo

#: Vertebra names from top to bottom used by the phantoms ("S" is the fused sacrum).
THORACIC = [f"T{i}" for i in range(4, 13)]
LUMBAR = [f"L{i}" for i in range(1, 6)]

#: Label values of the vertebra label volume (TotalSegmentator-like order, bottom up).
VERTEBRA_LABELS: dict[str, int] = {"S": 1, "S1": 2}
VERTEBRA_LABELS.update({name: 3 + i for i, name in enumerate(reversed(LUMBAR))})  # L5=3 .. L1=7
VERTEBRA_LABELS.update({name: 8 + i for i, name in enumerate(reversed(THORACIC))})  # T12=8 ..

#: Variant name -> probability per phantom (Tins 2000, Nakajima 2014: transitional lumbosacral
#: vertebrae ~5-10 %, 11/13 rib pairs a few percent).
VARIANT_RATES: dict[str, float] = {
    "11_ribs": 0.03,
    "13_ribs": 0.03,
    "lumbarised_s1": 0.02,
    "sacralised_l5": 0.02,
}

#: Coverage presets: (upper limit, lower limit) as (vertebra, fraction of its body height
#: measured from the bottom of the body); "femoral_heads" is the centre of the femoral heads.
COVERAGES: dict[str, tuple[tuple[str, float], tuple[str, float]]] = {
    "full": (("T10", 1.0), ("femoral_heads", 0.0)),  # T10 to the femoral heads
    "abdomen": (("T11", 0.5), ("S", 0.0)),  # T11 to the mid sacrum
    "chest": (("T8", 1.0), ("L1", 0.5)),  # chest only: T8 to mid L1, no L3
    "upper": (("T10", 0.5), ("L4", 0.3)),  # upper abdomen, no sacrum
    "lower": (("L2", 0.5), ("femoral_heads", 0.0)),  # like TotalSegmentator's ct_lower
    "mid": (("L1", 0.6), ("L5", 0.4)),  # no anchor: neither ribs nor sacrum
}


@dataclass
class Vertebra:
    """One vertebral body (or sacral segment) in world mm."""

    name: str
    center: tuple[float, float, float]  # body centre (x, y, z), mm
    height: float  # body height along the spine axis, mm
    half_width: float  # left-right semi-axis, mm
    half_depth: float  # antero-posterior semi-axis, mm
    tilt: float  # sagittal tilt of the body axis from vertical, radians (+ = top toward posterior)
    ribs: bool = False
    rib_length: float = 0.0  # mm, path length of each rib
    transverse: float = 0.0  # transverse process reach from the midline, mm
    sacral: bool = False  # part of the fused sacrum


@dataclass
class VolumeTruth:
    """Ground truth of a volume phantom."""

    seed: int
    variants: list[str]
    l3_z_mm: float | None  # world z of the middle of the L3 body; None when out of the FOV
    l3_index: float | None  # canonical (fractional) slice index of that z
    vertebrae: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> z_min/z_mid/z_max
    coverage: str = "full"
    rib_pairs: int = 12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- anatomy


def _build_spine(rng: np.random.Generator, variants: list[str]) -> tuple[list[Vertebra], dict[str, float]]:
    """Vertebrae from T4 down to the sacral tip, bottom-up z with z = 0 at the sacrum top."""
    scale = rng.uniform(0.88, 1.12)  # patient size
    lordosis = rng.uniform(6.0, 20.0)  # anterior bulge of the lumbar spine, mm
    lordosis_width = rng.uniform(60.0, 90.0)
    kyphosis = rng.uniform(5.0, 20.0)  # posterior drift of the thoracic spine per 100 mm
    x_spine = rng.uniform(-6.0, 6.0)
    y_base = rng.uniform(20.0, 45.0)  # vertebral body centre behind the trunk centre, mm

    lumbar_like = list(LUMBAR)
    if "lumbarised_s1" in variants:
        lumbar_like.append("S1")  # a free S1 below L5
    fused_l5 = "sacralised_l5" in variants
    if fused_l5:
        lumbar_like.remove("L5")

    # Heights along the column, walking up from the top of the sacrum.
    z = 0.0
    stack: list[tuple[str, float, float]] = []  # (name, z_bottom, height)
    free_names = list(reversed(lumbar_like)) + list(reversed(THORACIC))
    for k, name in enumerate(free_names):
        lumbar = name.startswith("L") or name == "S1"
        disc = (rng.uniform(8.0, 12.0) if lumbar else rng.uniform(5.0, 7.0)) * scale
        if name.startswith("T"):
            level = int(name[1:])
            height = (rng.uniform(21.0, 24.0) - 0.8 * (12 - level)) * scale
        else:
            height = rng.uniform(25.0, 30.0) * scale
        z += disc
        stack.append((name, z, height))
        z += height
    z_apex = next(zb for n, zb, _ in stack if n == "L4") + 15 * scale

    def y_centre(zz: float) -> float:
        y = y_base - lordosis * math.exp(-(((zz - z_apex) / lordosis_width) ** 2))
        z_t12 = next(zb for n, zb, _ in stack if n == "T12")
        if zz > z_t12:
            y += kyphosis * ((zz - z_t12) / 100.0) ** 2
        return y

    def tilt_at(zz: float) -> float:
        return math.atan((y_centre(zz + 1.0) - y_centre(zz - 1.0)) / 2.0)

    vertebrae: list[Vertebra] = []
    for name, z_bottom, height in stack:
        zc = z_bottom + height / 2
        thoracic = name.startswith("T")
        level = int(name[1:]) if name[1:].isdigit() else 5
        if thoracic:
            half_width = (15.0 + 0.6 * (level - 4)) * scale
            half_depth = (12.0 + 0.45 * (level - 4)) * scale
            transverse = rng.uniform(26.0, 32.0) * scale
        else:
            half_width = rng.uniform(21.0, 25.0) * scale
            half_depth = rng.uniform(15.0, 18.0) * scale
            transverse = {1: 32.0, 2: 38.0, 3: 45.0, 4: 42.0, 5: 40.0}.get(level, 38.0) * scale
            if name == "S1":
                transverse = 40.0 * scale
        vertebrae.append(
            Vertebra(name, (x_spine, y_centre(zc), zc), height, half_width, half_depth,
                     tilt_at(zc), transverse=transverse)
        )

    # Ribs: T4..T12 normally; 11 pairs -> none on T12; 13 pairs -> short ones on L1.
    rib_names = [n for n in THORACIC if not ("11_ribs" in variants and n == "T12")]
    if "13_ribs" in variants:
        rib_names.append("L1")
    for v in vertebrae:
        if v.name in rib_names:
            v.ribs = True
            last = v.name == rib_names[-1]
            second_last = len(rib_names) > 1 and v.name == rib_names[-2]
            if last:
                v.rib_length = rng.uniform(70.0, 140.0) * scale
            elif second_last:
                v.rib_length = rng.uniform(150.0, 220.0) * scale
            else:
                v.rib_length = rng.uniform(330.0, 420.0) * scale

    # Sacrum: fused segments curving posteriorly below z = 0 (plus L5 when sacralised).
    sac_names = (["L5"] if fused_l5 else []) + (["S1"] if "lumbarised_s1" not in variants else [])
    sac_names += ["S2", "S3", "S4", "S5"]
    angle = math.radians(rng.uniform(25.0, 40.0))  # sacral tilt from vertical at the top
    point = np.array([x_spine, y_centre(0.0), 0.0])
    sizes = [(28.0, 24.0, 16.0)] * (2 if fused_l5 else 1) + [(22, 20, 13), (17, 15, 10), (13, 11, 8), (10, 8, 6)]
    if "lumbarised_s1" in variants:
        sizes = sizes[1:]
    for k, (name, (h, a, b)) in enumerate(zip(sac_names, sizes)):
        h, a, b = h * scale, a * scale, b * scale
        direction = np.array([0.0, math.sin(angle), -math.cos(angle)])
        centre = point + direction * h / 2
        vertebrae.insert(
            0,
            Vertebra(name, (float(centre[0]), float(centre[1]), float(centre[2])), h, a, b,
                     -angle, sacral=True, transverse=0.0),
        )
        point = point + direction * (h - 1.0)  # fused: segments overlap, no disc
        angle += math.radians(rng.uniform(6.0, 12.0))  # sacral kyphosis
    # Bottom-up order.
    vertebrae.sort(key=lambda v: v.center[2])
    s1_top = max(v.center[2] + v.height / 2 for v in vertebrae if v.sacral)
    first_sacral = max((v for v in vertebrae if v.sacral), key=lambda v: v.center[2])
    landmarks = {
        "scale": scale,
        "sacrum_top": s1_top,
        "ala_z_top": s1_top,
        "ala_z_bottom": first_sacral.center[2] - first_sacral.height * 1.3,
        "y_spine0": y_centre(0.0),
        "x_spine": x_spine,
    }
    # Iliac crests near the disc between the second and first free vertebra above the sacrum
    # (L4/L5 normally; one level off with a transitional lumbosacral vertebra, as in patients).
    free = [v for v in vertebrae if not v.sacral]
    second = free[1]
    landmarks["crest_z"] = second.center[2] - second.height / 2 + rng.uniform(-15.0, 12.0) * scale
    landmarks["acetabulum_z"] = s1_top - rng.uniform(85.0, 105.0) * scale
    return vertebrae, landmarks


def _rib_path(v: Vertebra, side: int, trunk: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Centre-line points (n, 3) of one rib (side -1 right, +1 left), 2 mm apart."""
    x0, y0, z0 = v.center
    rx, ry = trunk
    start = np.array([x0 + side * (v.half_width + 3.0), y0 + 0.6 * v.half_depth, z0 + 0.25 * v.height])
    angle_pt = np.array([x0 + side * rng.uniform(55.0, 65.0), y0 + rng.uniform(22.0, 32.0), start[2] - 6.0])
    points = [start, angle_pt]
    # From the rib angle along an ellipse inside the trunk wall toward anterior.
    ex, ey = 0.82 * rx, 0.80 * ry
    theta0 = math.atan2((angle_pt[1]) / ey, abs(angle_pt[0]) / ex)  # from the lateral axis, + posterior
    length = np.linalg.norm(angle_pt - start)
    theta = theta0
    z = angle_pt[2]
    prev = angle_pt[:2]
    while length < v.rib_length and theta > -1.35:
        theta -= 0.04
        xy = np.array([side * ex * math.cos(theta), ey * math.sin(theta)])
        step = float(np.linalg.norm(xy - prev))
        z -= step * (0.18 if theta > 0.6 else 0.42)  # descends more steeply anteriorly
        points.append(np.array([xy[0], xy[1], z]))
        length += step
        prev = xy
    points = np.array(points)
    # Resample every 2 mm.
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    grid = np.arange(0.0, s[-1], 2.0)
    return np.stack([np.interp(grid, s, points[:, i]) for i in range(3)], axis=1)


# --------------------------------------------------------------------------- rendering


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


class _Grid:
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


def _render_soft(z: float, grid: _Grid, anatomy: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
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


def _render_bone(z: float, grid: _Grid, anatomy: dict[str, Any], hu: np.ndarray,
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


def _paint_ribs(hu: np.ndarray, z_planes: np.ndarray, xs: np.ndarray, ys: np.ndarray,
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


def make_volume_phantom(
    seed: int = 0,
    *,
    slice_thickness: float = 2.5,
    pixel_spacing: float = 1.5,
    matrix: int = 256,
    coverage: str | tuple[float, float] = "full",
    variants: list[str] | None = None,
    allow_variants: bool = True,
    noise_hu: float | None = None,
    with_labels: bool = False,
) -> tuple[CTImage, VolumeTruth] | tuple[CTImage, VolumeTruth, np.ndarray]:
    """A synthetic abdominal CT volume with its vertebra truth.

    Parameters
    ----------
    seed : int
        Random seed: anatomy, variants, tissue HU and noise all follow from it.
    slice_thickness : float
        Slice spacing (= thickness) in mm, 1-5; thick slices average sub-planes (partial volume).
    pixel_spacing : float
        In-plane pixel size in mm.
    matrix : int
        Number of pixels along x and y.
    coverage : str or (z_min, z_max)
        A key of :data:`COVERAGES` or world z limits in mm (z = 0 at the top of the sacrum).
    variants : list of str, optional
        Force these anatomical variants (keys of :data:`VARIANT_RATES`); by default they are
        drawn at their rates when ``allow_variants``.
    noise_hu : float, optional
        Standard deviation of the Gaussian noise in HU (default: drawn in 8-20 HU).
    with_labels : bool
        Also return the vertebra label volume (uint8, :data:`VERTEBRA_LABELS`, bodies and arches).

    Returns
    -------
    image : CTImage
        Canonical image (x left, y posterior, z superior), HU float32.
    truth : VolumeTruth
        L3 middle z (world mm) and canonical slice index, per-vertebra body z ranges.
    labels : ndarray, optional
        Only with ``with_labels``.
    """
    rng = np.random.default_rng(seed)
    if variants is None:
        variants = []
        if allow_variants:
            draw = rng.uniform(size=len(VARIANT_RATES))
            for (name, rate), u in zip(VARIANT_RATES.items(), draw):
                if u < rate:
                    variants.append(name)
            if "11_ribs" in variants and "13_ribs" in variants:
                variants.remove("13_ribs")
            if "lumbarised_s1" in variants and "sacralised_l5" in variants:
                variants.remove("sacralised_l5")
    else:
        rng.uniform(size=len(VARIANT_RATES))  # keep the random stream aligned
    unknown = set(variants) - set(VARIANT_RATES)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; use {sorted(VARIANT_RATES)}")
    if not 0.5 <= slice_thickness <= 10:
        raise ValueError("slice_thickness must be within 0.5-10 mm")

    vertebrae, landmarks = _build_spine(rng, variants)
    scale = landmarks["scale"]
    by_name = {v.name: v for v in vertebrae}
    trunk = (rng.uniform(135.0, 185.0) * scale, rng.uniform(100.0, 140.0) * scale)
    landmarks["ala_reach"] = rng.uniform(45.0, 55.0) * scale
    landmarks["wing_reach"] = trunk[0] - rng.uniform(25.0, 45.0)
    t12 = by_name["T12"]
    landmarks["diaphragm_z"] = t12.center[2] + rng.uniform(-10.0, 30.0)
    landmarks["psoas_top"] = by_name["T12"].center[2] - t12.height / 2
    # The body centre sits behind the trunk centre; shift so the trunk is centred in the FOV.
    sat_mm = rng.uniform(8.0, 40.0) * scale
    anatomy: dict[str, Any] = {
        "landmarks": landmarks,
        "vertebrae": vertebrae,
        "trunk": trunk,
        "sat_mm": sat_mm,
        "wall_mm": rng.uniform(8.0, 14.0),
        "fat_hu": rng.uniform(-110.0, -85.0),
        "visceral_fat_hu": rng.uniform(-105.0, -80.0),
        "muscle_hu": rng.uniform(25.0, 55.0),
        "lung_hu": rng.uniform(-880.0, -800.0),
        "disc_hu": rng.uniform(65.0, 100.0),
        "cancellous_hu": rng.uniform(110.0, 240.0),
        "cortical_hu": rng.uniform(450.0, 850.0),
        "posterior_hu": rng.uniform(250.0, 450.0),
        "csf_hu": rng.uniform(5.0, 30.0),
        "cortex_mm": rng.uniform(1.2, 2.2),
        "endplate_mm": rng.uniform(0.4, 0.9),
        "ala_segments": [v.name for v in sorted((v for v in vertebrae if v.sacral), key=lambda v: -v.center[2])[:2]],
    }
    # Organ and bowel blobs.
    blobs = []
    z_lo_all = landmarks["acetabulum_z"] - 40
    z_hi_all = by_name["T8"].center[2]
    for _ in range(int(rng.integers(25, 40))):
        cz = rng.uniform(z_lo_all, z_hi_all)
        value = float(rng.choice([rng.uniform(20, 60), rng.uniform(-40, 10), rng.uniform(-900, -600)], p=[0.6, 0.25, 0.15]))
        size = rng.uniform(10, 40) if value > -500 else rng.uniform(5, 15)
        blobs.append((rng.uniform(-0.6, 0.6) * trunk[0], rng.uniform(-0.7, 0.2) * trunk[1], cz,
                      size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3), size * rng.uniform(0.8, 2.0), value))
    # Liver (right upper, i.e. negative x) and kidneys.
    l1 = by_name["L1"]
    blobs.append((-0.45 * trunk[0], -0.1 * trunk[1], t12.center[2] + 10, 0.4 * trunk[0], 0.55 * trunk[1], 90.0, rng.uniform(50, 70)))
    for side in (-1, 1):
        blobs.append((side * 60.0, l1.center[1] + 5, l1.center[2] - 10 * side, 28.0, 22.0, 55.0, rng.uniform(25, 40)))
    anatomy["blobs"] = blobs

    # Coverage in world z.
    def level_z(spec: tuple[str, float]) -> float:
        name, frac = spec
        if name == "femoral_heads":
            return landmarks["acetabulum_z"] - 10.0
        if name == "S":
            sac = [v for v in vertebrae if v.sacral]
            return float(np.mean([v.center[2] for v in sac]))
        v = by_name[name] if name in by_name else by_name["L5"]
        return v.center[2] - v.height / 2 + frac * v.height

    if isinstance(coverage, str):
        if coverage not in COVERAGES:
            raise ValueError(f"unknown coverage {coverage!r}; use one of {sorted(COVERAGES)}")
        upper, lower = COVERAGES[coverage]
        z_max, z_min = level_z(upper), level_z(lower)
        coverage_name = coverage
    else:
        z_min, z_max = float(coverage[0]), float(coverage[1])
        coverage_name = f"{z_min:.0f}..{z_max:.0f}"
    z_min += rng.uniform(-5.0, 5.0)
    n_slices = max(int(round((z_max - z_min) / slice_thickness)) + 1, 2)
    z_planes = z_min + slice_thickness * np.arange(n_slices)

    # In-plane grid (mm), trunk centred; x toward left, y toward posterior.
    coords = (np.arange(matrix) - (matrix - 1) / 2.0) * pixel_spacing
    xs = coords + rng.uniform(-5.0, 5.0)
    ys = coords + rng.uniform(-10.0, 10.0)
    grid = _Grid(xs, ys)
    zs_spine = np.array([v.center[2] for v in vertebrae])
    ys_spine = np.array([v.center[1] for v in vertebrae])
    anatomy["y_spine_at"] = lambda zz: float(np.interp(zz, zs_spine, ys_spine))

    # Soft tissue changes slowly along z: one plane per slice. Bone is drawn on sub-planes and
    # averaged, which gives thick slices their partial-volume blur at endplates and discs.
    n_sub = max(1, int(math.ceil(slice_thickness / 1.5)))
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * slice_thickness
    planes = (z_planes[:, None] + offsets[None, :]).ravel()
    sub = np.empty((matrix, matrix, planes.size), dtype=np.float32)
    labels = np.zeros((matrix, matrix, n_slices), dtype=np.uint8) if with_labels else None
    trunks = np.empty((matrix, matrix, n_slices), dtype=bool)
    for k, zc in enumerate(z_planes):
        soft, trunks[:, :, k] = _render_soft(float(zc), grid, anatomy)
        for m in range(n_sub):
            plane = soft.copy()
            want_label = labels is not None and m == n_sub // 2
            _render_bone(float(planes[k * n_sub + m]), grid, anatomy, plane,
                         labels[:, :, k] if want_label else None)
            sub[:, :, k * n_sub + m] = plane
    rib_paths = []
    for v in vertebrae:
        if v.ribs:
            for side in (-1, 1):
                rib_paths.append(_rib_path(v, side, trunk, rng))
    _paint_ribs(sub, planes, xs, ys, rib_paths, anatomy["cortical_hu"] * 0.6)
    volume = sub.reshape(matrix, matrix, n_slices, n_sub).mean(axis=3)
    del sub
    volume[~trunks] = -1000.0
    sigma = float(noise_hu) if noise_hu is not None else float(rng.uniform(8.0, 20.0))
    volume += sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    np.clip(volume, -1024.0, 3000.0, out=volume)

    origin = (float(-xs[0]), float(-ys[0]), float(z_planes[0]))  # RAS of voxel (0, 0, 0)
    patient = PatientInfo(sex=str(rng.choice(["M", "F"])), age=float(rng.integers(30, 90)),
                          height_cm=float(round(rng.uniform(150, 195), 1)), weight_kg=float(round(rng.uniform(45, 120), 1)))
    image = make_image(volume, (pixel_spacing, pixel_spacing, slice_thickness), patient, origin=origin,
                       meta={"phantom_seed": seed, "modality": "CT", "format": "phantom"})

    # Truth: body z ranges (at the body centre column) and the L3 middle.
    truth_vertebrae = {}
    for v in vertebrae:
        half = v.height / 2 * math.cos(v.tilt)
        truth_vertebrae[v.name] = {"z_min": v.center[2] - half, "z_mid": v.center[2], "z_max": v.center[2] + half}
    l3 = by_name["L3"]
    inside = z_planes[0] <= l3.center[2] <= z_planes[-1]
    truth = VolumeTruth(
        seed=seed,
        variants=list(variants),
        l3_z_mm=float(l3.center[2]) if inside else None,
        l3_index=float((l3.center[2] - z_planes[0]) / slice_thickness) if inside else None,
        vertebrae=truth_vertebrae,
        coverage=coverage_name,
        rib_pairs=12 - ("11_ribs" in variants) + ("13_ribs" in variants),
    )
    if with_labels:
        return image, truth, labels
    return image, truth


def resample_z(image: CTImage, thickness: float) -> CTImage:
    """The image resliced to ``thickness`` mm slices (a thick-slice reconstruction).

    Each new slice covers ``thickness`` mm and is the overlap-weighted mean of the old slices
    (each old slice covering its own spacing); new slices start at the first old slice centre.
    """
    hu = image.hu
    dz = image.spacing[2]
    n_old = hu.shape[2]
    z_old = np.arange(n_old) * dz
    n_new = max(int(math.floor(z_old[-1] / thickness)) + 1, 1)
    z_new = np.arange(n_new) * thickness
    out = np.empty(hu.shape[:2] + (n_new,), dtype=np.float32)
    for k, z in enumerate(z_new):
        lo, hi = z - thickness / 2, z + thickness / 2
        overlap = np.clip(np.minimum(z_old + dz / 2, hi) - np.maximum(z_old - dz / 2, lo), 0.0, None)
        sel = np.nonzero(overlap > 0)[0]
        weights = overlap[sel] / overlap[sel].sum()
        out[:, :, k] = np.tensordot(hu[:, :, sel], weights, axes=([2], [0]))
    affine = image.affine.copy()
    affine[:3, 2] = affine[:3, 2] / dz * thickness
    return CTImage(hu=out, affine=affine, patient=image.patient, meta=dict(image.meta),
                   original_affine=affine.copy(), original_shape=out.shape)


def save_volume(image: CTImage, path: str | Path, flip_z: bool = False, truth: VolumeTruth | None = None) -> Path:
    """Write a canonical phantom as int16 NIfTI (+ patient sidecar, + truth JSON when given).

    ``flip_z`` stores the slices in reverse order (the first voxel plane is the most superior,
    as many scanners write feet-first series); readers that honour the affine see the same
    anatomy.
    """
    hu = np.clip(np.round(image.hu), -32768, 32767).astype(np.int16)
    affine = image.affine.copy()
    if flip_z:
        hu = hu[:, :, ::-1]
        affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (image.hu.shape[2] - 1)
        affine[:3, 2] = -affine[:3, 2]
    path = save_nifti(np.ascontiguousarray(hu), affine, path)
    sidecar = {"patient": image.patient.to_dict()}
    if truth is not None:
        sidecar["phantom_truth"] = truth.to_dict()
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2))
    return path
