"""MONAI Label scribbles tasks ``backprojection`` and ``grabcut`` (the work is in
:mod:`sarco_app.interaction.interactive`).

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
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np

from monailabel.interfaces.tasks.infer_v2 import InferType

from sarco_app.interaction import interactive, tool_inputs
from sarco_app.errors import SarcoError, reason
from sarco_app.inputs.ingest import load_image, save_label
from sarco_app.labels import LABELS, NAMES

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
            summary = label_from_files(
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


# ---- the files MONAI Label hands over, to and from the library's canonical arrays


def _read_file_grid(path: str, image, name: str) -> np.ndarray:
    """A label/scribble NIfTI on the image's file grid, returned in canonical order."""
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise SarcoError(f"{name}: not a readable NIfTI file ({reason(exc, path)})") from None
    while data.ndim > len(image.original_shape) and data.shape[-1] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(image.original_shape):
        raise SarcoError(
            f"{name} has shape {tuple(data.shape)} but the image has shape {tuple(image.original_shape)}"
        )
    return image.from_original(np.rint(data).astype(np.int16))


def _box_to_canonical(image, roi: Sequence[float] | None, slice_index: int | None):
    """Convert a roi and slice index given in the file's voxel order to canonical indices."""
    shape = tuple(image.original_shape)
    roi_c = None
    if roi is not None and len(list(roi)) > 0:
        values = list(roi)
        x0, x1, y0, y1 = tool_inputs.parse_roi(values, shape[:2])
        box = np.zeros(shape, dtype=bool)
        if len(shape) == 3 and len(values) >= 6:
            z0, z1 = max(int(values[4]), 0), min(int(values[5]), shape[2])
            if z1 <= z0:
                raise SarcoError(f"roi z-range [{values[4]}, {values[5]}] lies outside the image")
            box[x0:x1, y0:y1, z0:z1] = True
        else:
            box[x0:x1, y0:y1, ...] = True
        idx = np.nonzero(image.from_original(box))
        roi_c = [int(idx[0].min()), int(idx[0].max()) + 1, int(idx[1].min()), int(idx[1].max()) + 1]
        if len(shape) == 3 and len(values) >= 6:
            roi_c += [int(idx[2].min()), int(idx[2].max()) + 1]
    index_c = None
    if slice_index is not None and len(shape) == 3:
        try:
            k = int(slice_index)
        except (TypeError, ValueError):
            raise SarcoError(f"slice_index must be an integer, got {slice_index!r}") from None
        if not 0 <= k < shape[2]:
            raise SarcoError(f"slice_index {k} out of range 0..{shape[2] - 1}")
        index_c = image.canonical_slice(k)
        if index_c is None:
            raise SarcoError("slice_index needs an axial image: this file's slices are not axial")
    elif slice_index not in (None, 0):
        raise SarcoError(f"slice_index {slice_index} given but the image is 2D")
    return roi_c, index_c


def label_from_files(method: str, image_path: str, output_path: str, *, tissue: str | int,
                     scribbles_path: str | None = None, current_path: str | None = None,
                     roi: Sequence[float] | None = None, slice_index: int | None = None,
                     bg_value: int = 5, fg_value: int = 6, **options) -> dict:
    """Run a tool on files the way MONAI Label hands them over; write the merged label map.

    Parameters
    ----------
    method : 'backprojection' or 'grabcut'
    image_path : CT image (NIfTI or DICOM, see :func:`sarco_app.inputs.ingest.load_image`).
    output_path : where the merged uint8 label map is written (NIfTI, the image's own grid).
    tissue : target tissue.
    scribbles_path : NIfTI on the image grid with background scribbles = ``bg_value`` and
        foreground scribbles = ``fg_value`` (MONAI Label: ``len(labels) + 1`` and ``+ 2``).
    current_path : current label map (values 0-4) on the image grid, optional.
    roi : ``[x0, x1, y0, y1(, z0, z1)]`` in the file's voxel indices (MONAI Label's order).
    slice_index : axial slice in the file's voxel order (3D images).
    options : ``bins``/``threshold`` (back-projection) or ``window``/``iterations`` (GrabCut).

    Returns a summary: tissue, slice (file order), pixels and area (cm^2) of the tissue there.
    """
    if method not in interactive.METHODS:
        raise SarcoError(f"unknown method {method!r}; use one of {sorted(interactive.METHODS)}")
    value = tool_inputs.parse_tissue(tissue)
    image = load_image(image_path)
    fg = bg = None
    if scribbles_path:
        scribbles = _read_file_grid(scribbles_path, image, "scribble label")
        fg, bg = scribbles == fg_value, scribbles == bg_value
        if not (fg.any() or bg.any()) and not (roi is not None and len(list(roi)) > 0):
            raise SarcoError(
                f"the scribble label holds no scribbles (background {bg_value}, foreground "
                f"{fg_value}) and no roi was given"
            )
    current = None
    if current_path:
        current = _read_file_grid(current_path, image, "current label")
        current = np.where((current >= 0) & (current <= max(NAMES)), current, 0).astype(np.uint8)
    roi_c, index_c = _box_to_canonical(image, roi, slice_index)
    allowed = {"backprojection": ("bins", "threshold"), "grabcut": ("window", "iterations")}[method]
    kwargs = {k: options[k] for k in allowed if options.get(k) is not None}
    label = interactive.METHODS[method](image.hu, value, roi=roi_c, fg=fg, bg=bg, current=current,
                            spacing=image.pixel_spacing, slice_index=index_c, **kwargs)
    save_label(label, image, output_path)
    if label.ndim == 3:
        changed = int(index_c) if index_c is not None else tool_inputs.resolve_slice_index(label.shape, None, roi_c, fg, bg)
        plane = label[:, :, changed]
        marker = np.zeros(label.shape, bool)
        marker[:, :, changed] = True
        file_slice = int(np.nonzero(image.to_original(marker).any(axis=(0, 1)))[0][0])
    else:
        plane, file_slice = label, 0
    pixels = int(np.count_nonzero(plane == value))
    sx, sy = image.pixel_spacing
    return {"tissue": NAMES[value], "method": method, "slice_index": file_slice,
            "pixels": pixels, "area_cm2": round(pixels * sx * sy / 100.0, 3)}
