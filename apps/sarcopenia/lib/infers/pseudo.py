"""Infer task ``bodycomp_pseudo`` and the batch task that stores its results as ``pseudo`` labels.

``POST /infer/bodycomp_pseudo?image=ID`` returns the U-Net's label (exactly ``bodycomp_unet``'s
default output) with the label info of a pseudo-label: ``checkpoint`` (file name and SHA-256
prefix), ``time``, ``confidence`` per tissue and ``overall`` (1 - normalised softmax entropy, see
:mod:`sarco_app.segmentation.pseudo`), ``uncertainty``, ``slices``.

``POST /batch/infer/bodycomp_pseudo`` (MONAI Label's batch endpoint) labels every image that
has no ``final`` label and stores each result under the label tag ``pseudo`` with that info
(:class:`PseudoBatchInfer`); a ``final`` label is never written or overwritten. Batch runs of
other models keep MONAI Label's behaviour, except that they may not write ``final`` labels either.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from sarco_app.errors import SarcoError

from lib.infers.bodycomp import BodyCompInfer
from lib.infers.common import http_error

logger = logging.getLogger(__name__)

PSEUDO_TASK = "bodycomp_pseudo"


class PseudoLabelInfer(BodyCompInfer):
    """``bodycomp_unet``'s label plus the pseudo-label info (checkpoint, time, confidence)."""

    def __init__(self, model_paths, description: str | None = None):
        super().__init__(
            "unet", model_paths=model_paths,
            description=description or "Pseudo-label for the retraining loop: the U-Net label with "
            "checkpoint id, time and entropy confidence per tissue and overall",
        )
        self._config.pop("hu_refine", None)  # pseudo-labels are always the default output

    def __call__(self, request, callbacks: dict[Any, Callable] | None = None):
        from sarco_app.inputs.ingest import load_image, save_label
        from sarco_app.segmentation.pseudo import checkpoint_id, pseudo_label_image
        from sarco_app.segmentation.segment import resolve_slices

        begin = time.time()
        req, image_path = self.request_with_image(request, PSEUDO_TASK)
        model, warnings = self._load_model()
        try:
            image = load_image(image_path)
            slices, source = self._slices(image, req)
            chosen = resolve_slices(image.hu.shape, slices)
            result = pseudo_label_image(image, model, slices=chosen, model_id=checkpoint_id(model.path))
        except SarcoError as exc:
            raise http_error(400, str(exc)) from exc
        result.info["slice_source"] = source
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        save_label(result.label, image, out)
        result_json = dict(result.info, latencies={"total": round(time.time() - begin, 3)})
        if warnings:
            result_json["warnings"] = [f"{w}; used the next model" for w in warnings]
        return out, result_json


@contextmanager
def datastore_lock(datastore):
    """An exclusive lock shared by every sarco writer of the datastore (server process and
    MONAI Label's batch / scoring subprocesses), with the datastore re-read from its file once
    held: MONAI Label's local datastore writes its whole in-memory copy, so a writer with a
    stale copy would drop another process's labels and info."""
    root = getattr(datastore, "_datastore_path", None) or tempfile.gettempdir()
    with open(os.path.join(root, ".sarco_pseudo.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            reload = getattr(datastore, "_init_from_datastore_file", None)
            if reload is not None:
                reload()
            yield datastore
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_pseudo_label(datastore, image_id: str, label_file: str, info: dict) -> bool:
    """Store ``label_file`` as image ``image_id``'s ``pseudo`` label with ``info``; False (nothing
    written) when the image got a final label meanwhile."""
    from sarco_app.segmentation.pseudo import FINAL_TAG, PSEUDO_TAG

    with datastore_lock(datastore):
        if datastore.get_label_by_image_id(image_id, FINAL_TAG):
            return False
        datastore.save_label(image_id, label_file, PSEUDO_TAG, copy.deepcopy(info))
    return True


class PseudoBatchInfer(BatchInferTask):
    """MONAI Label's batch task; for ``bodycomp_pseudo`` it labels the images without a final
    label and stores the results under ``pseudo`` (never ``final``)."""

    def __init__(self, pseudo_models=(PSEUDO_TASK,)):
        self.pseudo_models = tuple(pseudo_models)

    def __call__(self, request, datastore, infer: Callable):
        from sarco_app.segmentation.pseudo import FINAL_TAG, PSEUDO_TAG, candidates

        if str(request.get("label_tag", "")) == FINAL_TAG:
            raise http_error(400, "batch inference never writes final labels: final labels come from annotators "
                                  f"(use label_tag {PSEUDO_TAG!r} or 'original')")
        if request.get("model") not in self.pseudo_models:
            return super().__call__(request, datastore, infer)
        with datastore_lock(datastore):
            queue = candidates(datastore.list_images(), datastore.get_labeled_images())
        logger.info(f"pseudo-labelling {len(queue)} images without a final label")
        stored, skipped, results = [], [], {}
        for image_id in queue:
            req = copy.deepcopy(request)
            req.update(image=image_id, save_label=False)
            out = infer(req, datastore)
            info = dict(out["params"], task=request.get("model"))
            info.pop("latencies", None)
            try:
                if save_pseudo_label(datastore, image_id, out["file"], info):
                    stored.append(image_id)
                    results[image_id] = {"confidence": info.get("confidence"), "checkpoint": info.get("checkpoint")}
                else:
                    skipped.append(image_id)
            finally:
                if out.get("file") and os.path.exists(out["file"]):
                    os.unlink(out["file"])
        logger.info(f"pseudo-labels stored for {len(stored)} images; {len(skipped)} got a final label meanwhile")
        return {"tag": PSEUDO_TAG, "labelled": stored, "skipped_final": skipped, "results": results}


def datastore_pseudos(datastore) -> tuple[dict, dict, dict]:
    """``(images, finals, pseudos)`` of a MONAI Label datastore for
    :func:`sarco_app.segmentation.pseudo.training_pairs` (read under :func:`datastore_lock`)."""
    from sarco_app.segmentation.pseudo import FINAL_TAG, PSEUDO_TAG

    with datastore_lock(datastore):
        images, finals, pseudos = {}, {}, {}
        for image_id in datastore.list_images():
            images[image_id] = datastore.get_image_uri(image_id)
            tags = datastore.get_labels_by_image_id(image_id)
            if FINAL_TAG in tags:
                finals[image_id] = datastore.get_label_uri(image_id, FINAL_TAG)
            if PSEUDO_TAG in tags:
                pseudos[image_id] = (datastore.get_label_uri(image_id, PSEUDO_TAG),
                                     datastore.get_label_info(image_id, PSEUDO_TAG))
    return images, finals, {k: v for k, v in pseudos.items() if Path(v[0]).is_file()}
