"""MONAI Label scribbles tasks ``backprojection`` and ``grabcut`` (thin: the work is in
:mod:`sarco_app.interactive`).

Request (``POST /infer/<model>?image=<id>``), following MONAI Label's scribbles convention:

* ``label`` (file): scribbles on the image grid, background = ``len(labels) + 1`` = 5,
  foreground = ``len(labels) + 2`` = 6 (what Slicer's/OHIF's MONAI Label plugins send);
* ``params`` (JSON): ``tissue`` ('muscle', 'sat', 'vat', 'imat'), optional ``roi``
  ``[x0, x1, y0, y1(, z0, z1)]`` in voxel indices, ``slice_index``, and ``bins``/``threshold``
  (back-projection) or ``window``/``iterations`` (GrabCut).

The current label map comes from the datastore (tag ``final``, else ``original``); the
response is that map with the target tissue updated (it is not saved: the client saves it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

from monailabel.interfaces.tasks.infer_v2 import InferType

from sarco_app import interactive
from sarco_app.errors import SarcoError
from sarco_app.labels import LABELS

from lib.infers.common import DirectInferTask, datastore_image_id, http_error

logger = logging.getLogger(__name__)

_DESCRIPTIONS = {
    "backprojection": "HU-histogram back-projection from a rectangle or scribbles (tissue-aware)",
    "grabcut": "OpenCV GrabCut on a tissue HU window from a rectangle or scribbles (tissue-aware)",
}


class TissueScribblesInfer(DirectInferTask):
    """One of the semi-automatic tools as a MONAI Label scribbles task (2D, slice by slice)."""

    def __init__(self, method: str, datastore: Optional[Callable[[], Any]] = None):
        config: Dict[str, Any] = {"tissue": "muscle", "slice_index": None}
        config.update({"bins": None, "threshold": 0.05} if method == "backprojection"
                      else {"window": None, "iterations": 5})
        super().__init__(path=None, network=None, type=InferType.SCRIBBLES, labels=dict(LABELS),
                         dimension=2, description=_DESCRIPTIONS[method], config=config)
        self.method = method
        self._datastore = datastore  # the app's datastore getter, for the current label
        # MONAI Label's own scribbles tasks use these values for the same label list.
        self.scribbles_bg_label = len(LABELS) + 1
        self.scribbles_fg_label = len(LABELS) + 2

    def is_valid(self) -> bool:
        return True  # nothing to load

    def _current_label_path(self, image_path: str) -> Optional[str]:
        """The datastore's final (else original) label of the requested image, if any."""
        if self._datastore is None:
            return None
        store = self._datastore()
        image_id = datastore_image_id(store, image_path)
        if image_id is None:
            return None
        for tag in ("final", "original"):
            label_id = store.get_label_by_image_id(image_id, tag)
            if label_id:
                return store.get_label_uri(label_id, tag)
        return None

    def __call__(self, request, callbacks=None) -> Tuple[Optional[str], Dict[str, Any]]:
        begin = time.time()
        req = dict(self._config)
        req.update(request)
        scribbles = req.get("label")
        if isinstance(scribbles, str) and not os.path.exists(scribbles):
            # A JSON param 'label' replaces the uploaded scribble file in MONAI Label's request.
            raise http_error(400, f"params 'label'={scribbles!r} would replace the scribble file: send the "
                             "target tissue as 'tissue'")
        output = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        try:
            options = {k: req.get(k) for k in ("bins", "threshold", "window", "iterations")}
            summary = interactive.label_from_files(
                self.method, req["image"], output, tissue=req.get("tissue"),
                scribbles_path=scribbles, current_path=self._current_label_path(req["image"]),
                roi=req.get("roi"), slice_index=req.get("slice_index"),
                bg_value=self.scribbles_bg_label, fg_value=self.scribbles_fg_label, **options)
        except SarcoError as exc:
            os.unlink(output)
            raise http_error(400, str(exc)) from None
        except Exception:
            os.unlink(output)  # no temp file left behind whatever went wrong
            raise
        summary["latencies"] = {"total": round(time.time() - begin, 3)}
        summary["label_names"] = self.labels
        logger.info(f"{self.method}: {summary}")
        return output, summary
