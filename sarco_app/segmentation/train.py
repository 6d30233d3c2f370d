"""Training of the body-composition network (shared by the CLI, the MONAI Label trainer and
``scripts/train_bodycomp.py``).

Data are axial slices with labels: :class:`Sample` ``(hu (X, Y), label (X, Y), spacing)``.
:func:`load_studies` reads them from a studies folder (``DIR/<id>.nii.gz`` with
``DIR/labels/final/<id>.nii.gz``; from 3D labels every slice with a labelled tissue is used).

Every sample is resampled once to the working spacing; batches are then drawn with strong,
SynthSeg-like augmentation so a model trained on phantoms copes with real scanners:

* geometry: rotation, isotropic and anisotropic scale (pixel-spacing errors), translation,
  left-right flip (the anterior-posterior axis is never flipped: anatomy is not symmetric);
* intensity, in HU: a random offset per tissue class (muscle density varies between people,
  myosteatosis), global HU shift and contrast, a smooth bias field, blur, lower resolution
  (3 mm pixels), white and correlated noise.

With ``organ_classes`` the network also learns the organ classes of
:data:`sarco_app.labels.ORGAN_NAMES` where a sample has an organ map (the phantoms' ``organ_label``,
or ``labels/organs/`` in a studies folder); each organ gets its own random HU offset, so organ HU
overlaps muscle as in non-contrast and portal-venous scans and shape and context must tell them
apart. Samples without an organ map are scored on the served five classes only (organs folded
into background), so user labels train such a network too.

Validation Dice per tissue is computed on held-out slices at the working spacing after every
epoch; the best checkpoint (mean Dice of muscle, SAT, VAT) is written atomically, so a server
that reloads on file change picks it up at once.

Optionally (``split_head_iterations``) a second phase trains the split head
(:class:`sarco_app.segmentation.network.TissueSplitHead`) with the backbone frozen, on the slices' own
grids: :func:`train_split_head`.

Why this module is ~770 lines: the augmentation (about 200 of them) is the next seam to split
off; it stays here until the lead's move into sub-packages, so two moves do not collide.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.metrics import PooledOverlap
from sarco_app.segmentation.network import (
    DEFAULT_NETWORK,
    DEFAULT_SPACING_MM,
    DEFAULT_WINDOWS,
    BodyCompModel,
    TissueSplitHead,
    add_organ_classes,
    encode_windows,
    load_checkpoint,
    new_model,
    resolve_device,
    save_checkpoint,
    tissue_logits,
)
from sarco_app.segmentation.segment import original_grid_logits, pad_to_multiple, resample_hu, working_shape

logger = logging.getLogger(__name__)

AIR = -1024.0


@dataclass
class Sample:
    """One labelled axial slice."""

    hu: np.ndarray  # (X, Y) float32 HU
    label: np.ndarray  # (X, Y) uint8, sarco_app.labels values
    spacing: tuple[float, float]  # mm
    name: str = ""
    organs: np.ndarray | None = None  # (X, Y) uint8 organ classes (ORGAN_NAMES position + 1), optional
    weight: float = 1.0  # loss weight (pseudo-labels below finals, sarco_app.segmentation.pseudo)


@dataclass
class TrainConfig:
    """Training settings (all recorded in the checkpoint's ``meta``)."""

    # The one set of defaults (CLI `train` and `loop`, the MONAI Label trainer): a fine-tune of
    # tens of slices on a 2-core CPU. scripts/train_bodycomp.py passes the shipped model's recipe.
    epochs: int = 10
    batch_size: int = 8
    crop: int = 128  # square crop at the working spacing (pixels)
    iterations_per_epoch: int | None = None  # default: enough to see every slice once
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    max_val: int = 24
    seed: int = 0
    threads: int = 2
    spacing_mm: float = DEFAULT_SPACING_MM
    windows: tuple = DEFAULT_WINDOWS
    network: dict = field(default_factory=lambda: dict(DEFAULT_NETWORK))
    augment: bool = True
    init_from: str | None = None  # checkpoint to fine-tune from (same network config)
    time_limit_s: float | None = None
    # Decide muscle vs IMAT inside the muscle compartment again by HU after intensity
    # augmentation, so labels keep following the HU protocol the augmentation moved pixels across.
    relabel_muscle_by_hu: bool = False
    # Then train the split head (the protocol's tissue decision on the original grid) for this
    # many iterations of two slices, the backbone frozen (not bounded by time_limit_s). With 0, a
    # head-only run is impossible and an initial checkpoint's head is dropped if the backbone trains.
    split_head_iterations: int = 0
    split_head_lr: float = 3e-3
    # Predict the organ classes too (labels.ORGAN_NAMES), learned where samples have organ maps; a
    # five-class initial model gets the extra output channels (network.add_organ_classes).
    organ_classes: bool = False
    # Also write every epoch's network here (the best by validation Dice still goes to the output):
    # phantom validation Dice cannot see every change that matters on real CT.
    last_path: str | None = None
    # 'auto' (CUDA when a GPU is there, else CPU), 'cpu', 'cuda' or 'cuda:N'. Random draws stay on
    # the CPU generator, so the crops and augmentations are the same on every device.
    device: str = "auto"

    #: Settings a request (HTTP params, CLI options, script options) may give, by kind. Others
    #: (windows, network, spacing_mm) come from the checkpoint being fine-tuned or from code.
    PARAM_KINDS = {
        "epochs": int, "iterations_per_epoch": int, "batch_size": int, "crop": int, "lr": float,
        "weight_decay": float, "val_fraction": float, "max_val": int, "seed": int, "threads": int,
        "augment": bool, "init_from": str, "time_limit_s": float, "relabel_muscle_by_hu": bool,
        "split_head_iterations": int, "split_head_lr": float, "organ_classes": bool, "last_path": str,
        "device": str,
    }

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """The defaults of every request setting (one set for the CLI, the scripts and the app)."""
        defaults = cls()
        return {name: getattr(defaults, name) for name in cls.PARAM_KINDS}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        """A checked config from request-style ``params`` (numbers or their text, flags as bools
        or 'true'/'false'); a missing or ``None`` value takes the default, ``0`` means none for
        ``iterations_per_epoch`` (one pass) and ``time_limit_s`` (no cap). Unknown names and
        values of the wrong kind raise :class:`SarcoError` naming them all."""
        values: dict[str, Any] = {}
        problems = [f"unknown setting {name!r}" for name in params if name not in cls.PARAM_KINDS]
        for name, kind in cls.PARAM_KINDS.items():
            raw = params.get(name)
            if raw is None or (isinstance(raw, str) and raw.strip() == "" and kind is not str):
                continue
            try:
                values[name] = _parse_setting(raw, kind)
            except ValueError:
                what = {int: "an integer", float: "a number", bool: "true or false", str: "text"}[kind]
                problems.append(f"{name} must be {what}, not {raw!r}")
        if problems:
            raise SarcoError("invalid training params: " + "; ".join(problems))
        for name in ("iterations_per_epoch", "time_limit_s"):
            if values.get(name) == 0:
                values[name] = None
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise :class:`SarcoError` naming every setting out of range, before any work starts."""
        problems = []

        def need(ok: bool, text: str) -> None:
            if not ok:
                problems.append(text)

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        need(isinstance(self.epochs, int) and self.epochs >= 0, f"epochs must be >= 0 (got {self.epochs!r})")
        need(isinstance(self.split_head_iterations, int) and self.split_head_iterations >= 0,
             f"split_head_iterations must be >= 0 (got {self.split_head_iterations!r})")
        need(finite(self.split_head_lr) and 0 < self.split_head_lr <= 1,
             f"split_head_lr must be in (0, 1] (got {self.split_head_lr!r})")
        need(self.epochs != 0 or (bool(self.init_from) and self.split_head_iterations > 0),
             "epochs 0 trains only the split head: it needs a model to start from (init_from, --init or "
             "fine_tune) and split_head_iterations > 0")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be >= 1 (got {self.batch_size!r})")
        need(isinstance(self.crop, int) and self.crop >= 32 and self.crop % 16 == 0,
             f"crop must be a multiple of 16 and >= 32 pixels (got {self.crop!r})")
        need(self.iterations_per_epoch is None
             or (isinstance(self.iterations_per_epoch, int) and self.iterations_per_epoch >= 1),
             f"iterations_per_epoch must be >= 1, or 0/None for one pass (got {self.iterations_per_epoch!r})")
        need(finite(self.lr) and 0 <= self.lr <= 1, f"lr must be in [0, 1] (got {self.lr!r})")
        need(finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0 (got {self.weight_decay!r})")
        need(finite(self.val_fraction) and 0 <= self.val_fraction < 1,
             f"val_fraction must be in [0, 1) (got {self.val_fraction!r})")
        need(isinstance(self.max_val, int) and self.max_val >= 1, f"max_val must be >= 1 (got {self.max_val!r})")
        need(isinstance(self.threads, int) and self.threads >= 1, f"threads must be >= 1 (got {self.threads!r})")
        need(self.time_limit_s is None or (finite(self.time_limit_s) and self.time_limit_s > 0),
             f"time_limit_s must be > 0, or 0/None for none (got {self.time_limit_s!r})")
        try:
            resolve_device(self.device)
        except SarcoError as exc:
            problems.append(str(exc))
        if problems:
            raise SarcoError("invalid training settings: " + "; ".join(problems))


def _parse_setting(raw: Any, kind: type) -> Any:
    """``raw`` (a value or its text) as ``kind``; ``ValueError`` when it is not one."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is str:
        return str(raw)
    if isinstance(raw, bool):
        raise ValueError(raw)
    number = float(raw)
    if kind is int:
        if not number.is_integer():
            raise ValueError(raw)
        return int(number)
    return number


# --------------------------------------------------------------------------- data


def load_studies(data_dir: str | Path, tag: str = "final") -> list[Sample]:
    """Labelled slices from a studies folder (MONAI Label local datastore layout).

    Images ``DIR/<id>.nii.gz`` (or ``.nii``) with labels ``DIR/labels/<tag>/<id>.nii.gz`` on the
    same grid. Images without a label are skipped.
    """
    from sarco_app.inputs.ingest import is_nifti

    data_dir = Path(data_dir)
    label_dir = data_dir / "labels" / tag
    if not data_dir.is_dir():
        raise SarcoError(f"{data_dir}: no such folder")
    if not label_dir.is_dir():
        raise SarcoError(f"{data_dir}: no labels/{tag}/ folder with training labels")
    pairs, organ_maps = [], []
    for image_path in sorted(p for p in data_dir.iterdir() if p.is_file() and is_nifti(p)):
        stem = image_path.name[: -len(".nii.gz")] if image_path.name.endswith(".nii.gz") else image_path.stem
        for suffix in (".nii.gz", ".nii"):
            if (label_dir / (stem + suffix)).is_file():
                pairs.append((image_path, label_dir / (stem + suffix)))
                organ_maps.append(organ_map_for(label_dir / (stem + suffix)))
                break
    if not pairs:
        raise SarcoError(f"{data_dir}: no image has a label in labels/{tag}/")
    return load_pairs(pairs, organ_maps)


#: Label tag of the phantoms' organ maps in a studies folder (``labels/organs/<id>.nii.gz``).
ORGANS_TAG = "organs"


def organ_map_for(label_path: str | Path) -> Path | None:
    """The organ map stored beside a label of a studies folder (``labels/<tag>/<name>`` ->
    ``labels/organs/<name>``), or None when there is none."""
    label_path = Path(label_path)
    organs = label_path.parent.parent / ORGANS_TAG / label_path.name
    return organs if organs.is_file() else None


def load_pairs(pairs: Sequence[tuple[str | Path, str | Path]],
               organ_maps: Sequence[str | Path | None] | None = None) -> list[Sample]:
    """Labelled slices from ``(image, label)`` file pairs (NIfTI or DICOM image, NIfTI label on
    the image's grid); from a 3D label every slice with a labelled tissue is used. ``organ_maps``
    (one path or None per pair) adds each slice's organ classes."""
    from sarco_app.inputs.ingest import load_image
    from sarco_app.measurement.quantify import load_label

    samples: list[Sample] = []
    for (image_path, label_path), organ_path in zip(pairs, organ_maps or [None] * len(pairs)):
        image_path, label_path = Path(image_path), Path(label_path)
        image = load_image(image_path)
        # Labels live on the image file's grid: map them with the image's own orientation.
        lab = load_label(label_path, image)
        organs = None if organ_path is None else load_label(organ_path, image, max_value=len(L.ORGAN_NAMES))
        stem = image_path.name.split(".")[0]
        spacing = image.pixel_spacing
        if image.hu.ndim == 2:
            if lab.any():
                samples.append(Sample(image.hu, lab, spacing, stem, organs))
        else:
            for k in range(image.hu.shape[2]):
                if lab[:, :, k].any():
                    samples.append(Sample(image.hu[:, :, k], lab[:, :, k], spacing, f"{stem}[{k}]",
                                          None if organs is None else organs[:, :, k]))
    if not samples:
        raise SarcoError("no labelled slices: every label is empty")
    return samples


def training_label(sample: Sample, organ_classes: bool) -> np.ndarray:
    """The sample's label over the network's classes: tissue values 0-4, and with
    ``organ_classes`` a background pixel of organ ``k`` (``sample.organs``) is class ``4 + k``."""
    label = np.asarray(sample.label, dtype=np.uint8)
    if not organ_classes or sample.organs is None:
        return label
    organs = np.asarray(sample.organs)
    return np.where((label == L.BACKGROUND) & (organs > 0), organs.astype(np.uint8) + (L.NUM_CLASSES - 1), label)


def to_working(sample: Sample, spacing_mm: float, organ_classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """HU ``(H, W)`` and label ``(H, W)`` (:func:`training_label`) of a sample resampled to
    ``spacing_mm``.

    Labels are resampled as antialiased one-hot maps then arg-maxed (area-weighted majority).
    """
    size = working_shape(sample.hu.shape, sample.spacing, spacing_mm)
    hu = resample_hu(torch.as_tensor(sample.hu, dtype=torch.float32)[None], size)[0]
    n_classes = L.NUM_CLASSES + (len(L.ORGAN_NAMES) if organ_classes else 0)
    onehot = F.one_hot(torch.as_tensor(training_label(sample, organ_classes), dtype=torch.long), n_classes)
    onehot = onehot.permute(2, 0, 1).float()
    lab = resample_hu(onehot, size).argmax(0).to(torch.uint8)
    return hu, lab


# --------------------------------------------------------------------------- augmentation


def _smooth_noise(shape: tuple[int, int], cells: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random field in [-1, 1] from a coarse ``cells x cells`` grid (bicubic)."""
    coarse = torch.rand((1, 1, cells, cells), generator=gen) * 2 - 1
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0].clamp(-1, 1)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` with ``sigma`` pixels."""
    if sigma < 0.2:
        return x
    radius = int(math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def sample_crop(
    hu: torch.Tensor, lab: torch.Tensor, crop: int, gen: torch.Generator, augment: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``crop x crop`` patch of a working-spacing slice with geometric augmentation.

    The patch centre is drawn near the body (label or tissue pixels); out-of-image pixels are
    air. Returns HU ``(crop, crop)`` and label ``(crop, crop)`` (long).
    """
    H, W = hu.shape
    tissue = torch.nonzero(hu > -500)
    if len(tissue) == 0:
        tissue = torch.tensor([[H // 2, W // 2]])
    centre = tissue[torch.randint(len(tissue), (1,), generator=gen)].float()[0]
    body_centre = tissue.float().mean(0)
    # Pull the centre toward the body's centre so most crops show enough context.
    centre = 0.7 * centre + 0.3 * body_centre
    if augment:
        angle = (torch.rand(1, generator=gen).item() * 2 - 1) * math.radians(15)
        scale = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * math.log(1.2))
        aniso = math.exp((torch.rand(1, generator=gen).item() * 2 - 1) * math.log(1.08))
        flip = torch.rand(1, generator=gen).item() < 0.5
        centre = centre + (torch.rand(2, generator=gen) * 2 - 1) * 12
    else:
        angle, scale, aniso, flip = 0.0, 1.0, 1.0, False
    # Output pixel offsets -> input pixel coordinates: p_in = centre + A @ offset.
    offs = torch.arange(crop, dtype=torch.float32) - (crop - 1) / 2
    ou, ov = torch.meshgrid(offs, offs, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    sx, sy = 1 / (scale * aniso), 1 / (scale / aniso)
    if flip:
        ou = -ou
    pu = centre[0] + c * sx * ou - s * sy * ov
    pv = centre[1] + s * sx * ou + c * sy * ov
    # grid_sample: last grid dim is (x = along W, y = along H), normalised, align_corners=False.
    grid = torch.stack([(pv + 0.5) / W * 2 - 1, (pu + 0.5) / H * 2 - 1], dim=-1)[None]
    hu_out = F.grid_sample((hu - AIR)[None, None], grid, mode="bilinear", align_corners=False)[0, 0] + AIR
    lab_out = F.grid_sample(lab.float()[None, None], grid, mode="nearest", align_corners=False)[0, 0]
    return hu_out, lab_out.long()


def augment_intensity(hu: torch.Tensor, lab: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """HU intensity augmentation of a batch ``(N, H, W)`` given its labels ``(N, H, W)``."""
    out = hu.clone()
    n, H, W = hu.shape
    rnd = lambda: torch.rand(1, generator=gen).item()  # noqa: E731
    for i in range(n):
        x = out[i]
        body = x > -500
        # Per-tissue HU offsets (muscle density varies most: myosteatosis, contrast phase).
        offsets = torch.zeros(L.NUM_CLASSES + len(L.ORGAN_NAMES))
        offsets[L.MUSCLE] = (rnd() * 2 - 1) * 25
        offsets[L.SAT] = (rnd() * 2 - 1) * 15
        offsets[L.VAT] = (rnd() * 2 - 1) * 15
        offsets[L.IMAT] = (rnd() * 2 - 1) * 20
        if int(lab[i].max()) >= L.NUM_CLASSES:
            # Organ classes (training with organ maps): every organ its own shift, so liver,
            # spleen and bowel wall cross the muscle range as they do between contrast phases.
            for k in range(L.NUM_CLASSES, len(offsets)):
                offsets[k] = (rnd() * 2 - 1) * 35
        offset_map = _gauss_blur(offsets[lab[i]][None, None], 0.7)[0, 0]
        x = x + offset_map * body
        # Global contrast around water and HU shift (calibration, kernel differences).
        x = torch.where(body, x * (1 + (rnd() * 2 - 1) * 0.08) + (rnd() * 2 - 1) * 15, x)
        # Smooth bias field (beam hardening, cupping) inside the body.
        if rnd() < 0.5:
            x = x + _smooth_noise((H, W), 4, gen) * (rnd() * 25) * body
        x = x[None, None]
        # Lower resolution: pixels up to 2x coarser (3 mm scans at a 1.5 mm working grid).
        if rnd() < 0.3:
            factor = 1 + rnd()
            small = (max(8, int(H / factor)), max(8, int(W / factor)))
            x = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(H, W), mode="bilinear", align_corners=False)
        if rnd() < 0.3:
            x = _gauss_blur(x, rnd() * 1.0)
        # Noise: white plus correlated (CT noise is not white), only where there is tissue.
        sigma = rnd() * 20
        noise = torch.randn((1, 1, H, W), generator=gen) * sigma
        noise = noise + _gauss_blur(torch.randn((1, 1, H, W), generator=gen), 1.5) * rnd() * 30
        out[i] = (x + noise * (x > -500))[0, 0]
    return out


def relabel_muscle_by_hu(hu: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Labels ``(N, H, W)`` with the muscle compartment (muscle or IMAT) re-split by the HU
    protocol on ``hu`` (:func:`sarco_app.labels.apply_hu_ranges`); SAT, VAT and background are
    kept. Used after intensity augmentation: offsets, blur and noise move pixels across -29 HU."""
    relabelled = torch.as_tensor(L.apply_hu_ranges(lab.numpy(), hu.numpy())).to(lab.dtype)
    compartment = (lab == L.MUSCLE) | (lab == L.IMAT)
    return torch.where(compartment, relabelled, lab)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def validate(model: BodyCompModel, val: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float | None]:
    """Dice per tissue of the raw network (arg-max at the working spacing) over ``val``,
    pooled over all validation pixels."""
    model.network.eval()
    pooled = PooledOverlap()
    for hu, lab in val:
        x, crop = pad_to_multiple(encode_windows(hu[None], model.windows).to(model.device))
        pooled.add(tissue_logits(model.network(x))[0, :, crop[0], crop[1]].argmax(0), lab)
    model.network.train()
    return pooled.dice()


def _main_score(dice: dict[str, float | None]) -> float:
    values = [dice[k] for k in ("muscle", "sat", "vat") if dice.get(k) is not None]
    return float(np.mean(values)) if values else 0.0


def train(
    samples: Sequence[Sample],
    out_path: str | Path,
    config: TrainConfig | None = None,
    val_samples: Sequence[Sample] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the network on ``samples`` and write the best checkpoint to ``out_path``.

    Parameters
    ----------
    samples : labelled slices; ``config.val_fraction`` of them are held out for validation
        unless ``val_samples`` is given (with one sample, it is used for both).
    out_path : checkpoint path (parents created; written atomically on every improvement).
    config : :class:`TrainConfig`.
    log : receives one progress line per epoch.

    Returns
    -------
    dict with ``best_dice`` (per tissue), ``best_epoch``, ``epochs``, ``iterations``,
    ``seconds``, ``checkpoint`` (None when nothing was written) and ``split_head`` (the head
    phase's record, see :func:`train_split_head`, or None).

    With ``config.split_head_iterations`` the split head is trained after the backbone (on the
    best epoch's backbone; with ``epochs`` 0 on the initial one) and the checkpoint written
    again with it. An initial model's head is not saved with a retrained backbone unless it is
    retrained too; a head-only run replaces an existing head only when its raw validation Dice
    (mean of muscle, SAT, VAT) is higher.
    """
    log = log or logger.info  # the CLI passes print; the server's trainer its own logger
    config = config or TrainConfig()
    config.check()
    if not samples:
        raise SarcoError("no training samples")
    torch.set_num_threads(max(1, int(config.threads)))
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    samples = list(samples)
    if val_samples is None:
        order = rng.permutation(len(samples))
        n_val = min(config.max_val, int(round(len(samples) * config.val_fraction))) if len(samples) > 1 else 0
        val_samples = [samples[i] for i in order[:n_val]] or [samples[order[0]]]
        samples = [samples[i] for i in order[n_val:]] or samples
    t0 = time.time()
    if config.init_from:
        # Fine-tuning keeps the network, working spacing and windows of the initial checkpoint.
        model = load_checkpoint(config.init_from)
        if config.organ_classes and config.epochs > 0 and not model.organ_classes:
            add_organ_classes(model)
            log(f"organ output classes added to {config.init_from}: " + ", ".join(model.organ_classes))
    else:
        model = new_model(config.network, config.spacing_mm, config.windows, organ_classes=config.organ_classes)
    model.to(config.device)
    device = model.device
    old_head = None
    if config.epochs > 0 and model.split_head is not None:
        # The head reads the backbone's logits: once the backbone changes, it no longer fits it.
        old_head, model.split_head = model.split_head, None
        log("the initial model's split head is set aside while the backbone trains; "
            + ("it is retrained afterwards" if config.split_head_iterations
               else "it is not saved with the new backbone (split_head_iterations > 0 retrains one)"))
    working = config.epochs > 0  # head-only runs never use the working-grid copies
    organs = bool(model.organ_classes)
    train_data = [to_working(s, model.spacing_mm, organs) for s in samples] if working else []
    train_weights = [float(s.weight) for s in samples]
    val_data = [to_working(s, model.spacing_mm) for s in list(val_samples)[: config.max_val]] if working else []
    # Slices without an organ map are scored on the served classes only (organs = background).
    has_organs = torch.tensor([s.organs is not None and organs for s in samples]) if working else None
    if working and organs:
        log(f"organ classes {', '.join(model.organ_classes)}: {int(has_organs.sum())} of {len(samples)} "
            "training slices have organ maps")
    model.network.train()
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, smooth_nr=1e-4, smooth_dr=1e-4)
    opt = torch.optim.AdamW(model.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = config.iterations_per_epoch or max(1, math.ceil(len(train_data) / config.batch_size))
    total_iters = per_epoch * config.epochs
    # 5 % linear warm-up, then cosine decay to 1 % of the peak, over iterations: the same
    # settings give the same run whatever the machine's speed; time_limit_s only stops it early.
    from monai.optimizers import WarmupCosineSchedule

    schedule = WarmupCosineSchedule(opt, warmup_steps=max(1, round(0.05 * total_iters)),
                                    t_total=max(1, total_iters), end_lr=0.01 * config.lr) if working else None
    if working:
        log(
            f"training {model.config['name']} on {len(train_data)} slices, validating on {len(val_data)}; "
            f"{config.epochs} epochs x {per_epoch} iterations, batch {config.batch_size}, crop {config.crop}, "
            f"spacing {model.spacing_mm} mm"
        )
    best = {"score": -1.0, "dice": {}, "epoch": 0}
    if config.init_from and config.epochs > 0:
        # A fine-tune must beat the model it starts from before it may replace it.
        initial = validate(model, val_data)
        best = {"score": _main_score(initial), "dice": initial, "epoch": 0}
        log("initial model val dice " + " ".join(f"{k} {v:.4f}" for k, v in initial.items() if v is not None))
    t_loop = time.time()
    it = 0
    history = []
    meta_base = {"train_config": _jsonable(asdict(config)), "train_slices": len(train_data), "val_slices": len(val_data)}
    stop = False
    # Progress on stderr in a terminal (disable=None); the per-epoch log line stays for logs.
    for epoch in tqdm(range(1, config.epochs + 1), desc="training", unit="epoch", disable=None):
        losses = [float("nan")]
        for _ in range(per_epoch):
            if config.time_limit_s and time.time() - t_loop >= config.time_limit_s:
                log(f"time limit of {config.time_limit_s:g} s reached after {it} of {total_iters} iterations")
                stop = True
                break
            idx = torch.randint(len(train_data), (config.batch_size,), generator=gen).tolist()
            crops = [sample_crop(*train_data[i], config.crop, gen, config.augment) for i in idx]
            hu = torch.stack([c[0] for c in crops])
            lab = torch.stack([c[1] for c in crops])
            if config.augment:
                hu = augment_intensity(hu, lab, gen)
                if config.relabel_muscle_by_hu:
                    lab = relabel_muscle_by_hu(hu, lab)
            x = encode_windows(hu, model.windows).to(device)
            lab = lab.to(device)
            logits = model.network(x)
            weights = torch.tensor([train_weights[i] for i in idx], device=device)
            with_organs = (has_organs[idx] if organs else torch.zeros(len(idx), dtype=torch.bool)).to(device)
            if bool((weights == 1.0).all()):
                loss = torch.zeros((), device=device)
                if with_organs.any():
                    loss = loss + loss_fn(logits[with_organs], lab[with_organs, None]) * with_organs.float().mean()
                if not with_organs.all():
                    loss = loss + loss_fn(tissue_logits(logits[~with_organs]), lab[~with_organs, None]) * (~with_organs).float().mean()
            else:
                # Dice per sample and CE averaged over equal crops: the batch loss is the mean
                # of per-sample losses, so the weighted mean keeps finals' scale (a batch of
                # pseudo-labels alone counts less, not the same).
                per_sample = torch.stack([
                    loss_fn(logits[j : j + 1] if with_organs[j] else tissue_logits(logits[j : j + 1]), lab[j : j + 1, None])
                    for j in range(len(idx))])
                loss = (per_sample * weights).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            it += 1
        losses = losses[1:] or [float("nan")]
        dice = validate(model, val_data)
        score = _main_score(dice)
        elapsed = time.time() - t0
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "dice": dice, "seconds": round(elapsed, 1)})
        improved = score > best["score"]
        if config.last_path:
            save_checkpoint(model, config.last_path, meta=dict(meta_base, epoch=epoch, val_dice=dice,
                                                               seconds=round(elapsed, 1), iterations=it))
        if improved:
            best = {"score": score, "dice": dice, "epoch": epoch}
            meta = dict(meta_base, best_epoch=epoch, val_dice=dice, seconds=round(elapsed, 1), iterations=it)
            save_checkpoint(model, out_path, meta=meta)
        dice_txt = " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in dice.items())
        log(
            f"epoch {epoch}/{config.epochs} iter {it} loss {np.mean(losses):.4f} val dice {dice_txt}"
            f"{' (best, saved)' if improved else ''} [{elapsed:.0f} s]"
        )
        if stop:
            log(f"time limit {config.time_limit_s:.0f} s reached in epoch {epoch}; stopping (the learning rate "
                "had not finished its decay)")
            break
    written = best["epoch"] > 0
    if config.epochs == 0:
        log(f"no backbone epochs: the network of {config.init_from} is kept")
    elif not written:
        log(f"no epoch beat the initial model, so {out_path} was not written")
    else:
        log(f"backbone done in {time.time() - t0:.0f} s; best epoch {best['epoch']} val dice {json.dumps(best['dice'])}")
    head = None
    if config.split_head_iterations > 0 and config.epochs > 0 and not written:
        log("split head not trained: no new backbone was written")
    elif config.split_head_iterations > 0:
        if written:
            model = load_checkpoint(out_path)  # the best epoch's backbone, not the last one's
            model.split_head = old_head  # warm start from the previous head, if there was one
        meta = dict(model.meta)  # the backbone's training record (this run's, or the initial checkpoint's)
        current = None
        if config.epochs == 0 and model.split_head is not None:
            # Like a fine-tune, a retrained head must beat the head it replaces.
            current = _raw_dice_with_and_without_head(model, list(val_samples)[: config.max_val])["head"]
            previous = copy.deepcopy(model.split_head)
        head = train_split_head(model, samples, config.split_head_iterations, val_samples=val_samples,
                                lr=config.split_head_lr, seed=config.seed, augment=config.augment,
                                max_val=config.max_val, log=log)
        if current is not None and _main_score(head["val_raw_dice"]["head"]) <= _main_score(current):
            model.split_head = previous
            log(f"the new split head does not beat the current one (raw Dice {_main_score(head['val_raw_dice']['head']):.4f} "
                f"against {_main_score(current):.4f}), so {out_path} was not written")
        else:
            meta["split_head"] = _jsonable(head)
            save_checkpoint(model, out_path, meta=meta)
            written = True
    seconds = time.time() - t0
    log(f"done in {seconds:.0f} s" + (f"; wrote {out_path}" if written else ""))
    return {
        "best_dice": best["dice"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "iterations": it,
        "seconds": round(seconds, 1),
        "checkpoint": str(out_path) if written else None,
        "split_head": head,
        "history": history,
    }


def served_dice(model: BodyCompModel, samples: Sequence[Sample], hu_refine: bool = True) -> dict[str, float | None]:
    """Dice per tissue of what the server answers (:func:`sarco_app.segmentation.segment.segment_volume` on
    each slice's own grid; ``hu_refine`` as the infer param), pooled over ``samples``."""
    from sarco_app.segmentation.segment import segment_volume

    inter = {v: 0 for v in L.NAMES}
    total = {v: 0 for v in L.NAMES}
    for sample in samples:
        pred = segment_volume(sample.hu, sample.spacing, method="unet", model=model, hu_refine=hu_refine,
                              threads=1).label
        for v in L.NAMES:
            p, t = pred == v, sample.label == v
            inter[v] += int((p & t).sum())
            total[v] += int(p.sum()) + int(t.sum())
    return {L.NAMES[v]: (2 * inter[v] / total[v] if total[v] else None) for v in L.NAMES}


def compare_models(candidate: str | Path, served: str | Path | None, samples: Sequence[Sample]) -> dict[str, Any]:
    """Should ``candidate`` replace the ``served`` checkpoint? Both label ``samples`` as the
    server would, with the HU rule (the default answer) and without it (the raw network); the
    score is the mean Dice of muscle, SAT and VAT. The candidate wins when it is at least as good
    on both outputs and better on one (a head-only retrain changes only the raw output).

    Returns ``{"replace", "reason", "candidate": {output: {"dice", "score"}}, "served": ...}``
    (``served`` None when there is no served model: then the candidate always wins).
    """
    if not samples:
        raise SarcoError("no validation slices to compare the models on")
    outputs = {"hu_refined": True, "raw": False}

    def scores(path) -> dict[str, Any]:
        model = load_checkpoint(path)
        out = {}
        for name, hu_refine in outputs.items():
            dice = served_dice(model, samples, hu_refine=hu_refine)
            out[name] = {"dice": {k: (None if v is None else round(v, 5)) for k, v in dice.items()},
                         "score": round(_main_score(dice), 5)}
        return out

    new = scores(candidate)
    result: dict[str, Any] = {"candidate_model": str(candidate), "served_model": str(served) if served else None,
                              "validation_slices": len(samples), "candidate": new, "served": None}
    if served is None:
        result.update(replace=True, reason="no model is served yet")
        return result
    old = scores(served)
    result["served"] = old
    diffs = {name: new[name]["score"] - old[name]["score"] for name in outputs}
    result["replace"] = all(d >= 0 for d in diffs.values()) and any(d > 0 for d in diffs.values())
    summary = ", ".join(f"{name} {new[name]['score']:.4f} vs {old[name]['score']:.4f}" for name in outputs)
    result["reason"] = (f"the candidate beats the served model ({summary})" if result["replace"]
                        else f"the candidate does not beat the served model ({summary})")
    return result


def _raw_dice_with_and_without_head(model: BodyCompModel, samples: Sequence[Sample]) -> dict[str, dict]:
    """Pooled Dice per tissue of the raw arg-max on the samples' own grids, for the backbone
    alone (softmax of its resampled logits) and with the split head."""
    pooled = {key: PooledOverlap() for key in ("backbone", "head")}
    with torch.no_grad():
        for sample in samples:
            hu = torch.as_tensor(sample.hu, dtype=torch.float32)[None]
            logits = original_grid_logits(hu, sample.spacing, model)
            pooled["backbone"].add(logits[0].argmax(0), sample.label)
            pooled["head"].add(model.split_head.probabilities(logits, hu.to(logits.device))[0].argmax(0), sample.label)
    return {key: per.dice() for key, per in pooled.items()}


def train_split_head(
    model: BodyCompModel,
    samples: Sequence[Sample],
    iterations: int,
    val_samples: Sequence[Sample] = (),
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    max_val: int = 24,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model.split_head`` (created when absent) with the backbone frozen.

    Each iteration takes two slices on their own grid (any spacing), with the intensity
    augmentation of the backbone and a left-right flip (``augment``); the labels follow the
    augmented HU by the protocol (:func:`sarco_app.labels.apply_hu_ranges`), and the loss is the
    negative log-likelihood of those labels under the head's probabilities
    (:meth:`~sarco_app.segmentation.network.TissueSplitHead.probabilities`). Learning rate: 5 % warm-up, then
    cosine decay. Returns the iterations, seconds, the first and last loss (means over a
    twentieth of the run) and the raw Dice per tissue on
    ``val_samples``' own grids, backbone alone and with the head
    (:func:`_raw_dice_with_and_without_head`).
    """
    log = log or logger.info
    if model.split_head is None:
        model.split_head = TissueSplitHead(model.num_classes).to(model.device)
    head = model.split_head
    model.network.eval()  # frozen: no dropout noise, no normalisation statistics updated
    head.train()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, iterations // 20)
    every = max(1, iterations // 20)
    log(f"training the split head on {len(samples)} slices (original grids), {iterations} iterations of 2")
    t0 = time.time()
    losses: list[float] = []
    for it in range(iterations):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (it + 1) / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * it / iterations)))
        loss = torch.zeros((), device=model.device)
        for _ in range(2):
            sample = samples[int(torch.randint(len(samples), (1,), generator=gen))]
            hu = torch.as_tensor(sample.hu, dtype=torch.float32)[None]
            lab = torch.as_tensor(sample.label).long()[None]
            if augment:
                if torch.rand(1, generator=gen).item() < 0.5:  # left-right, as in sample_crop
                    hu, lab = hu.flip(-2), lab.flip(-2)
                hu = augment_intensity(hu, lab, gen)
            # The head learns the protocol: labels follow the (augmented) HU.
            lab = torch.as_tensor(L.apply_hu_ranges(lab.numpy(), hu.numpy())).long().to(model.device)
            hu = hu.to(model.device)
            probs = head.probabilities(original_grid_logits(hu, sample.spacing, model), hu)
            loss = loss - torch.log(probs.gather(1, lab[:, None]).clamp_min(1e-6)).mean() / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (it + 1) % every == 0 or it + 1 == iterations:
            log(f"split head iter {it + 1}/{iterations} loss {np.mean(losses[-every:]):.4f} [{time.time() - t0:.0f} s]")
    head.eval()
    dice = _raw_dice_with_and_without_head(model, list(val_samples)[:max_val])
    if val_samples:
        log("split head: raw Dice on the validation slices' own grids, with the head "
            + " ".join(f"{k} {v:.4f}" for k, v in dice["head"].items() if v is not None)
            + "; backbone alone " + " ".join(f"{k} {v:.4f}" for k, v in dice["backbone"].items() if v is not None))
    return {"iterations": iterations, "lr": lr, "seconds": round(time.time() - t0, 1),
            "first_loss": float(np.mean(losses[:every])), "final_loss": float(np.mean(losses[-every:])),
            "val_raw_dice": dice}


def _jsonable(value: Any) -> Any:
    """Checkpoint meta must hold only plain types (``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(value, default=str))


def train_from_folder(data_dir: str | Path, out_path: str | Path, config: TrainConfig | None = None,
                      log: Callable[[str], None] | None = None, tag: str = "final") -> dict[str, Any]:
    """:func:`train` on the labelled slices of a studies folder (see :func:`load_studies`)."""
    log = log or logger.info
    samples = load_studies(data_dir, tag=tag)
    log(f"{len(samples)} labelled slices found in {data_dir}")
    return train(samples, out_path, config, log=log)
