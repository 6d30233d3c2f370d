"""MONAI Label infer tasks ``bodycomp_unet`` and ``bodycomp_threshold``: automatic muscle, SAT,
VAT and IMAT labels (the paper's "Sarcopenia Predict" button).

Both load the request's image with :func:`sarco_app.inputs.ingest.load_image` (NIfTI file or DICOM
series folder), label it with :func:`sarco_app.segmentation.segment.segment_image` and return a uint8 NIfTI
on the image file's own grid (same shape, voxel order and affine), plus JSON.

Request params (all optional):

* ``slice_index`` - canonical axial slice (axis 2 toward superior, as everywhere in sarco);
  default: L3 found by :func:`sarco_app.spine.l3.locate_l3`, else the middle slice
  (:func:`sarco_app.spine.l3.choose_slice`);
* ``all_slices`` - label every slice (bool);
* ``hu_refine`` - apply the HU rule to the network's regions (``bodycomp_unet`` only; default
  true, false gives the raw network labels: the backbone with its split head, if it has one);
* ``device`` - ``auto`` (default: CUDA when the server has a GPU), ``cpu``, ``cuda`` or ``cuda:N``.
* ``result_extension`` - ``.nrrd`` returns the label as NRRD (what OHIF's MONAI Label panel
  reads; ``result_compress`` false: raw voxels), default NIfTI.

The JSON has ``slices`` (canonical), ``file_slices``, ``confidence`` (mean probability per
tissue, ``bodycomp_unet`` only), ``model`` (checkpoint path), ``method`` and ``slice_source``.

``bodycomp_unet`` uses the app's retrained checkpoint (``<model_dir>/bodycomp_unet.pt``) when
it exists, else the shipped ``models/bodycomp_unet.pt``; the checkpoint is reloaded whenever its
file changes, so a model written by the trainer is used without a restart.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from monailabel.interfaces.tasks.infer_v2 import InferType

from sarco_app.errors import SarcoError
from sarco_app.labels import LABELS

from lib.infers.common import DirectInferTask, as_bool, http_error, write_label_result

logger = logging.getLogger(__name__)


class BodyCompInfer(DirectInferTask):
    """Automatic body-composition label of one slice (default) or all slices."""

    def __init__(
        self,
        method: str = "unet",
        model_paths: Sequence[Path] | Callable[[], Sequence[Path]] = (),
        description: str | None = None,
    ):
        self.method = method
        self._model_paths = model_paths
        # One torch thread: on a busy 2-core CPU, OpenMP threads that wait for each other make a
        # 512x512 slice ~10x slower (scripts/bench_infer.py); SARCO_INFER_THREADS overrides.
        self.threads = int(os.environ.get("SARCO_INFER_THREADS", "1") or 1)
        default_description = (
            "2D U-Net body composition (muscle, SAT, VAT, IMAT) on L3 or a chosen slice"
            if method == "unet"
            else "Rule-based body composition: HU thresholds with body contour and abdominal-wall "
            "geometry (classical baseline and pseudo-labeller)"
        )
        config: dict[str, Any] = {"slice_index": "", "all_slices": False}
        if method == "unet":
            config["hu_refine"] = True
            config["device"] = "auto"  # CUDA when the server has a GPU
        super().__init__(
            path=None,
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=2,
            description=description or default_description,
            config=config,
        )

    def _existing_models(self) -> list[Path]:
        """The configured checkpoint candidates that exist, preferred first."""
        paths = self._model_paths() if callable(self._model_paths) else self._model_paths
        return [Path(p) for p in paths if Path(p).is_file()]

    def model_path(self) -> Path | None:
        """The first existing checkpoint of the configured candidates."""
        existing = self._existing_models()
        return existing[0] if existing else None

    def _load_model(self) -> tuple[Any, list[str]]:
        """The first readable checkpoint of the candidates, and a warning for each damaged one
        skipped (a retrained checkpoint that cannot be read falls back to the shipped model)."""
        from sarco_app.segmentation.network import first_readable_model
        from sarco_app.segmentation.segment import get_model

        existing = self._existing_models()
        if not existing:
            raise http_error(503, "no body-composition model found: train one or ship models/bodycomp_unet.pt")
        model, warnings = first_readable_model(existing, load=get_model)  # get_model caches
        for message in warnings:
            logger.warning(f"skipping model {message}")
        if model is None:
            raise http_error(500, "no readable body-composition model: " + "; ".join(warnings))
        return model, warnings

    def is_valid(self) -> bool:
        return self.method == "threshold" or self.model_path() is not None

    def _slices(self, image, req: dict) -> tuple[Any, str]:
        if image.hu.ndim == 2:
            return 0, "2d"
        if as_bool(req.get("all_slices", False)):
            return "all", "all_slices"
        from sarco_app.spine.l3 import choose_slice

        choice = choose_slice(image, req.get("slice_index", ""))  # request, else L3, else middle
        return choice.index, choice.source

    def __call__(self, request, callbacks: dict[Any, Callable] | None = None):
        from sarco_app.inputs.ingest import load_image
        from sarco_app.segmentation.segment import segment_image

        begin = time.time()
        req, image_path = self.request_with_image(request, f"bodycomp_{self.method}")
        model, warnings = None, []
        if self.method == "unet":
            model, warnings = self._load_model()
        try:
            image = load_image(image_path)
            slices, source = self._slices(image, req)
            t0 = time.time()
            result = segment_image(
                image, slices, method=self.method, model=model, hu_refine=as_bool(req.get("hu_refine", True)),
                device=req.get("device", "auto"),
                threads=self.threads,
            )
            t_segment = time.time() - t0
        except SarcoError as exc:
            raise http_error(400, str(exc)) from exc
        out = write_label_result(result.label, image, req)
        file_slices = result.slices
        if image.hu.ndim == 3:
            from sarco_app.spine.l3 import file_slice_index

            file_slices = [file_slice_index(image, k) for k in result.slices]
        counts = {name: int((result.label == value).sum()) for name, value in LABELS.items()}
        result_json = {
            "method": self.method,
            "model": result.model_path,
            "slices": result.slices,
            "file_slices": file_slices,
            "slice_source": source,
            "confidence": result.confidence,
            "pixels": counts,
            "label_names": dict(LABELS),
            "latencies": {"segment": round(t_segment, 3), "total": round(time.time() - begin, 3)},
        }
        if warnings:
            result_json["warnings"] = [f"{w}; used the next model" for w in warnings]
        if not any(counts.values()):
            # An empty label is an answer to check, not a result: say so in the JSON.
            result_json.setdefault("warnings", []).append(
                f"no tissue found on slice(s) {result.slices[:5]}: is this an abdominal CT slice in HU?")
        logger.info(f"bodycomp_{self.method} on {image_path}: slices {result.slices[:5]} ({source})")
        return out, result_json
