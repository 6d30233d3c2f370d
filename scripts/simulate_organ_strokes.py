#!/usr/bin/env python
"""Simulated annotator on the real-CT failure: organs glued to the muscle wall labelled muscle.

On real upper-abdomen CT the automatic label marks organs pressed against the abdominal wall as
muscle (liver at the lateral wall, spleen and kidney at the posterior wall). This script makes
that failure on phantoms at L1/L2 (where they have liver, spleen and kidneys) and counts the
interactions the simulated annotator of ``simulate_annotator.py`` (protocol ``--start auto``:
strokes only, no rectangle, every call edits the starting label) needs to bring muscle to IoU
>= 0.90 and 0.95.

The starting label (:func:`organ_failure_label`) is the protocol truth plus, relabelled as
muscle, the liver, spleen and kidney pixels within ``--reach-mm`` (default 20 mm) of the true
muscle, in organs that touch it (within 1.5 pixels), and only where their HU lies in the muscle
range (-29..150 HU, as the protocol's HU rule would leave them): the part of the organ within a
couple of centimetres of the wall, which is how the network's mistake looks on real CT.

Writes ``<out>_sessions.csv`` (one row per phantom, method and code version; rows of other
``--tag`` values already in the file are kept, so a run on the previous code and one on the
new code end up side by side), ``<out>_summary.csv`` and ``<out>.png``.

Usage (the numbers in docs/interactive.md; "main" is the same script run from an export of
the previous commit, see the docs)::

    .venv/bin/python -m scripts.simulate_organ_strokes --n 16 --size 256 --tag strokes \\
        --out docs/organ_strokes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from sarco_app.labels import MUSCLE, MUSCLE_HU, ORGAN_NAMES
from scripts.simulate_annotator import ours, run_session

ROOT = Path(__file__).resolve().parents[1]

#: Organs the network takes for muscle on real CT where they touch the wall.
ORGANS = ("liver", "spleen", "kidney")
CHECKPOINTS = (1, 3, 10)


def organ_failure_label(truth: np.ndarray, organ_label: np.ndarray, hu: np.ndarray, spacing,
                        reach_mm: float = 20.0) -> np.ndarray:
    """The truth with the organ part near the muscle wall relabelled as muscle.

    Every connected liver / spleen / kidney region that comes within 1.5 pixels of true muscle
    gives its pixels within ``reach_mm`` (Euclidean, mm) of true muscle whose HU lies in the
    muscle range. Returns a new uint8 label map.
    """
    muscle = truth == MUSCLE
    distance = ndi.distance_transform_edt(~muscle, sampling=spacing)
    in_range = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])
    out = truth.copy()
    for name in ORGANS:
        organ = organ_label == ORGAN_NAMES.index(name) + 1
        regions, count = ndi.label(organ, structure=np.ones((3, 3), bool))
        for k in range(1, count + 1):
            region = regions == k
            if distance[region].min() > 1.5 * max(spacing):
                continue
            out[region & (distance <= reach_mm) & in_range & (truth == 0)] = MUSCLE
    return out


def load(seed: int, size: int, level: str):
    from sarco_app.synthesis import phantom

    ph = phantom.generate(seed, size=size, level=level)
    return (np.asarray(ph.hu, np.float32), np.asarray(ph.label, np.uint8),
            np.asarray(ph.organ_label), tuple(float(s) for s in ph.spacing[:2]))


def iou_after(ious: list[float], k: int) -> float:
    """IoU after ``k`` interactions (a session that stopped early keeps its last IoU)."""
    return ious[min(k, len(ious)) - 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="phantoms (levels alternate L1, L2)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed0", type=int, default=2000)
    parser.add_argument("--reach-mm", type=float, default=20.0,
                        help="organ pixels within this distance of true muscle become muscle")
    parser.add_argument("--methods", default="backprojection,grabcut")
    parser.add_argument("--tag", default="current", help="code version recorded in the CSV")
    parser.add_argument("--out", default=str(ROOT / "docs" / "organ_strokes"))
    args = parser.parse_args(argv)

    import logging

    import pandas as pd

    logging.disable(logging.WARNING)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    begin = time.time()
    for i in range(args.n):
        seed, level = args.seed0 + i, ("L1", "L2")[i % 2]
        hu, truth, organs, spacing = load(seed, args.size, level)
        start = organ_failure_label(truth, organs, hu, spacing, args.reach_mm)
        added = int(np.count_nonzero((start == MUSCLE) & (truth != MUSCLE)))
        for m in methods:
            res = run_session(ours(m), hu, truth, "muscle", start, spacing, goal=0.95, cap=10,
                              auto_seconds=0.0)
            ious = res["ious"]
            at_090 = [k + 1 for k, v in enumerate(ious) if v >= 0.90]
            row = {"tag": args.tag, "seed": seed, "level": level, "method": m,
                   "organ_cm2": round(added * spacing[0] * spacing[1] / 100.0, 2),
                   "interactions_to_090": at_090[0] if at_090 else 10,
                   "reached_090": bool(at_090), "interactions_to_095": res["interactions"],
                   "reached_095": res["reached"]}
            for k in CHECKPOINTS:
                row[f"iou_after_{k}"] = round(iou_after(ious, k), 4)
            # Mean per tool call (the first interaction, the automatic label, took 0 s here).
            calls = len(ious) - 1
            row["latency_ms"] = round(1000.0 * res["mean_latency_s"] * len(ious) / calls, 1) if calls else 0.0
            row["ious"] = ";".join(f"{v:.4f}" for v in ious)
            rows.append(row)
        print(f"phantom {i + 1}/{args.n} ({level}) done ({time.time() - begin:.0f} s)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sessions = pd.DataFrame(rows)
    path = Path(f"{out}_sessions.csv")
    if path.exists():
        previous = pd.read_csv(path)
        sessions = pd.concat([previous[previous.tag != args.tag], sessions], ignore_index=True)
    sessions.to_csv(path, index=False)
    summary = (sessions.groupby(["tag", "method"], sort=False)
               .agg(n=("seed", "size"), organ_cm2_mean=("organ_cm2", "mean"),
                    interactions_to_090_mean=("interactions_to_090", "mean"),
                    interactions_to_090_median=("interactions_to_090", "median"),
                    reached_090_pct=("reached_090", lambda s: 100.0 * s.mean()),
                    within3_090_pct=("interactions_to_090", lambda s: 100.0 * (s <= 3).mean()),
                    interactions_to_095_mean=("interactions_to_095", "mean"),
                    iou_after_1=("iou_after_1", "mean"), iou_after_3=("iou_after_3", "mean"),
                    iou_after_10=("iou_after_10", "mean"),
                    latency_ms_mean=("latency_ms", "mean"))
               .round(3).reset_index())
    summary.to_csv(f"{out}_summary.csv", index=False)
    print(summary.to_string(index=False))
    print(markdown_table(summary))
    plot(sessions, f"{out}.png")
    print(f"wrote {path}, {out}_summary.csv, {out}.png")
    return 0


def markdown_table(summary) -> str:
    lines = ["| code | method | n | organ added (cm², mean) | interactions to IoU >= 0.90 "
             "(mean / median, cap 10) | within 3 | reached 0.90 | interactions to 0.95 (mean) | "
             "IoU after 1 | after 3 | after 10 | ms per call |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.tag} | {r.method} | {r.n} | {r.organ_cm2_mean:.1f} | "
                     f"{r.interactions_to_090_mean:.1f} / {r.interactions_to_090_median:g} | "
                     f"{r.within3_090_pct:.0f} % | {r.reached_090_pct:.0f} % | "
                     f"{r.interactions_to_095_mean:.1f} | {r.iou_after_1:.3f} | "
                     f"{r.iou_after_3:.3f} | {r.iou_after_10:.3f} | {r.latency_ms_mean:.0f} |")
    return "\n".join(lines)


def plot(sessions, path: str) -> None:
    """Mean muscle IoU after k interactions, one line per code version and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(dict.fromkeys(zip(sessions.tag, sessions.method)))
    for tag, method in keys:
        sub = sessions[(sessions.tag == tag) & (sessions.method == method)]
        curves = []
        for text in sub.ious:
            values = [float(v) for v in str(text).split(";")]
            curves.append(values + [values[-1]] * (10 - len(values)))
        style = "-" if tag == keys[-1][0] else "--"
        left.plot(np.arange(1, 11), np.mean(curves, axis=0), style, marker="o", ms=3,
                  label=f"{tag}: {method}")
    left.axhline(0.90, color="k", lw=0.8, ls=":")
    left.set_xlabel("interactions (1 = the automatic label)")
    left.set_ylabel("mean muscle IoU")
    left.set_ylim(0.5, 1.0)
    left.legend(fontsize=8)
    left.set_title("organs labelled muscle, then strokes", fontsize=10)
    width = 0.8 / len(keys)
    x = np.arange(1, 11)
    for j, (tag, method) in enumerate(keys):
        sub = sessions[(sessions.tag == tag) & (sessions.method == method)]
        counts = np.bincount(sub.interactions_to_090, minlength=11)[1:]
        right.bar(x + j * width, counts, width, label=f"{tag}: {method}")
    right.set_xlabel("interactions to muscle IoU >= 0.90 (10 = cap / not reached)")
    right.set_ylabel("sessions")
    right.axvline(3.5, color="k", lw=0.8, ls=":")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
