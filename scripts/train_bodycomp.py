#!/usr/bin/env python
"""Train the shipped body-composition network (models/bodycomp_unet.pt) from phantoms only.

Reproducible from ``--seed``: the phantom seeds, the validation split and the training
randomness all derive from it. Phantoms are drawn like this (see :func:`phantom_plan`):

* 65 %: the phantom generator's clinical default (512 matrix, 0.6-1.0 mm pixels);
* 35 %: coarse pixels, 1.0-3.0 mm, on a matrix that keeps a ~420 mm field of view (the shared
  real NIfTI has 3 mm pixels);
* levels L3 (70 %) and L1/L2/L4 (30 %) so that labelling all slices of a volume behaves.

The shipped model is three runs (recorded in models/MODEL_CARD.md): the defaults (stage 1, 80 min),
a fine-tune on another seed's phantoms with larger crops (stage 2, 45 min), and the split head
with the backbone frozen (stage 3, 14 min)::

    .venv/bin/python -m scripts.train_bodycomp --out runs/stage1.pt
    .venv/bin/python -m scripts.train_bodycomp --seed 7 --init runs/stage1.pt --lr 6e-4 --epochs 90 \
        --crop 192 --batch-size 4 --time-limit 2700 --out models/bodycomp_unet.pt
    .venv/bin/python -m scripts.train_bodycomp --seed 21 --init models/bodycomp_unet.pt --epochs 0 \
        --count 300 --split-head-iterations 1500 --threads 1 --out models/bodycomp_unet.pt

Stages 4 and 5 (organ classes, class weights) are in the model card. ``--nproc N`` trains in N
processes under torch DDP (the same run as one process; each takes batch-size / N crops of every
batch), ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sarco_app.synthesis.phantom import generate
from sarco_app.segmentation.network import DEFAULT_NETWORK
from sarco_app.segmentation.train import TrainConfig, train
from sarco_app.segmentation.training_data import Sample


def parse_levels(text: str | None) -> dict[str, float] | None:
    """``"L3:0.4,T12:0.2,..."`` -> {level: weight} (normalised); None stays None."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        level, _, weight = part.partition(":")
        weights[level.strip().upper()] = float(weight or 1.0)
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


def phantom_plan(count: int, seed: int, coarse_fraction: float = 0.35,
                 levels: dict[str, float] | None = None) -> list[dict]:
    """Arguments of :func:`sarco_app.synthesis.phantom.generate` for ``count`` phantoms from ``seed``.
    ``levels`` weights the vertebral levels (default: L3 70 %, L1/L2/L4 10 % each)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB0D1]))
    plan = []
    for _ in range(count):
        kwargs = {"seed": int(rng.integers(0, 2**31 - 1))}
        if levels is None:
            kwargs["level"] = "L3" if rng.random() < 0.7 else str(rng.choice(["L1", "L2", "L4"]))
        else:
            kwargs["level"] = str(rng.choice(list(levels), p=list(levels.values())))
        if rng.random() < coarse_fraction:
            spacing = float(rng.uniform(1.0, 3.0))
            kwargs["spacing_mm"] = spacing
            kwargs["size"] = int(np.clip(round(420 / spacing), 64, 512))
        plan.append(kwargs)
    return plan


def make_samples(plan: list[dict], log=print) -> list[Sample]:
    samples = []
    t0 = time.time()
    for i, kwargs in enumerate(plan):
        args = dict(kwargs)
        ph = generate(args.pop("seed"), **args)
        samples.append(Sample(ph.hu, ph.label, ph.spacing, f"phantom seed {kwargs['seed']} {ph.params['level']}",
                              ph.organ_label))
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(plan)} phantoms [{time.time() - t0:.0f} s]")
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/bodycomp_unet.pt"))
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--count", type=int, default=300, help="training phantoms")
    parser.add_argument("--val-count", type=int, default=16, help="validation phantoms (other seeds)")
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    parser.add_argument("--time-limit", type=float, default=4800.0,
                        help="seconds of training after which the run stops (default 80 min; the learning-rate "
                             "schedule follows iterations, see models/MODEL_CARD.md)")
    parser.add_argument("--init", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument("--features", type=str, default="24,24,48,96,192,24",
                        help="BasicUNet features, comma-separated (the shipped model's by default)")
    parser.add_argument("--relabel-muscle-by-hu", action="store_true",
                        help="after intensity augmentation, split the muscle compartment into muscle and "
                             "IMAT again by HU (-29 HU), as the protocol truth does on the final image")
    parser.add_argument("--split-head-iterations", type=int, default=0,
                        help="then train the split head (tissue by HU on each phantom's own grid) for this many "
                             "iterations of 2 phantoms, the backbone frozen; with --epochs 0 only the head is trained")
    parser.add_argument("--split-head-lr", type=float, default=3e-3)
    parser.add_argument("--organ-classes", action="store_true",
                        help="also learn the phantoms' organ classes (liver, spleen, kidney, bowel, bone, diaphragm, "
                             "other); a five-class --init model gets the extra outputs")
    parser.add_argument("--class-weights", default=None, metavar="NAME:W,...",
                        help="cross-entropy weight per class, e.g. 'diaphragm:3,liver:2' (tissue names, "
                             "background and the organ classes; others 1)")
    parser.add_argument("--class-weight-border-mm", type=float, default=0.0, metavar="MM",
                        help="spread the class weights this far (mm) across every border (default 0: off)")
    parser.add_argument("--last", type=Path, default=None,
                        help="also write the last epoch's network here (no split head), whatever its validation Dice")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes (torch DDP; each takes batch-size / nproc crops of every batch)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--levels", type=str, default=None,
                        help="level weights, e.g. 'L3:0.4,L1:0.15,L2:0.1,L4:0.1,T12:0.13,T11:0.12' "
                             "(default: L3 70 %%, L1/L2/L4 10 %% each)")
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    t0 = time.time()
    log(f"generating {args.count} training + {args.val_count} validation phantoms (seed {args.seed})")
    # Validation phantoms use a different seed stream than training ones.
    levels = parse_levels(args.levels)
    train_samples = make_samples(phantom_plan(args.count, args.seed, levels=levels), log)
    val_samples = make_samples(phantom_plan(args.val_count, args.seed + 7919, levels=levels), log)
    t_data = time.time() - t0
    log(f"phantoms ready in {t_data:.0f} s")
    # The options' defaults are the shipped model's stage-1 recipe (models/MODEL_CARD.md), not
    # the library's defaults; TrainConfig.from_params checks them like the CLI's and the app's.
    config = TrainConfig.from_params({
        "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "batch_size": args.batch_size,
        "crop": args.crop, "lr": args.lr, "seed": args.seed, "threads": args.threads, "max_val": args.val_count,
        "init_from": str(args.init) if args.init else None, "time_limit_s": args.time_limit,
        "relabel_muscle_by_hu": args.relabel_muscle_by_hu, "split_head_iterations": args.split_head_iterations,
        "split_head_lr": args.split_head_lr, "organ_classes": args.organ_classes,
        "last_path": str(args.last) if args.last else None, "class_weights": args.class_weights,
        "class_weight_border_mm": args.class_weight_border_mm, "nproc": args.nproc, "device": args.device,
    })
    if args.features:
        features = [int(f) for f in args.features.split(",")]
        config.network = {**DEFAULT_NETWORK, "kwargs": {**DEFAULT_NETWORK["kwargs"], "features": features}}
    result = train(train_samples, args.out, config, val_samples=val_samples, log=log)
    summary = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "seed": args.seed,
        "train_phantoms": args.count,
        "val_phantoms": args.val_count,
        "data_seconds": round(t_data, 1),
        "train_seconds": result["seconds"],
        "iterations": result["iterations"],
        "best_epoch": result["best_epoch"],
        "val_dice": result["best_dice"],
        "split_head": result["split_head"],
    }
    log("summary " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
