"""The studies folder as a hardened MONAI Label local datastore.

MONAI Label's stock :class:`LocalDatastore` joins client-given image ids and label tags into
file paths unchecked, stores any label file, keeps an image's labels when new pixels are
uploaded under its id, and serves any extension. :class:`HardenedDatastore` keeps its file
layout and JSON, and adds:

* ids and tags must match :data:`sarco_app.labels.ID_PATTERN` (400 before any file is touched);
  files or stored entries with other names are skipped with a warning;
* every path it reads, writes or deletes is resolved (links followed) and must lie inside the
  studies folder;
* images and labels are NIfTI (``.nii.gz``, ``.nii``) only, and an uploaded image must have a
  readable 2D or 3D NIfTI header;
* a label is validated against its image before it is stored (shape, affine, values 0-4), and
  is written atomically, so a refused or failed save leaves the stored label unchanged;
* re-uploading an image that has labels is a conflict (409) unless ``replace`` is asked; a
  replace moves the old image, its labels and its patient sidecar to
  ``replaced/<id>-<UTC time>/``.

Errors are :class:`sarco_app.errors.SarcoError` subclasses with an HTTP ``status``;
:mod:`lib.guard` turns them into HTTP answers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from sarco_app.errors import SarcoError
from sarco_app.labels import ID_PATTERN, check_label_file, check_name, max_label_value

logger = logging.getLogger(__name__)

#: The file types the datastore serves: what ``sarco_app.inputs.ingest`` and the label checks read.
EXTENSIONS = (".nii.gz", ".nii")
#: Where a replaced image and its labels go, inside the studies folder (not a label tag folder).
REPLACED_DIR = "replaced"


class DatastoreError(SarcoError):
    """A datastore request the client can fix; ``status`` is its HTTP status."""

    status = 400


class UnknownImageError(DatastoreError):
    status = 404


class UnknownLabelError(DatastoreError):
    status = 404


class LabelledImageConflict(DatastoreError):
    status = 409


def check_id(value: Any) -> str:
    """``value`` as an image id (:data:`ID_PATTERN`), else :class:`DatastoreError` (400)."""
    try:
        return check_name(value, "image id")
    except SarcoError as exc:
        raise DatastoreError(str(exc)) from None


def check_tag(value: Any) -> str:
    """``value`` as a label tag (:data:`ID_PATTERN`), else :class:`DatastoreError` (400)."""
    try:
        return check_name(value, "label tag")
    except SarcoError as exc:
        raise DatastoreError(str(exc)) from None


def split_extension(file_name: str) -> Tuple[str, str]:
    """``(stem, extension)`` of a NIfTI file name; :class:`DatastoreError` for other types."""
    for ext in EXTENSIONS:
        if file_name.lower().endswith(ext) and len(file_name) > len(ext):
            return file_name[: -len(ext)], file_name[-len(ext):]
    raise DatastoreError(f"{file_name!r}: only NIfTI files ({', '.join(EXTENSIONS)}) are accepted")


def check_image_file(path: str) -> None:
    """:class:`DatastoreError` unless ``path`` is a NIfTI whose header describes a 2D or 3D
    image (trailing axes of length 1 aside). Reads the header only."""
    import nibabel as nib

    try:
        shape = tuple(int(n) for n in nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file
        raise DatastoreError(f"the upload is not a readable NIfTI image ({type(exc).__name__})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DatastoreError(f"expected a 2D or 3D image, got shape {shape}")


class HardenedDatastore(LocalDatastore):
    """:class:`LocalDatastore` with checked ids, tags, paths and labels (see the module doc)."""

    def __init__(self, datastore_path: str, **kwargs):
        # Set before the parent's __init__, which already reconciles the folder with our rules.
        self._root = os.path.realpath(datastore_path)
        kwargs["extensions"] = tuple(f"*{ext}" for ext in EXTENSIONS)
        super().__init__(datastore_path, **kwargs)

    # --- paths ---------------------------------------------------------------------------
    def _inside(self, path: str) -> str:
        """The real path of ``path`` (links resolved), which must lie inside the studies folder."""
        real = os.path.realpath(path)
        if real != self._root and os.path.commonpath([real, self._root]) == self._root:
            return real
        logger.warning(f"refused path outside the studies folder: {path!r} -> {real!r}")
        raise DatastoreError("the path leaves the studies folder")

    def _image_file(self, image_id: str, ext: str) -> str:
        return self._inside(os.path.join(self._datastore.image_path(), self._filename(image_id, ext)))

    def _label_file(self, image_id: str, tag: str, ext: str) -> str:
        return self._inside(os.path.join(self._datastore.label_path(tag), self._filename(image_id, ext)))

    def _to_id(self, file: str) -> Tuple[str, str]:
        # The stock version removes the extension wherever it occurs ('a.nii.gzb.nii.gz' -> 'ab').
        try:
            return split_extension(file)
        except DatastoreError:
            return super()._to_id(file)

    # --- what the folder and the JSON may contribute --------------------------------------
    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        kept = {}
        for name, file in files.items():
            stem = self._to_id(name)[0]
            if not ID_PATTERN.fullmatch(stem):
                logger.warning(f"skipping {os.path.join(path, name)!r}: {stem!r} is not a valid image id")
                continue
            try:
                self._inside(os.path.join(path, name))  # a link to a file elsewhere is not ours
            except DatastoreError:
                continue
            kept[name] = file
        return kept

    def _add_non_existing_labels(self, tag) -> int:
        if not ID_PATTERN.fullmatch(tag):
            logger.warning(f"skipping label folder {tag!r}: not a valid label tag")
            return 0
        return super()._add_non_existing_labels(tag)

    def _init_from_datastore_file(self, throw_exception=False):
        super()._init_from_datastore_file(throw_exception=throw_exception)
        self._drop_invalid_names()

    def _reload_holding_lock(self) -> None:
        """Re-read the datastore JSON if another process changed it, for a caller that holds
        the lock (the stock reload takes the lock itself, and file locks do not nest)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            ts = os.stat(path).st_mtime
            with open(path) as fh:
                self._datastore = type(self._datastore).model_validate_json(fh.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = ts
            self._drop_invalid_names()

    def _drop_invalid_names(self) -> None:
        # A JSON written before these rules (or by hand) may hold ids that name other files.
        objects = self._datastore.objects
        for image_id in [k for k in objects if not ID_PATTERN.fullmatch(k)]:
            logger.warning(f"dropping stored image id {image_id!r}: not a valid image id")
            del objects[image_id]
        for obj in objects.values():
            for tag in [t for t in obj.labels if not ID_PATTERN.fullmatch(t)]:
                logger.warning(f"dropping stored label tag {tag!r}: not a valid label tag")
                del obj.labels[tag]

    # --- reads: unknown or outside the folder is "not found" --------------------------------
    def get_image_uri(self, image_id: str) -> str:
        obj = self._datastore.objects.get(image_id) if isinstance(image_id, str) else None
        if obj is None:
            return ""
        try:
            return self._image_file(image_id, obj.image.ext)
        except DatastoreError:
            return ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label = self._datastore.label(label_id, label_tag) if isinstance(label_id, str) else None
        if label is None:
            return ""
        try:
            return self._label_file(label_id, label_tag, label.ext)
        except DatastoreError:
            return ""

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        pairs = super().datalist(full_path=full_path)
        if not full_path:
            return pairs
        inside = []
        for pair in pairs:
            try:
                inside.append({key: self._inside(path) for key, path in pair.items()})
            except DatastoreError:
                continue
        return inside

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        if not self.datalist():
            raise UnknownLabelError("no image has a final label yet: nothing to archive")
        return super().get_dataset_archive(limit_cases)

    # --- writes -----------------------------------------------------------------------------
    def _copy_atomic(self, source: str, dest: str) -> None:
        """Copy ``source`` to ``dest`` through a temporary file beside it: readers see the old
        file or the new one, never a partial one, and a failed copy leaves ``dest`` unchanged."""
        fd, partial = tempfile.mkstemp(prefix=".upload-", dir=os.path.dirname(dest))
        os.close(fd)
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, dest)
        except BaseException:
            if os.path.exists(partial):
                os.unlink(partial)
            raise

    def check_upload(self, image_id: str, replace: bool = False) -> None:
        """Whether ``image_id`` may be uploaded: a valid id, and not an image with labels
        unless ``replace`` (409)."""
        check_id(image_id)
        obj = self._datastore.objects.get(image_id)
        if obj is not None and obj.labels and not replace:
            raise LabelledImageConflict(
                f"image {image_id} has labels ({', '.join(sorted(obj.labels))}): upload the new pixels "
                "under another id, or ask to replace it (replace=true moves the old image and labels aside)")

    def _move_aside(self, image_id: str, obj: ImageLabelModel) -> str:
        """Move ``image_id``'s image and labels to ``replaced/<id>-<UTC time>/``; the folder,
        relative to the studies folder."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder = self._inside(os.path.join(self._root, REPLACED_DIR, f"{image_id}-{stamp}"))
        suffix = 1
        while os.path.exists(folder):
            suffix += 1
            folder = self._inside(os.path.join(self._root, REPLACED_DIR, f"{image_id}-{stamp}-{suffix}"))
        for tag, label in list(obj.labels.items()):
            source = self._label_file(image_id, tag, label.ext)
            if os.path.exists(source):
                os.makedirs(os.path.join(folder, "labels", tag), exist_ok=True)
                shutil.move(source, os.path.join(folder, "labels", tag, os.path.basename(source)))
        obj.labels.clear()
        image = self._image_file(image_id, obj.image.ext)
        if os.path.exists(image):
            os.makedirs(folder, exist_ok=True)
            shutil.copy2(image, os.path.join(folder, os.path.basename(image)))
        # The patient sidecar (sarco_app.inputs.ingest.sidecar_path) described the old pixels too.
        sidecar = os.path.join(os.path.dirname(image), f"{image_id}.json")
        if os.path.isfile(sidecar) and not os.path.islink(sidecar):
            os.makedirs(folder, exist_ok=True)
            shutil.move(sidecar, os.path.join(folder, os.path.basename(sidecar)))
        logger.info(f"replacing image {image_id}: old image and labels moved to {folder}")
        return os.path.relpath(folder, self._root)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        image_info = dict(image_info or {})
        replace = bool(image_info.pop("replace", False))
        _, image_ext = split_extension(os.path.basename(image_filename))
        if not image_id:
            image_id = self._to_id(os.path.basename(image_filename))[0]
        self.check_upload(image_id, replace)
        check_image_file(image_filename)
        name = self._filename(image_id, image_ext)
        dest = self._image_file(image_id, image_ext)
        with FileLock(self._lock_file):
            self._reload_holding_lock()  # another process may have written meanwhile
            self.check_upload(image_id, replace)
            old = self._datastore.objects.get(image_id)
            if old is not None and old.labels:
                image_info["replaced"] = self._move_aside(image_id, old)
            if old is not None and old.image.ext != image_ext:
                stale = self._image_file(image_id, old.image.ext)
                if os.path.exists(stale):
                    os.unlink(stale)  # the same id under the other NIfTI extension
            self._copy_atomic(image_filename, dest)
            image_info["ts"] = int(time.time())
            image_info["name"] = name
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=image_info, ext=image_ext))
            self._update_datastore_file(lock=False)
        return image_id

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise UnknownImageError(f"image {image_id} not found")
        for tag in list(obj.labels):
            self.remove_label(image_id, tag)
        path = self._image_file(image_id, obj.image.ext)
        if os.path.exists(path):
            os.unlink(path)
        self._forget(lambda: self._datastore.objects.pop(image_id, None))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_id(image_id)
        check_tag(label_tag)
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise UnknownImageError(f"image {image_id} not found")
        _, label_ext = split_extension(os.path.basename(label_filename))
        image_path = self._image_file(image_id, obj.image.ext)
        try:
            check_label_file(label_filename, image_path, max_value=max_label_value(label_tag))
        except SarcoError as exc:
            raise DatastoreError(f"label for {image_id} ({label_tag}) refused: {exc}") from None
        label_dir = self._inside(self._datastore.label_path(label_tag))
        name = self._filename(image_id, label_ext)
        dest = self._label_file(image_id, label_tag, label_ext)
        with FileLock(self._lock_file):
            self._reload_holding_lock()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise UnknownImageError(f"image {image_id} not found")
            os.makedirs(label_dir, exist_ok=True)
            old = obj.labels.get(label_tag)
            self._copy_atomic(label_filename, dest)
            if old is not None and old.ext != label_ext:
                stale = self._label_file(image_id, label_tag, old.ext)
                if os.path.exists(stale):
                    os.unlink(stale)
            label_info = dict(label_info or {})
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id)
        check_tag(label_tag)
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise UnknownLabelError(f"image {label_id} has no {label_tag!r} label")
        path = self._label_file(label_id, label_tag, label.ext)
        if os.path.exists(path):
            os.unlink(path)
        def drop_label():
            obj = self._datastore.objects.get(label_id)
            if obj is not None:
                obj.labels.pop(label_tag, None)

        self._forget(drop_label)

    def _forget(self, drop: Callable[[], Any]) -> None:
        """After a file was deleted: rescan the folder (no auto-reload), or ``drop`` its entry
        from the index and write the index, under the datastore lock."""
        if not self._auto_reload:
            self.refresh()
            return
        with FileLock(self._lock_file):
            drop()
            self._update_datastore_file(lock=False)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_id(image_id)
        if image_id not in self._datastore.objects:
            raise UnknownImageError(f"image {image_id} not found")
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_id(label_id)
        check_tag(label_tag)
        if self._datastore.label(label_id, label_tag) is None:
            raise UnknownLabelError(f"image {label_id} has no {label_tag!r} label")
        return super().update_label_info(label_id, label_tag, info)
