"""Automatic body-composition labels: network inference with pre- and post-processing.

The pipeline for one axial slice (``(X, Y)`` HU, pixel ``spacing`` in mm):

1. **Resample** in-plane to the model's working spacing (antialiased bilinear), pad with air to a
   multiple of 16; any matrix size and 0.5-3 mm pixels are accepted.
2. **Encode** HU as one [0, 1] channel per HU window (soft-tissue and wide windows).
3. **Network** (2D MONAI U-Net) -> 5 class logits, resampled *back to the original grid*
   (bilinear on logits, so boundaries stay sub-pixel smooth) and soft-maxed; when the checkpoint
   has a split head (:class:`sarco_app.segmentation.network.TissueSplitHead`) and the HU rule is off, the
   head decides tissue inside the compartments there from each original pixel's HU (muscle /
   IMAT / neither; SAT, VAT kept or not): the network's own labels.
4. **Post-process** (:func:`postprocess`): nothing outside the body, tissue islands below
   ``min_island_mm2`` handed to the next most likely class (muscle with its IMAT is one region),
   IMAT only inside the muscle compartment (closed muscle mask, or connected to muscle), and
   (``hu_refine``, on by default) the clinical HU rule applied to the regions: the network
   finds the compartments, HU decides tissue at the original resolution; muscle and
   VAT borders first move by HU within half a working pixel (:func:`refine_borders`).

:func:`segment_volume` / :func:`segment_image` run it on a 2D image, one slice of a volume or all
slices, with the method ``"unet"`` or ``"threshold"`` (:mod:`sarco_app.segmentation.threshold`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from tqdm import tqdm

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.segmentation.network import SIZE_MULTIPLE, BodyCompModel, encode_windows, load_checkpoint, tissue_logits
from sarco_app.segmentation.threshold import body_mask, closing, remove_small_components, threshold_segment

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The model shipped in the repository (trained on phantoms, see models/MODEL_CARD.md).
SHIPPED_MODEL_PATH = REPO_ROOT / "models" / "bodycomp_unet.pt"
#: Environment variable naming a checkpoint to use instead (a retrained model, tests). The
#: MONAI Label app passes its own model paths (its retrained model, then this one) explicitly.
MODEL_ENV = "SARCO_BODYCOMP_MODEL"

METHODS = ("unet", "threshold")
#: Tissue regions whose small islands post-processing removes. Muscle and IMAT form one region
#: (the muscle compartment): IMAT is speckle inside muscle, not an island to be removed.
ISLAND_GROUPS = ((L.MUSCLE, L.IMAT), (L.SAT,), (L.VAT,))


def default_model_path() -> Path:
    """The checkpoint the library uses when none is given: ``$SARCO_BODYCOMP_MODEL``, else the
    shipped one."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return Path(env)
    return SHIPPED_MODEL_PATH


_cache: dict[str, BodyCompModel] = {}
_cache_lock = threading.Lock()


def get_model(path: str | Path | None = None) -> BodyCompModel:
    """The model at ``path`` (default :func:`default_model_path`), cached; reloaded when the
    file's modification time changes, so a retrained checkpoint is used without a restart."""
    path = Path(path) if path is not None else default_model_path()
    key = str(path.resolve())
    if not path.is_file():
        raise SarcoError(f"{path}: model checkpoint not found (train one or pass --model)")
    mtime = path.stat().st_mtime
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None or cached.mtime != mtime:
            cached = load_checkpoint(path)
            _cache[key] = cached
        return cached


# --------------------------------------------------------------------------- pre-processing


def working_shape(shape: Sequence[int], spacing: Sequence[float], spacing_mm: float) -> tuple[int, int]:
    """Size ``(nx, ny)`` of an ``(X, Y)`` grid with pixel ``spacing`` (mm) at ``spacing_mm``."""
    return (
        max(1, int(round(shape[0] * float(spacing[0]) / spacing_mm))),
        max(1, int(round(shape[1] * float(spacing[1]) / spacing_mm))),
    )


def resample_hu(hu: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample HU slices ``(N, X, Y)`` to ``(N, *size)``, antialiased bilinear."""
    if tuple(hu.shape[-2:]) == tuple(size):
        return hu
    down = size[0] < hu.shape[-2] or size[1] < hu.shape[-1]
    return F.interpolate(hu[:, None], size=size, mode="bilinear", align_corners=False, antialias=down)[:, 0]


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE, value: float = 0.0):
    """Pad the last two axes of ``x`` up to a multiple of ``multiple``, centred.

    Returns the padded tensor and the slices that cut the original region back out.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    top, left = ph // 2, pw // 2
    padded = F.pad(x, (left, pw - left, top, ph - top), value=value)
    return padded, (slice(top, top + h), slice(left, left + w))


def preprocess(hu_slices: np.ndarray | torch.Tensor, spacing: Sequence[float], model: BodyCompModel):
    """HU slices ``(N, X, Y)`` at pixel ``spacing`` (mm) -> network input ``(N, C, H, W)`` at the
    model's working spacing, and the crop that removes the padding."""
    if not isinstance(hu_slices, torch.Tensor):
        hu_slices = torch.as_tensor(np.asarray(hu_slices, dtype=np.float32))
    hu = hu_slices.to(device=model.device, dtype=torch.float32)
    size = working_shape(hu.shape[-2:], spacing, model.spacing_mm)
    hu = resample_hu(hu, size)
    x, crop = pad_to_multiple(encode_windows(hu, model.windows), value=0.0)  # 0 = air in all windows
    return x, crop


@torch.no_grad()
def working_logits(hu_slices: np.ndarray | torch.Tensor, spacing: Sequence[float], model: BodyCompModel) -> torch.Tensor:
    """Logits ``(N, 5, h, w)`` of the served classes on the model's working grid (padding
    removed; a network's organ classes folded into background, :func:`tissue_logits`) for HU
    slices ``(N, X, Y)`` at pixel ``spacing`` (mm)."""
    x, crop = preprocess(hu_slices, spacing, model)
    return tissue_logits(model.network(x)[:, :, crop[0], crop[1]])


@torch.no_grad()
def original_grid_logits(hu_slices: np.ndarray | torch.Tensor, spacing: Sequence[float], model: BodyCompModel) -> torch.Tensor:
    """Network logits ``(N, K, X, Y)`` resampled (bilinear) back to the grid of HU slices
    ``(N, X, Y)`` at pixel ``spacing`` (mm)."""
    logits = working_logits(hu_slices, spacing, model)
    return F.interpolate(logits, size=tuple(hu_slices.shape[-2:]), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probabilities(
    hu_slices: np.ndarray, spacing: Sequence[float], model: BodyCompModel, batch_size: int = 4,
    split_head: bool = True,
) -> np.ndarray:
    """Class probabilities ``(N, K, X, Y)`` on the original grid for HU slices ``(N, X, Y)``;
    with ``split_head`` (and a model that has one) after the split head's tissue decision, else
    the backbone's softmax."""
    hu_slices = np.asarray(hu_slices, dtype=np.float32)
    if hu_slices.ndim == 2:
        hu_slices = hu_slices[None]
    out = np.empty((hu_slices.shape[0], model.num_classes) + hu_slices.shape[1:], dtype=np.float32)
    model.network.eval()
    for start in range(0, hu_slices.shape[0], batch_size):
        logits = original_grid_logits(hu_slices[start : start + batch_size], spacing, model)
        if model.split_head is None or not split_head:
            probs = torch.softmax(logits, dim=1)
        else:
            hu = torch.as_tensor(hu_slices[start : start + batch_size]).to(logits.device)
            probs = model.split_head.probabilities(logits, hu)
        out[start : start + batch_size] = probs.cpu().numpy()
    return out


# --------------------------------------------------------------------------- post-processing


def postprocess(
    probs: np.ndarray,
    hu: np.ndarray,
    spacing: Sequence[float],
    min_island_mm2: float = 25.0,
    imat_margin_mm: float = 3.0,
    hu_refine: bool = False,
    border_mm: float = 1.0,
    border_min_prob: float = 0.05,
) -> np.ndarray:
    """Label map from class probabilities with the corrections users expect.

    Parameters
    ----------
    probs : (K, X, Y) class probabilities on the slice grid (modified in place).
    hu : (X, Y) HU slice; spacing : (sx, sy) mm.
    min_island_mm2 : connected tissue regions smaller than this area (mm^2) are given to the
        next most likely class; muscle and IMAT count as one region (``ISLAND_GROUPS``).
    imat_margin_mm : IMAT is kept only within the muscle compartment, i.e. the muscle mask
        closed with a disk of this radius (mm), plus IMAT connected to muscle and within this
        distance of it.
    hu_refine : also apply the clinical HU rule (:func:`sarco_app.labels.apply_hu_ranges`):
        inside the muscle compartment (muscle or IMAT) pixels are muscle at -29..150 HU and IMAT
        at -190..-30 HU, other out-of-range pixels background; SAT / VAT outside -190..-30 HU
        become background. Before the rule, muscle and VAT borders are refined by HU within
        ``border_mm`` (see :func:`refine_borders`).
    border_mm, border_min_prob : band (mm) and least class probability of the border
        refinement; ``border_mm`` is half the model's working spacing in :func:`segment_volume`.

    Returns
    -------
    (X, Y) uint8 label map (``sarco_app.labels`` values).
    """
    sx, sy = float(spacing[0]), float(spacing[1])
    body = body_mask(hu, (sx, sy))
    probs[1:, ~body] = 0.0
    probs[0, ~body] = 1.0
    label = probs.argmax(0).astype(np.uint8)
    min_px = int(round(min_island_mm2 / (sx * sy)))
    for _ in range(2):  # a second pass catches islands created by the first re-assignment
        changed = False
        for values in ISLAND_GROUPS:
            mask = np.isin(label, values)
            small = mask & ~remove_small_components(mask, min_px)
            if small.any():
                for value in values:
                    probs[value][small] = 0.0
                changed = True
        if not changed:
            break
        label = probs.argmax(0).astype(np.uint8)
    muscle = label == L.MUSCLE
    # The compartment: muscle closed by the margin, plus IMAT connected to muscle within the
    # margin of it (a fat pixel on a muscle's border that the split head calls IMAT is outside a
    # closing at 3 mm pixels; the margin keeps a mislabelled fat region from joining).
    regions, _ = ndi.label(muscle | (label == L.IMAT))
    attached = np.isin(regions, np.unique(regions[muscle])) & (regions > 0)
    if muscle.any():
        attached &= ndi.distance_transform_edt(~muscle, sampling=(sx, sy)) <= imat_margin_mm
    compartment = closing(muscle, imat_margin_mm, (sx, sy)) | attached
    stray_imat = (label == L.IMAT) & ~compartment
    if stray_imat.any():
        probs[L.IMAT][stray_imat] = 0.0
        label = probs.argmax(0).astype(np.uint8)
    if hu_refine:
        label = refine_borders(label, probs, hu, (sx, sy), border_mm, border_min_prob)
        label = L.apply_hu_ranges(label, hu)
    return label


def refine_borders(
    label: np.ndarray,
    probs: np.ndarray,
    hu: np.ndarray,
    spacing: Sequence[float],
    band_mm: float = 1.0,
    min_prob: float = 0.05,
    tissues: Sequence[int] = (L.MUSCLE, L.VAT),
) -> np.ndarray:
    """Move muscle and VAT borders to where HU puts them, within ``band_mm`` of the network's.

    The network works on a coarser grid (2 mm) than clinical slices (0.6-1.0 mm), so its
    borders are uncertain by about half a working pixel; the HU rule alone then drops the
    partial-volume rim (a muscle border pixel the network called fat or background). Here,
    one pixel ring at a time up to ``band_mm``, a pixel that is background or whose label
    does not fit its HU, touches (4-connected) a tissue of ``tissues`` whose HU range it fits
    and has that tissue's probability >= ``min_prob`` takes that tissue (the most probable one
    if several qualify). SAT is not grown: its outer border is skin/air partial volume, whose
    mixed HU falls in the fat range. Returns a new ``(X, Y)`` label map.
    """
    steps = int(round(band_mm / float(min(spacing[0], spacing[1]))))
    if steps <= 0:
        return label
    label = label.copy()
    is_fat = (hu >= L.FAT_HU[0]) & (hu <= L.FAT_HU[1])
    is_muscle = (hu >= L.MUSCLE_HU[0]) & (hu <= L.MUSCLE_HU[1])
    fits = {L.MUSCLE: is_muscle, L.SAT: is_fat, L.VAT: is_fat, L.IMAT: is_fat}
    for _ in range(steps):
        misfit = label == L.BACKGROUND
        for value, fit in fits.items():
            misfit |= (label == value) & ~fit
        best = np.zeros(label.shape, dtype=np.float32)
        grown = np.zeros(label.shape, dtype=np.uint8)
        for value in tissues:
            take = ndi.binary_dilation(label == value) & misfit & fits[value]
            take &= (probs[value] >= min_prob) & (probs[value] > best)
            grown[take] = value
            best[take] = probs[value][take]
        if not grown.any():
            break
        label[grown > 0] = grown[grown > 0]
    return label


# --------------------------------------------------------------------------- slices and volumes


@dataclass
class SegmentResult:
    """Labels on the input's grid and what the caller may want to report."""

    label: np.ndarray  # uint8, same shape as the input
    slices: list[int]  # slices that were labelled (``[0]`` for a 2D input)
    method: str
    confidence: dict[str, float | None] = field(default_factory=dict)  # per tissue, unet only
    model_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def resolve_slices(shape: tuple[int, ...], slices: int | str | Iterable[int] | None) -> list[int]:
    """Sorted slice indices of an image of ``shape`` that ``slices`` names: an index (negative
    counts from the end), several, ``"all"`` or None (all); a 2D image has the one slice 0.
    Raises :class:`SarcoError` for an index out of range."""
    if len(shape) == 2:
        if slices not in (None, "all", 0, [0], (0,)):
            raise SarcoError(f"slice {slices} out of range: the image is 2D")
        return [0]
    depth = shape[2]
    if slices is None or (isinstance(slices, str) and slices.lower() == "all"):
        return list(range(depth))
    if isinstance(slices, (int, np.integer)) or (isinstance(slices, str) and slices.lstrip("-").isdigit()):
        chosen = [int(slices)]
    else:
        chosen = [int(k) for k in slices]
    for k in chosen:
        if not -depth <= k < depth:
            raise SarcoError(f"slice index {k} out of range 0..{depth - 1}")
    return sorted({k % depth for k in chosen})


def segment_volume(
    hu: np.ndarray,
    spacing: Sequence[float],
    slices: int | str | Iterable[int] | None = None,
    method: str = "unet",
    model: BodyCompModel | str | Path | None = None,
    hu_refine: bool = True,
    batch_size: int = 4,
    threads: int | None = None,
    device: str | None = "auto",
) -> SegmentResult:
    """Body-composition labels of a 2D slice ``(X, Y)`` or of slices of a volume ``(X, Y, Z)``.

    Parameters
    ----------
    hu : HU array in canonical orientation (see ``docs/CONVENTIONS.md``).
    spacing : voxel size in mm; only the first two values (in-plane) are used.
    slices : slice index, iterable of indices, or ``None`` / ``"all"`` for every slice;
        slices not chosen stay 0 in the result.
    method : ``"unet"`` (network) or ``"threshold"`` (rule-based baseline).
    model : a loaded model, a checkpoint path, or ``None`` for :func:`default_model_path`.
    hu_refine : apply the HU rule after the network (see :func:`postprocess`); on by default
        because it raises held-out Dice of every tissue (models/MODEL_CARD.md). It then works on
        the backbone's probabilities; without it the model's split head, if any, decides tissue
        (the raw network labels).
    threads : torch CPU threads for the network while this call runs (``None``: unchanged).
        One thread is the robust choice on a busy 2-core machine (``scripts/bench_infer.py``).
    device : ``'auto'`` (CUDA when a GPU is there, else CPU), ``'cpu'``, ``'cuda'`` or
        ``'cuda:N'`` (:func:`sarco_app.segmentation.network.resolve_device`); the model is moved there.

    Returns
    -------
    :class:`SegmentResult` whose ``label`` has the shape of ``hu``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim not in (2, 3):
        raise SarcoError(f"expected a 2D or 3D image, got shape {hu.shape}")
    if method not in METHODS:
        raise SarcoError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    spacing = (float(spacing[0]), float(spacing[1]))
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise SarcoError(f"invalid pixel spacing {spacing}")
    chosen = resolve_slices(hu.shape, slices)
    volume = hu[:, :, None] if hu.ndim == 2 else hu
    label = np.zeros(volume.shape, dtype=np.uint8)
    result = SegmentResult(label=label, slices=chosen, method=method)
    if method == "threshold":
        for k in chosen:
            label[:, :, k] = threshold_segment(volume[:, :, k], spacing)
    else:
        if not isinstance(model, BodyCompModel):
            model = get_model(model)
        model.to(device)
        result.model_path = model.path
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            sums = {name: [0.0, 0] for name in L.LABELS}
            # Progress on stderr for a whole volume in a terminal (disable=None: off elsewhere).
            progress = tqdm(total=len(chosen), desc="segment", unit="slice",
                            disable=None if len(chosen) > batch_size else True)
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                stack = np.moveaxis(volume[:, :, batch], 2, 0)
                # The HU rule and the split head make the same decision (tissue by HU inside the
                # compartments); with the rule on, the exact rule decides on the backbone's
                # compartments, so a head's mistake cannot remove tissue the rule would keep.
                probs = predict_probabilities(stack, spacing, model, batch_size=batch_size, split_head=not hu_refine)
                for i, k in enumerate(batch):
                    lab = postprocess(probs[i], stack[i], spacing, hu_refine=hu_refine,
                                      border_mm=model.spacing_mm / 2)
                    label[:, :, k] = lab
                    for value, name in L.NAMES.items():
                        mask = lab == value
                        sums[name][0] += float(probs[i][value][mask].sum())
                        sums[name][1] += int(mask.sum())
                progress.update(len(batch))
            progress.close()
            result.confidence = {
                name: (round(total / count, 4) if count else None) for name, (total, count) in sums.items()
            }
        finally:
            torch.set_num_threads(previous_threads)
    result.label = label[:, :, 0] if hu.ndim == 2 else label
    return result


def segment_image(
    image, slices=None, method: str = "unet", model=None, hu_refine: bool = True, threads: int | None = None,
    device: str | None = "auto",
) -> SegmentResult:
    """:func:`segment_volume` on a :class:`sarco_app.inputs.ingest.CTImage` (canonical grid)."""
    return segment_volume(
        image.hu, image.spacing, slices, method=method, model=model, hu_refine=hu_refine, threads=threads,
        device=device,
    )
