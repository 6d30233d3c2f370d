"""Request checks in front of MONAI Label's stock endpoints that take ids, tags, paths or uploads.

The stock handlers write an upload to a temporary file before the datastore sees the id (and
leave it behind when the request fails), take the id of an upload from its file name, answer
datastore errors with 500, pass ``params`` keys such as ``image`` or ``label`` straight into the
infer request (a server path then becomes the input), and leave every dataset zip in /tmp. The
routes here replace those handlers (same paths, parameters and roles) and:

* check ids and tags (:mod:`lib.datastore`) before anything is written: 400;
* answer unknown image ids with 404, saying nothing about server files;
* refuse ``params`` keys that name files (``image``, ``label``, ``file``, ``session``) and string
  values that look like server paths: 400;
* write each upload to one temporary file that is removed on every path, success or not;
* answer datastore errors with their status (400, 404, 409) and a one-line reason;
* check training params before a training job starts: 422 naming every bad value;
* remove the dataset zip once it is sent.

:func:`install_guard` puts these routes in front of the stock ones (the first match wins).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import RBAC_ADMIN, RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints import train as stock_train
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file
from starlette.background import BackgroundTask

from sarco_app.errors import SarcoError

from lib.datastore import (
    DatastoreError,
    HardenedDatastore,
    UnknownImageError,
    check_id,
    check_tag,
    split_extension,
)
from lib.infers.common import as_bool
from lib.routes import include_in_front

logger = logging.getLogger(__name__)

#: ``params`` keys that MONAI Label copies into the infer request as file paths.
PATH_KEYS = ("image", "label", "file", "session", "session_id")

# The stock routes' roles, so that MONAI Label's auth applies to these routes unchanged.
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
USER = settings.MONAI_LABEL_AUTH_ROLE_USER

router = APIRouter()


def _store():
    return app_instance().datastore()


def _http(exc: SarcoError) -> HTTPException:
    return HTTPException(status_code=getattr(exc, "status", 400), detail=str(exc))


def parse_params(text: Optional[str], what: str = "params") -> Dict[str, Any]:
    """A form field of JSON as a dict (``DatastoreError`` for bad JSON or another type)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DatastoreError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DatastoreError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def looks_like_path(value: str) -> bool:
    """Whether a string param could name a server file: absolute, home-relative, a URL, a
    NUL, or a '..' segment."""
    if value.startswith(("/", "~", "\\")) or "\x00" in value or "://" in value:
        return True
    return ".." in value.replace("\\", "/").split("/")


def check_infer_params(params: Dict[str, Any]) -> None:
    """``DatastoreError`` for infer params that would make the server read its own files or
    write a final label."""
    if "label" in params:
        raise DatastoreError("params 'label' cannot name a server file: upload the label (form field 'label'); "
                             "the tissue to edit is 'tissue', a stored label is chosen with 'label_tag'")
    for key in PATH_KEYS:
        if key in params:
            raise DatastoreError(f"params may not set {key!r}: give the image as a datastore id (image=...) "
                                 "or an uploaded file")
    if "label_tag" in params:
        tag = check_tag(params["label_tag"])
        if as_bool(params.get("save_label", False)) and tag == DefaultLabelTag.FINAL.value:
            raise DatastoreError("inference never writes final labels: final labels come from annotators")

    def walk(value: Any, key: str) -> None:
        if isinstance(value, str) and looks_like_path(value):
            raise DatastoreError(f"params {key!r}: {value[:80]!r} looks like a server path; give a name or a "
                                 "value, not a path (files are uploads)")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)

    walk(params, "")


@contextmanager
def upload_to_temp(upload: UploadFile, suffix: str) -> Iterator[str]:
    """The upload copied to a temporary file, removed when the block ends, whatever happens."""
    fd, path = tempfile.mkstemp(prefix="sarco-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(upload.file, fh)
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _upload_name(upload: UploadFile) -> str:
    """The upload's file name without folders ('upload.nii.gz' when the client sent none)."""
    return os.path.basename((upload.filename or "").replace("\\", "/")) or "upload.nii.gz"


# --- datastore -----------------------------------------------------------------------------
@router.put("/datastore/", include_in_schema=False, deprecated=True)
@router.put("/datastore/image", summary=f"{RBAC_ANNOTATOR}Upload new Image (checked id; 409 for a labelled id "
            "unless replace=true)")
def add_image(
    image: Optional[str] = None,
    params: str = Form("{}"),
    replace: bool = False,
    file: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    store = _store()
    try:
        info = parse_params(params)
        stem, ext = split_extension(_upload_name(file))
        image_id = check_id(image if image else stem)
        replace = replace or as_bool(info.pop("replace", False))
        store.check_upload(image_id, replace)
        if user and user.username:
            info["user"] = user.username
        info["replace"] = replace
        with upload_to_temp(file, ext) as path:
            image_id = store.add_image(image_id, path, info)
    except SarcoError as exc:
        raise _http(exc) from None
    result: Dict[str, Any] = {"image": image_id}
    moved = store.get_image_info(image_id).get("replaced") if replace else None
    if moved:
        result["replaced"] = moved
    return result


@router.delete("/datastore/", include_in_schema=False, deprecated=True)
@router.delete("/datastore/image", summary=f"{RBAC_ADMIN}Remove Image and corresponding labels")
def remove_image(id: str, user: User = Depends(RBAC(ADMIN))):
    try:
        _store().remove_image(check_id(id))
    except SarcoError as exc:
        raise _http(exc) from None
    return {}


@router.put("/datastore/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label (checked against its image)")
def save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    instance = app_instance()
    store = instance.datastore()
    try:
        check_id(image)
        tag = check_tag(tag or DefaultLabelTag.FINAL.value)
        info = parse_params(params)
        name = _upload_name(label)
        if name.lower().endswith(".bin") and not isinstance(store, HardenedDatastore):
            ext = ".bin"  # OHIF's raw labelmap: the DICOMweb datastore maps it onto the series (lib/dicomweb.py)
        else:
            _, ext = split_extension(name)
        if not store.get_image_uri(image):
            raise UnknownImageError(f"image {image} not found")
        with upload_to_temp(label, ext) as path:
            label_id = store.save_label(image, path, tag, info)
    except SarcoError as exc:
        raise _http(exc) from None
    result = instance.on_save_label(image, label_id) or {}
    result.update({"image": image, "label": label_id})
    return result


@router.delete("/datastore/label", summary=f"{RBAC_ADMIN}Remove Label")
def remove_label(id: str, tag: str, user: User = Depends(RBAC(ADMIN))):
    try:
        _store().remove_label(check_id(id), check_tag(tag))
    except SarcoError as exc:
        raise _http(exc) from None
    return {}


@router.put("/datastore/image/info", summary=f"{RBAC_ANNOTATOR}Update Image Info")
def update_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    try:
        values = parse_params(info, "info")
        if user and user.username:
            values["user"] = user.username
        return _store().update_image_info(check_id(image), values)
    except SarcoError as exc:
        raise _http(exc) from None


def _update_label_info(label: str, tag: str, text: str, user: User, what: str):
    try:
        values = parse_params(text, what)
        if user and user.username:
            values["user"] = user.username
        return _store().update_label_info(check_id(label), check_tag(tag), values)
    except SarcoError as exc:
        raise _http(exc) from None


@router.put("/datastore/label/info", summary=f"{RBAC_ANNOTATOR}Update Label Info")
def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    return _update_label_info(label, tag, info, user, "info")


@router.put("/datastore/updatelabelinfo", include_in_schema=False, deprecated=True)
def update_label_info_old(label: str, tag: str, params: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    return _update_label_info(label, tag, params, user, "params")


@router.get("/datastore/dataset", summary=f"{RBAC_ANNOTATOR}Download full dataset as ZIP archive")
def download_dataset(limit_cases: Optional[int] = None, user: User = Depends(RBAC(ANNOTATOR))):
    try:
        path = _store().get_dataset_archive(limit_cases)
    except SarcoError as exc:
        raise _http(exc) from None
    # The zip is built for this answer only: remove it once it is sent.
    return FileResponse(path, media_type="application/zip", filename="dataset.zip",
                        background=BackgroundTask(remove_file, path))


# --- inference -------------------------------------------------------------------------------
@router.post("/infer/{model}", summary=f"{RBAC_USER}Run Inference for supported model (datastore ids or "
             "uploads only)")
def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(USER)),
):
    try:
        check_infer_params(parse_params(params))
        if image:
            check_id(image)
            if not file and not _store().get_image_uri(image):
                raise UnknownImageError(f"image {image} not found")
        elif not file and not session_id:
            raise DatastoreError("send an image id (image=...), an image file or a session id")
    except SarcoError as exc:
        raise _http(exc) from None
    converted = None
    try:
        if label is not None and _upload_name(label).lower().endswith(".bin"):
            converted = scribbles_from_binary(label, image)
            label = UploadFile(file=open(converted, "rb"), filename="scribbles.nii.gz")
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except SarcoError as exc:
        _run_removals(background_tasks)
        raise _http(exc) from None
    except BaseException:
        _run_removals(background_tasks)
        raise
    finally:
        if converted is not None:
            label.file.close()
            os.unlink(converted)


def _run_removals(background_tasks: BackgroundTasks) -> None:
    # The stock handler removes its temporary upload copies only after a successful answer.
    for task in background_tasks.tasks:
        if task.func is remove_file:
            task.func(*task.args, **task.kwargs)


def scribbles_from_binary(upload: UploadFile, image_id: str) -> str:
    """OHIF's raw scribbles (one uint8 per voxel of the image, Fortran order) as a NIfTI on the
    image's grid, in a temporary file the caller removes. Replaces the stock conversion, which
    left its output behind and answered a wrong size with 500."""
    import nibabel as nib
    import numpy as np

    if not image_id:
        raise DatastoreError("binary scribbles (.bin) need the image they were drawn on (image=...)")
    image_path = _store().get_image_uri(image_id)
    if not image_path:
        raise UnknownImageError(f"image {image_id} not found")
    image = nib.load(image_path)
    voxels = int(np.prod(image.shape))
    data = upload.file.read(voxels + 1)
    if len(data) != voxels:
        raise DatastoreError(f"binary scribbles hold {len(data) if len(data) <= voxels else 'more than ' + str(voxels)}"
                             f" bytes; the image has {voxels} voxels (one uint8 each)")
    scribbles = np.frombuffer(data, np.uint8).reshape(image.shape, order="F")
    fd, path = tempfile.mkstemp(prefix="sarco-scribbles-", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(scribbles, image.affine), path)
    except BaseException:
        os.unlink(path)
        raise
    return path


@router.post("/batch/infer/{model}", summary=f"{RBAC_ADMIN}Run Batch Inference Task (checked label tag)")
def batch_infer(
    model: str,
    images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(ADMIN)),
):
    from monailabel.endpoints.batch_infer import run

    if params is None:  # the stock defaults, used when no body is sent
        params = {"device": "cuda", "multi_gpu": True, "gpus": "all", "logging": "WARNING", "save_label": True,
                  "label_tag": DefaultLabelTag.ORIGINAL.value, "max_workers": 1, "max_batch_size": 0}
    try:
        tag = check_tag(params.get("label_tag", DefaultLabelTag.ORIGINAL.value))
        if as_bool(params.get("save_label", True)) and tag == DefaultLabelTag.FINAL.value:
            # Checked here too: the batch task's own refusal happens in the background, after a 200.
            raise DatastoreError("batch inference never writes final labels: final labels come from annotators")
        for key in PATH_KEYS:
            if key in params:
                raise DatastoreError(f"params may not set {key!r}: batch inference runs on the datastore's images")
    except SarcoError as exc:
        raise _http(exc) from None
    return run(model, images, params, run_sync)


# --- training --------------------------------------------------------------------------------
def check_train_request(model: str, params: Optional[dict]) -> None:
    """Check a training request in the server process, so bad params get a 422 naming every
    problem at once instead of a background job that starts a process only to fail (trainers
    without a ``check_request`` method, and unknown models, are left to the stock handler)."""
    trainer = getattr(app_instance(), "_trainers", {}).get(model)
    check = getattr(trainer, "check_request", None)
    if check is None:
        return
    try:
        check(dict(params or {}))
    except SarcoError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


@router.post("/train/{model}", summary=f"{RBAC_ADMIN} Run Training Task for specific model (params checked first)")
async def train_model(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = Depends(RBAC(ADMIN)),
):
    check_train_request(model, params)
    return stock_train.run_model(model, params, run_sync, enqueue)


@router.post("/infer/wsi/{model}", include_in_schema=False)
@router.post("/infer/wsi_v2/{model}", include_in_schema=False)
def infer_wsi(model: str):
    # Whole-slide inference takes server paths and is meaningless for CT.
    raise HTTPException(status_code=404, detail="whole-slide inference is not offered by this app")


def install_guard(app) -> None:
    """Put this module's routes in front of MONAI Label's own on the FastAPI ``app``."""
    added = include_in_front(app, router, prefix=settings.MONAI_LABEL_API_STR)
    logger.info(f"request guard in front of {added} stock routes")
