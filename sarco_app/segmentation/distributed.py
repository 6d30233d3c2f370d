"""Training in several processes: torch ``DistributedDataParallel`` under ``torchrun``.

:func:`launch` runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m
sarco_app.segmentation.distributed JOB`` with a job file (the training config and the path of
the slices, as JSON); every process runs :func:`sarco_app.segmentation.train.train` on its share
of each batch (:class:`sarco_app.segmentation.training_data.CropBatches`) with the network
wrapped in DDP, which averages the gradients, so N processes train the same network as one
process with the same global batch. The process group uses ``gloo`` on the CPU and ``nccl`` on
CUDA (one GPU per process). Rank 0 alone prints the progress lines (the launcher passes them on),
writes checkpoints and logs, and writes the result JSON the launcher returns.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from sarco_app.errors import SarcoError

logger = logging.getLogger(__name__)

#: Set by :func:`launch` for its workers, so their ``train()`` runs instead of launching again.
WORKER_ENV = "SARCO_TRAIN_WORKER"


def in_worker() -> bool:
    """True inside a process started by :func:`launch` (torchrun sets ``RANK``)."""
    return os.environ.get(WORKER_ENV) == "1" and "RANK" in os.environ


class Group:
    """The processes of one training run: ``rank`` of ``world_size``, this process's ``device``.
    With one process (:meth:`single`) every operation is the identity and nothing is sent."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    @classmethod
    def single(cls, device: str | torch.device = "auto") -> "Group":
        from sarco_app.segmentation.network import resolve_device

        return cls(0, 1, resolve_device(device))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and logs."""
        return self.rank == 0

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """``network`` in ``DistributedDataParallel`` (gradients averaged over the processes)
        when there are several, else as it is."""
        if self.world_size == 1:
            return network
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=ids)

    def _reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return float(value)
        # nccl reduces CUDA tensors only; gloo CPU ones.
        tensor = torch.tensor([float(value)], dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def mean(self, value: float) -> float:
        """Mean of ``value`` over the processes."""
        return self._reduce(value, dist.ReduceOp.SUM) / self.world_size

    def agree_any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (a stop decided together)."""
        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def init_group(device: str = "auto") -> Group:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
    ``nccl`` with one GPU per process when ``device`` resolves to CUDA, else ``gloo``."""
    from sarco_app.segmentation.network import resolve_device

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local)
        torch.cuda.set_device(chosen)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=chosen)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return Group(rank, world, chosen)


def _sample_record(sample) -> dict[str, Any]:
    return {"hu": torch.as_tensor(sample.hu), "label": torch.as_tensor(sample.label),
            "spacing": [float(s) for s in sample.spacing], "name": sample.name,
            "organs": None if sample.organs is None else torch.as_tensor(sample.organs), "weight": float(sample.weight)}


def _sample_from_record(record: dict[str, Any]):
    from sarco_app.segmentation.training_data import Sample

    return Sample(record["hu"].numpy(), record["label"].numpy(), tuple(record["spacing"]), record["name"],
                  None if record["organs"] is None else record["organs"].numpy(), record["weight"])


def launch(samples: Sequence, out_path: str | Path, config, val_samples: Sequence | None = None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`sarco_app.segmentation.train.train` in ``config.nproc`` processes under torchrun.

    The slices go to the workers in a temporary file; rank 0's lines are passed to ``log`` as
    they come. Returns rank 0's result (the same dict as ``train``); a worker's
    :class:`SarcoError` is raised again here, any other failure as a :class:`SarcoError` with
    the end of the workers' error output.
    """
    from sarco_app.segmentation.train import jsonable

    log = log or logger.info
    with tempfile.TemporaryDirectory(prefix="sarco_ddp_") as tmp:
        tmp = Path(tmp)
        torch.save({"samples": [_sample_record(s) for s in samples],
                    "val_samples": None if val_samples is None else [_sample_record(s) for s in val_samples]},
                   tmp / "samples.pt")
        job = {"config": jsonable(asdict(config)), "samples": str(tmp / "samples.pt"),
               "out_path": str(Path(out_path).resolve()), "result": str(tmp / "result.json")}
        (tmp / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        env[WORKER_ENV] = "1"
        for name in ("MASTER_ADDR", "MASTER_PORT"):  # torchrun --standalone picks a free port itself
            env.pop(name, None)
        # The workers import this package from wherever this process did.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(config.threads))))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(config.nproc), "-m", "sarco_app.segmentation.distributed", str(tmp / "job.json")]
        log(f"training in {config.nproc} processes (torch DDP, {'nccl' if _cuda(config) else 'gloo'})")
        with open(tmp / "stderr.txt", "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                    text=True, env=env, bufsize=1)
            for line in proc.stdout:
                log(line.rstrip("\n"))
            code = proc.wait()
            err.seek(0)
            stderr = err.read()
        result = json.loads((tmp / "result.json").read_text()) if (tmp / "result.json").is_file() else None
    if result is not None and "error" in result:
        raise SarcoError(result["error"])
    if code != 0 or result is None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise SarcoError(f"distributed training failed (exit code {code}):\n{tail}")
    return result


def _cuda(config) -> bool:
    from sarco_app.segmentation.network import resolve_device

    return resolve_device(config.device).type == "cuda"


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (run by torchrun through :func:`launch`): ``JOB.json``."""
    from sarco_app.segmentation.train import TrainConfig, jsonable, train

    job_path = (sys.argv[1:] if argv is None else list(argv))[0]
    job = json.loads(Path(job_path).read_text())
    config = TrainConfig.from_json(job["config"])
    torch.set_num_threads(max(1, int(config.threads)))
    group = init_group(config.device)
    result_path = Path(job["result"])

    def write_result(value: dict[str, Any]) -> None:
        tmp = result_path.with_name(result_path.name + ".tmp")
        tmp.write_text(json.dumps(jsonable(value)))
        tmp.replace(result_path)

    try:
        data = torch.load(job["samples"], weights_only=True)
        samples = [_sample_from_record(r) for r in data["samples"]]
        val = None if data["val_samples"] is None else [_sample_from_record(r) for r in data["val_samples"]]
        log = (lambda line: print(line, flush=True)) if group.is_main else (lambda line: None)
        result = train(samples, job["out_path"], config, val_samples=val, log=log, group=group)
        if group.is_main:
            write_result(result)
        dist.barrier()  # every rank leaves together, after rank 0 has saved
        return 0
    except SarcoError as exc:
        if group.is_main:
            write_result({"error": str(exc)})
        return 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: a gloo worker aborted there now and then
    # ("terminate called without an active exception", SIGABRT, about 1 run in 8 here) after
    # its work was done and saved, and torchrun then failed the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
