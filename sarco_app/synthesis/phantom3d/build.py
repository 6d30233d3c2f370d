"""The volume phantom: :func:`make_volume_phantom` draws the patient, spine and organs, renders
every slice and adds noise; :class:`VolumeTruth` records the vertebra levels."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sarco_app.inputs.ingest import CTImage, make_image
from sarco_app.inputs.patient import PatientInfo
from sarco_app.synthesis.phantom3d.render import Grid, paint_ribs, render_bone, render_soft
from sarco_app.synthesis.phantom3d.spine import VARIANT_RATES, build_spine, rib_path

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

    vertebrae, landmarks = build_spine(rng, variants)
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
    grid = Grid(xs, ys)
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
        soft, trunks[:, :, k] = render_soft(float(zc), grid, anatomy)
        for m in range(n_sub):
            plane = soft.copy()
            want_label = labels is not None and m == n_sub // 2
            render_bone(float(planes[k * n_sub + m]), grid, anatomy, plane,
                         labels[:, :, k] if want_label else None)
            sub[:, :, k * n_sub + m] = plane
    rib_paths = []
    for v in vertebrae:
        if v.ribs:
            for side in (-1, 1):
                rib_paths.append(rib_path(v, side, trunk, rng))
    paint_ribs(sub, planes, xs, ys, rib_paths, anatomy["cortical_hu"] * 0.6)
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
