"""Helpers shared by the tests and the bench scripts: a real MONAI Label server in its own process
group, free ports and a test Orthanc. Plain functions and classes (the fixtures are in conftest.py), so
scripts use them too: ``from tests.harness import RunningServer``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "sarcopenia"
SHARED_REAL = ROOT.parent / "shared" / "data" / "real"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Credentials of the test PACS (Orthanc with authentication on).
PACS_USER, PACS_PASSWORD = "annotator", "s3cret"


def running_orthanc(tmp_path_factory, folder):
    """Orthanc (DICOMweb, authentication on) with ``folder``'s DICOM uploaded: a generator for
    a module fixture (``yield from``), stopped when the fixture ends."""
    from sarco_app.inputs import pacs

    server = pacs.Orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), PACS_USER, PACS_PASSWORD)
    server.start()
    try:
        pacs.upload(server.dicomweb_root, folder, session=server.session())
        yield server
    finally:
        server.stop()


def start_dicomweb_server(start_server, orthanc, tmp_path_factory):
    """The app on ``orthanc``'s DICOMweb root, with the PACS credentials and its own cache."""
    env = {"MONAI_LABEL_DICOMWEB_USERNAME": PACS_USER, "MONAI_LABEL_DICOMWEB_PASSWORD": PACS_PASSWORD,
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path_factory.mktemp("dicomweb_cache"))}
    return start_server(orthanc.dicomweb_root, conf={"model_dir": str(tmp_path_factory.mktemp("model"))}, env=env)


class RunningServer:
    """A ``monailabel start_server`` process in its own process group."""

    def __init__(self, studies: Path | str, log_path: Path, conf: dict | None = None,
                 env: dict | None = None, timeout: float = 180.0, app_dir: Path | str = APP_DIR):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        venv_bin = Path(sys.executable).parent
        full_env = dict(os.environ)
        # MONAI Label re-launches `python` from PATH: the test interpreter's bin goes first.
        full_env["PATH"] = f"{venv_bin}{os.pathsep}{full_env.get('PATH', '')}"
        full_env.setdefault("OMP_NUM_THREADS", "2")
        full_env.update(env or {})
        cmd = [str(venv_bin / "monailabel"), "start_server", "--app", str(app_dir),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in (conf or {}).items():
            cmd += ["--conf", key, str(value)]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env,
                                     start_new_session=True, cwd=str(ROOT))
        self._wait(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _is_up(self, info: requests.Response) -> bool:
        """Whether this answer of ``/info/`` means the server is ready (a subclass may relax it)."""
        return info.status_code == 200

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._is_up(requests.get(f"{self.url}/info/", timeout=5)):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self._log.close()
