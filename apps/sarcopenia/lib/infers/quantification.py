"""MONAI Label infer task ``quantification``: body-composition measures of a labelled scan.

Post-processing only (no network): for the request's image and either the label sent with
the request or the image's stored label (tag ``final`` by default, ``label_tag`` to choose
another), it returns the JSON of :func:`sarco_app.measurement.quantify.quantify_scan` and no label file.

Request params (all optional): ``height_cm``, ``weight_kg``, ``sex`` (M/F), ``age`` (years)
override or fill the image's patient data; ``slice`` picks the axial slice of a 3D image;
``reference`` names a T-score table (a file stem in ``sarco_app/measurement/references/`` or
``<studies>/references/``; not a path: a client must not make the server read its files);
``label_tag`` the stored label used. The label comes as an uploaded file (``label``), never as a
server path in ``params``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from monailabel.interfaces.tasks.infer_v2 import InferType

from sarco_app.errors import SarcoError

from lib.infers.common import DirectInferTask, datastore_image_id, http_error

logger = logging.getLogger(__name__)


def _is_upload(path: Any) -> bool:
    """Whether ``path`` is where MONAI Label saves an uploaded label (a temporary file)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return False
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir())


class QuantificationInfer(DirectInferTask):
    """Areas, HU statistics, indices, T-scores and cut-off flags as JSON (no label output)."""

    def __init__(self, datastore: Any = None, description: str | None = None):
        super().__init__(
            path=None,
            network=None,
            type=InferType.OTHERS,
            labels=None,
            dimension=2,
            description=description
            or "Body-composition measures (areas, HU, SMI, T-scores, Prado/Martin flags) "
            "of the stored final label or a label sent with the request; returns JSON",
            config={
                "label_tag": "final",
                "height_cm": "",
                "weight_kg": "",
                "sex": "",
                "age": "",
                "slice": "",
                "reference": "lee2022_young_adults",
            },
        )
        # The app's datastore, or a callable returning it (``MONAILabelApp.datastore``).
        self._datastore = datastore

    def is_valid(self) -> bool:
        return True  # nothing to load

    def _get_datastore(self):
        store = self._datastore
        if store is None:
            from monailabel.interfaces.utils.app import app_instance

            return app_instance().datastore()
        return store() if callable(store) else store

    def _stored_label(self, image_path: str, tag: str) -> str:
        """Path of the ``tag`` label stored for the datastore image at ``image_path``."""
        store = self._get_datastore()
        image_id = datastore_image_id(store, image_path)
        if image_id is None:
            raise http_error(400, "no label sent and the image is not in the datastore: send a label file")
        label_id = store.get_label_by_image_id(image_id, tag)
        if not label_id:
            raise http_error(404, f"image {image_id} has no {tag!r} label: save one or send a label file")
        return store.get_label_uri(label_id, tag)

    def _reference_dirs(self) -> list[Path]:
        dirs = []
        try:
            dirs.append(Path(self._get_datastore()._datastore_path) / "references")
        except Exception:  # a datastore without a local folder
            pass
        return dirs

    def __call__(self, request, callbacks: dict[Any, Callable] | None = None):
        from sarco_app.measurement.quantify import clean_json, quantify_request

        begin = time.time()
        req, image_path = self.request_with_image(request, "quantification")
        label_path = req.get("label")
        reference = str(req.get("reference") or "")
        if "/" in reference or "\\" in reference or reference.lower().endswith(".csv"):
            raise http_error(400, f"reference {reference!r}: give a table name (a CSV stem in the studies "
                             "folder's references/ or a bundled table), not a path")
        if label_path is not None and not _is_upload(label_path):
            raise http_error(400, "params 'label' cannot name a server file: upload the label file "
                             "(form field 'label') or choose a stored label with 'label_tag'")
        try:
            if label_path is None:
                label_path = self._stored_label(image_path, str(req.get("label_tag") or "final"))
            result = quantify_request(image_path, label_path, req, reference_dirs=self._reference_dirs())
        except SarcoError as exc:
            raise http_error(400, str(exc)) from exc
        result = clean_json(result)
        result["latencies"] = {"total": round(time.time() - begin, 3)}
        sma = result["indices"]["sma_cm2"]
        logger.info(f"quantification of {image_path}: SMA {'none labelled' if sma is None else f'{sma:.2f} cm²'}")
        return None, result
