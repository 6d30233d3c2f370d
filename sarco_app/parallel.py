"""Run many independent tasks: in this process, on a local Dask cluster, or on an existing one.

One executor for the batch commands (``cohort``: one task per scan; ``loop``: one task per image
to pseudo-label):

* ``workers=1`` and no scheduler: serial, in this process, no Dask;
* ``workers=N``: a local Dask cluster of N worker processes with one thread each
  (``LocalCluster(processes=True, threads_per_worker=1)``); a worker that dies is restarted and
  its task re-run elsewhere;
* ``scheduler="tcp://host:8786"``: an existing Dask distributed cluster. Its workers must see the
  input and output folders at the same paths (a shared filesystem) and have sarco installed.

Results come back as they finish (:meth:`Executor.map_unordered`), with a tqdm progress bar;
a task that raised, or whose worker died, comes back with its exception instead of stopping the
others. A task function is a module-level function (workers import it by name); whatever it
should load once per worker (a model) it keeps in a per-process cache, e.g.
:func:`functools.lru_cache`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from sarco_app.errors import SarcoError

logger = logging.getLogger(__name__)

__all__ = ["Done", "Executor", "default_workers", "process_memory"]


def default_workers() -> int:
    """Worker processes when none is asked for: the CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_memory() -> dict[str, Any]:
    """This process's id, resident memory now and its peak so far (``rss_mb``, ``peak_rss_mb``,
    MiB), for per-worker memory figures."""
    import psutil

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"pid": os.getpid(), "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "peak_rss_mb": round(peak_kib / 1024, 1)}


@dataclass
class Done:
    """One finished task: ``index`` into the items given, and either ``value`` (what the task
    returned) or ``error`` (what it raised; ``distributed.KilledWorker`` when its worker died
    every time it was tried)."""

    index: int
    value: Any = None
    error: BaseException | None = None


class Executor:
    """Serial, local-Dask or remote-Dask execution of one function over many items.

    Parameters
    ----------
    workers : int, optional
        Worker processes of a local cluster (default :func:`default_workers`); 1 runs serially in
        this process. Ignored with ``scheduler``. Never more than ``n_tasks``.
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``).
    n_tasks : int, optional
        How many tasks will be run, to start no more local workers than there are tasks.
    announce : callable, optional
        Called with one line of text for the user (the cluster used, the dashboard address);
        default: log at INFO.

    Use as a context manager; the local cluster is shut down on exit.
    """

    def __init__(self, workers: int | None = None, scheduler: str | None = None, n_tasks: int | None = None,
                 announce: Callable[[str], Any] | None = None):
        if workers is not None and workers < 1:
            raise SarcoError(f"--workers must be at least 1 (got {workers})")
        self.scheduler = scheduler or None
        self.workers = workers if workers is not None else default_workers()
        if n_tasks is not None:
            self.workers = max(1, min(self.workers, n_tasks))
        self.kind = "remote" if self.scheduler else ("serial" if self.workers == 1 else "local")
        self.announce = announce or logger.info
        self.client = None
        self.cluster = None
        self.dashboard_link: str | None = None

    def __enter__(self) -> "Executor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """``serial``, ``local Dask, N workers`` or ``Dask at ADDRESS, N workers``."""
        if self.kind == "serial":
            return "serial, in this process"
        n = len(self.client.nthreads()) if self.client is not None else self.workers  # every worker, not a sample
        return f"local Dask, {n} workers" if self.kind == "local" else f"Dask at {self.scheduler}, {n} workers"

    def start(self) -> None:
        if self.kind == "serial" or self.client is not None:
            return
        from dask.distributed import Client, LocalCluster

        if self.kind == "remote":
            try:
                self.client = Client(self.scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SarcoError(f"--scheduler {self.scheduler}: cannot connect to a Dask scheduler ({exc})") from exc
        else:
            # The dashboard needs bokeh; without it the cluster runs without one.
            dashboard = ":0" if importlib.util.find_spec("bokeh") is not None else None
            self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                        dashboard_address=dashboard, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
            if dashboard is None:
                self.announce(f"running on {self.describe()} (no dashboard: bokeh is not installed)")
                return
        self.dashboard_link = self.client.dashboard_link
        self.announce(f"running on {self.describe()}"
                      + (f"; Dask dashboard: {self.dashboard_link}" if self.dashboard_link else ""))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def map_unordered(self, fn: Callable[..., Any], items: Sequence[Any], desc: str = "tasks", unit: str = "task",
                      progress: bool = True, **kwargs: Any) -> Iterator[Done]:
        """``fn(item, **kwargs)`` for every item, yielded as :class:`Done` in the order they
        finish, with a progress bar on stderr. A task's exception is returned, not raised."""
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit=unit, file=sys.stderr, disable=not progress)
        try:
            if self.kind == "serial":
                for index, item in enumerate(items):
                    try:
                        done = Done(index, value=fn(item, **kwargs))
                    except Exception as exc:  # reported with the item, the others go on
                        done = Done(index, error=exc)
                    bar.update()
                    yield done
                return
            from dask.distributed import as_completed

            self.start()
            futures = [self.client.submit(fn, item, pure=False, **kwargs) for item in items]
            position = {future.key: index for index, future in enumerate(futures)}
            try:
                for future in as_completed(futures):
                    try:
                        done = Done(position[future.key], value=future.result())
                    except Exception as exc:
                        done = Done(position[future.key], error=exc)
                    future.release()  # the result is ours now; the cluster may forget it
                    bar.update()
                    yield done
            finally:
                for future in futures:
                    future.cancel()  # no-op for finished ones; stops the rest when the caller stops early
        finally:
            bar.close()
