"""The phantom's spine: vertebra names and label values, anatomical variants, the vertebrae from
T4 to the sacral tip with the pelvic landmarks, and rib centre lines (world mm, z = 0 at the top
of the sacrum)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def build_spine(rng: np.random.Generator, variants: list[str]) -> tuple[list[Vertebra], dict[str, float]]:
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


def rib_path(v: Vertebra, side: int, trunk: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
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
