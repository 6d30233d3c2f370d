"""MONAI Label trainer ``bodycomp_unet``: (re)train the body-composition U-Net on the
datastore's final labels with :func:`sarco_app.segmentation.train.train` (the code behind
``python -m sarco_app train``).

``POST /train/bodycomp_unet`` runs it in MONAI Label's background process; one progress line per
epoch (loss, validation Dice per tissue, time) appears in ``GET /train/`` details and the train
log, and TensorBoard logs go to ``<model_dir>/train_logs/``. The best checkpoint by validation Dice becomes a candidate that replaces
``<model_dir>/bodycomp_unet.pt`` (atomically) only when it beats the served model (see *Safe
model swap* below); the ``bodycomp_unet`` infer task picks a replaced model up at its next
request. By default training fine-tunes the current model (retrained, else shipped), which is
what makes tens of slices enough on a 2-core CPU.

Request params (defaults and checks: :meth:`sarco_app.segmentation.train.TrainConfig.from_params`, the same
as the CLI's): ``epochs``, ``iterations_per_epoch`` (0 = one pass over the slices),
``batch_size``, ``crop``, ``lr``, ``seed``, ``fine_tune`` (bool), ``time_limit_s`` (0 = none; it
stops a run, the learning rate follows iterations), ``device`` (``auto``: CUDA when there),
``nproc`` (processes training together under torch DDP, dividing ``batch_size``; 1 by default),
``multi_gpu`` (bool, default true: with ``nproc`` 1, one process per visible GPU when there are
two or more; MONAI Label's ``gpus`` param chooses them), ``relabel_muscle_by_hu`` (bool: after HU augmentation, split the muscle compartment into muscle
and IMAT again by HU, as the L3 protocol does), ``split_head_iterations`` (then train the
native-grid tissue split head for this many iterations of 2 slices, the backbone frozen; not
bounded by ``time_limit_s``. With 0, a retrained backbone is saved without the current model's
head, which would no longer fit it; ``epochs`` 0 retrains only the head, which replaces the
current one only if its raw validation Dice is higher), ``organ_classes`` (bool: also learn the
organ classes of ``labels/organs/`` where an image has one; the served label keeps values 0-4).

Pseudo-label loop params (:mod:`sarco_app.segmentation.pseudo`): ``include_pseudo`` (bool, default false: add
the ``pseudo`` labels of images without a final label), ``pseudo_min_confidence`` (only those
whose overall confidence is at or above it, default 0.9) and ``pseudo_weight`` (their loss weight,
finals 1; default 0.5). A final label always wins over a pseudo-label of the same image, and
validation uses final labels only (one in seven final images, at least one when there are two).
Every run records a round (checkpoint id, finals and pseudo-labels used, validation Dice per
tissue, seconds, time) in ``<model_dir>/rounds.json``: ``GET /loop/rounds`` and
``GET /loop/learning_curve.png``.

Safe model swap: a run trains a candidate (``<model_dir>/bodycomp_unet.candidate.pt``) that
replaces the served model only when it beats it on the validation slices, with and without the
HU rule (:func:`sarco_app.segmentation.validation.compare_models`); a from-scratch run of a few iterations
therefore never replaces a good model. The comparison is in the train log, the task's result
(``model_swap``) and the round record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.common import as_bool

logger = logging.getLogger(__name__)

#: TrainConfig settings a request may give (the others belong to the library or the checkpoint).
_REQUEST_SETTINGS = ("epochs", "iterations_per_epoch", "batch_size", "crop", "lr", "seed", "time_limit_s",
                     "relabel_muscle_by_hu", "split_head_iterations", "organ_classes", "device", "nproc")

# The validation images are drawn with this seed whatever the request's ``seed``, so every run
# on the same final labels is compared on the same validation set.
VALIDATION_SEED = 0


def gpu_processes(config) -> int:
    """Processes for the ``multi_gpu`` option: one per visible GPU (MONAI Label's ``gpus`` request
    param sets ``CUDA_VISIBLE_DEVICES``) when there are two or more and the run is on CUDA, as many
    as divide the batch; else 1."""
    import torch

    from sarco_app.segmentation.network import resolve_device

    if resolve_device(config.device).type != "cuda":
        return 1
    count = torch.cuda.device_count()
    return max(n for n in range(1, max(1, count) + 1) if config.batch_size % n == 0) if count >= 2 else 1


class BodyCompTrainer(TrainTask):
    def __init__(self, output_path: Path, init_paths: Sequence[Path] | Callable[[], Sequence[Path]] = (),
                 description: str | None = None, rounds_path: Path | None = None):
        super().__init__(description or "Train the 2D body-composition U-Net on final labels (CPU or GPUs)")
        self.output_path = Path(output_path)
        self._init_paths = init_paths
        self.rounds_path = Path(rounds_path) if rounds_path else self.output_path.parent / "rounds.json"

    def config(self) -> dict[str, Any]:
        from sarco_app.segmentation.train import TrainConfig

        # The library's one set of training defaults; 0 stands for "none" in a JSON form.
        defaults = TrainConfig.param_defaults()
        settings = {name: (0 if defaults[name] is None else defaults[name]) for name in _REQUEST_SETTINGS}
        return {**settings, "fine_tune": True, "multi_gpu": True, "include_pseudo": False,
                "pseudo_min_confidence": 0.9, "pseudo_weight": 0.5}

    def _init_checkpoint(self, log: Callable[[str], None]) -> Path | None:
        """The first readable candidate; a damaged retrained checkpoint is skipped (logged)."""
        from sarco_app.segmentation.network import first_readable_model

        paths = self._init_paths() if callable(self._init_paths) else self._init_paths
        model, skipped = first_readable_model(paths)
        for message in skipped:
            log(f"bodycomp_unet: skipping unreadable checkpoint {message}")
        return Path(model.path) if model else None

    def _checked_params(self, request: dict[str, Any]):
        """Request params -> :class:`~sarco_app.segmentation.train.TrainConfig`
        (:meth:`~sarco_app.segmentation.train.TrainConfig.from_params`), ``fine_tune`` and the
        pseudo-label loop's settings, checked before any data is read. Pure validation: nothing
        here looks at devices, so the server's route can call it in its own process."""
        from sarco_app.errors import SarcoError
        from sarco_app.segmentation.train import TrainConfig

        req = dict(self.config())
        req.update({k: v for k, v in request.items() if k in req})
        fine_tune = as_bool(req["fine_tune"])
        loop = {"include_pseudo": as_bool(req["include_pseudo"])}
        problems = []
        for key, name, ok, rule in (("pseudo_min_confidence", "min_confidence", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                    ("pseudo_weight", "pseudo_weight", lambda v: 0 < v <= 1, "in (0, 1]")):
            try:
                loop[name] = float(req[key])
            except (TypeError, ValueError):
                problems.append(f"{key} must be a number, not {req[key]!r}")
                continue
            if not ok(loop[name]):
                problems.append(f"{key} must be {rule}, not {req[key]!r}")
        # The checkpoint to fine-tune is found when training starts; until then a placeholder
        # lets check() accept epochs 0 (split head only) for a fine-tune.
        try:
            config = TrainConfig.from_params({**{name: req[name] for name in _REQUEST_SETTINGS},
                                              "init_from": "the current model" if fine_tune else None})
        except SarcoError as exc:
            raise SarcoError("; ".join([str(exc), *problems])) from None
        if problems:
            raise SarcoError("invalid training params: " + "; ".join(problems))
        return config, fine_tune, loop, as_bool(req["multi_gpu"])

    def _train_config(self, request: dict[str, Any]):
        """:meth:`_checked_params` plus the run's settings: TensorBoard folder and GPU processes."""
        config, fine_tune, loop, multi_gpu = self._checked_params(request)
        # TensorBoard logs of every run: <model_dir>/train_logs/ (tensorboard --logdir there).
        config.tensorboard_dir = str(self.output_path.parent / "train_logs")
        if multi_gpu and config.nproc == 1:
            config.nproc = gpu_processes(config)
        return config, fine_tune, loop

    def check_request(self, request: dict[str, Any]) -> None:
        """Raise :class:`SarcoError` naming every bad param of ``request`` (the server's route
        calls this before it starts the training job; the job checks again)."""
        self._checked_params(request)

    def stats(self) -> dict[str, Any]:
        from sarco_app.segmentation.pseudo import read_rounds

        try:
            rounds = read_rounds(self.rounds_path)
        except Exception as exc:  # a damaged history must not break /info/
            rounds = [{"error": str(exc)}]
        loop = {"rounds": len(rounds), "last_round": rounds[-1] if rounds else None}
        if not self.output_path.is_file():
            return {"loop": loop} if rounds else {}
        try:
            from sarco_app.segmentation.network import load_checkpoint

            meta = load_checkpoint(self.output_path).meta
        except Exception as exc:  # a damaged file must not break /info/
            return {"error": str(exc)}
        return {"checkpoint": str(self.output_path), "best_epoch": meta.get("best_epoch"),
                "val_dice": meta.get("val_dice"), "seconds": meta.get("seconds"),
                "split_head_iterations": (meta.get("split_head") or {}).get("iterations"), "loop": loop}

    def __call__(self, request, datastore):
        from sarco_app.errors import SarcoError
        from sarco_app.segmentation.pseudo import retrain_round, training_pairs

        from lib.infers.pseudo import datastore_pseudos

        def log(line: str) -> None:
            print(line, flush=True)  # MONAI Label collects the process's stdout as the train log

        try:
            config, fine_tune, loop = self._train_config(request)
        except Exception as exc:
            log(f"bodycomp_unet: {exc}")  # the reason shows in GET /train/ details
            raise
        images, finals, pseudos = datastore_pseudos(datastore)
        if not finals:
            raise ValueError("no final labels in the datastore: save some labels before training")
        chosen = training_pairs(images, finals, pseudos, loop["include_pseudo"], loop["min_confidence"])
        pairs = chosen.finals + chosen.pseudo
        # The model the infer task serves now: the one a fine-tune starts from, and the one a
        # new model must beat on the validation slices before it replaces it.
        served = self._init_checkpoint(log)
        init = served if fine_tune else None
        config.init_from = str(init) if init else None
        if config.epochs == 0 and init is None:
            message = ("epochs 0 trains only the split head of the current model, but "
                       + ("fine_tune is off" if not fine_tune else "no readable model exists"))
            log(f"bodycomp_unet: {message}")
            raise SarcoError(message)
        counts = chosen.counts()
        log(f"bodycomp_unet: {len(pairs)} labelled images ({counts['finals']} final, {counts['pseudo']} pseudo; "
            f"pseudo left out: {counts['pseudo_below_threshold']} below confidence {loop['min_confidence']}, "
            f"{counts['pseudo_overridden_by_final']} with a final label); "
            f"{'fine-tuning ' + str(init) if init else 'training from scratch'} -> {self.output_path}")
        result = retrain_round(chosen, self.output_path, config, self.rounds_path, pseudo_weight=loop["pseudo_weight"],
                               log=log, served_path=served, gate=True, val_seed=VALIDATION_SEED,
                               include_pseudo=loop["include_pseudo"], min_confidence=loop["min_confidence"])
        result.pop("history", None)
        return result
