"""Validation of the body-composition network: pooled Dice per tissue on held-out slices.

* :class:`PooledDice`: an ignite metric (pixel counts per tissue summed over every validation
  slice, :class:`sarco_app.metrics.PooledOverlap`; summed over the processes of a distributed run);
* :class:`WorkingGridInferer`: the network on a whole working-spacing slice (padded to the
  network's size multiple, the organ classes folded into background);
* :func:`make_evaluator` / :func:`validate`: a MONAI ``SupervisedEvaluator`` with both, the score
  every epoch of :func:`sarco_app.segmentation.train.train` is judged by (:func:`main_score`);
* :func:`served_dice` / :func:`compare_models`: what the server would answer, for the safe
  model swap of the MONAI Label trainer.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys

from sarco_app import labels as L
from sarco_app.errors import SarcoError
from sarco_app.metrics import PooledOverlap
from sarco_app.segmentation.network import BodyCompModel, encode_windows, load_checkpoint, tissue_logits
from sarco_app.segmentation.segment import pad_to_multiple

#: Tissue values in the order of :class:`PooledDice`'s count rows.
_TISSUES = sorted(L.NAMES)
_COUNT_KEYS = ("intersection", "union", "pred", "truth")


class PooledDice(Metric):
    """Pooled Dice per tissue name over every ``(logits (N, C, H, W), label (N, H, W))`` output
    of an evaluator (arg-max over the classes); ``None`` for a tissue absent from every slice.

    The counts are summed over the processes of a distributed run (ignite's
    ``sync_all_reduce``), so each process may validate its own share of the slices.
    """

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros((len(_TISSUES), len(_COUNT_KEYS)), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output) -> None:
        logits, label = output
        pooled = PooledOverlap()
        for pred, truth in zip(logits.argmax(1), label):
            pooled.add(pred, truth)
        self._counts += torch.tensor([[pooled.counts[v][k] for k in _COUNT_KEYS] for v in _TISSUES],
                                     dtype=torch.float64)

    @sync_all_reduce("_counts")
    def compute(self) -> dict[str, float | None]:
        pooled = PooledOverlap()
        for row, value in zip(self._counts.tolist(), _TISSUES):
            pooled.counts[value] = {k: int(round(c)) for k, c in zip(_COUNT_KEYS, row)}
        return pooled.dice()


class WorkingGridInferer(Inferer):
    """Logits ``(N, 5, H, W)`` over the served classes of a whole working-grid batch
    ``(N, windows, H, W)``: padded to the network's size multiple and cropped back; a network
    with organ classes has them folded into background (:func:`~sarco_app.segmentation.network.tissue_logits`)."""

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        x, crop = pad_to_multiple(inputs)
        return tissue_logits(network(x, *args, **kwargs))[:, :, crop[0], crop[1]]


def working_batches(val: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Validation slices ``(hu (H, W), label (H, W))`` as one-slice batches for :func:`make_evaluator`."""
    return [{"hu": hu[None], "label": torch.as_tensor(lab)[None].long()} for hu, lab in val]


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to ``level`` inside the block and restore their levels after."""
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


def make_evaluator(model: BodyCompModel, val: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> SupervisedEvaluator:
    """A MONAI ``SupervisedEvaluator`` of ``model``'s raw network on the working-grid slices
    ``val`` (:func:`sarco_app.segmentation.training_data.to_working`); after ``run()``,
    ``evaluator.state.metrics["val_dice"]`` is the pooled Dice per tissue (:class:`PooledDice`)."""
    windows = model.windows

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
        return (encode_windows(batch["hu"], windows).to(device, non_blocking=non_blocking),
                batch["label"].to(device, non_blocking=non_blocking))

    data = working_batches(val)
    evaluator = SupervisedEvaluator(device=model.device, val_data_loader=data, epoch_length=max(1, len(data)),
                                    network=model.network, prepare_batch=prepare_batch,
                                    inferer=WorkingGridInferer(), decollate=False)
    PooledDice(output_transform=lambda out: (out[Keys.PRED], out[Keys.LABEL])).attach(evaluator, "val_dice")
    return evaluator


def validate(model: BodyCompModel, val: Sequence[tuple[torch.Tensor, torch.Tensor]],
             evaluator: SupervisedEvaluator | None = None) -> dict[str, float | None]:
    """Dice per tissue of the raw network (arg-max at the working spacing) over ``val``, pooled
    over all validation pixels (and over the processes of a distributed run, each given its
    share of the slices). ``evaluator`` reuses one from :func:`make_evaluator`."""
    evaluator = evaluator or make_evaluator(model, val)
    if evaluator.state.epoch_length and evaluator.data_loader:
        # MONAI Label keeps only the last lines of a train log: the engine's own chatter stays
        # out, for this run only.
        with quiet_loggers(evaluator.logger.name):
            evaluator.run()
        return dict(evaluator.state.metrics["val_dice"])
    # A process without validation slices still takes part in the count's reduction.
    metric = PooledDice()
    metric.reset()
    return metric.compute()


def main_score(dice: dict[str, float | None]) -> float:
    """The score a model is judged by: the mean Dice of muscle, SAT and VAT (0 when none is defined)."""
    values = [dice[k] for k in ("muscle", "sat", "vat") if dice.get(k) is not None]
    return float(np.mean(values)) if values else 0.0


def served_dice(model: BodyCompModel, samples, hu_refine: bool = True) -> dict[str, float | None]:
    """Dice per tissue of what the server answers (:func:`sarco_app.segmentation.segment.segment_volume` on
    each slice's own grid; ``hu_refine`` as the infer param), pooled over ``samples``
    (:class:`sarco_app.segmentation.training_data.Sample`)."""
    from sarco_app.segmentation.segment import segment_volume

    pooled = PooledOverlap()
    for sample in samples:
        pred = segment_volume(sample.hu, sample.spacing, method="unet", model=model, hu_refine=hu_refine,
                              threads=1).label
        pooled.add(pred, sample.label)
    return pooled.dice()


def compare_models(candidate: str | Path, served: str | Path | None, samples) -> dict[str, Any]:
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
                         "score": round(main_score(dice), 5)}
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
