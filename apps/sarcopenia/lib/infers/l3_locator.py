"""MONAI Label infer task ``l3_locator``: the axial slice at the middle of L3 in a 3D image.

Loads the request's image with :func:`sarco_app.inputs.ingest.load_image`, runs
:func:`sarco_app.spine.l3.locate_l3` and returns

* a uint8 label NIfTI on the image file's own grid (shape, voxel order and affine) with value 1
  on every voxel of the L3 slice (all zeros when L3 is not in the field of view), and
* JSON: ``slice_index`` (file voxel order), ``canonical_slice_index`` (axis 2 toward superior),
  ``z_mm``, ``confidence``, ``reason``, ``found``, the level z ranges and, unless the request
  says ``"views": false``, ``views_png_base64``: the sagittal + coronal reconstruction with the
  L3 level drawn (PNG bytes, base64).

A 2D image or an unreadable file is answered with HTTP 400.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import time
from typing import Any, Callable

from monailabel.interfaces.tasks.infer_v2 import InferType

from sarco_app.errors import SarcoError

from lib.infers.common import DirectInferTask, as_bool, http_error

logger = logging.getLogger(__name__)


class L3LocatorInfer(DirectInferTask):
    """Find the L3 slice of a 3D CT (vertebra counting; no network, no download)."""

    def __init__(self, description: str | None = None):
        super().__init__(
            path=None,
            network=None,
            type=InferType.OTHERS,
            labels={"l3_slice": 1},
            dimension=3,
            description=description
            or "Find the axial slice at the middle of the L3 vertebral body (iliac crests and "
            "last ribs anchor a vertebra count); JSON with slice index and z, label marking the slice",
            config={"views": True},
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request, callbacks: dict[Any, Callable] | None = None):
        import cv2
        import numpy as np

        from sarco_app.spine.l3 import answer_json
        from sarco_app.inputs.ingest import load_image, save_label
        from sarco_app.spine.l3 import locate_l3

        begin = time.time()
        req, image_path = self.request_with_image(request, "l3_locator")
        try:
            image = load_image(image_path)
            if image.hu.ndim != 3 or image.num_slices < 3:
                raise SarcoError(f"l3_locator needs a 3D image; this one has shape {image.hu.shape}")
            result = locate_l3(image)
        except SarcoError as exc:
            raise http_error(400, str(exc)) from exc
        label = np.zeros(image.hu.shape, dtype=np.uint8)
        if result.found:
            label[:, :, result.slice_index] = 1
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        save_label(label, image, out)
        answer = answer_json(image, result, source=os.path.basename(image_path))
        if as_bool(req.get("views", True)):
            from sarco_app.figures.views import render_l3_views

            ok, png = cv2.imencode(".png", render_l3_views(image, result))
            if ok:
                answer["views_png_base64"] = base64.b64encode(png.tobytes()).decode("ascii")
        answer["latencies"] = {"total": round(time.time() - begin, 3)}
        logger.info(f"l3_locator on {image_path}: {answer['slice_index']} ({result.reason})")
        return out, answer
