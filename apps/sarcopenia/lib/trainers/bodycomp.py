"""MONAI Label trainer ``bodycomp_unet``: (re)train the body-composition U-Net on the
datastore's final labels with :func:`sarco_app.train.train` (the code behind
``python -m sarco_app train``).

``POST /train/bodycomp_unet`` runs it in MONAI Label's background process; one progress line per
epoch (loss, validation Dice per tissue, time) appears in ``GET /train/`` details and the train
log. The best checkpoint by validation Dice is written atomically to
``<model_dir>/bodycomp_unet.pt``, which the ``bodycomp_unet`` infer task picks up at its next
request. By default training fine-tunes the current model (retrained, else shipped), which is
what makes tens of slices enough on a 2-core CPU.

Request params: ``epochs``, ``iterations_per_epoch`` (0 = one pass over the slices),
``batch_size``, ``crop``, ``lr``, ``seed``, ``fine_tune`` (bool), ``time_limit_s`` (0 = none).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from monailabel.interfaces.tasks.train import TrainTask

logger = logging.getLogger(__name__)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class BodyCompTrainer(TrainTask):
    def __init__(self, output_path: Path, init_paths: Sequence[Path] | Callable[[], Sequence[Path]] = (),
                 description: str | None = None):
        super().__init__(description or "Train the 2D body-composition U-Net on final labels (CPU)")
        self.output_path = Path(output_path)
        self._init_paths = init_paths

    def config(self) -> dict[str, Any]:
        return {
            "epochs": 10,
            "iterations_per_epoch": 0,
            "batch_size": 8,
            "crop": 128,
            "lr": 1e-3,
            "seed": 0,
            "fine_tune": True,
            "time_limit_s": 0,
        }

    def _init_checkpoint(self) -> Path | None:
        paths = self._init_paths() if callable(self._init_paths) else self._init_paths
        return next((Path(p) for p in paths if Path(p).is_file()), None)

    def stats(self) -> dict[str, Any]:
        if not self.output_path.is_file():
            return {}
        try:
            from sarco_app.network import load_checkpoint

            meta = load_checkpoint(self.output_path).meta
        except Exception as exc:  # a damaged file must not break /info/
            return {"error": str(exc)}
        return {"checkpoint": str(self.output_path), "best_epoch": meta.get("best_epoch"),
                "val_dice": meta.get("val_dice"), "seconds": meta.get("seconds")}

    def __call__(self, request, datastore):
        from sarco_app.train import TrainConfig, load_pairs, train

        req = dict(self.config())
        req.update({k: v for k, v in request.items() if k in req})
        pairs = [(d["image"], d["label"]) for d in datastore.datalist()]
        if not pairs:
            raise ValueError("no final labels in the datastore: save some labels before training")
        samples = load_pairs(pairs)
        init = self._init_checkpoint() if _as_bool(req["fine_tune"]) else None
        config = TrainConfig(
            epochs=int(req["epochs"]),
            iterations_per_epoch=int(req["iterations_per_epoch"]) or None,
            batch_size=int(req["batch_size"]),
            crop=int(req["crop"]),
            lr=float(req["lr"]),
            seed=int(req["seed"]),
            init_from=str(init) if init else None,
            time_limit_s=float(req["time_limit_s"]) or None,
        )

        def log(line: str) -> None:
            print(line, flush=True)  # MONAI Label collects the process's stdout as the train log

        log(f"bodycomp_unet: {len(pairs)} labelled images, {len(samples)} slices; "
            f"{'fine-tuning ' + str(init) if init else 'training from scratch'} -> {self.output_path}")
        result = train(samples, self.output_path, config, log=log)
        result.pop("history", None)
        return result
