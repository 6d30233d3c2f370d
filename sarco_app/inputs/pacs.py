"""Putting DICOM into a PACS over DICOMweb: UID repair and upload (STOW-RS).

A PACS such as Orthanc refuses instances whose StudyInstanceUID, SeriesInstanceUID or
SOPInstanceUID is empty (anonymisers leave them so; the shared TotalSegmentator series is such a
case). :func:`repair_uids` gives them UIDs derived from what the files hold, so uploading the
same files twice yields the same UIDs and the series stays one series.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sarco_app.inputs import dicom
from sarco_app.errors import SarcoError

logger = logging.getLogger(__name__)

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _generated(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _pixel_digest(ds: Any) -> str:
    data = ds.get("PixelData")
    return hashlib.sha256(bytes(data) if data is not None else b"").hexdigest()


def repair_uids(datasets: Sequence[Any], names: Sequence[str] | None = None) -> list[str]:
    """Give every dataset with an empty Study, Series or SOP Instance UID a deterministic one.

    The new UIDs are pydicom ``generate_uid`` hashes of the files' own content: the study's from
    patient id, study date/time/id, accession number and frame of reference; the series' from
    the study UID and the series' identity (its geometry when the UID is missing, as
    :mod:`sarco_app.inputs.dicom` groups series); an instance's from the file meta's
    MediaStorageSOPInstanceUID when it has one, else from the series UID, position, instance
    number and a hash of the pixel data. ``datasets`` are changed in place (file meta too).

    Returns one line per repaired instance (``name: StudyInstanceUID, SOPInstanceUID``), and
    logs them as a warning.
    """
    names = list(names) if names is not None else [f"instance {i}" for i in range(len(datasets))]
    repaired: list[str] = []
    used_sop = {_text(ds, "SOPInstanceUID") for ds in datasets} - {""}
    for ds, name in zip(datasets, names):
        empty = [keyword for keyword in UID_KEYWORDS if not _text(ds, keyword)]
        if not empty:
            continue
        if "StudyInstanceUID" in empty:
            ds.StudyInstanceUID = _generated(
                "sarco-study", *(_text(ds, k) for k in ("PatientID", "PatientName", "StudyDate", "StudyTime",
                                                        "StudyID", "AccessionNumber", "FrameOfReferenceUID")))
        if "SeriesInstanceUID" in empty:
            ds.SeriesInstanceUID = _generated(
                "sarco-series", ds.StudyInstanceUID, dicom.series_key(ds), _text(ds, "SeriesNumber"),
                _text(ds, "SeriesDescription"))
        if "SOPInstanceUID" in empty:
            meta_uid = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or "").strip()
            if meta_uid and meta_uid not in used_sop:
                ds.SOPInstanceUID = meta_uid
            else:
                ds.SOPInstanceUID = _generated(
                    "sarco-sop", ds.SeriesInstanceUID, _text(ds, "ImagePositionPatient"),
                    _text(ds, "InstanceNumber"), _pixel_digest(ds))
            used_sop.add(str(ds.SOPInstanceUID))
        if getattr(ds, "file_meta", None) is not None:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        repaired.append(f"{name}: {', '.join(empty)}")
    if repaired:
        listed = "; ".join(repaired[:10]) + (f"; ... ({len(repaired)} in all)" if len(repaired) > 10 else "")
        logger.warning("generated UIDs for %d instance(s) with empty UIDs: %s", len(repaired), listed)
    return repaired


@dataclass
class UploadResult:
    """What :func:`upload` sent: instance count, repaired instances, series UIDs, skipped files."""

    instances: int = 0
    repaired: list[str] = field(default_factory=list)
    series_uids: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


def read_datasets(path: str | Path) -> tuple[list[Any], list[str], list[str]]:
    """(datasets, names, skipped names) of every DICOM file under a file or folder (recursive);
    non-DICOM files are skipped, damaged DICOM files are an error."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise SarcoError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    datasets, names, skipped = [], [], []
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        try:
            ds = pydicom.dcmread(str(file))
        except InvalidDicomError:
            skipped.append(name)
            continue
        except Exception as exc:
            raise SarcoError(f"{name}: damaged DICOM file ({type(exc).__name__}: {exc})") from exc
        datasets.append(ds)
        names.append(name)
    if not datasets:
        raise SarcoError(f"{path}: no DICOM files found")
    return datasets, names, skipped


def dicomweb_session(user: str | None = None, password: str | None = None):
    """A requests Session with HTTP basic auth when ``user`` is given."""
    import requests

    session = requests.Session()
    if user:
        session.auth = (user, password or "")
    return session


def upload(dicomweb_root: str, path: str | Path, session: Any = None, batch: int = 50) -> UploadResult:
    """Upload every DICOM file under ``path`` to a DICOMweb server (STOW-RS at ``dicomweb_root``),
    repairing empty UIDs first (:func:`repair_uids`).

    Raises :class:`SarcoError` when the server cannot be reached or refuses instances.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets, names, skipped = read_datasets(path)
    result = UploadResult(repaired=repair_uids(datasets, names), skipped=skipped)
    client = DICOMwebClient(url=dicomweb_root.rstrip("/"), session=session or dicomweb_session())
    for start in range(0, len(datasets), batch):
        chunk = datasets[start:start + batch]
        try:
            client.store_instances(chunk)
        except requests.exceptions.ConnectionError as exc:
            raise SarcoError(f"DICOMweb server {dicomweb_root} unreachable: {exc.__class__.__name__}") from exc
        except requests.exceptions.HTTPError as exc:
            raise SarcoError(f"DICOMweb server {dicomweb_root} refused the upload of {names[start]}...: {exc}") from exc
        result.instances += len(chunk)
        result.series_uids.update(str(ds.SeriesInstanceUID) for ds in chunk)
    return result


def segs_of_series(dicomweb_root: str, source_series: str, session: Any = None) -> list:
    """Every DICOM SEG on a DICOMweb server that references ``source_series``, as pydicom
    datasets (QIDO for SEG series, WADO-RS for their instances)."""
    from dicomweb_client.api import DICOMwebClient

    from sarco_app.inputs.dicom_seg import referenced_series

    client = DICOMwebClient(url=dicomweb_root.rstrip("/"), session=session or dicomweb_session())
    found = []
    for item in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        for ds in client.retrieve_series(study, series):
            if source_series in referenced_series(ds):
                found.append(ds)
    return found


# --------------------------------------------------------------------------- Orthanc

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> str | None:
    """Why Orthanc with its DICOMweb plugin cannot run here (``None`` when it can)."""
    import shutil

    if shutil.which(ORTHANC_BINARY) is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not Path(DICOMWEB_PLUGIN).is_file():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def orthanc_config(storage: str | Path, http_port: int = 8042, user: str | None = None,
                   password: str | None = None) -> dict:
    """An Orthanc configuration: its own storage folder, DICOMweb at ``/dicom-web/``, loopback
    clients only, no DICOM (DIMSE) port, HTTP basic authentication when ``user`` is given, and
    instances overwritten by a new upload with the same SOP Instance UID (how a label saved
    again replaces its SEG, see :func:`sarco_app.inputs.dicom_seg.seg_uids`)."""
    storage = Path(storage).resolve()
    config = {
        "Name": "sarco",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "HttpPort": int(http_port),
        "DicomServerEnabled": False,
        # Orthanc 1.10 has no bind address: it listens on every interface but answers only
        # clients on this machine.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(user),
        "OverwriteInstances": True,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    if user:
        config["RegisteredUsers"] = {user: password or ""}
    return config


class Orthanc:
    """An Orthanc process on 127.0.0.1 with its own storage folder; use as a context manager
    or call :meth:`stop`."""

    def __init__(self, storage: str | Path, http_port: int = 8042, user: str | None = None,
                 password: str | None = None, log_path: str | Path | None = None):
        self.storage = Path(storage).resolve()
        self.http_port = int(http_port)
        self.user, self.password = user, password
        self.log_path = Path(log_path) if log_path else self.storage / "orthanc.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    def session(self):
        return dicomweb_session(self.user, self.password)

    def start(self, timeout: float = 30.0) -> "Orthanc":
        import json
        import subprocess
        import time

        import requests

        problem = orthanc_available()
        if problem:
            raise SarcoError(problem)
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.storage / "orthanc.json"
        config_path.write_text(json.dumps(orthanc_config(self.storage, self.http_port, self.user, self.password),
                                          indent=2))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        session = self.session()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SarcoError(f"Orthanc exited at start-up (status {self.proc.returncode}); see {self.log_path}")
            try:
                if session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SarcoError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
