#!/usr/bin/env python
"""Simulation of the pseudo-label retraining loop: does it reach the finals-only Dice with fewer
corrected images, and do corrections get cheaper round after round?

* **Start:** a network trained from scratch on ``--n-start`` (5) phantom finals (L3, the
  default phantom distribution), or, with ``--start-model PATH``, that checkpoint (e.g. the
  shipped ``models/bodycomp_unet.pt``): the question then is whether the loop helps a good
  model where it is weak. The ``--n-start`` finals stay in every round's training set either way;
  rounds fine-tune with ``--lr`` for ``--iterations``.
* **Pool:** ``--pool`` (100) unlabelled phantoms from a shifted distribution: coarser pixels
  (``--pool-spacing``), extra correlated noise, mostly upper-abdomen levels (L1, L2; or the
  ``--pool-levels`` given, e.g. ``T11,T12,L1``, drawn uniformly), extreme body sizes and
  myosteatosis in half of them. Truth is the protocol label of the noisy image
  (the anatomical map with the HU rule, :func:`sarco_app.labels.apply_hu_ranges`). A held-out
  set of ``--heldout`` phantoms from the same shifted distribution measures Dice.
* **Each round** (``--rounds``): every pool image without a final label gets a pseudo-label with
  its entropy confidence (:func:`sarco_app.segmentation.pseudo.pseudo_label_image`); the strategy picks ``-k``
  images; the simulated annotator of ``scripts/simulate_annotator.py`` (``--start auto``
  protocol: the pseudo-label is the first interaction, then back-projection strokes) corrects
  muscle, SAT and VAT of each to IoU >= 0.95 (cap 10 per tissue) and its interactions are counted
  (IMAT is left out: no tool reaches IoU 0.95 on it, README); the image's final label is then the
  truth. The model then fine-tunes (``--iterations`` per round) on the finals (+ pseudo-labels).
* **Arms:** ``loop`` = ``pseudo_review`` order + pseudo-labels at or above ``--min-confidence``
  (default: the median overall confidence of the start model's pool pseudo-labels, fixed for all
  rounds; loss weight ``--pseudo-weight``); ``finals`` = ``random`` order, finals only; and, to
  tell the two changes apart, ``review_finals`` (``pseudo_review`` order, finals only) and
  ``random_pseudo`` (``random`` order + pseudo-labels). Same start model, pool, annotator and
  training budget. ``--arms`` picks some.
* **Per round:** held-out Dice per tissue, interactions per corrected image to IoU 0.95 and to
  0.90 (and the share of tissues that reached 0.95, the corrected images' MSV IoU before
  correction), whether the retrained model replaced the current one (a fine-tune that does not
  beat it on the finals keeps it), the share of the
  remaining pool's pseudo-labels already at MSV IoU >= 0.90 (the paper's Table 3 measure),
  pseudo-labels used, seconds.

Outputs ``<out>.csv`` (one row per arm and round) and ``<out>.png``. ``--real DIR`` also runs the
same loop (``python -m sarco_app loop``) with the real scans of ``DIR`` (``../shared/data/real``)
as the unlabelled pool and writes the pseudo-label overlays of round 0 and of the last round.
``--quick`` is a tiny run for tests.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m scripts.simulate_loop --out docs/pseudo_loop
    OMP_NUM_THREADS=1 .venv/bin/python -m scripts.simulate_loop --quick --out /tmp/loop_quick
    # from the shipped model, on the upper abdomen (docs/pseudo_loop.md, "From a good start model"):
    OMP_NUM_THREADS=1 .venv/bin/python -m scripts.simulate_loop --start-model models/bodycomp_unet.pt \
        --pool-levels T11,T12,L1 --crop 192 --lr 3e-4 --iterations 60 --rounds 3 --pool 60 --heldout 12 \
        --out docs/pseudo_loop_good_start
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.stats import spearmanr

from sarco_app import labels as L
from sarco_app.segmentation import pseudo
from sarco_app.measurement.evaluate import agreement
from sarco_app.metrics import PooledOverlap
from sarco_app.segmentation.network import DEFAULT_NETWORK
from sarco_app.synthesis.phantom import generate
from sarco_app.segmentation.segment import get_model
from sarco_app.segmentation.train import TrainConfig, train
from sarco_app.segmentation.training_data import Sample

ROOT = Path(__file__).resolve().parents[1]

TISSUES_CORRECTED = ("muscle", "sat", "vat")
#: First phantom seeds of the start finals, the pool and the held-out set.
START_SEED0, POOL_SEED0, HELDOUT_SEED0 = 900000, 910000, 920000
#: Levels of the default shifted pool and their probabilities (mostly upper abdomen).
DEFAULT_POOL_LEVELS = {"L1": 0.35, "L2": 0.35, "L3": 0.15, "L4": 0.15}
#: arm -> (review order, pseudo-labels used). ``loop`` and ``finals`` are the issue's comparison;
#: the other two separate the order's effect from the pseudo-labels' (``--arms``).
ARMS = {"loop": ("pseudo_review", True), "finals": ("random", False),
        "review_finals": ("pseudo_review", False), "random_pseudo": ("random", True)}
ARM_LABELS = {"loop": "pseudo_review + pseudo-labels", "finals": "random, finals only",
              "review_finals": "pseudo_review, finals only", "random_pseudo": "random + pseudo-labels"}
ARM_STYLES = {"loop": "o-", "finals": "s--", "review_finals": "^:", "random_pseudo": "v-."}


# --------------------------------------------------------------------------- data


def start_phantom(seed: int, size: int):
    """A default-distribution L3 phantom: (hu, truth, spacing)."""
    ph = generate(seed, size=size)
    return ph.hu.astype(np.float32), ph.label.astype(np.uint8), tuple(float(s) for s in ph.spacing)


def shifted_phantom(seed: int, size: int, spacing_range: tuple[float, float], levels: Sequence[str] | None = None):
    """A phantom of the shifted pool distribution: (hu, truth, spacing). ``levels``: vertebral
    levels drawn uniformly (default: :data:`DEFAULT_POOL_LEVELS` with their probabilities)."""
    rng = np.random.default_rng([seed, 0x100F])
    if levels:
        level = str(rng.choice(list(levels)))
    else:
        level = str(rng.choice(list(DEFAULT_POOL_LEVELS), p=list(DEFAULT_POOL_LEVELS.values())))
    height = float(rng.uniform(150, 192))
    bmi = float(rng.choice([rng.uniform(16, 20), rng.uniform(31, 40)]))  # thin or obese
    muscle_hu = float(rng.uniform(5, 28)) if rng.random() < 0.5 else None  # myosteatosis
    ph = generate(seed, size=size, level=level, spacing_mm=float(rng.uniform(*spacing_range)),
                  height_cm=height, weight_kg=min(299.0, bmi * (height / 100) ** 2), muscle_hu=muscle_hu)
    hu = ph.hu.astype(np.float32)
    sigma = float(rng.uniform(10, 30))  # extra correlated noise inside the body (another scanner)
    noise = ndi.gaussian_filter(rng.standard_normal(hu.shape), 0.8)
    noise *= sigma / max(float(noise.std()), 1e-6)
    hu = np.where(hu > -500, hu + noise, hu).astype(np.float32)
    truth = L.apply_hu_ranges(ph.anatomical_label, hu)
    return hu, truth, tuple(float(s) for s in ph.spacing)


# --------------------------------------------------------------------------- the annotator


def correct(hu, truth, current, spacing) -> tuple[int, int, int]:
    """Interactions the simulated annotator needs to bring ``current`` to IoU >= 0.95 on
    muscle, SAT and VAT: 1 (the pseudo-label, accepted as the start) + its strokes (a tissue
    that does not reach 0.95 within the cap of 10 counts 10); how many of the three tissues
    reached 0.95; and the interactions the same session took to reach IoU 0.90 (the paper's
    measure; a tissue that never does counts 10). Strokes move IoU by 0.01-0.05 each, so from a
    poor pseudo-label 0.95 is out of reach within the cap and the 0.90 count tells more."""
    from scripts.simulate_annotator import ours, run_session

    tool = ours("backprojection")
    strokes = reached = strokes_090 = 0
    for tissue in TISSUES_CORRECTED:
        session = run_session(tool, hu, truth, tissue, current, spacing, goal=0.95, cap=10, auto_seconds=0.0)
        strokes += session["interactions"] - 1
        reached += int(session["reached"])
        to_090 = next((k + 1 for k, iou in enumerate(session["ious"]) if iou >= 0.90), 10)
        strokes_090 += to_090 - 1
    return 1 + strokes, reached, 1 + strokes_090


def msv_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pooled IoU of muscle, SAT and VAT (:func:`sarco_app.measurement.evaluate.agreement`'s MSV);
    1 when neither map holds any of them (nothing to correct: the annotator's rule,
    :func:`simulate_annotator.session_iou`), not the library's ``None``."""
    value = agreement(pred, truth)["MSV"]["iou"]
    return 1.0 if value is None else float(value)


# --------------------------------------------------------------------------- training


def train_model(samples, val, init: str | None, out: Path, iterations: int, args, seed: int) -> tuple[str, bool]:
    """Train (or fine-tune ``init``) and return the model now in use and whether this run
    replaced it (a fine-tune that does not beat ``init`` on the finals keeps ``init``)."""
    config = TrainConfig(epochs=args.epochs_per_round if init else args.start_epochs,
                         iterations_per_epoch=max(1, iterations // (args.epochs_per_round if init else args.start_epochs)),
                         batch_size=args.batch_size, crop=args.crop, lr=args.lr if init else args.start_lr,
                         seed=seed, threads=1, init_from=init, network=dict(DEFAULT_NETWORK))
    result = train(samples, out, config, val_samples=val, log=lambda line: None)
    return (str(out), True) if result["checkpoint"] else (str(init), False)


def heldout_dice(model, heldout) -> dict[str, float]:
    """Pooled Dice per tissue over the held-out phantoms (default output; NaN for a tissue
    absent from all of them, so the CSV stays numeric)."""
    pooled = PooledOverlap()
    for hu, truth, spacing in heldout:
        label, _ = pseudo.pseudo_label_volume(hu, spacing, model, [0])
        pooled.add(label, truth)
    return {name: (float("nan") if value is None else value) for name, value in pooled.dice().items()}


# --------------------------------------------------------------------------- one arm


def run_arm(arm: str, start_model: str, finals0, pool, heldout, args, work: Path, log,
            min_confidence: float) -> list[dict]:
    strategy, use_pseudo = ARMS[arm]
    rng = random.Random(args.seed)
    current = start_model
    final_ids: list[int] = []
    rows = []
    t_arm = time.time()
    for round_index in range(0, args.rounds + 1):
        t0 = time.time()
        model = get_model(current)
        queue = [i for i in range(len(pool)) if i not in final_ids]
        preds, scores = {}, {}
        for i in queue:
            hu, truth, spacing = pool[i]
            label, confidence = pseudo.pseudo_label_volume(hu, spacing, model, [0])
            preds[i], scores[i] = label, pseudo.overall_confidence(confidence)
        pool_iou = {i: msv_iou(preds[i], pool[i][1]) for i in queue}
        share90 = float(np.mean([pool_iou[i] >= 0.90 for i in queue])) if queue else float("nan")
        # How well the overall confidence ranks the pseudo-labels' quality (what pseudo_review
        # and the confidence threshold rely on): Spearman's rho over the pool.
        ranked = [i for i in queue if scores[i] is not None]
        rho = (float(spearmanr([scores[i] for i in ranked], [pool_iou[i] for i in ranked]).statistic)
               if len(ranked) >= 3 else float("nan"))
        dice = heldout_dice(model, heldout) if round_index == 0 else {k: float("nan") for k in L.LABELS}
        confidences = [scores[i] for i in queue if scores[i] is not None]
        row = {"arm": arm, "round": round_index, "corrected_total": len(final_ids), "corrected_this_round": 0,
               "interactions_per_image": "", "interactions_to_090": "", "tissues_reaching_095": "", "msv_iou_before_correction": "",
               "pseudo_used": 0, "model_replaced": "", "min_confidence": round(min_confidence, 4), "pool_left": len(queue),
               "confidence_median": round(float(np.median(confidences)), 4) if confidences else "",
               "pseudo_share_iou90": round(share90, 4), "confidence_iou_spearman": round(rho, 3),
               **{f"heldout_dice_{k}": round(v, 4) for k, v in dice.items()},
               "heldout_dice_msv_mean": round(float(np.mean([dice[k] for k in TISSUES_CORRECTED])), 4)}
        if round_index > 0:
            # The annotator corrects k images in the strategy's order, from their pseudo-labels.
            ids = [str(i) for i in queue]
            score_map = {str(i): scores[i] for i in queue}
            if strategy == "pseudo_review":
                picked = [int(i) for i in pseudo.review_order("pseudo_review", ids, score_map)[: args.k]]
            else:
                picked = rng.sample(queue, min(args.k, len(queue)))
            sessions = [correct(pool[i][0], pool[i][1], preds[i], pool[i][2]) for i in picked]
            interactions = [n for n, _, _ in sessions]
            iou_before = [msv_iou(preds[i], pool[i][1]) for i in picked]
            final_ids += picked
            samples = [Sample(hu, truth, sp, f"start{j}") for j, (hu, truth, sp) in enumerate(finals0)]
            samples += [Sample(pool[i][0], pool[i][1], pool[i][2], f"pool{i}") for i in final_ids]
            val = list(samples)  # finals only; the held-out set never steers training
            used = 0
            if use_pseudo:
                for i in queue:
                    if i not in picked and scores[i] is not None and scores[i] >= min_confidence:
                        samples.append(Sample(pool[i][0], preds[i], pool[i][2], f"pseudo{i}", weight=args.pseudo_weight))
                        used += 1
            current, replaced = train_model(samples, val, current, work / f"{arm}_round{round_index}.pt",
                                  args.iterations, args, seed=args.seed + round_index)
            dice = heldout_dice(get_model(current), heldout)
            row.update({"corrected_total": len(final_ids), "corrected_this_round": len(picked),
                        "interactions_per_image": round(float(np.mean(interactions)), 3),
                        "interactions_to_090": round(float(np.mean([n for _, _, n in sessions])), 3),
                        "tissues_reaching_095": round(float(np.mean([r for _, r, _ in sessions])) / len(TISSUES_CORRECTED), 4),
                        "msv_iou_before_correction": round(float(np.mean(iou_before)), 4), "pseudo_used": used,
                        "model_replaced": int(replaced),
                        **{f"heldout_dice_{k}": round(v, 4) for k, v in dice.items()},
                        "heldout_dice_msv_mean": round(float(np.mean([dice[k] for k in TISSUES_CORRECTED])), 4)})
        row["seconds"] = round(time.time() - t0, 1)
        row["seconds_total"] = round(time.time() - t_arm, 1)
        rows.append(row)
        log(f"{arm} round {round_index}: corrected {row['corrected_total']}, interactions/image "
            f"{row['interactions_per_image'] or '-'}, pseudo used {row['pseudo_used']}, share IoU>=0.90 "
            f"{row['pseudo_share_iou90']}, held-out Dice M {row['heldout_dice_muscle']} S {row['heldout_dice_sat']} "
            f"V {row['heldout_dice_vat']} [{row['seconds']} s]")
    return rows


# --------------------------------------------------------------------------- outputs


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        arm_rows = [r for r in rows if r["arm"] == arm]
        style, label = ARM_STYLES[arm], ARM_LABELS[arm]
        axes[0].plot([r["corrected_total"] for r in arm_rows], [r["heldout_dice_msv_mean"] for r in arm_rows], style, label=label)
        later = [r for r in arm_rows if r["round"] > 0]
        axes[1].plot([r["round"] for r in later], [r["interactions_to_090"] for r in later], style, label=label)
        axes[2].plot([r["round"] for r in arm_rows], [r["pseudo_share_iou90"] for r in arm_rows], style, label=label)
    axes[0].set(xlabel="corrected images (finals from the pool)", ylabel="held-out Dice, mean of M/S/V")
    axes[1].set(xlabel="round", ylabel="interactions per corrected image to IoU 0.90")
    axes[2].set(xlabel="round (pseudo-labels made by the model of this round)",
                ylabel="share of pool pseudo-labels at MSV IoU >= 0.90")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows) -> str:
    cols = ["arm", "round", "corrected_total", "interactions_per_image", "interactions_to_090", "tissues_reaching_095",
            "msv_iou_before_correction", "pseudo_used", "model_replaced", "confidence_median", "pseudo_share_iou90", "confidence_iou_spearman",
            "heldout_dice_muscle", "heldout_dice_sat", "heldout_dice_vat", "heldout_dice_imat", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- real scans


def real_loop(real_dir: Path, start_finals, start_model: str, args, out: Path, log) -> None:
    """The CLI loop with the real scans as the unlabelled pool; overlays of the pseudo-labels of
    round 0 (start model) and of the model after the last round."""
    from sarco_app.__main__ import main as cli
    from sarco_app.inputs.ingest import load_image, make_image, save_image, save_label
    from sarco_app.figures.overlay import overlay_png

    studies = Path(tempfile.mkdtemp(prefix="sarco_real_loop_"))
    try:
        (studies / "labels" / "final").mkdir(parents=True)
        for j, (hu, truth, spacing) in enumerate(start_finals):
            image = make_image(hu, spacing)
            save_image(image, studies / f"phantom{j}.nii.gz")
            save_label(truth, image, studies / "labels" / "final" / f"phantom{j}.nii.gz")
        sources = [p for p in sorted(real_dir.rglob("*")) if p.name.endswith((".nii.gz", ".nii")) and "vertebrae" not in p.name]
        sources += [d for d in sorted(real_dir.iterdir()) if d.is_dir() and any(f.suffix == ".dcm" or f.name.startswith("CT.") for f in d.iterdir())]
        real_ids = []
        for k, src in enumerate(sources):
            try:
                image = load_image(src)
            except Exception as exc:  # e.g. a DICOM SEG beside the CT: say so, keep going
                log(f"real scan {src}: skipped ({exc})")
                continue
            real_id = f"real{k}_{src.name.split('.')[0]}"
            save_image(image, studies / f"{real_id}.nii.gz")
            real_ids.append(real_id)
        code = cli(["loop", "--studies", str(studies), "--rounds", str(args.real_rounds), "--init", start_model,
                    "--out-dir", str(studies / "loop"), "--min-confidence", str(args.min_confidence),
                    "--pseudo-weight", str(args.pseudo_weight), "--epochs", str(args.epochs_per_round),
                    "--iterations-per-epoch", str(max(1, args.iterations // args.epochs_per_round)),
                    "--batch-size", str(args.batch_size), "--crop", str(args.crop), "--lr", str(args.lr)])
        if code != 0:
            raise SystemExit(f"the real-scan loop failed ({code})")
        shutil.copy(studies / "loop" / "rounds.json", f"{out}_real_rounds.json")
        last = sorted((studies / "loop").glob("round*.pt"))
        models = {"round0": start_model, "last": str(last[-1]) if last else start_model}
        for real_id in real_ids:
            image = load_image(studies / f"{real_id}.nii.gz")
            for name, path in models.items():
                result = pseudo.pseudo_label_image(image, get_model(path))
                k = result.slices[0]
                hu = image.hu if image.hu.ndim == 2 else image.hu[:, :, k]
                lab = result.label if result.label.ndim == 2 else result.label[:, :, k]
                overlay_png(hu, lab, image.spacing[:2], f"{out}_real_{real_id}_{name}.png",
                            title=f"{real_id} slice {k}, {name}: confidence {result.confidence['overall']:.3f}")
            log(f"real {real_id}: overlays written")
    finally:
        shutil.rmtree(studies, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output prefix: <out>.csv, <out>.png")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (overrides the sizes)")
    parser.add_argument("--n-start", type=int, default=5,
                        help="phantom finals at the start (default 5): they train the start model and stay in "
                             "every round's training set")
    parser.add_argument("--start-model", type=Path, default=None,
                        help="start from this checkpoint (e.g. models/bodycomp_unet.pt) instead of training one on "
                             "the --n-start finals; rounds fine-tune it with --lr for --iterations")
    parser.add_argument("--pool-levels", type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
                        default=None, help="comma-separated levels of the pool and held-out phantoms, drawn "
                        "uniformly, e.g. T11,T12,L1 (default: L1 0.35, L2 0.35, L3 0.15, L4 0.15)")
    parser.add_argument("--pool", type=int, default=100, help="unlabelled pool phantoms (default 100)")
    parser.add_argument("--heldout", type=int, default=20, help="held-out phantoms (default 20)")
    parser.add_argument("--size", type=int, default=256, help="phantom matrix (default 256)")
    parser.add_argument("--pool-spacing", type=float, nargs=2, default=(1.5, 2.4),
                        help="pool pixel spacing range, mm (default 1.5 2.4; the start set has ~1.2-2.0 at 256)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-k", type=int, default=5, help="images corrected per round (default 5)")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="pseudo-labels at or above this overall confidence are used (default: the "
                             "--pseudo-quantile of the start model's pool confidences, fixed for all rounds)")
    parser.add_argument("--pseudo-quantile", type=float, default=0.5,
                        help="quantile of the start model's pool confidences used as --min-confidence (default 0.5)")
    parser.add_argument("--pseudo-weight", type=float, default=0.5)
    parser.add_argument("--start-epochs", type=int, default=4)
    parser.add_argument("--start-iterations", type=int, default=600, help="training of the start model")
    parser.add_argument("--start-lr", type=float, default=3e-3)
    parser.add_argument("--epochs-per-round", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300,
                        help="fine-tuning iterations per round (default 300; with 120 a round often did not beat "
                             "the model it started from, so the model stayed unchanged)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", type=lambda text: [a for a in text.split(",") if a], default=list(ARMS),
                        help=f"comma-separated arms of {', '.join(ARMS)} (default: all four)")
    parser.add_argument("--real", type=Path, default=None, help="also run the loop on these real scans")
    parser.add_argument("--real-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown or 'empty'}; choose from {', '.join(ARMS)}")
    if args.pool_levels is not None:
        from sarco_app.synthesis.phantom.plan import LEVELS

        bad = [v for v in args.pool_levels if v not in LEVELS]
        if bad or not args.pool_levels:
            parser.error(f"--pool-levels: unknown {bad or 'empty'}; choose from {', '.join(LEVELS)}")
    if args.start_model is not None and not args.start_model.is_file():
        parser.error(f"--start-model {args.start_model}: no such file")
    if args.quick:
        args.pool, args.heldout, args.size, args.rounds, args.k = 4, 1, 96, 2, 1
        args.n_start, args.start_iterations, args.start_epochs, args.iterations = 2, 4, 1, 2
        args.epochs_per_round, args.crop, args.batch_size, args.real_rounds = 1, 64, 2, 1
    torch.set_num_threads(1)
    t_start = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {line}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    finals0 = [start_phantom(START_SEED0 + j, args.size) for j in range(args.n_start)]
    pool = [shifted_phantom(POOL_SEED0 + j, args.size, tuple(args.pool_spacing), args.pool_levels)
            for j in range(args.pool)]
    heldout = [shifted_phantom(HELDOUT_SEED0 + j, args.size, tuple(args.pool_spacing), args.pool_levels)
               for j in range(args.heldout)]
    log(f"{len(finals0)} start finals, {len(pool)} pool and {len(heldout)} held-out phantoms generated")
    work = Path(tempfile.mkdtemp(prefix="sarco_loop_sim_"))
    try:
        if args.start_model is not None:
            start_model = str(args.start_model)
            log(f"start model {start_model} (not trained here)")
        else:
            samples = [Sample(hu, truth, sp, f"start{j}") for j, (hu, truth, sp) in enumerate(finals0)]
            start_model, _ = train_model(samples, samples, None, work / "start.pt", args.start_iterations, args, args.seed)
            log(f"start model trained on {len(samples)} finals")
        min_confidence = args.min_confidence
        if min_confidence is None:
            # A model trained on five slices is far less sure of itself than the shipped one:
            # an absolute 0.9 would admit no pseudo-label, so the start model's own median is used.
            model = get_model(start_model)
            confidences = [pseudo.overall_confidence(pseudo.pseudo_label_volume(hu, sp, model, [0])[1])
                           for hu, _, sp in pool]
            min_confidence = float(np.quantile(confidences, args.pseudo_quantile))
            log(f"min confidence {min_confidence:.4f}: the {args.pseudo_quantile} quantile of the start model's "
                f"pool confidences ({min(confidences):.4f}..{max(confidences):.4f})")
        args.min_confidence = min_confidence  # the real-scan loop uses the same threshold
        rows = []
        for arm in args.arms:
            rows += run_arm(arm, start_model, finals0, pool, heldout, args, work, log, min_confidence)
            # After every arm, so a long run that is stopped keeps the arms it finished.
            write_csv(rows, Path(f"{args.out}.csv"))
            plot(rows, Path(f"{args.out}.png"))
        print(markdown_table(rows))
        if args.real:
            real_loop(args.real, finals0, start_model, args, args.out, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done: {args.out}.csv, {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
