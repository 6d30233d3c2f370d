"""Resumable cohorts: one part file per scan, written as soon as the scan is done.

A cohort run (``cohort --studies`` or ``cohort --input``) measures every scan as one task on a
:class:`sarco_app.parallel.Executor` (serial, local Dask or a Dask cluster). Each finished scan's
record is written at once to ``<out>.parts/<scan>.json`` (written to a temporary file, then
renamed: a killed run leaves only whole parts), and the workbook is merged from the parts at the
end. A part is JSON because it keeps the row's values exactly as the task made them (numbers,
text, booleans and nulls), so the merged workbook equals one built in memory.

A part holds ``id``, ``row`` (the workbook row), ``settings`` (what the row depends on: method,
slice, reference, model, the input file's size and time), ``seconds`` (time spent per step) and
``worker`` (process id, memory and model loads of the process that did it). A rerun on the same
``--out`` reuses the parts whose settings match and whose status is not ``error: ...`` (those
may have been passing failures, e.g. a worker that died) and measures only the rest; ``force``
measures everything again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sarco_app.errors import SarcoError
from sarco_app.parallel import Executor

logger = logging.getLogger(__name__)

__all__ = ["file_signature", "parts_dir", "part_path", "read_parts", "run_scans", "timed", "write_part"]


def parts_dir(out_path: str | Path) -> Path:
    """The folder of part files of the workbook ``out_path``: ``<out_path>.parts/``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def part_path(parts: Path, scan_id: str) -> Path:
    """The part file of ``scan_id``: its id made safe for a file name, plus a short hash of the
    id so two ids that differ only in unsafe characters (``a#1``, ``a/1``) never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", scan_id).lstrip(".")[:100] or "scan"
    digest = hashlib.sha1(scan_id.encode()).hexdigest()[:8]
    return parts / f"{safe}-{digest}.json"


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays (rows hold numpy numbers now and then)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_part(parts: Path, record: dict[str, Any]) -> Path:
    """Write one scan's record atomically (temporary file in the same folder, fsync, rename)."""
    parts.mkdir(parents=True, exist_ok=True)
    path = part_path(parts, record["id"])
    fd, tmp = tempfile.mkstemp(dir=parts, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, default=_plain)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_parts(parts: Path) -> dict[str, dict[str, Any]]:
    """``{scan id: record}`` of the part files in ``parts`` (none when it does not exist).
    Leftover temporary files of a killed run are removed; a part that cannot be read is
    ignored (and measured again)."""
    records: dict[str, dict[str, Any]] = {}
    if not parts.is_dir():
        return records
    for path in sorted(parts.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if path.suffix != ".json":
            continue
        try:
            record = json.loads(path.read_text())
            records[record["id"]] = record
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable part (%s); the scan is measured again", path, exc)
    return records


def file_signature(path: str | Path | None) -> list[Any] | None:
    """``[path, size in bytes, modification time in ns]`` of a file or folder, so a part made
    from an older version of an input is not reused; ``None`` for no path or a missing one."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [str(path), stat.st_size, stat.st_mtime_ns]


@contextlib.contextmanager
def timed(seconds: dict[str, float] | None, step: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``seconds[step]`` (seconds); no-op for None."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if seconds is not None:
            seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start


def _reusable(record: dict[str, Any], settings: dict[str, Any]) -> bool:
    status = str(record.get("row", {}).get("status", "error"))
    return record.get("settings") == settings and not status.startswith("error")


def _refuse_repeated_ids(scans: Sequence[tuple[str, Any]], source: Callable[[Any], Any]) -> None:
    """Two inputs with one id (``a.nii`` beside ``a.nii.gz``) would share a row and a part file,
    so one scan's numbers would silently stand for both: refuse before measuring anything."""
    seen: dict[str, list[str]] = {}
    for scan_id, item in scans:
        seen.setdefault(scan_id, []).append(str(source(item)))
    repeated = {scan_id: paths for scan_id, paths in seen.items() if len(paths) > 1}
    if repeated:
        listed = "; ".join(f"{scan_id!r}: {', '.join(paths)}" for scan_id, paths in repeated.items())
        raise SarcoError(f"{len(repeated)} scan id(s) name more than one input ({listed}); "
                         "rename or move one of each so every scan has its own id")


def run_scans(
    scans: Sequence[tuple[str, Any]],
    task: Callable[..., dict[str, Any]],
    out_path: str | Path,
    settings: Callable[[Any], dict[str, Any]],
    failed_row: Callable[[str, Any, str], dict[str, Any]],
    *,
    source: Callable[[Any], Any] = str,
    force: bool = False,
    workers: int | None = 1,
    scheduler: str | None = None,
    progress: bool = True,
    desc: str = "cohort",
    unit: str = "scan",
    announce: Callable[[str], Any] | None = None,
    **task_kwargs: Any,
) -> dict[str, Any]:
    """Measure every scan not already done, one task each, writing a part as each finishes.

    Parameters
    ----------
    scans : [(scan id, item), ...]
        In the order of the workbook's rows.
    task : callable
        ``task(item, **task_kwargs)`` -> ``{"row": {...}, "seconds": {...}, "worker": {...}}``;
        it records a scan's own failures in the row's ``status``.
    settings : callable
        ``settings(item)`` -> the JSON-able settings the scan's row depends on (see module
        docstring); parts made with other settings are measured again.
    failed_row : callable
        ``failed_row(scan id, item, reason)`` -> the row of a task that raised or whose worker died.
    source : callable
        ``source(item)`` -> the input file or folder, named when two scans share an id.
    force : bool
        Measure every scan again, ignoring existing parts.
    workers, scheduler, announce :
        See :class:`sarco_app.parallel.Executor` (``workers=None``: the CPU cores).

    Returns
    -------
    dict with ``rows`` (in ``scans`` order), ``records`` (id -> part record), ``measured`` and
    ``reused`` (scan counts), ``executor`` (how the measured ones ran), ``dashboard`` (link or
    None), ``wall_s`` (seconds for the measuring, cluster start included), ``startup_s``
    (seconds to start the cluster) and ``parts`` (the folder).
    """
    _refuse_repeated_ids(scans, source)
    parts = parts_dir(out_path)
    existing = read_parts(parts)
    records: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, Any, dict[str, Any]]] = []
    for scan_id, item in scans:
        wanted = settings(item)
        old = existing.get(scan_id)
        if not force and old is not None and _reusable(old, wanted):
            records[scan_id] = old
        else:
            todo.append((scan_id, item, wanted))
    reused = len(records)
    executor = Executor(workers, scheduler, n_tasks=len(todo), announce=announce)
    start = time.perf_counter()
    description, dashboard, startup = "nothing to measure", None, 0.0
    if todo:
        if reused:
            (announce or logger.info)(f"{reused} scan(s) already measured in {parts}; measuring {len(todo)}")
        with executor:
            executor.start()
            startup = time.perf_counter() - start
            description, dashboard = executor.describe(), executor.dashboard_link
            for done in executor.map_unordered(task, [item for _, item, _ in todo], desc=desc, unit=unit,
                                               progress=progress, **task_kwargs):
                scan_id, item, wanted = todo[done.index]
                if done.error is not None:
                    reason = f"error: {type(done.error).__name__}: {done.error}"
                    record = {"row": failed_row(scan_id, item, reason), "seconds": {}, "worker": None}
                else:
                    record = dict(done.value)
                record.update(id=scan_id, settings=wanted)
                with timed(record["seconds"], "part"):
                    write_part(parts, record)
                records[scan_id] = record
    return {
        "rows": [records[scan_id]["row"] for scan_id, _ in scans],
        "records": records,
        "measured": len(todo),
        "reused": reused,
        "executor": description,
        "dashboard": dashboard,
        "wall_s": time.perf_counter() - start,
        "startup_s": startup,
        "parts": parts,
    }
