#!/usr/bin/env python
"""Evaluate the body-composition model: held-out phantoms (Dice) and real CT (HU plausibility).

1. **Held-out phantoms** (L3): seeds from a stream the training script never uses, at the clinical
   default (0.6-1.0 mm, 512 matrix) and at 1.5, 2.0 and 3.0 mm pixels. Dice per tissue
   (pooled over all pixels of a group, and the mean of per-case Dice) for the raw U-Net
   (``unet``), the default output, U-Net with the HU rule (``unet+hu``), and the threshold
   baseline. The truth is the phantom's ``label``: the clinical protocol (exact compartments,
   tissue by HU, :func:`sarco_app.labels.apply_hu_ranges`). The pooled Dice against the
   anatomical majority map (``anatomical_label``, which no thresholding protocol reproduces)
   is printed too, for comparison with models evaluated that way.
   Then held-out upper-abdomen phantoms (``--upper`` per level T11-L2 and spacing): Dice per
   tissue, muscle area error, and the organ and diaphragm area labelled muscle (the real-CT
   failure). ``--upper-only`` runs this part alone, and ``--compare NAME=MODEL ...`` measures
   more checkpoints on the same phantoms (per case and pooled rows in ``--out``, column ``model``).
2. **Real CT** in ``../shared/data/real`` (no tissue labels): the L3 slice of ``ct_lower.nii.gz``
   (z = 73, 3 mm pixels), the 3 dcmqi slices and the 20-slice DICOM series. Printed: the fraction
   of predicted muscle pixels inside -29..150 HU and of SAT / VAT pixels inside -190..-30 HU for
   the raw U-Net (its labels on the scan's grid, split head included, no HU rule; target >=
   0.95; the default output obeys the HU rule by construction), the same share of the backbone
   alone on its working grid (its arg-max against the HU it is given there), and the areas of
   the default output. Overlay PNGs go to ``--docs``. Before it, phantoms made
   like the real L3 slice (3 mm pixels, muscle 18 HU) give the same raw share next to the
   default output's Dice against their truth.

3. **Real CT at every level, label-free plausibility** (:mod:`sarco_app.segmentation.plausibility`): the
   default output on the middle slice of each vertebra of ``ct_lower.nii.gz`` (L2..S1 from
   ``vertebrae_lower.nii.gz``), on slices 0, 5, 10, 15 and 19 of the DICOM series (T11-T12) and on
   the 3 dcmqi slices: muscle share of the body, muscle components, muscle inside the abdominal
   cavity and inside organ-like blobs, printed, written to ``<docs>/real/plausibility_real.csv``
   and drawn as overlays (cavity and organ blobs outlined) in ``<docs>/real/``. The dcmqi slices
   are measured once more with their liver (the sample's DICOM SEG) labelled muscle: the issue's
   failure made on purpose, to show what the measures read when it happens. Before them,
   ``--plausibility-phantoms`` L1/L2 phantoms give the same measures where the truth is known:
   the true label, and the liver, spleen or kidney labelled muscle
   (``<docs>/real/plausibility_phantoms.csv``).
   ``--real-only`` runs this part alone (about a minute).

Everything else printed is also written as CSV to ``--out``.

    .venv/bin/python -m scripts.eval_bodycomp --model models/bodycomp_unet.pt
    .venv/bin/python -m scripts.eval_bodycomp --real-only
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from sarco_app import labels as L
from sarco_app.inputs.dicom_seg import load_dicom_seg
from sarco_app.inputs.ingest import load_image
from sarco_app.segmentation.network import load_checkpoint
from sarco_app.figures.overlay import overlay_png
from sarco_app.synthesis.phantom import generate
from sarco_app.segmentation.plausibility import slice_measures
from sarco_app.metrics import PooledOverlap, dice_per_tissue
from sarco_app.segmentation.segment import (
    resample_hu,
    segment_volume,
    working_logits,
    working_shape,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
TISSUES = ("muscle", "sat", "vat", "imat")
#: Held-out groups: (name, spacing_mm or None for the generator's clinical default, matrix).
GROUPS = (("clinical 0.6-1.0 mm", None, 512), ("1.5 mm", 1.5, 280), ("2.0 mm", 2.0, 210), ("3.0 mm", 3.0, 140))
HELD_OUT_SEED = 777_000  # the training script draws seeds from SeedSequence([seed, 0xB0D1])
LIKE_REAL_SEED = 555_000
PLAUSIBILITY_SEED = 444_000
#: A reading guide for the phantom summary: a slice whose cavity or organ-blob muscle share is
#: above this is flagged (no true label of these phantoms goes above 0.015).
FLAG_SHARE = 0.03


def overlay(hu, label, spacing, path, title, areas=None):
    try:
        from sarco_app.figures.overlay import overlay_png
    except ImportError:  # pragma: no cover - overlay module is part of the repository
        overlay_png = None
    if overlay_png is not None:
        return overlay_png(hu, label, spacing, path, title=title, areas=areas)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(hu.T, cmap="gray", vmin=-160, vmax=240)
    ax.imshow(np.ma.masked_equal(label.T, 0), alpha=0.4, vmin=0, vmax=4, cmap="tab10")
    ax.set_title(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def areas_cm2(label, spacing):
    px = spacing[0] * spacing[1] / 100.0
    return {name: float((label == v).sum() * px) for name, v in L.LABELS.items()}


def hu_fractions(hu, label):
    """Share of each tissue's predicted pixels inside its HU range (None when absent)."""
    out = {}
    for name, (lo, hi) in (("muscle", L.MUSCLE_HU), ("sat", L.FAT_HU), ("vat", L.FAT_HU), ("imat", L.FAT_HU)):
        mask = label == L.LABELS[name]
        out[name] = float(((hu[mask] >= lo) & (hu[mask] <= hi)).mean()) if mask.any() else None
    return out


def working_grid_fractions(model, hu_slices, spacing):
    """:func:`hu_fractions` of the backbone's arg-max on its own working grid (no split head,
    which works on the original grid), against the HU it sees there (the input resampled to
    ``model.spacing_mm``). On the original grid a pixel whose HU the resampling averaged away
    cannot be told apart by a network at the working spacing."""
    import torch

    hu_slices = np.asarray(hu_slices, dtype=np.float32)
    hu_slices = hu_slices[None] if hu_slices.ndim == 2 else np.moveaxis(hu_slices, -1, 0)
    model.network.eval()
    label = working_logits(hu_slices, spacing, model).argmax(1).numpy()
    size = working_shape(hu_slices.shape[1:], spacing, model.spacing_mm)
    return hu_fractions(resample_hu(torch.as_tensor(hu_slices), size).numpy(), label)


def fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def eval_phantoms(model, per_group: int, docs: Path | None, rows: list, seed_base: int = HELD_OUT_SEED) -> None:
    print(f"\n== held-out phantoms ({per_group} per group, seeds from {seed_base}) ==")
    methods = ("unet", "unet+hu", "threshold")  # raw network, default output, baseline
    overall = {m: PooledOverlap() for m in methods}
    anatomical = {m: PooledOverlap() for m in methods}
    every_case = {m: {t: [] for t in TISSUES} for m in methods}
    for g, (group, spacing, size) in enumerate(GROUPS):
        pooled = {m: PooledOverlap() for m in methods}
        cases = {m: {t: [] for t in TISSUES} for m in methods}
        for i in range(per_group):
            seed = seed_base + 100 * g + i
            kwargs = {"size": size} if spacing is None else {"spacing_mm": spacing, "size": size}
            ph = generate(seed, **kwargs)
            preds = {
                "unet": segment_volume(ph.hu, ph.spacing, method="unet", model=model, hu_refine=False).label,
                "unet+hu": segment_volume(ph.hu, ph.spacing, method="unet", model=model, hu_refine=True).label,
                "threshold": segment_volume(ph.hu, ph.spacing, method="threshold").label,
            }
            for m, pred in preds.items():
                dice = dice_per_tissue(pred, ph.label)
                pooled[m].add(pred, ph.label)
                overall[m].add(pred, ph.label)
                anatomical[m].add(pred, ph.anatomical_label)
                for t in TISSUES:
                    if dice[t] is not None:
                        cases[m][t].append(dice[t])
                        every_case[m][t].append(dice[t])
                rows.append({"set": "phantom", "group": group, "case": f"seed {seed}", "method": m,
                             "spacing_mm": round(ph.spacing[0], 3),
                             **{f"dice_{t}": (round(dice[t], 4) if dice[t] is not None else "") for t in TISSUES}})
            if docs is not None and i == 0 and g in (0, 3):
                tag = "clinical" if spacing is None else f"{spacing:g}mm"
                overlay(ph.hu, preds["unet+hu"], ph.spacing, docs / f"bodycomp_phantom_{tag}_unet.png",
                        f"U-Net + HU rule (default), held-out phantom ({group})",
                        areas_cm2(preds["unet+hu"], ph.spacing))
                overlay(ph.hu, ph.label, ph.spacing, docs / f"bodycomp_phantom_{tag}_truth.png",
                        f"Truth, held-out phantom ({group})", areas_cm2(ph.label, ph.spacing))
        print(f"-- {group}")
        for m in methods:
            pooled_txt = " ".join(f"{t} {fmt(pooled[m].dice()[t])}" for t in TISSUES)
            mean_txt = " ".join(f"{t} {fmt(np.mean(c) if c else None)}" for t, c in cases[m].items())
            print(f"  {m:10s} pooled Dice: {pooled_txt} | mean of cases: {mean_txt}")
    for title, acc in (("", overall), (", anatomical majority truth", anatomical)):
        print(f"-- all held-out phantoms (pooled Dice{title})")
        for m in methods:
            print(f"  {m:10s} " + " ".join(f"{t} {fmt(acc[m].dice()[t])}" for t in TISSUES))
    print("-- all held-out phantoms (mean of per-case Dice | worst case)")
    for m in methods:
        print(f"  {m:10s} " + " ".join(f"{t} {fmt(np.mean(c) if c else None)}" for t, c in every_case[m].items())
              + " | " + " ".join(f"{t} {fmt(min(c) if c else None)}" for t, c in every_case[m].items()))


UPPER_SEED = 990_000
UPPER_LEVELS = ("T11", "T12", "L1", "L2")


def eval_upper(model, per_group: int, rows: list, seed_base: int = UPPER_SEED,
               others: dict | None = None, name: str = "model") -> None:
    """Held-out upper-abdomen phantoms (T11-L2, clinical and 3 mm pixels), the levels where real
    CT labels organs against the wall as muscle: default output's pooled Dice per tissue, muscle
    area error per case, and the area (cm² per slice) of solid organs (liver, spleen, kidney,
    bowel, other) and of the diaphragm labelled muscle. ``others`` ({name: model}) are measured
    on the same phantoms (each phantom is generated once), for a comparison of models."""
    if per_group <= 0:
        return
    models = {name: model, **(others or {})}
    group_dice = {name: [] for name in models}  # pooled Dice per group, for the summary below
    print(f"\n== held-out upper-abdomen phantoms ({per_group} per group, seeds from {seed_base}; default output) ==")
    diaphragm = L.ORGAN_NAMES.index("diaphragm") + 1
    for g, level in enumerate(UPPER_LEVELS):
        level_fp = {name: [] for name in models}  # organs + diaphragm per group
        for spacing, size in ((None, 512), (3.0, 140)):
            group = f"{level} {'clinical' if spacing is None else '3 mm'}"
            pooled = {name: PooledOverlap() for name in models}
            errors = {name: [] for name in models}
            organ_fp = {name: [] for name in models}
            diaphragm_fp = {name: [] for name in models}
            for i in range(per_group):
                seed = seed_base + 100 * g + i + (50 if spacing else 0)
                ph = generate(seed, level=level, size=size, **({"spacing_mm": spacing} if spacing else {}))
                t = ph.label == L.MUSCLE
                px = ph.spacing[0] * ph.spacing[1] / 100.0
                for name, net in models.items():
                    out = segment_volume(ph.hu, ph.spacing, method="unet", model=net).label
                    p = out == L.MUSCLE
                    pooled[name].add(out, ph.label)
                    errors[name].append(float(p.sum() / max(int(t.sum()), 1) - 1.0))
                    organ_fp[name].append(float((p & (ph.organ_label > 0) & (ph.organ_label != diaphragm)).sum() * px))
                    diaphragm_fp[name].append(float((p & (ph.organ_label == diaphragm)).sum() * px))
                    dice = dice_per_tissue(out, ph.label)
                    rows.append({"set": "upper", "group": group, "case": f"seed {seed}", "method": "unet+hu",
                                 **({"model": name} if others else {}), "spacing_mm": round(ph.spacing[0], 3),
                                 **{f"dice_{k}": round(dice[k], 4) for k in TISSUES if dice.get(k) is not None},
                                 "muscle_area_error": round(errors[name][-1], 4),
                                 "organ_as_muscle_cm2": round(organ_fp[name][-1], 2),
                                 "diaphragm_as_muscle_cm2": round(diaphragm_fp[name][-1], 2)})
            for name in models:
                dice = pooled[name].dice()
                group_dice[name].append(dice)
                shown = " ".join(f"{k} {dice[k]:.4f}" for k in TISSUES if dice.get(k) is not None)
                print(f"  {group:12s}{f' {name:10s}' if others else ''} Dice {shown}; "
                      f"muscle area error mean {100 * np.mean(errors[name]):+.1f} %, "
                      f"worst {100 * max(errors[name], key=abs):+.1f} %; organs as muscle "
                      f"{np.mean(organ_fp[name]):.2f} cm², diaphragm as muscle {np.mean(diaphragm_fp[name]):.2f} cm²")
                level_fp[name].append(float(np.mean(organ_fp[name]) + np.mean(diaphragm_fp[name])))
                rows.append({"set": "upper", "group": group, "case": "pooled", "method": "unet+hu",
                             **({"model": name} if others else {}),
                             **{f"dice_{k}": round(dice[k], 4) for k in TISSUES if dice.get(k) is not None},
                             "muscle_area_error": round(float(np.mean(errors[name])), 4),
                             "organ_as_muscle_cm2": round(float(np.mean(organ_fp[name])), 2),
                             "diaphragm_as_muscle_cm2": round(float(np.mean(diaphragm_fp[name])), 2)})
        base_name = next(iter(models))
        base = float(np.mean(level_fp[base_name]))
        parts = []
        for name, fp in level_fp.items():
            part = f"{name} {np.mean(fp):.2f} cm²"
            if name != base_name and base > 0:
                part += f" ({100 * (np.mean(fp) / base - 1):+.0f} % against {base_name})"
            parts.append(part)
        print(f"  {level} organs + diaphragm as muscle, mean of the two pixel groups: {', '.join(parts)}")
    base_name = next(iter(models))
    for name in list(models)[1:]:
        print(f"  {name} against {base_name}, pooled Dice change over the {len(group_dice[name])} groups: "
              + dice_change_summary(group_dice[base_name], group_dice[name]))


def dice_change_summary(base: list[dict], other: list[dict]) -> str:
    """'muscle min -0.0031 max +0.0040 mean +0.0011; sat ...': the change of each tissue's Dice
    from ``base`` to ``other``, group by group (lists of per-group Dice dicts, same order)."""
    parts = []
    for tissue in TISSUES:
        change = [o[tissue] - b[tissue] for b, o in zip(base, other)
                  if b.get(tissue) is not None and o.get(tissue) is not None]
        if change:
            parts.append(f"{tissue} min {min(change):+.4f} max {max(change):+.4f} mean {np.mean(change):+.4f}")
    return "; ".join(parts)


def eval_like_real(model, count: int, rows: list, seed_base: int = LIKE_REAL_SEED) -> None:
    """Phantoms made like the real L3 slice (3 mm pixels, muscle 18 HU): the raw network's share
    of muscle pixels inside -29..150 HU next to the default output's Dice against the truth, so
    the real-CT share below can be read against phantoms where the truth is known."""
    if count <= 0:
        return
    print(f"\n== phantoms like the real L3 slice (3 mm pixels, muscle 18 HU; {count} seeds from {seed_base}) ==")
    pooled = PooledOverlap()
    shares = []
    for i in range(count):
        seed = seed_base + i
        ph = generate(seed, spacing_mm=3.0, size=140, muscle_hu=18.0)
        raw = segment_volume(ph.hu, ph.spacing, method="unet", model=model, hu_refine=False).label
        out = segment_volume(ph.hu, ph.spacing, method="unet", model=model, hu_refine=True).label
        share = hu_fractions(ph.hu, raw)["muscle"]
        dice = dice_per_tissue(out, ph.label)["muscle"]
        pooled.add(out, ph.label)
        shares.append(share)
        rows.append({"set": "like_real", "group": "3 mm, muscle 18 HU", "case": f"seed {seed}", "method": "unet",
                     "spacing_mm": 3.0, "inside_hu_muscle": round(share, 4), "dice_muscle": round(dice, 4)})
    print(f"  raw network muscle inside -29..150 HU: mean {np.mean(shares):.3f} (min {np.min(shares):.3f}, "
          f"max {np.max(shares):.3f}); default output muscle Dice (pooled): {pooled.dice()['muscle']:.4f}")


def real_cases():
    """(name, path, canonical slice indices, file for the overlay) of the shared real CT."""
    cases = []
    nifti = REAL / "totalsegmentator-ct-lower" / "ct_lower.nii.gz"
    if nifti.is_file():
        cases.append(("ct_lower L3 (z=73, 3 mm)", nifti, [73], "bodycomp_real_ct_lower_L3"))
    dcmqi = REAL / "dcmqi-ct-3slice"
    if dcmqi.is_dir():
        cases.append(("dcmqi 3 slices (0.81 mm)", dcmqi, "all", "bodycomp_real_dcmqi"))
    series = REAL / "totalsegmentator-dicom-series"
    if series.is_dir():
        cases.append(("TotalSegmentator DICOM series (0.98 mm)", series, "all", "bodycomp_real_dicom_series"))
    return cases


def eval_real(model, docs: Path | None, rows: list) -> None:
    print(f"\n== real CT in {REAL} (no tissue labels: HU plausibility of the raw U-Net) ==")
    if not REAL.is_dir():
        print("  (absent)")
        return
    for name, path, slices, stem in real_cases():
        try:
            image = load_image(path)
        except Exception as exc:  # e.g. a JPEG 2000 series without a decoder installed
            print(f"  {name}: cannot load ({exc})")
            continue
        t0 = time.time()
        res = segment_volume(image.hu, image.spacing, slices, method="unet", model=model, hu_refine=False)
        refined = segment_volume(image.hu, image.spacing, slices, method="unet", model=model, hu_refine=True)
        seconds = time.time() - t0
        ks = res.slices
        hu_vals = image.hu if image.hu.ndim == 2 else image.hu[:, :, ks]
        lab_vals = res.label if image.hu.ndim == 2 else res.label[:, :, ks]
        frac = hu_fractions(hu_vals, lab_vals)
        grid = working_grid_fractions(model, hu_vals, image.pixel_spacing)
        ref_vals = refined.label if image.hu.ndim == 2 else refined.label[:, :, ks]
        area = areas_cm2(ref_vals, image.pixel_spacing)
        n = len(ks)
        print(f"  {name}: {n} slice(s), {seconds:.1f} s; inside HU range: muscle {fmt(frac['muscle'], 3)} "
              f"SAT {fmt(frac['sat'], 3)} VAT {fmt(frac['vat'], 3)} IMAT {fmt(frac['imat'], 3)}; "
              f"on the {model.spacing_mm:g} mm working grid: muscle {fmt(grid['muscle'], 3)} "
              f"SAT {fmt(grid['sat'], 3)} VAT {fmt(grid['vat'], 3)}; "
              f"mean area per slice cm2 (default output, HU rule): " + " ".join(f"{t} {area[t] / n:.1f}" for t in TISSUES)
              + f"; confidence {res.confidence}")
        rows.append({"set": "real", "group": name, "case": str(path.name), "method": "unet",
                     "spacing_mm": round(image.pixel_spacing[0], 3),
                     **{f"inside_hu_{t}": (round(frac[t], 4) if frac[t] is not None else "") for t in TISSUES},
                     **{f"working_grid_inside_hu_{t}": (round(grid[t], 4) if grid[t] is not None else "")
                        for t in TISSUES}})
        if docs is not None:
            k = ks[len(ks) // 2]
            hu_k = image.hu if image.hu.ndim == 2 else image.hu[:, :, k]
            lab_k = res.label if image.hu.ndim == 2 else res.label[:, :, k]
            ref_k = refined.label if image.hu.ndim == 2 else refined.label[:, :, k]
            thr = segment_volume(hu_k, image.pixel_spacing, method="threshold").label
            overlay(hu_k, ref_k, image.pixel_spacing, docs / f"{stem}_unet.png",
                    f"U-Net + HU rule (default): {name}, slice {k}", areas_cm2(ref_k, image.pixel_spacing))
            overlay(hu_k, lab_k, image.pixel_spacing, docs / f"{stem}_unet_raw.png",
                    f"U-Net raw: {name}, slice {k}", areas_cm2(lab_k, image.pixel_spacing))
            overlay(hu_k, thr, image.pixel_spacing, docs / f"{stem}_threshold.png",
                    f"Threshold baseline: {name}, slice {k}", areas_cm2(thr, image.pixel_spacing))


#: Vertebra label values of ``vertebrae_lower.nii.gz`` (TotalSegmentator) and their names.
VERTEBRA_NAMES = {26: "S1", 27: "L5", 28: "L4", 29: "L3", 30: "L2"}
#: Slices of the 20-slice DICOM series that get an overlay.
SERIES_SLICES = (0, 5, 10, 15, 19)
PLAUSIBILITY_FIELDS = (
    "sample", "level", "slice", "spacing_mm", "body_cm2", "muscle_cm2", "muscle_body_share",
    "muscle_components", "largest_components_cm2", "cavity_cm2", "cavity_muscle_share",
    "cavity_muscle_cm2", "cavity_components", "cavity_components_cm2", "organ_blob_cm2",
    "organ_blob_muscle_share", "organ_blob_muscle_cm2", "spine_found", "sat_cm2", "vat_cm2",
    "imat_cm2", "png",
)


def real_levels():
    """(sample, path, [(level, canonical slice)]) of every real sample at every level it holds."""
    cases = []
    nifti = REAL / "totalsegmentator-ct-lower" / "ct_lower.nii.gz"
    vertebrae = REAL / "totalsegmentator-ct-lower" / "vertebrae_lower.nii.gz"
    if nifti.is_file() and vertebrae.is_file():
        labels = np.rint(load_image(vertebrae).hu).astype(int)
        levels = []
        for value, name in sorted(VERTEBRA_NAMES.items(), reverse=True):  # L2 first (top down)
            zs = np.flatnonzero((labels == value).any(axis=(0, 1)))
            if zs.size:  # the middle slice of the vertebra's z-range
                levels.append((name, int((zs.min() + zs.max()) // 2)))
        cases.append(("ct_lower", nifti, levels))
    series = REAL / "totalsegmentator-dicom-series"
    if series.is_dir():
        cases.append(("dicom_series", series, [("T11-T12", k) for k in SERIES_SLICES]))
    dcmqi = REAL / "dcmqi-ct-3slice"
    if dcmqi.is_dir():
        cases.append(("dcmqi", dcmqi, [("liver-level", k) for k in range(3)]))
    return cases


def eval_real_levels(model, docs: Path | None, csv_path: Path | None) -> list[dict]:
    """Default output and plausibility measures on every real sample at every level (part 3)."""
    print("\n== real CT at every level: label-free plausibility of the default output ==")
    rows: list[dict] = []
    if not REAL.is_dir():
        print("  (absent)")
        return rows
    for sample, path, levels in real_levels():
        try:
            image = load_image(path)
        except Exception as exc:  # e.g. a JPEG 2000 series without a decoder installed
            print(f"  {sample}: cannot load ({exc})")
            continue
        ks = [k for _, k in levels if 0 <= k < image.hu.shape[2]]
        label = segment_volume(image.hu, image.spacing, ks, method="unet", model=model).label
        cases = [(level, k, label[:, :, k]) for level, k in levels if k in ks]
        liver_seg = path / "liver_seg.dcm" if path.is_dir() else None
        if liver_seg is not None and liver_seg.is_file():
            # The issue's failure made on purpose: the liver (dcmqi's SEG) labelled muscle where
            # its HU lie in the muscle range, as the default output's HU rule would keep it.
            liver = load_dicom_seg(liver_seg, image)
            for level, k in levels:
                wrong = label[:, :, k].copy()
                hu_k = image.hu[:, :, k]
                wrong[liver[:, :, k] & (hu_k >= L.MUSCLE_HU[0]) & (hu_k <= L.MUSCLE_HU[1])] = L.MUSCLE
                cases.append((f"{level}+liver-as-muscle", k, wrong))
        for level, k, lab_k in cases:
            hu_k = image.hu[:, :, k]
            masks: dict = {}
            m = slice_measures(hu_k, lab_k, image.pixel_spacing, k, masks=masks)
            area = areas_cm2(lab_k, image.pixel_spacing)
            png = ""
            if docs is not None and not (level.endswith("liver-as-muscle") and k != 1):  # one such overlay
                png = f"{sample}_{level}_z{k}.png".replace("-", "_").replace("+", "_")
                title = (f"{sample} {level}, slice {k}: muscle/body {m.muscle_body_share:.2f}, "
                         f"cavity muscle {m.cavity_muscle_share:.2f} ({m.cavity_components} inside), "
                         f"organ-blob muscle {m.organ_blob_muscle_share:.2f}")
                overlay_png(hu_k, lab_k, image.pixel_spacing, docs / png, title=title, areas=area, dpi=72,
                            outlines={"abdominal cavity": masks["cavity"], "organ-like blobs": masks["organ_blobs"]})
            print(f"  {sample} {level} z{k}: muscle {m.muscle_cm2:.1f} cm2 = {m.muscle_body_share:.3f} of the body; "
                  f"{m.muscle_components} components (largest {m.largest_components_cm2}); cavity muscle "
                  f"{m.cavity_muscle_share:.3f} ({m.cavity_muscle_cm2} cm2), {m.cavity_components} component(s) "
                  f"inside ({m.cavity_components_cm2} cm2); organ-blob muscle {m.organ_blob_muscle_share:.3f} "
                  f"({m.organ_blob_muscle_cm2} cm2)" + (f"; {'; '.join(m.notes)}" if m.notes else ""))
            record = m.to_dict()
            rows.append({
                "sample": sample, "level": level, "slice": k, "spacing_mm": round(image.pixel_spacing[0], 3),
                **{f: record[f] for f in PLAUSIBILITY_FIELDS if f in record},
                "largest_components_cm2": "/".join(f"{a:g}" for a in m.largest_components_cm2),
                **{f"{t}_cm2": round(area[t], 2) for t in ("sat", "vat", "imat")},
                "png": png,
            })
    if csv_path is not None and rows:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PLAUSIBILITY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"  wrote {csv_path}")
    return rows


def eval_plausibility_phantoms(count: int, csv_path: Path | None, seed_base: int = PLAUSIBILITY_SEED) -> None:
    """The plausibility measures where the truth is known: L1/L2 phantoms (256 matrix) with their
    true label, and with their liver, spleen or kidney (``Phantom.organ_label``, organs of at least
    10 cm²) labelled muscle, the issue's failure. Per case and as min / median / max."""
    if count <= 0:
        return
    print(f"\n== plausibility measures on {count} L1/L2 phantoms (seeds from {seed_base}): truth vs organ labelled muscle ==")
    keys = ("muscle_body_share", "cavity_muscle_share", "cavity_components", "organ_blob_muscle_share")
    rows = []
    for i in range(count):
        seed = seed_base + i
        ph = generate(seed, level=("L1", "L2")[i % 2], size=256)
        cases = [("truth", ph.label)]
        for name in ("liver", "spleen", "kidney"):
            organ = ph.organ_label == L.ORGAN_NAMES.index(name) + 1
            if organ.sum() * ph.spacing[0] * ph.spacing[1] / 100 >= 10:
                wrong = ph.label.copy()
                wrong[organ] = L.MUSCLE
                cases.append((f"{name} as muscle", wrong))
        for case, label in cases:
            m = slice_measures(ph.hu, label, ph.spacing).to_dict()
            rows.append({"seed": seed, "level": ph.params["level"], "truncated": ph.params.get("truncated"),
                         "case": case, **{k: m[k] for k in keys}})
    for case in ("truth", "liver as muscle", "spleen as muscle", "kidney as muscle"):
        sel = [r for r in rows if r["case"] == case]
        if sel:
            print(f"  {case:17s} n={len(sel):2d} " + "; ".join(
                f"{k} {min(r[k] for r in sel):.3f} / {float(np.median([r[k] for r in sel])):.3f} / {max(r[k] for r in sel):.3f}"
                for k in keys) + "  (min / median / max)")
            flagged = sum(max(r["cavity_muscle_share"], r["organ_blob_muscle_share"]) > FLAG_SHARE for r in sel)
            print(f"  {'':17s} flagged (cavity or organ-blob muscle share > {FLAG_SHARE:g}): {flagged} of {len(sel)}")
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"  wrote {csv_path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "bodycomp_unet.pt")
    parser.add_argument("--per-group", type=int, default=8, help="held-out phantoms per spacing group")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="folder for overlay PNGs")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "eval_bodycomp.csv")
    parser.add_argument("--skip-phantoms", action="store_true")
    parser.add_argument("--seed-base", type=int, default=HELD_OUT_SEED,
                        help="first held-out seed (another stream, e.g. 888000, checks choices made on the default)")
    parser.add_argument("--like-real", type=int, default=6, help="phantoms made like the real L3 slice")
    parser.add_argument("--upper", type=int, default=8,
                        help="held-out phantoms per upper-abdomen level (T11-L2) and spacing (clinical, 3 mm)")
    parser.add_argument("--plausibility-phantoms", type=int, default=24,
                        help="L1/L2 phantoms for the plausibility measures against known truth (part 3)")
    parser.add_argument("--upper-seed", type=int, default=UPPER_SEED,
                        help="first seed of the upper-abdomen phantoms (another stream, e.g. 970000)")
    parser.add_argument("--upper-only", action="store_true",
                        help="only the held-out upper-abdomen phantoms (--upper per group); --compare adds models")
    parser.add_argument("--compare", nargs="+", default=[], metavar="NAME=MODEL",
                        help="with --upper-only: also measure these checkpoints on the same phantoms")
    parser.add_argument("--no-split-head", action="store_true",
                        help="drop the split head of every model, e.g. to compare fine-tuned backbones, which carry "
                             "no head, with the shipped one; the default output never uses the head, so only the "
                             "raw (no HU rule) measures of part 2 change")
    parser.add_argument("--real-only", action="store_true",
                        help="only part 3: real CT at every level, overlays and plausibility measures (~1 min)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    model = load_checkpoint(args.model)
    others = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--compare takes NAME=MODEL, not {item!r}")
        others[name] = load_checkpoint(path)
    if others and not args.upper_only:
        parser.error("--compare needs --upper-only")
    if args.no_split_head:
        for net in (model, *others.values()):
            net.split_head = None
    meta = model.meta
    print(f"model {args.model}: {model.config['name']} {model.config.get('kwargs')}, spacing {model.spacing_mm} mm, "
          f"windows {model.windows}; trained {meta.get('iterations')} iterations, best epoch {meta.get('best_epoch')}; "
          f"split head: {'trained ' + str(meta.get('split_head', {}).get('iterations')) + ' iterations' if model.split_head else 'none'}")
    docs = None if args.no_overlays else args.docs
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
    real_docs = None if docs is None else docs / "real"
    real_csv = (real_docs or args.out.parent) / "plausibility_real.csv"
    phantom_csv = (real_docs or args.out.parent) / "plausibility_phantoms.csv"
    if args.real_only:
        eval_plausibility_phantoms(args.plausibility_phantoms, phantom_csv)
        eval_real_levels(model, real_docs, real_csv)
        return 0
    rows: list[dict] = []
    if args.upper_only:
        eval_upper(model, args.upper, rows, seed_base=args.upper_seed, others=others or None, name=args.model.stem)
    elif not args.skip_phantoms:
        eval_phantoms(model, args.per_group, docs, rows, args.seed_base)
        eval_upper(model, args.upper, rows, seed_base=args.upper_seed)
        eval_like_real(model, args.like_real, rows)
    if not args.upper_only:
        eval_real(model, docs, rows)
        eval_plausibility_phantoms(args.plausibility_phantoms, phantom_csv)
        eval_real_levels(model, real_docs, real_csv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("set", "group", "case", "method"), k))
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out}" + (f" and overlays in {docs}" if docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
