"""Picture of synthetic L3 phantoms next to real CT slices, for judging realism by eye.

Writes ``docs/phantom_grid.png``: a grid of phantoms (window W400/L40) next to three real slices
from ``../shared/data/real`` (the L3 slice z=73 of TotalSegmentator's ``ct_lower``, one slice of
the TotalSegmentator DICOM series and one of dcmqi's 3-slice CT), a row of label overlays, and
HU histograms inside the body of the phantoms and of the real L3 slice. Prints median HU per
tissue of the phantoms and HU percentiles inside the body for both.

A second picture, ``docs/phantom_grid_upper.png``, compares the upper abdomen: T11, T12 and L1
phantoms with their organ maps next to the real T11-T12 DICOM series and the dcmqi liver-level
slices, with HU histograms per region (the outer 25 mm of the body: skin, SAT and the wall; the
inner body: organs, cavity and spine) of T12 phantoms and of the real series. It prints, per
level, how much of the wall's inner edge the liver, spleen, kidneys or diaphragm touch in the
phantoms (from their organ maps), and the same for the real dcmqi slices from their liver SEG
(liver only; the wall there is the shipped model's muscle label).

    .venv/bin/python -m scripts.phantom_grid [--count 8] [--seed 0] [--out docs/phantom_grid.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sarco_app import labels

from sarco_app.synthesis import phantom
from sarco_app.inputs.ingest import load_image

ROOT = Path(__file__).resolve().parents[1]

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


OUTER_MM = 25.0  # depth of the outer region of the body (skin, SAT, wall) in the histograms
UPPER_LEVELS = ("T11", "T12", "L1")


def regions(hu: np.ndarray, spacing: float) -> dict[str, np.ndarray]:
    """Masks of the body's outer ``OUTER_MM`` (skin, SAT, wall) and the inner body."""
    from scipy import ndimage as ndi

    body = body_mask(hu)
    depth = ndi.distance_transform_edt(body) * spacing
    return {"outer": body & (depth <= OUTER_MM), "inner": body & (depth > OUTER_MM)}


def wall_contact(label: np.ndarray, organ: np.ndarray, spacing: float) -> float:
    """Share of the muscle's inner boundary (muscle pixels next to body pixels that are neither
    muscle, SAT nor IMAT: cavity, organs, VAT, bone) within 3 mm of ``organ``."""
    from scipy import ndimage as ndi

    muscle = label == labels.MUSCLE
    inside = (label == labels.BACKGROUND) | (label == labels.VAT)
    inner_edge = muscle & ndi.binary_dilation(inside)
    if not inner_edge.any():
        return 0.0
    near = ndi.distance_transform_edt(~organ) * spacing <= 3.0
    return float((inner_edge & near).sum() / inner_edge.sum())


def upper_abdomen_figure(args, plt) -> None:
    from sarco_app.segmentation.segment import segment_volume

    phantoms = {lv: [phantom.generate(args.seed + i, level=lv) for i in range(args.count)] for lv in UPPER_LEVELS}
    solid = [labels.ORGAN_NAMES.index(n) + 1 for n in ("liver", "spleen", "kidney", "diaphragm")]
    print("share of the wall's inner edge touched by liver / spleen / kidney / diaphragm (phantoms):")
    for lv, group in phantoms.items():
        shares = [wall_contact(ph.label, np.isin(ph.organ_label, solid), ph.spacing[0]) for ph in group]
        print(f"  {lv}: mean {np.mean(shares):.2f}, min {np.min(shares):.2f}, max {np.max(shares):.2f}")
    series = REAL / "totalsegmentator-dicom-series"
    dcmqi = REAL / "dcmqi-ct-3slice"
    reals = []
    if series.exists():
        image = load_image(series)
        reals += [(f"REAL T11-T12 series slice {k}", image.slice2d(k), image.pixel_spacing[0]) for k in (0, 10, 19)]
    if dcmqi.exists():
        import pydicom

        image = load_image(dcmqi)
        reals.append(("REAL dcmqi liver level", image.slice2d(1), image.pixel_spacing[0]))
        try:  # the liver SEG: how much of the wall the real liver touches
            seg = pydicom.dcmread(str(dcmqi / "liver_seg.dcm"))
            frames = seg.pixel_array.astype(bool)
            positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in seg.PerFrameFunctionalGroupsSequence]
            result = segment_volume(image.hu, image.pixel_spacing, slices="all")
            z = image.affine[2, 3] + np.arange(image.num_slices) * image.affine[2, 2]
            shares = []
            for frame, pos in zip(frames, positions):
                k = int(np.argmin(np.abs(z - pos)))
                # Axial LPS rows/columns: the frame's transpose is the canonical (X, Y) slice.
                liver = frame.T if frame.T.shape == image.hu.shape[:2] else None
                if liver is None or not liver.any():
                    continue
                shares.append(wall_contact(result.label[:, :, k], liver, image.pixel_spacing[0]))
            if shares:
                print(f"  real dcmqi (liver only, wall = model's muscle): {', '.join(f'{s:.2f}' for s in shares)}")
        except Exception as exc:  # the SEG is a bonus; the picture does not depend on it
            print(f"  real dcmqi liver SEG not used: {exc}")
    ncols = max(len(UPPER_LEVELS) * 2, len(reals) + 1)
    fig, axes = plt.subplots(3, ncols, figsize=(2.6 * ncols, 2.6 * 3))
    for ax in axes.ravel():
        ax.axis("off")
    organ_colours = plt.get_cmap("tab10")(np.arange(len(labels.ORGAN_NAMES) + 1))[:, :3]
    for j, lv in enumerate(UPPER_LEVELS):
        for i in range(2):
            ph = phantoms[lv][i]
            ax = axes[i, 2 * j]
            ax.imshow(ph.hu.T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
            ax.set_title(f"{lv} #{ph.params['seed']} {ph.params['contrast'][:4]}", fontsize=7)
            grey = np.clip((ph.hu.T - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)[..., None].repeat(3, axis=2)
            org = ph.organ_label.T
            over = np.where(org[..., None] > 0, 0.55 * organ_colours[org] + 0.45 * grey, grey)
            over[ph.label.T == labels.MUSCLE] = 0.55 * np.array(labels.COLORS[labels.MUSCLE]) / 255 + \
                0.45 * grey[ph.label.T == labels.MUSCLE]
            axes[i, 2 * j + 1].imshow(over)
            axes[i, 2 * j + 1].set_title(f"muscle (red) + organs {lv}", fontsize=7)
    for j, (title, hu, _) in enumerate(reals[: ncols - 1]):
        axes[2, j].imshow(hu.T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
        axes[2, j].set_title(title, fontsize=7)
    ax = axes[2, ncols - 1]
    ax.axis("on")
    bins = np.arange(-200, 301, 5)
    print(f"HU percentiles 5/25/50/75/95 per region (outer {OUTER_MM:.0f} mm / inner body):")
    for name, slices in (("T12 phantoms", [(ph.hu, ph.spacing[0]) for ph in phantoms["T12"]]),
                         ("real T11-T12", [(hu, sp) for title, hu, sp in reals if "series" in title])):
        if not slices:
            continue
        for region, style in (("outer", "--"), ("inner", "-")):
            values = np.concatenate([hu[regions(hu, sp)[region]] for hu, sp in slices])
            ax.hist(values, bins=bins, density=True, histtype="step", linestyle=style, label=f"{name} {region}")
            print(f"  {name:13s} {region}: {np.round(np.percentile(values, [5, 25, 50, 75, 95]), 1)}")
    ax.legend(fontsize=5)
    ax.set_title("HU per region", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    out = args.out.with_name(args.out.stem + "_upper" + args.out.suffix)
    fig.savefig(out, dpi=72)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


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
    upper_abdomen_figure(args, plt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
