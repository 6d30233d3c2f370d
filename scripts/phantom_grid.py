"""Picture of synthetic L3 phantoms next to real CT slices, for judging realism by eye.

Writes ``docs/phantom_grid.png``: a grid of phantoms (window W400/L40) next to three real slices
from ``../shared/data/real`` (the L3 slice z=73 of TotalSegmentator's ``ct_lower``, one slice of
the TotalSegmentator DICOM series and one of dcmqi's 3-slice CT), a row of label overlays, and
HU histograms inside the body of the phantoms and of the real L3 slice. Prints median HU per
tissue of the phantoms and HU percentiles inside the body for both.

    .venv/bin/python scripts/phantom_grid.py [--count 8] [--seed 0] [--out docs/phantom_grid.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarco_app import labels, phantom  # noqa: E402
from sarco_app.ingest import load_image  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
WINDOW = (40 - 200, 40 + 200)  # W400 / L40


def real_slices() -> list[tuple[str, np.ndarray, float]]:
    """(title, (X, Y) HU slice, pixel spacing mm) of the real samples that exist here."""
    found = []
    sources = [
        ("TotalSegmentator ct_lower z=73 (L3)", REAL / "totalsegmentator-ct-lower" / "ct_lower.nii.gz", 73),
        ("TotalSegmentator DICOM series", REAL / "totalsegmentator-dicom-series", None),
        ("dcmqi CT 3-slice", REAL / "dcmqi-ct-3slice", None),
    ]
    for title, path, z in sources:
        if not path.exists():
            continue
        try:
            image = load_image(path)
        except Exception as exc:  # a damaged sample should not stop the picture
            print(f"skipping {path.name}: {exc}")
            continue
        k = z if z is not None else image.num_slices // 2
        found.append((title, image.slice2d(k) if image.hu.ndim == 3 else image.hu, image.pixel_spacing[0]))
    return found


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Largest connected region above -500 HU, holes filled (the patient, not the table)."""
    from scipy import ndimage as ndi

    mask = hu > -500
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "phantom_grid.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phantoms = [phantom.generate(args.seed + i, level="L3") for i in range(args.count)]
    reals = real_slices()
    ncols = max(4, (args.count + 1) // 2)
    nrows = 2 + 1 + 1  # phantoms (2 rows), overlays of the first phantoms, real + histogram
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * nrows))
    for ax in axes.ravel():
        ax.axis("off")
    for i, ph in enumerate(phantoms):
        ax = axes[i // ncols, i % ncols]
        ax.imshow(ph.hu.T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        p = ph.params
        ax.set_title(f"#{p['seed']} {p['sex']} BMI {p['bmi']:.0f} {p['contrast'][:4]}"
                     f"{' sarc' if p['sarcopenic'] else ''}", fontsize=7)
    # Label overlays of the first phantoms.
    colours = np.zeros((labels.NUM_CLASSES, 3))
    for value, rgb in labels.COLORS.items():
        colours[value] = np.array(rgb) / 255.0
    for j in range(min(ncols, len(phantoms))):
        ph = phantoms[j]
        grey = np.clip((ph.hu.T - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)[..., None].repeat(3, axis=2)
        lab = ph.label.T
        over = np.where(lab[..., None] > 0, 0.55 * colours[lab] + 0.45 * grey, grey)
        axes[2, j].imshow(over)
        axes[2, j].set_title(f"labels #{ph.params['seed']}", fontsize=7)
    for j, (title, hu, _) in enumerate(reals[: ncols - 1]):
        axes[3, j].imshow(hu.T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        axes[3, j].set_title("REAL: " + title, fontsize=7)
    # HU histograms inside the body.
    ax = axes[3, ncols - 1]
    ax.axis("on")
    bins = np.arange(-200, 301, 5)
    inside = np.concatenate([ph.hu[body_mask(ph.hu)] for ph in phantoms])
    ax.hist(inside, bins=bins, density=True, histtype="step", label="phantoms")
    print("HU percentiles 5/25/50/75/95 inside the body:")
    print("  phantoms     ", np.round(np.percentile(inside, [5, 25, 50, 75, 95]), 1))
    if reals:
        real_hu = reals[0][1]
        real_in = real_hu[body_mask(real_hu)]
        ax.hist(real_in, bins=bins, density=True, histtype="step", label="real L3")
        print("  real L3 z=73 ", np.round(np.percentile(real_in, [5, 25, 50, 75, 95]), 1))
    ax.legend(fontsize=6)
    ax.set_title("HU inside body", fontsize=7)
    ax.tick_params(labelsize=6)
    print("median HU per label (phantoms):")
    for name, value in labels.LABELS.items():
        values = np.concatenate([ph.hu[ph.label == value] for ph in phantoms])
        print(f"  {name:7s} {np.median(values):7.1f}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
