"""The split head's training phase: the protocol's tissue decision on each slice's own grid
(:class:`sarco_app.segmentation.network.TissueSplitHead`), learned with the backbone frozen.

Why a hand-written loop and not a MONAI engine: each iteration takes two slices on their own
grids (any size and spacing, so no batch can be stacked), the network runs frozen under the
head, and the learning-rate rule is a 20-line warm-up and cosine; an engine would add a data
adapter and handlers to replace these few lines. It is run once, in one process, after the
backbone (:func:`sarco_app.segmentation.train.train`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sarco_app import labels as L
from sarco_app.metrics import PooledOverlap
from sarco_app.segmentation.augment import augment_intensity
from sarco_app.segmentation.network import BodyCompModel, TissueSplitHead
from sarco_app.segmentation.segment import original_grid_logits
from sarco_app.segmentation.training_data import Sample

logger = logging.getLogger(__name__)


def raw_dice_with_and_without_head(model: BodyCompModel, samples: Sequence[Sample]) -> dict[str, dict]:
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
    (:func:`raw_dice_with_and_without_head`).
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
    dice = raw_dice_with_and_without_head(model, list(val_samples)[:max_val])
    if val_samples:
        log("split head: raw Dice on the validation slices' own grids, with the head "
            + " ".join(f"{k} {v:.4f}" for k, v in dice["head"].items() if v is not None)
            + "; backbone alone " + " ".join(f"{k} {v:.4f}" for k, v in dice["backbone"].items() if v is not None))
    return {"iterations": iterations, "lr": lr, "seconds": round(time.time() - t0, 1),
            "first_loss": float(np.mean(losses[:every])), "final_loss": float(np.mean(losses[-every:])),
            "val_raw_dice": dice}
