"""Bounded inputs and a responsive event loop for MONAI Label's FastAPI app.

MONAI Label's stock endpoints are ``async def`` functions that call blocking code directly, so
while one inference runs the whole server waits (``/info/`` was blocked for seconds), and they
copy any upload whole to disk and decompress it without looking at its size. :func:`install`
changes that, at server start:

* **Request size.** A body larger than ``max_upload_mb`` is refused with 413 from its
  ``Content-Length`` before a byte of it is read (a body sent without one is counted as it
  streams in and cut off at the limit).
* **Image size.** Every uploaded file (infer ``file`` / ``label``, datastore image and label,
  sessions) and the datastore image an infer names are checked from their headers
  (:mod:`sarco_app.inputs.limits`): unpacked pixel data over ``max_decompressed_mb``, or a slice over
  ``max_matrix`` pixels along either axis, gives 413; a gzip stream that is not NIfTI gives 400.
* **Inference off the event loop.** ``POST /infer/{model}`` runs in worker threads, at most
  ``infer_workers`` at a time (default: half the CPU cores, at least one), so ``/info/`` and
  the datastore answer while inferences run and queued ones wait their turn instead of
  competing for the same cores.

Settings (``--conf key value`` or ``SARCO_<KEY>``): ``max_upload_mb`` (default 512),
``max_decompressed_mb`` (1024), ``max_matrix`` (2048), ``infer_workers``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from typing import Any, Callable

import anyio
from fastapi import HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from sarco_app.errors import SarcoError
from sarco_app.inputs.limits import MIB, InputLimits, InputTooLarge, check_image_file, check_image_path

from lib.routes import api_routes, put_in_front

logger = logging.getLogger(__name__)


def limits_from_config(get: Callable[[str, str], str]) -> tuple[InputLimits, int]:
    """(:class:`InputLimits`, inference workers) from the app's settings getter."""
    def number(key: str, default: str) -> int:
        value = get(key, default)
        try:
            return int(float(value))
        except (TypeError, ValueError):
            raise SarcoError(f"setting {key} must be a number, not {value!r}") from None

    limits = InputLimits(
        max_upload_bytes=number("max_upload_mb", "512") * MIB,
        max_decompressed_bytes=number("max_decompressed_mb", "1024") * MIB,
        max_matrix=number("max_matrix", "2048"),
    )
    workers = number("infer_workers", str(max(1, (os.cpu_count() or 2) // 2)))
    if workers < 1:
        raise SarcoError(f"setting infer_workers must be >= 1, not {workers}")
    return limits, workers


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, decided from
    ``Content-Length`` when the client sends one, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"request body exceeds the upload limit of {self.max_bytes / MIB:.0f} MiB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await _send_json(send, 400, "invalid Content-Length header")
            if length > self.max_bytes:
                return await _send_json(send, 413, self._too_large())
        received = 0
        exceeded = False
        started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # the body parser's own error answer is replaced by our 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await _send_json(send, 413, self._too_large())


def _upload_params(endpoint: Callable) -> list[str]:
    """Names of an endpoint's parameters that receive uploaded files."""
    names = []
    for name, param in inspect.signature(endpoint).parameters.items():
        text = str(param.annotation)
        if param.annotation is UploadFile or "UploadFile" in text:
            names.append(name)
    return names


def _check_uploads(kwargs: dict[str, Any], names: list[str], limits: InputLimits) -> None:
    """Raise HTTP 413/400 for an uploaded file over ``limits`` (headers only)."""
    for name in names:
        value = kwargs.get(name)
        for upload in value if isinstance(value, list) else [value]:
            if upload is None or not hasattr(upload, "file"):
                continue
            try:
                check_image_file(upload.file, limits, f"{name} {upload.filename or ''}".strip())
            except InputTooLarge as exc:
                raise HTTPException(status_code=413, detail=str(exc)) from None
            except SarcoError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None


def _check_datastore_image(image_id: str, limits: InputLimits) -> None:
    """413 when the datastore image an infer names is over the limits (its header only)."""
    from monailabel.interfaces.utils.app import app_instance

    if not image_id:
        return
    try:
        path = app_instance().datastore().get_image_uri(image_id)
    except Exception:  # an unknown id is the infer task's to report
        return
    if not path or not os.path.exists(path):
        return
    try:
        check_image_path(path, limits, f"image {image_id}")
    except InputTooLarge as exc:
        raise HTTPException(status_code=413, detail=str(exc)) from None
    except SarcoError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _checked_endpoint(endpoint: Callable, names: list[str], limits: InputLimits) -> Callable:
    @functools.wraps(endpoint)
    async def checked(**kwargs):
        await run_in_threadpool(_check_uploads, kwargs, names, limits)
        if inspect.iscoroutinefunction(endpoint):
            return await endpoint(**kwargs)
        # The request guard's routes (lib/guard.py) are plain functions: off the event loop too.
        return await run_in_threadpool(functools.partial(endpoint, **kwargs))

    return checked


def _offloaded_infer(names: list[str], limits: InputLimits, workers: int, endpoint: Callable) -> Callable:
    """``POST /infer/{model}`` checked, then run in a worker thread (at most ``workers`` at a
    time) instead of on the event loop: the request guard's endpoint when it is in front
    (lib/guard.py, a plain function), else MONAI Label's own ``run_inference``."""
    from monailabel.endpoints import infer as infer_module

    limiter: dict[str, anyio.CapacityLimiter] = {}

    @functools.wraps(endpoint)
    async def infer(**kwargs):
        def check():
            _check_uploads(kwargs, names, limits)
            if not kwargs.get("file"):
                _check_datastore_image(kwargs.get("image") or "", limits)

        await run_in_threadpool(check)
        if "pool" not in limiter:  # created on the event loop, at the first request
            limiter["pool"] = anyio.CapacityLimiter(workers)
        if inspect.iscoroutinefunction(endpoint):  # the stock route: its blocking body, unwrapped
            args = {k: v for k, v in kwargs.items() if k != "user"}
            call = functools.partial(infer_module.run_inference, **args)
        else:
            call = functools.partial(endpoint, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=limiter["pool"])

    return infer


def install(app, get: Callable[[str, str], str]) -> InputLimits:
    """Add the request-size middleware, header checks on every upload route, and inference in
    worker threads to MONAI Label's FastAPI ``app`` (called once, at server start)."""
    limits, workers = limits_from_config(get)
    seen = set()
    for path, route in list(api_routes(app)):
        names = _upload_params(route.endpoint)
        key = (path, tuple(sorted(route.methods)))
        if key in seen:  # only the first route of a path answers (e.g. the request guard's)
            continue
        seen.add(key)
        if not names:
            continue
        if path == "/infer/{model}" and "POST" in route.methods:
            put_in_front(app, path, route, _offloaded_infer(names, limits, workers, route.endpoint))
        else:
            put_in_front(app, path, route, _checked_endpoint(route.endpoint, names, limits))
    app.user_middleware.insert(0, Middleware(BodySizeLimit, max_bytes=limits.max_upload_bytes))
    logger.info(f"input limits: upload {limits.max_upload_bytes // MIB} MiB, unpacked "
                f"{limits.max_decompressed_bytes // MIB} MiB, matrix {limits.max_matrix}; {workers} infer worker(s)")
    return limits
