"""Training of the body-composition network (shared by the CLI, the MONAI Label trainer and
``scripts/train_bodycomp.py``): :class:`TrainConfig` and :func:`train`.

The backbone trains on MONAI's ``SupervisedTrainer`` (ignite) with these handlers:

* data: :class:`~sarco_app.segmentation.training_data.CropBatches`, augmented crops of the
  slices resampled once to the working spacing (:mod:`sarco_app.segmentation.augment`);
* loss: Dice + cross-entropy per slice, weighted by the slice's weight (pseudo-labels below
  finals) and scored on the organ classes only where a slice has an organ map
  (:class:`SliceWeightedDiceCE`);
* learning rate: 5 % linear warm-up then cosine decay over *iterations* (MONAI
  ``WarmupCosineSchedule`` through ``LrScheduleHandler``), so the same settings give the same run
  on any machine; ``time_limit_s`` only stops a run early (all processes together);
* after every epoch: validation Dice per tissue on held-out slices at the working spacing
  (:mod:`sarco_app.segmentation.validation`, a MONAI ``SupervisedEvaluator``); the best
  checkpoint (mean Dice of muscle, SAT and VAT) is written atomically, so a server that reloads
  on file change picks it up at once; a fine-tune must beat the model it starts from;
* ``state_dir``: a resume state after every epoch (ignite ``Checkpoint``), loaded by MONAI's
  ``CheckpointLoader`` when the run is started again;
* ``tensorboard_dir`` / ``mlflow_uri``: MONAI's ``TensorBoardStatsHandler`` / ``MLFlowHandler``;
* ``nproc`` > 1: the same run in several processes under torch DDP
  (:mod:`sarco_app.segmentation.distributed`); only rank 0 writes checkpoints and logs.

With ``organ_classes`` the network also learns the organ classes of
:data:`sarco_app.labels.ORGAN_NAMES` where a sample has an organ map (the phantoms'
``organ_label``, or ``labels/organs/`` in a studies folder). Optionally
(``split_head_iterations``) a second phase trains the split head with the backbone frozen
(:mod:`sarco_app.segmentation.split_head`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.segmentation.distributed import Group, in_worker
from sarco_app.segmentation.network import (
    DEFAULT_NETWORK,
    DEFAULT_SPACING_MM,
    DEFAULT_WINDOWS,
    BodyCompModel,
    add_organ_classes,
    encode_windows,
    load_checkpoint,
    new_model,
    resolve_device,
    save_checkpoint,
    tissue_logits,
)
from sarco_app.segmentation.split_head import raw_dice_with_and_without_head, train_split_head
from sarco_app.segmentation.training_data import CropBatches, Sample, load_studies, to_working
from sarco_app.segmentation.validation import main_score, make_evaluator, quiet_loggers, validate

logger = logging.getLogger(__name__)

#: File name prefix of the resume states in ``state_dir`` (``resume_checkpoint_<epoch>.pt``).
STATE_PREFIX = "resume"


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
    # Processes training together (torch DDP under torchrun, sarco_app.segmentation.distributed):
    # each takes batch_size / nproc crops of every batch, so the run is the one-process run.
    nproc: int = 1
    # Resume state (network, optimizer, schedule, epoch, best so far) written after every epoch;
    # a run given a folder holding one continues from it.
    state_dir: str | None = None
    # Loss, learning rate and validation Dice per epoch for TensorBoard / an MLflow tracking URI
    # (e.g. sqlite:///path/mlflow.db).
    tensorboard_dir: str | None = None
    mlflow_uri: str | None = None
    # Per-class cross-entropy weights by class name (labels.NAMES, labels.ORGAN_NAMES or
    # 'background'; others 1), e.g. {"diaphragm": 3, "liver": 2}: an experiment against organs
    # pressed on the wall being labelled muscle (docs/plausibility.md, "Class-weighted loss").
    # Request text: "diaphragm:3,liver:2" (parse_class_weights).
    class_weights: dict | None = None
    # Spread each pixel's class weight over the pixels within this distance (mm), so the pixels on
    # both sides of a weighted organ's border weigh alike: the weighting then pays for border
    # errors in both directions instead of moving the border into the wall muscle (0: off).
    class_weight_border_mm: float = 0.0

    #: Settings a request (HTTP params, CLI options, script options) may give, by kind. Others
    #: (windows, network, spacing_mm) come from the checkpoint being fine-tuned or from code.
    PARAM_KINDS = {
        "epochs": int, "iterations_per_epoch": int, "batch_size": int, "crop": int, "lr": float,
        "weight_decay": float, "val_fraction": float, "max_val": int, "seed": int, "threads": int,
        "augment": bool, "init_from": str, "time_limit_s": float, "relabel_muscle_by_hu": bool,
        "split_head_iterations": int, "split_head_lr": float, "organ_classes": bool, "last_path": str,
        "device": str, "nproc": int, "state_dir": str, "tensorboard_dir": str, "mlflow_uri": str,
        "class_weights": dict, "class_weight_border_mm": float,
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
            if kind is dict:
                try:
                    values[name] = parse_class_weights(raw)
                except SarcoError as exc:
                    problems.append(str(exc))
                continue
            try:
                values[name] = _parse_setting(raw, kind)
            except ValueError:
                what = {int: "an integer", float: "a number", bool: "true or false", str: "text"}[kind]
                problems.append(f"{name} must be {what}, not {raw!r}")
        for name in ("iterations_per_epoch", "time_limit_s"):
            if values.get(name) == 0:
                values[name] = None
        config = cls(**values)
        if problems:
            # The values of the right kind are range-checked too, so one reply names them all.
            raise SarcoError("invalid training params: " + "; ".join(problems + config.problems()))
        config.check()
        return config

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config ``asdict(config)`` wrote to JSON (tuples come back from lists)."""
        values = dict(values)
        values["windows"] = tuple(tuple(w) for w in values.get("windows", DEFAULT_WINDOWS))
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`SarcoError` naming every setting out of range, before any work starts."""
        problems = self.problems()
        if problems:
            raise SarcoError("invalid training settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """One line per setting out of range (empty when the config can run)."""
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
        # 1024 working pixels (2 m at 2 mm) hold any body; more only exhausts memory.
        need(isinstance(self.crop, int) and 32 <= self.crop <= 1024 and self.crop % 16 == 0,
             f"crop must be a multiple of 16 in 32-1024 pixels (got {self.crop!r})")
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
        need(isinstance(self.nproc, int) and self.nproc >= 1, f"nproc must be >= 1 (got {self.nproc!r})")
        need(finite(self.class_weight_border_mm) and 0 <= self.class_weight_border_mm <= 50,
             f"class_weight_border_mm must be in [0, 50] (got {self.class_weight_border_mm!r})")
        if self.class_weights is not None:
            try:
                parse_class_weights(self.class_weights)
            except SarcoError as exc:
                problems.append(str(exc))
        if isinstance(self.nproc, int) and self.nproc >= 1 and isinstance(self.batch_size, int) and self.batch_size >= 1:
            need(self.batch_size % self.nproc == 0,
                 f"nproc {self.nproc} does not divide batch_size {self.batch_size}: every process takes an "
                 "equal share of each batch")
        try:
            device = resolve_device(self.device)
            if device.type == "cuda" and isinstance(self.nproc, int) and self.nproc > 1:
                need(self.nproc <= torch.cuda.device_count(),
                     f"nproc {self.nproc} on CUDA needs {self.nproc} GPUs; {torch.cuda.device_count()} are visible")
        except SarcoError as exc:
            problems.append(str(exc))
        return problems


#: Names a class weight may be given for: background, the tissues and the organ classes.
CLASS_WEIGHT_NAMES: tuple[str, ...] = ("background", *L.LABELS, *L.ORGAN_NAMES)


def parse_class_weights(raw: str | dict | None) -> dict[str, float] | None:
    """Class weights from request text ``"diaphragm:3,liver:2,imat:2"`` (or a dict of the same)
    -> ``{name: weight}``; empty text gives None. Names are :data:`CLASS_WEIGHT_NAMES`; a weight
    must be a finite number > 0. Raises :class:`SarcoError` naming every bad entry."""
    if raw is None:
        return None
    if isinstance(raw, dict):
        items = [(str(k), v) for k, v in raw.items()]
    else:
        text = str(raw).strip()
        if not text:
            return None
        items = []
        for part in text.split(","):
            name, sep, value = part.partition(":")
            items.append((name, value if sep else None))
    weights, problems = {}, []
    for name, value in items:
        key = name.strip().lower()
        if key not in CLASS_WEIGHT_NAMES:
            problems.append(f"unknown class {name.strip()!r} (use {', '.join(CLASS_WEIGHT_NAMES)})")
            continue
        try:
            weight = _parse_setting(value, float) if value is not None else None
        except (ValueError, TypeError):
            weight = None
        if weight is None or not math.isfinite(weight) or weight <= 0:
            problems.append(f"class weight of {key} must be a number > 0 (got {value!r})")
            continue
        if key in weights:
            problems.append(f"class {key} weighted twice")
        weights[key] = float(weight)
    if problems:
        raise SarcoError("invalid class_weights: " + "; ".join(problems))
    return weights or None


def class_weight_vector(weights: dict[str, float] | None, class_names: Sequence[str]) -> torch.Tensor | None:
    """Weights per output channel of a network whose classes are ``class_names`` (1 where not
    given), or None without weights. A weighted class the network lacks (an organ on a
    five-class network) is a :class:`SarcoError`."""
    if not weights:
        return None
    missing = [name for name in weights if name not in class_names]
    if missing:
        raise SarcoError(f"class_weights name {', '.join(missing)}, which the network does not predict "
                         "(organ classes need organ_classes / --organ-classes)")
    return torch.tensor([float(weights.get(name, 1.0)) for name in class_names], dtype=torch.float32)


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




def jsonable(value: Any) -> Any:
    """``value`` with only plain JSON types (checkpoint meta must load with ``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(value, default=str))


class SliceWeightedDiceCE(torch.nn.Module):
    """Dice + cross-entropy of each slice, weighted mean over the batch.

    ``forward(logits (N, C, H, W), target)`` with ``target`` a dict of ``label`` ``(N, H, W)``,
    ``weight`` ``(N,)`` and ``organs`` ``(N,)`` bool. A slice with an organ map is scored on all
    the network's classes; one without on the served classes, organs folded into background
    (:func:`~sarco_app.segmentation.network.tissue_logits`). The loss is the mean over slices of
    ``weight * (Dice loss + cross-entropy)``: with weights 1 it is MONAI's ``DiceCELoss`` on the
    batch (Dice per slice and class, cross-entropy over equal crops), and a batch split over
    processes averages to the same value (DDP averages the gradients).

    ``class_weights`` (one per network channel, :func:`class_weight_vector`) weight the
    cross-entropy per pixel by its true class, normalised per slice by the summed weights (torch's
    weighted mean); slices without an organ map use the first five. The Dice term is unweighted.
    ``border_px`` > 0 spreads the weights: each pixel takes the largest weight within that many
    pixels (a max-filter of the weight map), so both sides of a weighted class's border weigh the
    same and the weight no longer biases where the border lies.
    """

    def __init__(self, class_weights: torch.Tensor | None = None, border_px: int = 0) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, smooth_nr=1e-4,
                             smooth_dr=1e-4, reduction="none")
        self.register_buffer("class_weights", None if class_weights is None else class_weights.float())
        self.border_px = int(border_px)

    def per_slice(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice loss (mean over classes) + mean cross-entropy (class-weighted mean with
        ``class_weights``) of each slice, ``(N,)``."""
        dice = self.dice(logits, label[:, None]).flatten(1).mean(1)
        ce = F.cross_entropy(logits, label, reduction="none").flatten(1)
        if self.class_weights is None:
            return dice + ce.mean(1)
        pixel_weight = self.class_weights[: logits.shape[1]][label]
        if self.border_px > 0:
            size = 2 * self.border_px + 1
            pixel_weight = F.max_pool2d(pixel_weight[:, None], size, stride=1, padding=self.border_px)[:, 0]
        pixel_weight = pixel_weight.flatten(1)
        return dice + (ce * pixel_weight).sum(1) / pixel_weight.sum(1)

    def forward(self, logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        label, organs = target["label"], target["organs"]
        losses = torch.zeros(len(label), device=logits.device)
        for rows, net_logits in ((organs, logits), (~organs, None)):
            index = torch.nonzero(rows).flatten()
            if len(index):
                chosen = logits[index] if net_logits is not None else tissue_logits(logits[index])
                losses = losses.index_put((index,), self.per_slice(chosen, label[index]))
        return (losses * target["weight"]).mean()


class RunRecord:
    """What a resumed run needs besides the network and optimizer: the best epoch so far, the
    epoch history and the seconds already spent (``state_dict`` for ignite's ``Checkpoint``)."""

    def __init__(self) -> None:
        self.best: dict[str, Any] = {"score": -1.0, "dice": {}, "epoch": 0}
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0  # since the run started, before model loading (the epoch lines' clock)
        self.loop_seconds = 0.0  # in the training loop (what time_limit_s caps)
        self.started = False  # the initial model was scored (a fine-tune)
        self.seconds_offset = 0.0  # not stored: seconds of earlier runs, added to this run's clock

    def state_dict(self) -> dict[str, Any]:
        return jsonable({"best": self.best, "history": self.history, "seconds": self.seconds,
                         "loop_seconds": self.loop_seconds, "started": self.started})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.history = dict(state["best"]), list(state["history"])
        self.seconds, self.loop_seconds, self.started = state["seconds"], state["loop_seconds"], state["started"]


def latest_state(state_dir: str | Path | None) -> Path | None:
    """The newest resume state in ``state_dir`` (``resume_checkpoint_<epoch>.pt``), or None."""
    if not state_dir or not Path(state_dir).is_dir():
        return None
    states = []
    for path in Path(state_dir).glob(f"{STATE_PREFIX}_checkpoint_*.pt"):
        try:
            states.append((int(path.stem.rsplit("_", 1)[1]), path))
        except ValueError:
            continue
    return max(states)[1] if states else None


def _run_backbone(model: BodyCompModel, config: TrainConfig, group: Group, train_data, train_weights,
                  has_organs, val_data, n_val: int, out_path: Path, meta_base: dict, t0: float,
                  log: Callable[[str], None]) -> tuple[RunRecord, int]:
    """Train the backbone on MONAI's ``SupervisedTrainer``; returns the run's record and the
    iterations done. Checkpoints and logs come from rank 0 only."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import CheckpointLoader, LrScheduleHandler
    from monai.inferers import SimpleInferer
    from monai.optimizers import WarmupCosineSchedule
    from monai.utils import CommonKeys as Keys

    per_epoch = config.iterations_per_epoch or max(1, math.ceil(len(train_data) / config.batch_size))
    total_iters = per_epoch * config.epochs
    batches = CropBatches(train_data, config.batch_size, config.crop, seed=config.seed, augment=config.augment,
                          relabel_muscle=config.relabel_muscle_by_hu, weights=train_weights, has_organs=has_organs,
                          rank=group.rank, world_size=group.world_size)
    opt = torch.optim.AdamW(model.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = WarmupCosineSchedule(opt, warmup_steps=max(1, round(0.05 * total_iters)), t_total=max(1, total_iters),
                                    end_lr=0.01 * config.lr)
    windows = model.windows

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
        target = {key: batch[key].to(device, non_blocking=non_blocking) for key in ("label", "weight", "organs")}
        return encode_windows(batch["hu"], windows).to(device, non_blocking=non_blocking), target

    border_px = round(config.class_weight_border_mm / model.spacing_mm)
    loss = SliceWeightedDiceCE(class_weight_vector(config.class_weights, model.class_names),
                               border_px=border_px).to(group.device)
    trainer = SupervisedTrainer(device=group.device, max_epochs=config.epochs, train_data_loader=batches,
                                epoch_length=per_epoch, network=group.wrap(model.network), optimizer=opt,
                                loss_function=loss, prepare_batch=prepare_batch,
                                inferer=SimpleInferer(), decollate=False, optim_set_to_none=True)
    evaluator = make_evaluator(model, val_data)
    record = RunRecord()
    epoch_losses: list[float] = []
    clock = {"loop": time.time(), "stop": False}
    log(f"training {model.config['name']} on {len(train_data)} slices, validating on {n_val}; "
        f"{config.epochs} epochs x {per_epoch} iterations, batch {config.batch_size}"
        f"{f' ({group.world_size} processes x {batches.local_size})' if group.world_size > 1 else ''}, "
        f"crop {config.crop}, spacing {model.spacing_mm} mm")

    to_save = {"trainer": trainer, "network": model.network, "optimizer": opt, "schedule": schedule,
               "record": record}
    resume_from = latest_state(config.state_dir)
    if resume_from is not None:
        # MONAI's loader restores every object at STARTED (before the first epoch).
        CheckpointLoader(str(resume_from), to_save, map_location=group.device).attach(trainer)

    @trainer.on(Events.STARTED)
    def started(engine) -> None:
        batches.start = engine.state.iteration  # the crop stream continues where the state left it
        if resume_from is not None:
            log(f"resumed from {resume_from} (epoch {engine.state.epoch}, iteration {engine.state.iteration})")
        elif config.init_from and not record.started:
            # A fine-tune must beat the model it starts from before it may replace it.
            initial = validate(model, val_data, evaluator)
            record.best = {"score": main_score(initial), "dice": initial, "epoch": 0}
            log("initial model val dice " + " ".join(f"{k} {v:.4f}" for k, v in initial.items() if v is not None))
        record.started = True
        # A resumed run's clocks count the seconds spent before (epoch lines, time limit).
        record.seconds_offset = record.seconds - (time.time() - t0) if resume_from is not None else 0.0
        clock["loop"] = time.time() - record.loop_seconds

    if config.time_limit_s:
        @trainer.on(Events.GET_BATCH_STARTED)
        def cap_time(engine) -> None:
            # All processes stop at the same iteration: one of them past the limit stops all.
            if group.agree_any(time.time() - clock["loop"] >= config.time_limit_s):
                log(f"time limit of {config.time_limit_s:g} s reached after {engine.state.iteration} of "
                    f"{total_iters} iterations")
                clock["stop"] = True
                engine.terminate_epoch()  # the epoch is still validated (and maybe saved)

    @trainer.on(Events.ITERATION_COMPLETED)
    def record_loss(engine) -> None:
        # The loss of the global batch: the mean of the processes' (equal) shares.
        engine.state.output["global_loss"] = group.mean(float(engine.state.output[Keys.LOSS].detach()))
        epoch_losses.append(engine.state.output["global_loss"])

    LrScheduleHandler(schedule, print_lr=False, epoch_level=False).attach(trainer)
    saver = None
    if config.state_dir and group.is_main:
        from ignite.handlers import Checkpoint, DiskSaver

        # ignite's DiskSaver with atomic=True writes a temporary file and renames it: a run killed
        # mid-write leaves the previous state whole. (MONAI's CheckpointSaver builds its saver
        # with atomic=False, so it is not used for this.)
        saver = Checkpoint(to_save, DiskSaver(config.state_dir, atomic=True, require_empty=False),
                           filename_prefix=STATE_PREFIX, n_saved=1,
                           global_step_transform=lambda engine, event: engine.state.epoch)

    @trainer.on(Events.EPOCH_COMPLETED)
    def end_epoch(engine) -> None:
        epoch, it = engine.state.epoch, engine.state.iteration
        losses = list(epoch_losses) or [float("nan")]
        epoch_losses.clear()
        dice = validate(model, val_data, evaluator)
        score = main_score(dice)
        elapsed = time.time() - t0 + record.seconds_offset
        record.history.append({"epoch": epoch, "loss": float(np.mean(losses)), "dice": dice,
                               "seconds": round(elapsed, 1)})
        improved = score > record.best["score"]
        if group.is_main and config.last_path:
            save_checkpoint(model, config.last_path, meta=dict(meta_base, epoch=epoch, val_dice=dice,
                                                               seconds=round(elapsed, 1), iterations=it))
        if improved:
            record.best = {"score": score, "dice": dice, "epoch": epoch}
            if group.is_main:
                save_checkpoint(model, out_path, meta=dict(meta_base, best_epoch=epoch, val_dice=dice,
                                                           seconds=round(elapsed, 1), iterations=it))
        dice_txt = " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in dice.items())
        log(f"epoch {epoch}/{config.epochs} iter {it} loss {np.mean(losses):.4f} val dice {dice_txt}"
            f"{' (best, saved)' if improved else ''} [{elapsed:.0f} s]")
        # For the TensorBoard and MLflow handlers (attached after this one).
        engine.state.metrics.update({"train_loss": float(np.mean(losses)), "val_score": score},
                                    **{f"val_dice_{k}": v for k, v in dice.items() if v is not None})
        record.seconds, record.loop_seconds = elapsed, time.time() - clock["loop"]
        if clock["stop"]:
            log(f"time limit {config.time_limit_s:.0f} s reached in epoch {epoch}; stopping (the learning rate "
                "had not finished its decay)")
            engine.terminate()
        elif saver is not None:
            saver(engine)  # after the best checkpoint: a resumed run never lacks the best so far

    if group.is_main:
        _attach_trackers(trainer, config, log)
    # MONAI Label keeps only the last lines of a train log: the engines' own chatter stays out
    # (for this run only: the levels are put back when it ends).
    with quiet_loggers("ignite", "monai.engines", trainer.logger.name):
        trainer.run()
    return record, trainer.state.iteration


def _attach_trackers(trainer, config: TrainConfig, log: Callable[[str], None]) -> None:
    """Progress bar, TensorBoard and MLflow handlers on ``trainer`` (rank 0)."""
    from ignite.handlers import ProgressBar

    # A bar on stderr in a terminal only (disable=None): the epoch lines stay the log.
    ProgressBar(persist=False, desc="training", disable=None).attach(
        trainer, output_transform=lambda out: {"loss": out["global_loss"]})
    if config.tensorboard_dir:
        from monai.handlers import TensorBoardStatsHandler

        TensorBoardStatsHandler(log_dir=config.tensorboard_dir, iteration_log=True, epoch_log=True,
                                output_transform=lambda out: out["global_loss"], tag_name="loss").attach(trainer)
        log(f"TensorBoard logs in {config.tensorboard_dir}")
    if config.mlflow_uri:
        from monai.handlers import MLFlowHandler

        MLFlowHandler(tracking_uri=config.mlflow_uri, iteration_log=True, epoch_log=True,
                      output_transform=lambda out: out["global_loss"], tag_name="loss",
                      experiment_name="sarco_bodycomp", close_on_complete=True,
                      experiment_param={k: v for k, v in jsonable(asdict(config)).items()
                                        if isinstance(v, (int, float, str, bool))}).attach(trainer)
        log(f"MLflow run in {config.mlflow_uri} (experiment sarco_bodycomp)")


def train(
    samples: Sequence[Sample],
    out_path: str | Path,
    config: TrainConfig | None = None,
    val_samples: Sequence[Sample] | None = None,
    log: Callable[[str], None] | None = None,
    group: Group | None = None,
) -> dict[str, Any]:
    """Train the network on ``samples`` and write the best checkpoint to ``out_path``.

    Parameters
    ----------
    samples : labelled slices; ``config.val_fraction`` of them are held out for validation
        unless ``val_samples`` is given (with one sample, it is used for both).
    out_path : checkpoint path (parents created; written atomically on every improvement).
    config : :class:`TrainConfig`; with ``nproc`` > 1 the run is launched in that many processes
        (:func:`sarco_app.segmentation.distributed.launch`) and their rank 0's result returned.
    log : receives one progress line per epoch.
    group : the processes of a distributed run (set by the worker; None for one process).

    Returns
    -------
    dict with ``best_dice`` (per tissue), ``best_epoch``, ``epochs``, ``iterations``,
    ``seconds``, ``checkpoint`` (None when nothing was written), ``split_head`` (the head
    phase's record, see :func:`~sarco_app.segmentation.split_head.train_split_head`, or None)
    and ``history`` (per epoch: loss, validation Dice, seconds).

    With ``config.split_head_iterations`` the split head is trained after the backbone (on the
    best epoch's backbone; with ``epochs`` 0 on the initial one) and the checkpoint written
    again with it. An initial model's head is not saved with a retrained backbone unless it is
    retrained too; a head-only run replaces an existing head only when its raw validation Dice
    (mean of muscle, SAT, VAT) is higher.
    """
    log = log or logger.info  # the CLI passes print; the server's trainer its own logger
    config = config or TrainConfig()
    config.check()
    check_output_path(out_path)
    if not samples:
        raise SarcoError("no training samples")
    if group is None and config.nproc > 1 and not in_worker():
        from sarco_app.segmentation.distributed import launch

        return launch(samples, out_path, config, val_samples=val_samples, log=log)
    group = group or Group.single(config.device)
    out_path = Path(out_path)
    torch.set_num_threads(max(1, int(config.threads)))
    torch.manual_seed(config.seed)
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
    model.to(group.device)
    old_head = None
    if config.epochs > 0 and model.split_head is not None:
        # The head reads the backbone's logits: once the backbone changes, it no longer fits it.
        old_head, model.split_head = model.split_head, None
        log("the initial model's split head is set aside while the backbone trains; "
            + ("it is retrained afterwards" if config.split_head_iterations
               else "it is not saved with the new backbone (split_head_iterations > 0 retrains one)"))
    organs = bool(model.organ_classes)
    if config.epochs > 0 and config.class_weights:
        class_weight_vector(config.class_weights, model.class_names)  # a class the network lacks fails here
        log("cross-entropy class weights " + ", ".join(f"{k} {v:g}" for k, v in config.class_weights.items())
            + (f", spread {config.class_weight_border_mm:g} mm across borders" if config.class_weight_border_mm else ""))
    record, iterations = RunRecord(), 0
    if config.epochs > 0:  # head-only runs never use the working-grid copies
        train_data = [to_working(s, model.spacing_mm, organs) for s in samples]
        val_list = list(val_samples)[: config.max_val]
        # Each process validates its share of the slices; the Dice counts are summed over all.
        val_data = [to_working(s, model.spacing_mm) for s in val_list[group.rank :: group.world_size]]
        # Slices without an organ map are scored on the served classes only (organs = background).
        has_organs = [s.organs is not None and organs for s in samples]
        if organs:
            log(f"organ classes {', '.join(model.organ_classes)}: {sum(has_organs)} of {len(samples)} "
                "training slices have organ maps")
        meta_base = {"train_config": jsonable(asdict(config)), "train_slices": len(train_data),
                     "val_slices": len(val_list)}
        record, iterations = _run_backbone(model, config, group, train_data, [float(s.weight) for s in samples],
                                           has_organs, val_data, len(val_list), out_path, meta_base, t0, log)
    best = record.best
    written = best["epoch"] > 0
    if not group.is_main:
        return {"best_dice": best["dice"], "best_epoch": best["epoch"], "rank": group.rank}
    if config.epochs == 0:
        log(f"no backbone epochs: the network of {config.init_from} is kept")
    elif not written:
        log(f"no epoch beat the initial model, so {out_path} was not written")
    else:
        log(f"backbone done in {time.time() - t0 + record.seconds_offset:.0f} s; "
            f"best epoch {best['epoch']} val dice {json.dumps(best['dice'])}")
    head = None
    if config.split_head_iterations > 0 and config.epochs > 0 and not written:
        log("split head not trained: no new backbone was written")
    elif config.split_head_iterations > 0:
        if written:
            model = load_checkpoint(out_path, device=group.device)  # the best epoch's backbone, not the last one's
            model.split_head = old_head  # warm start from the previous head, if there was one
        meta = dict(model.meta)  # the backbone's training record (this run's, or the initial checkpoint's)
        current = None
        if config.epochs == 0 and model.split_head is not None:
            # Like a fine-tune, a retrained head must beat the head it replaces.
            current = raw_dice_with_and_without_head(model, list(val_samples)[: config.max_val])["head"]
            previous = copy.deepcopy(model.split_head)
        head = train_split_head(model, samples, config.split_head_iterations, val_samples=val_samples,
                                lr=config.split_head_lr, seed=config.seed, augment=config.augment,
                                max_val=config.max_val, log=log)
        if current is not None and main_score(head["val_raw_dice"]["head"]) <= main_score(current):
            model.split_head = previous
            log(f"the new split head does not beat the current one (raw Dice {main_score(head['val_raw_dice']['head']):.4f} "
                f"against {main_score(current):.4f}), so {out_path} was not written")
        else:
            meta["split_head"] = jsonable(head)
            save_checkpoint(model, out_path, meta=meta)
            written = True
    seconds = time.time() - t0 + record.seconds_offset
    log(f"done in {seconds:.0f} s" + (f"; wrote {out_path}" if written else ""))
    return {
        "best_dice": best["dice"],
        "best_epoch": best["epoch"],
        "epochs": len(record.history),
        "iterations": iterations,
        "seconds": round(seconds, 1),
        "checkpoint": str(out_path) if written else None,
        "split_head": head,
        "history": record.history,
    }


def check_output_path(path: str | Path) -> None:
    """Raise :class:`SarcoError` unless a checkpoint can be written at ``path`` (its folder is
    created): found before training, not when the first epoch tries to save."""
    path = Path(path)
    if path.is_dir():
        raise SarcoError(f"{path} is a folder, not a checkpoint file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SarcoError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SarcoError(f"{path}: not writable here")


def train_from_folder(data_dir: str | Path, out_path: str | Path, config: TrainConfig | None = None,
                      log: Callable[[str], None] | None = None, tag: str = "final") -> dict[str, Any]:
    """:func:`train` on the labelled slices of a studies folder (see
    :func:`~sarco_app.segmentation.training_data.load_studies`)."""
    log = log or logger.info
    check_output_path(out_path)  # before the studies are read
    samples = load_studies(data_dir, tag=tag)
    log(f"{len(samples)} labelled slices found in {data_dir}")
    return train(samples, out_path, config, log=log)
