"""Active-learning strategies and the uncertainty scoring method of the pseudo-label loop.

Strategies (``POST /activelearning/{name}``), all over the images without a ``final`` label
(saving a final label takes an image out of the queue); the order logic is
:func:`sarco_app.segmentation.pseudo.next_image`:

* ``random``, ``first`` (smallest id);
* ``uncertainty``: the highest model uncertainty (1 - overall entropy confidence) of the current
  checkpoint; scores come from the ``uncertainty`` scoring method (MONAI Label runs it in the
  background at start-up and after training), and images it has not scored for the current
  checkpoint yet are scored on the spot;
* ``pseudo_review``: the image whose stored ``pseudo`` label has the lowest overall confidence.

When nothing is left the answer is HTTP 404 with the reason in ``detail`` (no image left, or no
pseudo-label yet), not a 500.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Sequence

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.infers.common import http_error
from lib.infers.pseudo import datastore_lock

logger = logging.getLogger(__name__)

#: Image info key of the stored uncertainty: ``{"value", "checkpoint", "time"}``.
UNCERTAINTY_KEY = "sarco_uncertainty"


class UncertaintyScorer:
    """Scores images with the current body-composition model (first readable candidate)."""

    def __init__(self, model_paths: Callable[[], Sequence]):
        self._model_paths = model_paths

    def current_model(self):
        from sarco_app.segmentation.network import first_readable_model
        from sarco_app.segmentation.pseudo import checkpoint_id
        from sarco_app.segmentation.segment import get_model

        paths = [p for p in self._model_paths() if p and os.path.isfile(p)]
        model, _ = first_readable_model(paths, load=get_model)
        if model is None:
            raise http_error(503, "no readable body-composition model to score uncertainty with")
        return model, checkpoint_id(model.path)

    def score(self, datastore, image_id: str, model, model_id: str) -> float:
        """Uncertainty of one image, stored in its image info; returns it."""
        import torch

        from sarco_app.inputs.ingest import load_image
        from sarco_app.segmentation.pseudo import now_iso, pseudo_label_image

        torch.set_num_threads(1)  # a background job on a shared CPU
        image = load_image(datastore.get_image_uri(image_id))
        value = pseudo_label_image(image, model, model_id=model_id).uncertainty
        with datastore_lock(datastore):
            if image_id in datastore.list_images():
                datastore.update_image_info(image_id, {UNCERTAINTY_KEY: {"value": value, "checkpoint": model_id,
                                                                        "time": now_iso()}})
        return value

    def stored(self, datastore, image_id: str, model_id: str) -> float | None:
        entry = datastore.get_image_info(image_id).get(UNCERTAINTY_KEY) or {}
        return entry.get("value") if entry.get("checkpoint") == model_id else None


class UncertaintyScoring(ScoringMethod):
    """``POST /scoring/uncertainty``: stores the current model's uncertainty of every image
    without a final label in its image info (``sarco_uncertainty``)."""

    def __init__(self, scorer: UncertaintyScorer):
        super().__init__("Model uncertainty (1 - entropy confidence) of the images without a final label")
        self.scorer = scorer

    def __call__(self, request, datastore):
        from sarco_app.segmentation.pseudo import candidates

        model, model_id = self.scorer.current_model()
        with datastore_lock(datastore):
            queue = candidates(datastore.list_images(), datastore.get_labeled_images())
        scored = {}
        for image_id in queue:
            if request.get("force") or self.scorer.stored(datastore, image_id, model_id) is None:
                scored[image_id] = self.scorer.score(datastore, image_id, model, model_id)
        logger.info(f"uncertainty: scored {len(scored)} of {len(queue)} images with {model_id}")
        return {"checkpoint": model_id, "scored": scored, "queue": len(queue)}


class QueueStrategy(Strategy):
    """One of :data:`sarco_app.segmentation.pseudo.STRATEGIES` over the images without a final label."""

    def __init__(self, name: str, scorer: UncertaintyScorer | None = None, description: str = ""):
        super().__init__(description or f"{name}: next image without a final label")
        self.name = name
        self.scorer = scorer
        self._rng = random.Random()

    def _scores(self, datastore, queue: list[str]) -> dict[str, Any]:
        from sarco_app.segmentation.pseudo import PSEUDO_TAG, overall_confidence

        if self.name == "pseudo_review":
            scores = {}
            for image_id in queue:
                if datastore.get_label_by_image_id(image_id, PSEUDO_TAG):
                    scores[image_id] = overall_confidence(
                        datastore.get_label_info(image_id, PSEUDO_TAG).get("confidence"))
            return scores
        if self.name == "uncertainty" and self.scorer is not None:
            model, model_id = self.scorer.current_model()
            scores = {i: self.scorer.stored(datastore, i, model_id) for i in queue}
            for image_id in [i for i, v in scores.items() if v is None]:
                scores[image_id] = self.scorer.score(datastore, image_id, model, model_id)
            return scores
        return {}

    def __call__(self, request, datastore):
        from sarco_app.segmentation.pseudo import candidates, next_image, nothing_left_message

        with datastore_lock(datastore):  # the endpoint then writes image info from a fresh copy
            images = datastore.list_images()
            queue = candidates(images, datastore.get_labeled_images())
        chosen = next_image(self.name, queue, self._scores(datastore, queue), rng=self._rng)
        if chosen is None:
            raise http_error(404, nothing_left_message(self.name, len(images), len(queue)))
        logger.info(f"activelearning {self.name}: {chosen} ({len(queue)} images in the queue)")
        return {"id": chosen, "strategy": self.name, "queue": len(queue)}
