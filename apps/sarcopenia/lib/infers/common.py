"""What the sarco infer tasks share: a task base that calls ``sarco_app`` directly (no MONAI
transform pipeline) and the HTTP errors users see."""

from __future__ import annotations

import copy
import os
from typing import Any

from fastapi import HTTPException
from monailabel.tasks.infer.basic_infer import BasicInferTask


def http_error(status: int, message: str) -> HTTPException:
    """An error FastAPI answers with ``status`` and ``{"detail": message}``."""
    return HTTPException(status_code=status, detail=message)


def as_bool(value: Any) -> bool:
    """A request flag given as a bool or as text ('true', '1', 'yes', 'on')."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class DirectInferTask(BasicInferTask):
    """An infer task whose ``__call__`` runs the library itself: no pre/post transforms."""

    def pre_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return []

    def request_with_image(self, request: dict, task_name: str) -> tuple[dict, str]:
        """The task's config overlaid with ``request``, and the path of the request's image
        (HTTP 400 when there is none)."""
        req = copy.deepcopy(self._config)
        req.update(request)
        image_path = req.get("image")
        if not isinstance(image_path, str) or not os.path.exists(image_path):
            raise http_error(400, f"{task_name} needs an image from the datastore or an uploaded file")
        return req, image_path


def write_label_result(label: Any, image: Any, request: dict) -> str:
    """A temporary label file on the image's own grid in the format the client asked for:
    NRRD when ``result_extension`` is ``.nrrd`` (OHIF's MONAI Label panel; ``result_compress``
    false gives raw voxels), else NIfTI."""
    import tempfile

    from sarco_app.inputs.ingest import save_label, save_label_nrrd

    if str(request.get("result_extension") or "").lower() == ".nrrd":
        out = tempfile.NamedTemporaryFile(suffix=".nrrd", delete=False).name
        save_label_nrrd(label, image, out, compress=as_bool(request.get("result_compress", True)))
        return out
    out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
    save_label(label, image, out)
    return out


def datastore_image_id(store: Any, image_path: str) -> str | None:
    """The id of the datastore image stored at ``image_path`` (None for an uploaded file)."""
    wanted = os.path.realpath(image_path)
    for image_id in store.list_images():
        try:
            if os.path.realpath(store.get_image_uri(image_id)) == wanted:
                return image_id
        except Exception:  # an image the datastore cannot resolve is not ours
            continue
    return None
