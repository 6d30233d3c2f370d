"""The pseudo-label retraining loop (the paper's semi-supervised scheme), without server code.

1. A model trained on a few final labels predicts **pseudo-labels** for the images that have no
   final label (:func:`pseudo_label_image`), each with a confidence per tissue and overall.
2. Annotators correct the least certain ones first (:func:`next_image`: ``random``, ``first``,
   ``uncertainty``, ``pseudo_review``); a corrected label saved as ``final`` takes the image
   out of the queue.
3. The model retrains on the finals plus the confident pseudo-labels, weighted below the finals
   (:func:`training_pairs`; a final always wins over a pseudo-label of the same image), and each
   retrain is recorded as a **round** (:func:`append_round`, :func:`plot_learning_curve`).

The MONAI Label app (``apps/sarcopenia``) and ``python -m sarco_app loop`` both use these
functions; :class:`StudyFolder` is the CLI's view of a studies folder in MONAI Label's local
datastore layout (``DIR/<id>.nii.gz``, ``DIR/labels/<tag>/<id>.nii.gz``).

**Confidence** is one minus the normalised softmax entropy, ``1 - H(p) / log K`` (1: the network
puts all probability on one class; 0: uniform over the ``K`` classes), averaged over a tissue's
pixels for the per-tissue value and over the region of interest (pixels labelled a tissue, or
where the network gives the tissues together at least 5 %) for ``overall``. Entropy and not MC
dropout: the shipped network has no dropout (``dropout 0.0``), so dropout samples would all be
the same, and one forward pass instead of tens keeps batch labelling of a whole datastore cheap
on a CPU. Entropy, unlike the mean winning probability (``SegmentResult.confidence``),
also counts how the rest of the probability is spread (muscle vs IMAT vs background).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import random as _random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sarco_app import labels as L
from sarco_app.errors import SarcoError

logger = logging.getLogger(__name__)

PSEUDO_TAG = "pseudo"
FINAL_TAG = "final"
STRATEGIES = ("random", "first", "uncertainty", "pseudo_review")
#: Pixels where the tissues together get at least this probability count for ``overall`` even
#: when labelled background: a tissue the network half-missed is uncertain, not confident.
ROI_TISSUE_PROBABILITY = 0.05


# --------------------------------------------------------------------------- confidence


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Softmax entropy of class probabilities ``(K, ...)`` divided by ``log K``: in [0, 1]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(0) / math.log(p.shape[0])).astype(np.float32)


class ConfidenceSums:
    """Accumulates per-tissue and overall confidence (``1 - normalised entropy``) over slices."""

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0] for name in list(L.LABELS) + ["overall"]}

    def add(self, probs: np.ndarray, label: np.ndarray) -> None:
        """``probs`` ``(K, X, Y)`` (before post-processing) and the final ``label`` ``(X, Y)``."""
        confidence = 1.0 - normalised_entropy(probs)
        for value, name in L.NAMES.items():
            mask = label == value
            self.sums[name][0] += float(confidence[mask].sum())
            self.sums[name][1] += int(mask.sum())
        roi = (label > 0) | (1.0 - probs[0] >= ROI_TISSUE_PROBABILITY)
        self.sums["overall"][0] += float(confidence[roi].sum())
        self.sums["overall"][1] += int(roi.sum())

    def result(self) -> dict[str, float | None]:
        """``{tissue: mean confidence or None when absent, ..., "overall": ...}``."""
        return {name: (round(total / count, 5) if count else None) for name, (total, count) in self.sums.items()}


def overall_confidence(confidence: Mapping[str, Any] | None) -> float | None:
    """The ``overall`` value of a confidence dict (None when missing)."""
    if not confidence:
        return None
    value = confidence.get("overall")
    return float(value) if value is not None else None


# --------------------------------------------------------------------------- pseudo-labels


def checkpoint_id(path: str | Path) -> str:
    """``<file name>@<first 12 hex digits of its SHA-256>``: names one checkpoint's weights,
    whatever path it is read from."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name}@{digest.hexdigest()[:12]}"


def now_iso() -> str:
    """UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def default_slices(image) -> tuple[list[int], str]:
    """Slices to pseudo-label: the whole 2D image; for a volume the L3 slice
    (:func:`sarco_app.spine.l3.locate_l3`), else the middle slice. Returns (canonical slices, source)."""
    from sarco_app.spine.l3 import choose_slice

    choice = choose_slice(image)
    return [choice.index], choice.source


@dataclass
class PseudoLabel:
    """A pseudo-label on the image's canonical grid and its label info."""

    label: np.ndarray  # uint8, the image's shape (canonical); slices not labelled are 0
    slices: list[int]
    confidence: dict[str, float | None]  # per tissue and "overall"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def uncertainty(self) -> float:
        """``1 - overall confidence`` (1 when nothing could be measured)."""
        overall = overall_confidence(self.confidence)
        return 1.0 if overall is None else round(1.0 - overall, 5)


def pseudo_label_volume(hu: np.ndarray, spacing: Sequence[float], model, slices: Sequence[int],
                        hu_refine: bool = True) -> tuple[np.ndarray, dict[str, float | None]]:
    """Labels ``hu``'s (2D ``(X, Y)`` or 3D ``(X, Y, Z)``) ``slices`` exactly as
    :func:`sarco_app.segmentation.segment.segment_volume` does, and returns the label with the entropy
    confidence of the probabilities the label was decided on."""
    import torch

    from sarco_app.segmentation.segment import postprocess, predict_probabilities

    hu = np.asarray(hu, dtype=np.float32)
    volume = hu[:, :, None] if hu.ndim == 2 else hu
    label = np.zeros(volume.shape, dtype=np.uint8)
    sums = ConfidenceSums()
    spacing = (float(spacing[0]), float(spacing[1]))
    with torch.no_grad():
        for k in slices:
            stack = volume[:, :, k][None]
            probs = predict_probabilities(stack, spacing, model, split_head=not hu_refine)[0]
            before = probs.copy()  # postprocess edits probs in place
            lab = postprocess(probs, stack[0], spacing, hu_refine=hu_refine, border_mm=model.spacing_mm / 2)
            label[:, :, k] = lab
            sums.add(before, lab)
    return (label[:, :, 0] if hu.ndim == 2 else label), sums.result()


def pseudo_label_image(image, model, slices: Sequence[int] | None = None, hu_refine: bool = True,
                       model_id: str | None = None) -> PseudoLabel:
    """Pseudo-label of a :class:`sarco_app.inputs.ingest.CTImage` by a loaded
    :class:`~sarco_app.segmentation.network.BodyCompModel`, with its label info: ``checkpoint`` (id),
    ``model`` (path), ``time`` (UTC), ``confidence`` (per tissue and overall), ``uncertainty``,
    ``confidence_method``, ``slices`` (canonical) and ``slice_source``."""
    if slices is None:
        chosen, source = default_slices(image)
    else:
        chosen, source = [int(k) for k in slices], "request"
    label, confidence = pseudo_label_volume(image.hu, image.spacing, model, chosen, hu_refine=hu_refine)
    result = PseudoLabel(label=label, slices=chosen, confidence=confidence)
    result.info = {
        "checkpoint": model_id or (checkpoint_id(model.path) if getattr(model, "path", None) else None),
        "model": getattr(model, "path", None),
        "time": now_iso(),
        "confidence": confidence,
        "uncertainty": result.uncertainty,
        "confidence_method": "1 - softmax entropy / log(K), mean over pixels",
        "slices": chosen,
        "slice_source": source,
    }
    return result


# --------------------------------------------------------------------------- the review queue


def candidates(image_ids: Iterable[str], final_ids: Iterable[str]) -> list[str]:
    """Images still in the queue: those without a final label, in id order."""
    finals = set(final_ids)
    return sorted(i for i in image_ids if i not in finals)


def next_image(strategy: str, queue: Sequence[str], scores: Mapping[str, float | None] | None = None,
               rng: _random.Random | None = None) -> str | None:
    """The next image for an annotator, or None when the queue is empty.

    * ``first``: the first id;
    * ``random``: any, uniformly;
    * ``uncertainty``: the highest ``scores`` value (model uncertainty, ``1 - overall
      confidence``); images without a score come last;
    * ``pseudo_review``: the lowest ``scores`` value (the pseudo-label's overall confidence);
      only images that have a pseudo-label (a score) are eligible.

    Ties go to the smaller id, so the order is reproducible.
    """
    if strategy not in STRATEGIES:
        raise SarcoError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    queue = sorted(queue)
    scores = scores or {}
    if strategy == "first":
        return queue[0] if queue else None
    if strategy == "random":
        return (rng or _random.Random()).choice(queue) if queue else None
    ordered = review_order(strategy, queue, scores)
    return ordered[0] if ordered else None


def review_order(strategy: str, queue: Sequence[str], scores: Mapping[str, float | None]) -> list[str]:
    """The whole queue in the order ``uncertainty`` (most uncertain first, unscored last) or
    ``pseudo_review`` (least confident pseudo-label first, images without one left out) would
    hand it out."""
    if strategy == "uncertainty":
        return sorted(queue, key=lambda i: (scores.get(i) is None, -(scores.get(i) or 0.0), i))
    if strategy == "pseudo_review":
        return sorted((i for i in queue if scores.get(i) is not None), key=lambda i: (scores[i], i))
    raise SarcoError(f"strategy {strategy!r} has no score order")


def nothing_left_message(strategy: str, n_images: int, n_queue: int) -> str:
    """Why ``strategy`` has no image to hand out."""
    if n_images == 0:
        return "the datastore has no images"
    if n_queue == 0:
        return f"no unlabelled image left: all {n_images} images have a final label"
    if strategy == "pseudo_review":
        return (f"none of the {n_queue} images without a final label has a pseudo-label: "
                "run batch pseudo-labelling first (POST /batch/infer/bodycomp_pseudo)")
    return f"no image left for strategy {strategy!r}"


# --------------------------------------------------------------------------- training set


@dataclass
class TrainingSet:
    """What a retrain uses: ``(image, label, weight)`` triples and the counts it reports."""

    finals: list[tuple[str, str]] = field(default_factory=list)  # (image path, label path)
    pseudo: list[tuple[str, str]] = field(default_factory=list)
    final_ids: list[str] = field(default_factory=list)
    pseudo_ids: list[str] = field(default_factory=list)
    pseudo_below_threshold: list[str] = field(default_factory=list)
    pseudo_without_confidence: list[str] = field(default_factory=list)
    pseudo_overridden_by_final: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"finals": len(self.finals), "pseudo": len(self.pseudo),
                "pseudo_below_threshold": len(self.pseudo_below_threshold),
                "pseudo_without_confidence": len(self.pseudo_without_confidence),
                "pseudo_overridden_by_final": len(self.pseudo_overridden_by_final)}


def training_pairs(images: Mapping[str, str], finals: Mapping[str, str],
                   pseudos: Mapping[str, tuple[str, Mapping[str, Any] | None]],
                   include_pseudo: bool, min_confidence: float) -> TrainingSet:
    """Choose the labels a retrain uses.

    ``images``: id -> image path; ``finals``: id -> final label path; ``pseudos``: id ->
    (pseudo label path, its label info). A final always wins over a pseudo-label of the same
    image; with ``include_pseudo``, pseudo-labels whose overall confidence is at or above
    ``min_confidence`` are added (one without a recorded confidence is left out).
    """
    chosen = TrainingSet()
    for image_id in sorted(finals):
        if image_id in images:
            chosen.finals.append((images[image_id], finals[image_id]))
            chosen.final_ids.append(image_id)
    if not include_pseudo:
        return chosen
    for image_id in sorted(pseudos):
        if image_id not in images:
            continue
        if image_id in finals:
            chosen.pseudo_overridden_by_final.append(image_id)
            continue
        path, info = pseudos[image_id]
        overall = overall_confidence((info or {}).get("confidence"))
        if overall is None:
            chosen.pseudo_without_confidence.append(image_id)
        elif overall >= min_confidence:
            chosen.pseudo.append((images[image_id], path))
            chosen.pseudo_ids.append(image_id)
        else:
            chosen.pseudo_below_threshold.append(image_id)
    return chosen


def load_training_samples(chosen: TrainingSet, pseudo_weight: float, val_fraction: float = 0.15,
                          max_val: int = 24, seed: int = 0, organ_classes: bool = False):
    """``(train samples, validation samples)`` for :func:`sarco_app.segmentation.train.train`.

    Validation uses finals only (a pseudo-label is the model's own guess; scoring against it
    would reward agreeing with itself): ``val_fraction`` of the final images (at least one when
    there are two or more; with one final it validates on that final). Pseudo-label slices get
    ``weight = pseudo_weight`` in the loss, finals 1. With ``organ_classes`` the finals' organ maps
    (``labels/organs/``, :func:`sarco_app.segmentation.training_data.organ_map_for`) come along.
    """
    from sarco_app.segmentation.training_data import load_pairs, organ_map_for

    def load_finals(pairs):
        return load_pairs(pairs, [organ_map_for(label) for _, label in pairs] if organ_classes else None)

    if not chosen.finals:
        raise SarcoError("no final labels: save some final labels before training")
    if not 0 < pseudo_weight <= 1:
        raise SarcoError(f"pseudo_weight must be in (0, 1] (got {pseudo_weight!r})")
    order = np.random.default_rng(seed).permutation(len(chosen.finals))
    n_val = min(max_val, max(1, int(round(len(order) * val_fraction)))) if len(order) > 1 else 0
    val_pairs = [chosen.finals[i] for i in order[:n_val]]
    train_final_pairs = [chosen.finals[i] for i in order[n_val:]]
    train_samples = load_finals(train_final_pairs) if train_final_pairs else []
    val_samples = load_finals(val_pairs) if val_pairs else list(train_samples)
    if chosen.pseudo:
        for sample in load_pairs(chosen.pseudo):
            sample.weight = float(pseudo_weight)
            train_samples.append(sample)
    return train_samples, val_samples


# --------------------------------------------------------------------------- rounds


def _locked_update(path: Path, update: Callable[[Any], Any], default: Any) -> Any:
    """Read-modify-write of a JSON file under an exclusive lock (a ``.lock`` file beside it),
    written atomically, so concurrent writers (trainer, batch runs) never lose an update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.is_file() else default
            data = update(data)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, path)
            return data
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_rounds(path: str | Path) -> list[dict[str, Any]]:
    """The round history stored at ``path`` (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SarcoError(f"{path}: round history is not valid JSON ({exc})") from None
    return list(data.get("rounds", []))


def round_record(checkpoint: str | None, chosen: TrainingSet, val_dice: Mapping[str, float | None],
                 seconds: float, **extra: Any) -> dict[str, Any]:
    """One round: checkpoint id, finals and pseudo-labels used, validation Dice per tissue
    (finals only), seconds and time; ``extra`` keys (settings) are kept as given."""
    record = {"checkpoint": checkpoint, "time": now_iso(), "seconds": round(float(seconds), 1),
              **chosen.counts(), "val_dice": {k: (None if v is None else round(float(v), 5)) for k, v in val_dice.items()}}
    record.update(extra)
    return record


def append_round(path: str | Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Append ``record`` to the history at ``path`` with the next round number; returns it."""
    stored: dict[str, Any] = {}

    def update(data):
        rounds = list(data.get("rounds", []))
        stored.update(record, round=len(rounds) + 1)
        rounds.append(dict(stored))
        return {"rounds": rounds}

    _locked_update(Path(path), update, {"rounds": []})
    return stored


def plot_learning_curve(rounds: Sequence[Mapping[str, Any]], png_path: str | Path | None = None,
                        title: str = "pseudo-label loop") -> bytes:
    """Validation Dice per tissue (left) and labels used (right) by round, as PNG bytes (also
    written to ``png_path`` when given)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: the server's backend is left alone

    if not rounds:
        raise SarcoError("no rounds recorded yet: train once to start the history")
    x = [r.get("round", i + 1) for i, r in enumerate(rounds)]
    fig = Figure(figsize=(9, 3.6))
    ax_dice, ax_count = fig.subplots(1, 2)
    for name in ("muscle", "sat", "vat", "imat"):
        y = [(r.get("val_dice") or {}).get(name) for r in rounds]
        if any(v is not None for v in y):
            ax_dice.plot(x, [np.nan if v is None else v for v in y], marker="o", label=name,
                         color=np.array(L.COLORS[L.LABELS[name]]) / 255)
    ax_dice.set_xlabel("round")
    ax_dice.set_ylabel("validation Dice (finals)")
    ax_dice.legend(fontsize=8)
    ax_dice.grid(alpha=0.3)
    ax_count.plot(x, [r.get("finals", 0) for r in rounds], marker="o", label="finals")
    ax_count.plot(x, [r.get("pseudo", 0) for r in rounds], marker="s", label="pseudo-labels")
    ax_count.set_xlabel("round")
    ax_count.set_ylabel("labels used")
    ax_count.legend(fontsize=8)
    ax_count.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = buffer.getvalue()
    if png_path is not None:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        Path(png_path).write_bytes(data)
    return data


# --------------------------------------------------------------------------- a studies folder


class StudyFolder:
    """A studies folder in MONAI Label's local datastore layout, for the CLI: images
    ``DIR/<id>.nii.gz`` (or ``.nii``), labels ``DIR/labels/<tag>/<id>.nii.gz``; pseudo-label
    info in ``DIR/labels/pseudo_info.json`` (the server keeps it in the datastore's label info)."""

    def __init__(self, root: str | Path):
        from sarco_app.inputs.ingest import is_nifti

        self.root = Path(root)
        if not self.root.is_dir():
            raise SarcoError(f"{self.root}: no such folder")
        self.images: dict[str, str] = {}
        for path in sorted(p for p in self.root.iterdir() if p.is_file() and is_nifti(p)):
            self.images[_stem(path)] = str(path)
        if not self.images:
            raise SarcoError(f"{self.root}: no NIfTI images")
        self.info_path = self.root / "labels" / "pseudo_info.json"

    def labels(self, tag: str) -> dict[str, str]:
        """id -> label path for the images that have a label under ``tag``."""
        folder = self.root / "labels" / tag
        found = {}
        if folder.is_dir():
            for path in folder.iterdir():
                if _stem(path) in self.images and path.name.endswith((".nii.gz", ".nii")):
                    found[_stem(path)] = str(path)
        return found

    def pseudo_info(self) -> dict[str, dict]:
        if not self.info_path.is_file():
            return {}
        return json.loads(self.info_path.read_text())

    def pseudos(self) -> dict[str, tuple[str, dict | None]]:
        info = self.pseudo_info()
        return {i: (p, info.get(i)) for i, p in self.labels(PSEUDO_TAG).items()}

    def save_pseudo(self, image_id: str, image, result: PseudoLabel) -> str:
        """Write the pseudo-label (never a final one) and its info; returns the label path."""
        if image_id not in self.images:
            raise SarcoError(f"unknown image {image_id!r}")
        return write_pseudo(self.root, image_id, image, result)


def write_pseudo(root: str | Path, image_id: str, image, result: PseudoLabel) -> str:
    """Store a pseudo-label in the studies folder ``root``: ``labels/pseudo/<id>.nii.gz``
    (written atomically) and its info in ``labels/pseudo_info.json`` (under a file lock, so
    several processes may store at once); returns the label path."""
    from sarco_app.inputs.ingest import save_label

    root = Path(root)
    folder = root / "labels" / PSEUDO_TAG
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{image_id}.nii.gz"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{image_id}", suffix=".nii.gz")
    os.close(fd)
    save_label(result.label, image, tmp)
    os.replace(tmp, path)
    _locked_update(root / "labels" / "pseudo_info.json", lambda data: {**data, image_id: result.info}, {})
    return str(path)


def pseudo_label_task(item: tuple[str, str], root: str, model_path: str, model_id: str) -> float | None:
    """Pseudo-label one image ``(id, image path)`` of the studies folder ``root`` with the
    checkpoint ``model_path`` and store it (:func:`write_pseudo`); returns its overall
    confidence. A task for :class:`sarco_app.parallel.Executor`: the model is loaded once per
    process (:func:`sarco_app.segmentation.segment.get_model` caches it)."""
    from sarco_app.inputs.ingest import load_image
    from sarco_app.segmentation.segment import get_model

    image_id, image_path = item
    image = load_image(image_path)
    result = pseudo_label_image(image, get_model(model_path), model_id=model_id)
    write_pseudo(root, image_id, image, result)
    return overall_confidence(result.confidence)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def validation_dice(checkpoint: str | Path, val_samples, max_val: int) -> dict[str, float | None]:
    """Validation Dice per tissue of ``checkpoint`` as :func:`sarco_app.segmentation.train.train` scores its
    epochs (raw network on the working grid)."""
    from sarco_app.segmentation.network import load_checkpoint
    from sarco_app.segmentation.training_data import to_working
    from sarco_app.segmentation.validation import validate

    model = load_checkpoint(checkpoint)
    return validate(model, [to_working(s, model.spacing_mm) for s in list(val_samples)[:max_val]])


def retrain_round(chosen: TrainingSet, out_path: str | Path, config, rounds_path: str | Path,
                  pseudo_weight: float = 0.5, log: Callable[[str], None] | None = None,
                  served_path: str | Path | None = None, gate: bool = False, val_seed: int | None = None,
                  **extra: Any) -> dict[str, Any]:
    """One retrain of the loop: :func:`sarco_app.segmentation.train.train` on ``chosen`` (finals weight 1,
    pseudo-labels ``pseudo_weight``; validation on finals only) and a round appended to
    ``rounds_path``. Returns the train result with the stored ``round`` record.

    With ``gate`` (the server's safe model swap) training writes a candidate beside
    ``out_path`` (``<name>.candidate.pt``), and the candidate replaces ``out_path`` only when it
    beats ``served_path`` (the model being served; None when there is none) on the validation
    slices (:func:`sarco_app.segmentation.validation.compare_models`). The comparison is logged and stored as
    ``model_swap`` in the result and the round. ``val_seed`` (default ``config.seed``) chooses
    the validation images, so a fixed seed keeps the same validation set from round to round.
    """
    from sarco_app.segmentation.train import train
    from sarco_app.segmentation.validation import compare_models

    out_path = Path(out_path)
    log = log or logger.info
    seed = config.seed if val_seed is None else val_seed
    train_samples, val_samples = load_training_samples(chosen, pseudo_weight, config.val_fraction,
                                                       config.max_val, seed,
                                                       organ_classes=config.organ_classes)
    n_pseudo_slices = sum(1 for s in train_samples if s.weight != 1.0)
    log(f"round: {len(chosen.finals)} final images and {len(chosen.pseudo)} pseudo-labels "
        f"(weight {pseudo_weight}); {len(train_samples)} training slices ({n_pseudo_slices} pseudo), "
        f"{len(val_samples)} validation slices (finals only)")
    if not train_samples:
        raise SarcoError("nothing to train on: the only final label is kept for validation and no "
                         "pseudo-label is confident enough")
    round_dice = None
    target = out_path.with_suffix(".candidate.pt") if gate else out_path
    if gate:
        target.unlink(missing_ok=True)  # a candidate of an earlier round must not be taken for this one's
    result = train(train_samples, target, config, val_samples=val_samples, log=log)
    if gate:
        swap: dict[str, Any] = {"replace": False, "served_model": str(served_path) if served_path else None}
        if result["checkpoint"] is None:
            swap["reason"] = "training wrote no candidate (no epoch beat the model it started from)"
        else:
            swap = compare_models(target, served_path, val_samples)
            if swap["replace"]:
                os.replace(target, out_path)  # atomic: the server never reads a half-written model
        swap["replaced"] = bool(swap.pop("replace"))
        swap["candidate_path"] = str(target) if target.is_file() else None
        log(f"model swap: {'replaced' if swap['replaced'] else 'kept'} the served model: {swap['reason']}")
        result["model_swap"] = swap
        result["candidate"] = swap["candidate_path"]
        result["checkpoint"] = str(out_path) if swap["replaced"] else None
        extra["model_swap"] = swap
        if not swap["replaced"] and served_path:
            # The round reports the model in use: the served one, scored as train() scores.
            extra["candidate_val_dice"] = result["best_dice"]
            round_dice = validation_dice(served_path, val_samples, config.max_val)
    current = result["checkpoint"] or (served_path if gate else config.init_from)
    record = round_record(
        checkpoint_id(current) if current and Path(current).is_file() else None, chosen,
        result["best_dice"] if round_dice is None else round_dice,
        result["seconds"], checkpoint_path=str(current) if current else None,
        checkpoint_written=result["checkpoint"] is not None, train_slices=len(train_samples),
        pseudo_slices=n_pseudo_slices, val_slices=len(val_samples), pseudo_weight=pseudo_weight, **extra)
    result["round"] = append_round(rounds_path, record)
    log(f"round {result['round']['round']} recorded in {rounds_path}: checkpoint {record['checkpoint']}, "
        "val dice " + " ".join(f"{k} {v:.4f}" for k, v in record["val_dice"].items() if v is not None))
    return result
