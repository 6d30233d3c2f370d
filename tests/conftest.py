"""Shared fixtures: the real CT samples in ../shared and a real MONAI Label server (the helpers
behind them are in tests/harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import SHARED_REAL, RunningServer


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``; tests that need it skip when it is absent (a user's clone)."""
    if not SHARED_REAL.is_dir():
        pytest.skip("../shared/data/real is not present")
    return SHARED_REAL


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory ``start_server(studies_dir, conf=None, env=None) -> base_url``.

    Starts the real MONAI Label server with ``apps/sarcopenia`` on a free port; every server
    started in a test module is stopped when the module ends.
    """
    servers: list[RunningServer] = []

    def _start(studies: Path | str, conf: dict | None = None, env: dict | None = None) -> str:
        log = tmp_path_factory.mktemp("server") / "server.log"
        # A DICOMweb URL stays a string (Path would fold its "//").
        url = str(studies).startswith(("http://", "https://"))
        server = RunningServer(studies if url else Path(studies), log, conf=conf, env=env)
        servers.append(server)
        return server.url

    yield _start
    for server in servers:
        server.stop()
