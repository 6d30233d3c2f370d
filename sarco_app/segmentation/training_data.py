"""Training data of the body-composition network: labelled slices and the stream of batches.

* :class:`Sample`: one labelled axial slice ``(hu (X, Y), label (X, Y), spacing)``;
  :func:`load_studies` reads them from a studies folder (``DIR/<id>.nii.gz`` with
  ``DIR/labels/final/<id>.nii.gz``; from 3D labels every slice with a labelled tissue is used),
  :func:`load_pairs` from file pairs.
* :func:`to_working`: a sample resampled once to the network's working spacing.
* :class:`CropBatches`: the endless stream of augmented training batches
  (:mod:`sarco_app.segmentation.augment`). Every crop is drawn from its own generator, seeded from
  ``(seed, iteration, position in the global batch)``: the stream is the same whatever the number
  of processes sharing it (rank ``r`` of ``w`` takes its share of each global batch), and a
  resumed run picks it up at any iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.segmentation.augment import augment_intensity, relabel_muscle_by_hu, sample_crop
from sarco_app.segmentation.segment import resample_hu, working_shape


@dataclass
class Sample:
    """One labelled axial slice."""

    hu: np.ndarray  # (X, Y) float32 HU
    label: np.ndarray  # (X, Y) uint8, sarco_app.labels values
    spacing: tuple[float, float]  # mm
    name: str = ""
    organs: np.ndarray | None = None  # (X, Y) uint8 organ classes (ORGAN_NAMES position + 1), optional
    weight: float = 1.0  # loss weight (pseudo-labels below finals, sarco_app.segmentation.pseudo)


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


class CropBatches:
    """Endless iterable of training batches from working-spacing slices (:func:`to_working`).

    Each batch is a dict: ``hu`` ``(n, crop, crop)`` float32 HU, ``label`` ``(n, crop, crop)``
    long, ``weight`` ``(n,)`` float32 (the samples' loss weights) and ``organs`` ``(n,)`` bool
    (whether the slice has an organ map, so the loss scores the organ classes). ``n`` is
    ``batch_size / world_size``: rank ``r`` takes positions ``r*n .. (r+1)*n - 1`` of each global
    batch. Crop ``j`` of global batch ``i`` comes from a generator seeded with ``(seed, i, j)``:
    the sample it shows, its geometry and its intensity augmentation are the same in a
    one-process run and in any sharded one, and iteration ``start`` can be resumed directly.

    Why not a torch ``DataLoader`` over a ``Dataset``: its per-worker random streams depend on the
    number of workers and processes, which is exactly what must not change a run here.
    """

    def __init__(self, data: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int, crop: int, seed: int = 0,
                 augment: bool = True, relabel_muscle: bool = False, weights: Sequence[float] | None = None,
                 has_organs: Sequence[bool] | None = None, rank: int = 0, world_size: int = 1, start: int = 0):
        if not data:
            raise SarcoError("no training slices")
        if world_size < 1 or batch_size % world_size:
            raise SarcoError(f"batch_size {batch_size} cannot be shared by {world_size} processes: "
                             "use a number of processes that divides the batch size")
        self.data = list(data)
        self.batch_size, self.crop, self.seed = batch_size, crop, seed
        self.augment, self.relabel_muscle = augment, relabel_muscle
        self.weights = [1.0] * len(self.data) if weights is None else [float(w) for w in weights]
        self.has_organs = [False] * len(self.data) if has_organs is None else [bool(h) for h in has_organs]
        self.rank, self.world_size, self.start = rank, world_size, start

    @property
    def local_size(self) -> int:
        """Crops per batch in this process."""
        return self.batch_size // self.world_size

    def generator(self, iteration: int, position: int) -> torch.Generator:
        """The generator of crop ``position`` (in the global batch) of global batch ``iteration``."""
        state = np.random.SeedSequence([self.seed, iteration, position]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)

    def item(self, iteration: int, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """HU ``(crop, crop)``, label ``(crop, crop)`` and sample index of one crop."""
        gen = self.generator(iteration, position)
        index = int(torch.randint(len(self.data), (1,), generator=gen))
        hu, lab = sample_crop(*self.data[index], self.crop, gen, self.augment)
        if self.augment:
            hu = augment_intensity(hu[None], lab[None], gen)[0]
            if self.relabel_muscle:
                lab = relabel_muscle_by_hu(hu[None], lab[None])[0]
        return hu, lab, index

    def batch(self, iteration: int) -> dict[str, torch.Tensor]:
        """This process's share of global batch ``iteration``."""
        first = self.rank * self.local_size
        items = [self.item(iteration, j) for j in range(first, first + self.local_size)]
        index = [i for _, _, i in items]
        return {"hu": torch.stack([h for h, _, _ in items]), "label": torch.stack([lab for _, lab, _ in items]),
                "weight": torch.tensor([self.weights[i] for i in index], dtype=torch.float32),
                "organs": torch.tensor([self.has_organs[i] for i in index], dtype=torch.bool)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iteration = self.start
        while True:
            yield self.batch(iteration)
            iteration += 1
