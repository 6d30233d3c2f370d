"""Errors that carry a one-line message meant for the user (CLI and HTTP API)."""

from __future__ import annotations


class SarcoError(ValueError):
    """Bad input or a state the user can fix. The CLI prints it on one line and exits
    with ``exit_code``; the server answers it with HTTP 4xx."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class IngestError(SarcoError):
    """A file or folder that cannot be read as CT (not DICOM, no pixels, bad geometry...)."""


def reason(exc: BaseException, path) -> str:
    """``exc``'s message with ``path`` shortened to its file name: a reader's error names the
    server's folders (a temporary upload, the studies folder), which a client need not see."""
    import os

    text = str(exc)
    for form in {str(path), os.path.realpath(str(path))}:
        text = text.replace(form, os.path.basename(form))
    return text
