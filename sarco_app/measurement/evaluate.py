"""Segmentation agreement between predicted and reference label maps (the paper's Table 3).

Per image and tissue: IoU = |P ∩ T| / |P ∪ T| and Dice = 2 |P ∩ T| / (|P| + |T|) for
M (muscle), S (SAT), V (VAT), I (IMAT) and MSV, the three main tissues together. MSV pools the
three classes: a pixel counts as agreeing only when both maps give it the same one of M, S, V,
so IoU_MSV = Σ_c |P_c ∩ T_c| / Σ_c |P_c ∪ T_c| over c ∈ {M, S, V} (a confusion between muscle
and SAT is an error, unlike a union of the three masks).

The Table-3 summary counts images per IoU bin (≥ 0.90, 0.80-0.89, 0.70-0.79, < 0.70; the
bins are half-open, [0.80, 0.90) and so on) for M, S, V and MSV, and adds the total, the mean
IoU and the overall ratio: pooled Σ|P ∩ T| / Σ|P ∪ T| over all images. A tissue absent from
both maps of an image has no IoU and is left out of that column.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sarco_app import labels as L
from sarco_app.errors import SarcoError, reason
from sarco_app.inputs.ingest import NIFTI_SUFFIXES, image_stem
from sarco_app.metrics import iou_dice, overlap_counts

logger = logging.getLogger(__name__)

#: Column name -> label values it covers.
COLUMNS: dict[str, tuple[int, ...]] = {
    "M": (L.MUSCLE,),
    "S": (L.SAT,),
    "V": (L.VAT,),
    "I": (L.IMAT,),
    "MSV": (L.MUSCLE, L.SAT, L.VAT),
}
#: The columns of the paper's Table 3.
TABLE3_COLUMNS = ("M", "S", "V", "MSV")
#: (row label, lower bound inclusive, upper bound exclusive).
IOU_BINS = (("≥ 0.90", 0.90, np.inf), ("0.80-0.89", 0.80, 0.90), ("0.70-0.79", 0.70, 0.80), ("< 0.70", -np.inf, 0.70))


def agreement(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{column: {"iou", "dice", "intersection", "union", "pred", "truth"}}`` for every column
    of :data:`COLUMNS`."""
    out = {}
    for column, values in COLUMNS.items():
        counts = overlap_counts(pred, truth, values)
        iou, dice = iou_dice(counts)
        out[column] = {"iou": iou, "dice": dice, **counts}
    return out


# --------------------------------------------------------------------------- files


def _label_files(path: Path, what: str) -> dict[str, Path]:
    if not path.exists():
        raise SarcoError(f"{what} {path}: no such file or folder")
    if path.is_file():
        return {image_stem(path): path}
    if (path / "labels" / "final").is_dir():  # a studies folder: its files are images, not labels
        return _label_files(path / "labels" / "final", what)
    files = {image_stem(p): p for p in sorted(path.iterdir()) if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)}
    if not files:
        raise SarcoError(f"{what} {path}: no NIfTI label files found")
    return files


def load_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label NIfTI in closest-canonical orientation: ``(integer array, affine)``."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        raw = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise SarcoError(f"{path.name}: not a readable NIfTI label ({reason(exc, path)})") from exc
    try:
        L.check_whole_numbers(raw)
    except SarcoError as exc:
        raise SarcoError(f"{path.name}: {exc}") from None
    data = np.rint(raw).astype(np.int16)
    bad = np.setdiff1d(np.unique(data), [0, *L.NAMES])
    if bad.size:
        raise SarcoError(
            f"{path.name}: values {bad[:5].tolist()} outside 0-4 — an image rather than a label map?"
        )
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:  # a 2D slice: orient it as a one-slice volume
        data = data[:, :, None]
    if data.ndim != 3:
        raise SarcoError(f"{path.name}: expected a 2D or 3D label, got shape {data.shape}")
    # Same voxel order (RAS) for both maps whatever the files' orientations.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    data = np.asarray(canonical.dataobj)
    return (data[:, :, 0] if data.shape[2] == 1 else data), canonical.affine


def pair_files(pred: str | Path, truth: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Match predictions to references by file name (without .nii/.nii.gz).

    Two single files are paired whatever their names. Returns ``(pairs, only_pred, only_truth)``.
    """
    pred, truth = Path(pred), Path(truth)
    pred_files, truth_files = _label_files(pred, "--pred"), _label_files(truth, "--truth")
    if pred.is_file() and truth.is_file():
        return [(image_stem(truth), pred, truth)], [], []
    common = sorted(set(pred_files) & set(truth_files))
    if not common:
        raise SarcoError(f"no file names in common between {pred} and {truth}")
    pairs = [(key, pred_files[key], truth_files[key]) for key in common]
    return pairs, sorted(set(pred_files) - set(truth_files)), sorted(set(truth_files) - set(pred_files))


def evaluate_files(pred: str | Path, truth: str | Path) -> dict[str, Any]:
    """Per-image agreement rows and the Table-3 summary for label files or folders.

    Returns ``{"rows": [...], "table3": DataFrame, "only_pred": [...], "only_truth": [...]}``;
    each row has ``id`` and ``<column>_iou``, ``<column>_dice``, ``<column>_intersection``,
    ``<column>_union`` for every column of :data:`COLUMNS`.
    """
    pairs, only_pred, only_truth = pair_files(pred, truth)
    rows = []
    for key, pred_path, truth_path in pairs:
        p, p_affine = load_label_map(pred_path)
        t, t_affine = load_label_map(truth_path)
        if p.shape != t.shape:
            raise SarcoError(f"{key}: prediction shape {p.shape} differs from reference shape {t.shape}")
        if not np.allclose(p_affine, t_affine, atol=1e-2):
            logger.warning("%s: prediction and reference affines differ; compared voxel by voxel", key)
        row: dict[str, Any] = {"id": key}
        for column, result in agreement(p, t).items():
            for measure in ("iou", "dice", "intersection", "union"):
                row[f"{column}_{measure}"] = result[measure]
        rows.append(row)
    return {"rows": rows, "table3": table3(rows), "only_pred": only_pred, "only_truth": only_truth}


def table3(rows: list[dict[str, Any]]):
    """The Table-3 summary: counts (and % of images) per IoU bin for M, S, V and MSV, then
    ``total`` (images with an IoU), ``mean IoU`` and ``overall ratio`` (pooled IoU)."""
    import pandas as pd

    table: dict[str, dict[str, Any]] = {}
    for column in TABLE3_COLUMNS:
        ious = np.array([r[f"{column}_iou"] for r in rows if r.get(f"{column}_iou") is not None], dtype=float)
        cells: dict[str, Any] = {}
        for name, low, high in IOU_BINS:
            count = int(np.count_nonzero((ious >= low) & (ious < high)))
            share = 100.0 * count / len(ious) if len(ious) else 0.0
            cells[name] = f"{count} ({share:.1f}%)"
        cells["total"] = str(len(ious))
        cells["mean IoU"] = f"{ious.mean():.4f}" if len(ious) else ""
        inter = sum(r[f"{column}_intersection"] for r in rows)
        union = sum(r[f"{column}_union"] for r in rows)
        cells["overall ratio"] = f"{inter / union:.4f}" if union else ""
        table[column] = cells
    frame = pd.DataFrame(table)
    frame.index.name = "IoU"
    return frame


def table3_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Number of images per IoU bin and column (the integers behind :func:`table3`)."""
    out: dict[str, dict[str, int]] = {}
    for column in TABLE3_COLUMNS:
        ious = np.array([r[f"{column}_iou"] for r in rows if r.get(f"{column}_iou") is not None], dtype=float)
        out[column] = {name: int(np.count_nonzero((ious >= low) & (ious < high))) for name, low, high in IOU_BINS}
    return out


def to_markdown(rows: list[dict[str, Any]], summary) -> str:
    """Per-image table (IoU / Dice per column) and the Table-3 summary as Markdown."""
    columns = list(COLUMNS)
    lines = ["## Per image", ""]
    lines.append("| id | " + " | ".join(f"{c} IoU | {c} Dice" for c in columns) + " |")
    lines.append("|---|" + "---:|" * (2 * len(columns)))
    for row in rows:
        cells = []
        for c in columns:
            for m in ("iou", "dice"):
                v = row[f"{c}_{m}"]
                cells.append("–" if v is None else f"{v:.4f}")
        lines.append(f"| {row['id']} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 3: images per IoU bin", ""]
    header = ["IoU", *summary.columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * len(summary.columns))
    for name, values in summary.iterrows():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"
