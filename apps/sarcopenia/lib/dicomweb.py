"""The DICOMweb datastore of the app (``--studies http://.../dicom-web``): MONAI Label's, with
labels stored as DICOM SEG written by :mod:`sarco_app.inputs.dicom_seg` (highdicom) instead of dcmqi.

* Images: a CT series fetched over WADO-RS into the cache, converted to NIfTI by
  :mod:`sarco_app.inputs.ingest` (HU, canonical geometry, patient data sidecar) - the same grid every
  sarco task and label uses.
* ``save_label`` (tag ``final``): the label (NIfTI on the image's grid, or the raw ``label.bin``
  OHIF sends) becomes a SEG with one segment per tissue referencing the series, stored with
  STOW-RS. Its UIDs derive from the series, so saving again replaces that SEG and nothing else.
  Other tags stay in the local cache.
* A SEG already in the PACS that references a series is read as that series' ``final`` label
  (``get_label_uri``); one that references another series is refused.

Errors (PACS unreachable, a series without pixel data, a label of the wrong shape, a SEG of
another series) answer HTTP 4xx/502 with a one-line message that is also logged.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

from sarco_app.inputs import dicom_seg, ingest
from sarco_app.errors import SarcoError
from sarco_app.measurement.quantify import check_label, load_label

logger = logging.getLogger(__name__)

#: A DICOM UID: digits and dots, at most 64 characters. Image ids are series UIDs; checking
#: them keeps ids out of cache paths they do not belong to.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _fail(status: int, message: str) -> HTTPException:
    logger.error(message)
    return HTTPException(status_code=status, detail=message)


def check_uid(value: str, what: str = "image id") -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise _fail(400, f"{what} {value!r} is not a DICOM series UID")
    return value


def model_name(label_info: Dict[str, Any] | None) -> Optional[str]:
    """The model a client says made the label (``params={"model": ...}``), fit for the SEG's
    AlgorithmName (LO: 64 characters); ``None`` for a manual label."""
    name = str((label_info or {}).get("model") or "").strip()
    return name[:64] or None


class SarcoDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with sarco's ingest and highdicom SEG (no dcmqi)."""

    def __init__(self, client, *args, **kwargs):
        # dicomweb-client retries every failed request 5 times with exponential back-off (about
        # 30 s when the PACS is down); one quick retry lets the user see the error at once.
        client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=100)
        super().__init__(client, *args, **kwargs)

    def _pacs_call(self, what: str, call, *args, **kwargs):
        """``call(*args)``; a PACS that cannot be reached or refuses answers 502."""
        try:
            return call(*args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            raise _fail(502, f"PACS {self._client.base_url} unreachable ({what}): {type(exc).__name__}") from exc
        except requests.exceptions.HTTPError as exc:
            status = getattr(exc.response, "status_code", "?")
            raise _fail(502, f"PACS {self._client.base_url} answered HTTP {status} ({what})") from exc
        except IndexError as exc:  # MONAI Label's series lookup finds nothing
            raise _fail(404, f"PACS {self._client.base_url} has no such series ({what})") from exc

    def list_images(self) -> List[str]:
        return self._pacs_call("list series", super().list_images)

    def _series_dir(self, image_id: str) -> str:
        """The series' DICOM files in the cache, fetched from the PACS when missing."""
        check_uid(image_id)
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        if not os.path.isdir(image_dir) or not os.listdir(image_dir):
            self._pacs_call(f"fetch series {image_id}", dicom_web_download_series, None, image_id, image_dir,
                            self._client, self._fetch_by_frame)
        return image_dir

    def _load_series(self, image_id: str) -> tuple[str, ingest.CTImage]:
        image_dir = self._series_dir(image_id)
        try:
            return image_dir, ingest.load_dicom(image_dir)
        except SarcoError as exc:
            raise _fail(400, f"series {image_id}: {exc}") from exc

    def get_image_uri(self, image_id: str) -> str:
        check_uid(image_id)
        image_nii = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if self._convert_to_nifti and os.path.exists(image_nii):
            return image_nii
        image_dir, image = self._load_series(image_id)
        if not self._convert_to_nifti:
            return image_dir
        if not os.path.exists(image_nii):
            with tempfile.TemporaryDirectory() as tmp:
                written = ingest.save_image(image, Path(tmp) / f"{image_id}.nii.gz")
                LocalDatastore.add_image(self, image_id, str(written), self._pacs_call(
                    "series info", self._dicom_info, image_id))
                sidecar = ingest.sidecar_path(written)
                if sidecar.exists():  # patient data (sex, age, height, weight) for quantification
                    sidecar.replace(ingest.sidecar_path(image_nii))
        return image_nii

    def _label_array(self, image: ingest.CTImage, label_filename: str, label_info: Dict[str, Any]) -> np.ndarray:
        """The canonical label of a saved file: a NIfTI on the image's grid, or OHIF's raw
        ``label.bin`` (uint8, the series' voxels with columns fastest, then rows, then slices).

        A client whose values are its own segment indices says so in ``label_info``
        (``[{"name": "muscle", "idx": 2}, ...]``, MONAI Label's convention): they are mapped to
        sarco's values by name.
        """
        if label_filename.endswith(".bin"):
            raw = np.fromfile(label_filename, dtype=np.uint8)
            shape = tuple(image.original_shape or image.hu.shape)
            if raw.size != int(np.prod(shape)):
                raise SarcoError(f"label has {raw.size} voxels but the series has {int(np.prod(shape))} {shape}")
            data = image.from_original(raw.reshape(shape, order="F"))
        else:
            data = load_label(label_filename, image, max_value=255)
        segments = (label_info or {}).get("label_info")
        if segments:
            from sarco_app.labels import LABELS

            mapped = np.zeros(data.shape, dtype=np.uint8)
            for item in segments:
                name = str(item.get("name", "")).strip().lower()
                if name not in LABELS:
                    raise SarcoError(f"segment {item.get('name')!r} is not one of {', '.join(LABELS)}")
                mapped[data == int(item["idx"])] = LABELS[name]
            data = mapped
        return check_label(data)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        image_dir, image = self._load_series(image_id)
        self.get_image_uri(image_id)  # registers the image in the cache, which LocalDatastore.save_label needs
        try:
            label = self._label_array(image, label_filename, label_info)
        except SarcoError as exc:
            raise _fail(400, f"label for series {image_id}: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp:
            label_nii = str(ingest.save_label(label, image, Path(tmp) / f"{image_id}.nii.gz"))
            if label_tag == DefaultLabelTag.FINAL:
                try:
                    seg = dicom_seg.build_seg(dicom_seg.series_datasets(image_dir, image), image, label,
                                              tag=label_tag, algorithm=model_name(label_info))
                except SarcoError as exc:
                    raise _fail(400, f"label for series {image_id}: {exc}") from exc
                self._pacs_call(f"store SEG of {image_id}", self._client.store_instances, [seg])
                logger.info(f"stored SEG {seg.SeriesInstanceUID} of series {image_id} in {self._client.base_url}")
                label_info = dict(label_info or {}, SeriesInstanceUID=str(seg.SeriesInstanceUID),
                                  StudyInstanceUID=str(seg.StudyInstanceUID), Modality="SEG")
            return LocalDatastore.save_label(self, image_id, label_nii, label_tag, label_info)

    def seg_series_of(self, image_id: str) -> Optional[str]:
        """The SEG series in the PACS that is ``image_id``'s label: ours (sarco's UIDs) when
        there is one, else the last SEG that references the series; ``None`` when none does."""
        from pydicom.dataset import Dataset

        ours = dicom_seg.seg_uids(image_id, DefaultLabelTag.FINAL)[0]
        found = []
        for item in self._pacs_call("list SEGs", self._client.search_for_series, search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(item)
            meta = Dataset.from_json(self._pacs_call(
                "SEG metadata", self._client.retrieve_series_metadata, str(seg.StudyInstanceUID),
                str(seg.SeriesInstanceUID))[0])
            if image_id in dicom_seg.referenced_series(meta):
                found.append(str(seg.SeriesInstanceUID))
        return ours if ours in found else (found[-1] if found else None)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The label NIfTI of an image. MONAI Label asks with ``label_id`` = the SEG series and
        ``image_id`` = the image series (datalist), or with ``label_id`` = the image series alone
        (``GET /datastore/label``): then the SEG is looked up by its reference."""
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        if not image_id:
            image_id = check_uid(label_id)
            cached = LocalDatastore.get_label_uri(self, image_id, label_tag)
            if cached and os.path.exists(cached):
                return cached
            label_id = self.seg_series_of(image_id)
            if label_id is None:
                return ""
        label_nii = os.path.realpath(os.path.join(self._datastore.label_path(label_tag), f"{image_id}.nii.gz"))
        if os.path.exists(label_nii):
            return label_nii
        check_uid(label_id, "label id")
        self.get_image_uri(image_id)  # registers the image in the cache, which LocalDatastore.save_label needs
        seg_dir = os.path.realpath(os.path.join(self._datastore.label_path(label_tag), label_id))
        if not os.path.isdir(seg_dir) or not os.listdir(seg_dir):
            self._pacs_call(f"fetch SEG {label_id}", dicom_web_download_series, None, label_id, seg_dir,
                            self._client, False)
        _, image = self._load_series(image_id)
        seg_file = sorted(Path(seg_dir).glob("*.dcm"))[-1]
        try:
            label = dicom_seg.seg_to_label(seg_file, image)
        except SarcoError as exc:
            raise _fail(400, f"SEG {label_id}: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp:
            written = str(ingest.save_label(label, image, Path(tmp) / f"{image_id}.nii.gz"))
            LocalDatastore.save_label(self, image_id, written, label_tag, self._pacs_call(
                "SEG info", self._dicom_info, label_id))
        return label_nii

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return self._pacs_call("list SEGs", super().get_labeled_images, label_tag, labels)
