"""The body-composition network, its input encoding and its checkpoint format.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` can read::

    {"format": "sarco-bodycomp/1",
     "network": {"name": "BasicUNet", "kwargs": {...}},   # enough to rebuild the module
     "spacing_mm": 2.0,                                   # in-plane working spacing
     "windows": [[-250.0, 250.0], [-1000.0, 1000.0]],     # HU windows -> input channels
     "class_names": ["background", "muscle", "sat", "vat", "imat"],  # + organ classes, optional
     "state_dict": {...},
     "split_head": {"windows": [...], "hidden": 16,       # optional: the native-grid
                    "state_dict": {...}},                 # tissue split (see below)
     "meta": {...}}                                       # training record, metrics

so a model trained with other settings is rebuilt correctly by :func:`load_checkpoint`.

The backbone works on a 2 mm grid, where resampling averages a fat pixel on a muscle border into
the muscle range. The optional :class:`TissueSplitHead` works on the image's own grid: from the
upsampled class logits and each original pixel's HU it makes the protocol's tissue decision
inside the backbone's compartments (muscle compartment -> muscle / IMAT / neither; SAT, VAT ->
kept / neither). Checkpoints without it still load.

A network may predict organ classes beside the five tissue classes (``class_names`` then goes on
with :data:`sarco_app.labels.ORGAN_NAMES`): trained on the phantoms' organ maps, it learns what a
liver or a spleen pressed against the muscle wall is. Every consumer sees only the five served
classes: :func:`tissue_logits` folds the organ classes into background (log-sum-exp, so the softmax
is that of the full network with organ probabilities added to background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sarco_app import labels as L
from sarco_app.errors import SarcoError

CHECKPOINT_FORMAT = "sarco-bodycomp/1"
CLASS_NAMES = ["background"] + [L.NAMES[v] for v in sorted(L.NAMES)]
#: Class names of a network that also predicts the phantoms' organ classes.
ORGAN_CLASS_NAMES = CLASS_NAMES + list(L.ORGAN_NAMES)

#: Default in-plane working spacing (mm): clinical 0.6-1.0 mm pixels are downsampled to it,
#: 3 mm pixels upsampled. 2 mm keeps training on a shared 2-core CPU feasible; fine boundaries
#: come from bilinear upsampling of the logits (and optionally the HU rule) on the original grid.
DEFAULT_SPACING_MM = 2.0
#: HU windows, one input channel each, scaled to [0, 1]: a soft-tissue window that separates
#: fat (-190..-30) from muscle (-29..150), and a wide one that shows air, gas and bone.
DEFAULT_WINDOWS = ((-250.0, 250.0), (-1000.0, 1000.0))
#: The network all shipped checkpoints use (see models/MODEL_CARD.md for why).
DEFAULT_NETWORK = {
    "name": "BasicUNet",
    "kwargs": {"features": [16, 16, 32, 64, 128, 16], "norm": "instance", "dropout": 0.0},
}
#: Spatial size multiple the network needs (four 2x poolings).
SIZE_MULTIPLE = 16


def build_network(config: dict[str, Any], in_channels: int, out_channels: int) -> torch.nn.Module:
    """A 2D MONAI network from ``{"name": ..., "kwargs": {...}}``.

    Supported names: ``BasicUNet``, ``UNet`` (needs ``channels`` and ``strides``), ``DynUNet``.
    """
    from monai.networks import nets

    name = config.get("name")
    kwargs = dict(config.get("kwargs", {}))
    if name == "BasicUNet":
        kwargs["features"] = tuple(kwargs.get("features", (32, 32, 64, 128, 256, 32)))
        return nets.BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **kwargs)
    if name == "UNet":
        kwargs["channels"] = tuple(kwargs["channels"])
        kwargs["strides"] = tuple(kwargs["strides"])
        return nets.UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **kwargs)
    if name == "DynUNet":
        return nets.DynUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **kwargs)
    raise SarcoError(f"unknown network {name!r} in checkpoint (BasicUNet, UNet or DynUNet)")


def encode_windows(hu: torch.Tensor | np.ndarray, windows=DEFAULT_WINDOWS) -> torch.Tensor:
    """HU array ``(..., H, W)`` -> float tensor ``(..., C, H, W)``, one clipped [0, 1] channel
    per HU window ``(low, high)``."""
    hu = torch.as_tensor(hu, dtype=torch.float32)
    channels = [((hu - lo) / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in windows]
    return torch.stack(channels, dim=-3)


#: HU windows the split head reads on the original grid: the two backbone windows and a narrow
#: one around the -30/-29 HU fat/muscle threshold.
SPLIT_WINDOWS = ((-250.0, 250.0), (-1000.0, 1000.0), (-60.0, 0.0))


class TissueSplitHead(torch.nn.Module):
    """The L3 protocol's tissue decision, learned, on the image's own grid.

    Input: the backbone's class logits resampled to the original grid ``(N, K, H, W)`` and the HU
    there ``(N, H, W)``. A 3x3 convolution and two 1x1 layers give five logits per pixel: three
    that share the backbone's muscle-compartment probability ``m = p_muscle + p_imat`` between
    muscle, IMAT and background, and one each for the share of ``p_sat`` and ``p_vat`` that stays
    SAT / VAT (the rest is background). So, like the protocol, it can call compartment tissue
    muscle, IMAT or neither and drop SAT / VAT, but it never moves probability from one tissue
    to another: the compartments stay the backbone's.
    """

    def __init__(self, num_classes: int = L.NUM_CLASSES, windows=SPLIT_WINDOWS, hidden: int = 16):
        super().__init__()
        self.windows = tuple((float(a), float(b)) for a, b in windows)
        self.hidden = int(hidden)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(num_classes + len(self.windows), self.hidden, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(self.hidden, self.hidden, 1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(self.hidden, 5, 1),
        )
        # Start with SAT and VAT kept and little of the compartment sent to background; the
        # muscle/IMAT share starts even (whatever the backbone says) and is learned.
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.copy_(torch.tensor([0.0, 0.0, -3.0, 3.0, 3.0]))

    def forward(self, logits: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        """Split logits ``(N, 5, H, W)``: compartment muscle / IMAT / background, SAT kept, VAT kept."""
        return self.net(torch.cat([logits, encode_windows(hu, self.windows)], dim=1))

    def probabilities(self, logits: torch.Tensor, hu: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, K, H, W)``: the backbone's softmax with each tissue's
        probability split as described above (they still sum to 1)."""
        p = torch.softmax(logits, dim=1)
        split = self(logits, hu)
        share = torch.softmax(split[:, :3], dim=1)
        keep_sat, keep_vat = torch.sigmoid(split[:, 3]), torch.sigmoid(split[:, 4])
        compartment = p[:, L.MUSCLE] + p[:, L.IMAT]
        out = torch.empty_like(p)
        out[:, L.BACKGROUND] = (p[:, L.BACKGROUND] + compartment * share[:, 2]
                                + p[:, L.SAT] * (1.0 - keep_sat) + p[:, L.VAT] * (1.0 - keep_vat))
        out[:, L.MUSCLE] = compartment * share[:, 0]
        out[:, L.IMAT] = compartment * share[:, 1]
        out[:, L.SAT] = p[:, L.SAT] * keep_sat
        out[:, L.VAT] = p[:, L.VAT] * keep_vat
        return out


@dataclass
class BodyCompModel:
    """A loaded network with the settings it was trained with."""

    network: torch.nn.Module
    spacing_mm: float = DEFAULT_SPACING_MM
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NETWORK))
    meta: dict[str, Any] = field(default_factory=dict)
    split_head: TissueSplitHead | None = None
    path: str | None = None
    mtime: float | None = None

    @property
    def device(self) -> torch.device:
        """Where the network's weights are (inputs are moved there)."""
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device | None = "auto") -> "BodyCompModel":
        """Move the network and split head to ``device`` (see :func:`resolve_device`), in place."""
        device = resolve_device(device)
        self.network.to(device)
        if self.split_head is not None:
            self.split_head.to(device)
        return self

    @property
    def num_classes(self) -> int:
        """Classes the model serves (the five tissue classes), whatever the network predicts."""
        return L.NUM_CLASSES

    @property
    def organ_classes(self) -> list[str]:
        """Organ classes the network predicts beside the tissue classes (empty for most models)."""
        return list(self.class_names[L.NUM_CLASSES:])


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``device``: ``'auto'`` (or ``None``) is CUDA when a GPU is there,
    else the CPU; ``'cpu'``, ``'cuda'`` and ``'cuda:N'`` are taken as they are. A CUDA device
    without a usable GPU, or any other name, raises :class:`SarcoError`."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise SarcoError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise SarcoError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda" and (not torch.cuda.is_available()
                                  or (chosen.index or 0) >= torch.cuda.device_count()):
        raise SarcoError(f"device {device!r} asked for but no such CUDA GPU is available")
    return chosen


def tissue_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, K, ...)`` of a network -> the five served classes ``(N, 5, ...)``: organ
    classes (channels 5 and up) join background by log-sum-exp, so softmax gives background the
    sum of their probabilities. Five-class logits come back as they are."""
    if logits.shape[1] == L.NUM_CLASSES:
        return logits
    background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, L.NUM_CLASSES:]], dim=1), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1 : L.NUM_CLASSES]], dim=1)


def add_organ_classes(model: BodyCompModel) -> BodyCompModel:
    """Give a five-class model the organ output classes (:data:`ORGAN_CLASS_NAMES`) in place, for
    fine-tuning with organ maps. The new channels start as copies of background with their bias
    lowered by 10, so the served output is unchanged (to float rounding) before training."""
    if model.organ_classes:
        return model
    final = getattr(model.network, "final_conv", None)
    if not isinstance(final, torch.nn.Conv2d) or final.out_channels != L.NUM_CLASSES:
        raise SarcoError(f"cannot add organ classes to a {model.config.get('name')} network "
                         "(only BasicUNet's final 1x1 convolution is supported)")
    extra = len(ORGAN_CLASS_NAMES) - L.NUM_CLASSES
    new = torch.nn.Conv2d(final.in_channels, final.out_channels + extra, final.kernel_size)
    with torch.no_grad():
        new.weight[: L.NUM_CLASSES] = final.weight
        new.bias[: L.NUM_CLASSES] = final.bias
        new.weight[L.NUM_CLASSES :] = final.weight[:1]
        new.bias[L.NUM_CLASSES :] = final.bias[:1] - 10.0
    model.network.final_conv = new.to(final.weight.device)
    model.class_names = list(ORGAN_CLASS_NAMES)
    return model


def new_model(
    config: dict[str, Any] | None = None,
    spacing_mm: float = DEFAULT_SPACING_MM,
    windows=DEFAULT_WINDOWS,
    organ_classes: bool = False,
) -> BodyCompModel:
    """An untrained :class:`BodyCompModel` with the given (or default) network; with
    ``organ_classes`` it also predicts :data:`sarco_app.labels.ORGAN_NAMES`."""
    config = dict(config or DEFAULT_NETWORK)
    windows = tuple((float(a), float(b)) for a, b in windows)
    names = ORGAN_CLASS_NAMES if organ_classes else CLASS_NAMES
    net = build_network(config, in_channels=len(windows), out_channels=len(names))
    return BodyCompModel(net, float(spacing_mm), windows, list(names), config)


def checkpoint_dict(model: BodyCompModel, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict of ``model`` (see module docstring)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "network": model.config,
        "spacing_mm": float(model.spacing_mm),
        "windows": [list(w) for w in model.windows],
        "class_names": list(model.class_names),
        "state_dict": {k: v.detach().cpu() for k, v in model.network.state_dict().items()},
        "meta": dict(meta if meta is not None else model.meta),
    }
    if model.split_head is not None:
        head = model.split_head
        ckpt["split_head"] = {
            "windows": [list(w) for w in head.windows],
            "hidden": head.hidden,
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        }
    return ckpt


def save_checkpoint(model: BodyCompModel, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` atomically (temp file + rename), so a server reloading on mtime change
    never reads a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(model, meta), tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> BodyCompModel:
    """Rebuild the network stored at ``path`` (a checkpoint written by :func:`save_checkpoint`),
    in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise SarcoError(f"{path}: model checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickle / zip errors of a damaged or foreign file
        raise SarcoError(f"{path.name}: not a readable model checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SarcoError(f"{path.name}: not a sarco body-composition checkpoint")
    windows = tuple((float(a), float(b)) for a, b in ckpt["windows"])
    class_names = list(ckpt["class_names"])
    net = build_network(ckpt["network"], in_channels=len(windows), out_channels=len(class_names))
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise SarcoError(f"{path.name}: weights do not match the network it names ({exc})") from exc
    net.to(device).eval()
    split_head = None
    if ckpt.get("split_head") is not None:
        spec = ckpt["split_head"]
        try:
            split_head = TissueSplitHead(L.NUM_CLASSES, spec["windows"], spec["hidden"])
            split_head.load_state_dict(spec["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise SarcoError(f"{path.name}: the split head's weights do not match ({exc})") from exc
        split_head.to(device).eval()
    return BodyCompModel(
        network=net,
        spacing_mm=float(ckpt["spacing_mm"]),
        windows=windows,
        class_names=class_names,
        config=dict(ckpt["network"]),
        meta=dict(ckpt.get("meta", {})),
        split_head=split_head,
        path=str(path),
        mtime=path.stat().st_mtime,
    )


def first_readable_model(
    paths: Sequence[str | Path], load: Callable[[Path], BodyCompModel] | None = None
) -> tuple[BodyCompModel | None, list[str]]:
    """The first of ``paths`` that ``load`` (default :func:`load_checkpoint`) can read, and a
    message for each existing file skipped because it cannot be read (a retrained checkpoint
    cut short falls back to the next candidate, usually the shipped model). Missing files are
    passed over silently."""
    load = load or load_checkpoint
    skipped: list[str] = []
    for path in (Path(p) for p in paths):
        if not path.is_file():
            continue
        try:
            return load(path), skipped
        except SarcoError as exc:
            skipped.append(f"{path}: {exc}")
    return None, skipped
