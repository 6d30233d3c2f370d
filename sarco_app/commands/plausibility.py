"""``python -m sarco_app plausibility``: label-free checks of a muscle label on real CT."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "plausibility",
        help="label-free plausibility measures of the muscle label per slice (organs labelled muscle)",
        description=(
            "Per axial slice: muscle area as a share of the body area, muscle components, the share "
            "of muscle inside the abdominal cavity and the muscle components lying inside it, and the "
            "share of muscle inside organ-like blobs (docs/plausibility.md). Without --label the "
            "image is segmented first (U-Net, default output)."
        ),
    )
    parser.add_argument("image", type=Path, help="NIfTI file, DICOM file or DICOM folder")
    parser.add_argument("--label", type=Path, default=None,
                        help="label NIfTI on the image's grid (0-4); default: segment the image")
    parser.add_argument("--slices", default=None, metavar="K,K,A-B|all",
                        help="canonical slice indices (comma-separated, ranges A-B inclusive) or 'all'; "
                        "default: the labelled slices of --label, else all")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint for the segmentation (default: as `segment`)")
    parser.add_argument("--series", default=None, help="DICOM series UID or index when a folder holds several")
    return parser


def parse_slices(text: str | None, depth: int) -> list[int] | None:
    """Canonical slice indices from ``"3,5,10-12"`` or ``"all"`` (None: not given)."""
    from sarco_app.errors import SarcoError

    if text is None:
        return None
    text = text.strip().lower()
    if text == "all":
        return list(range(depth))
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                chosen.update(range(int(lo), int(hi) + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise SarcoError(f"--slices: {part!r} is not a slice index or range A-B") from None
    if not chosen:
        raise SarcoError("--slices: no slice given")
    bad = [k for k in sorted(chosen) if not 0 <= k < depth]
    if bad:
        raise SarcoError(f"--slices: index {bad[0]} out of range 0..{depth - 1}")
    return sorted(chosen)


def _table(rows) -> str:
    header = ("slice", "body cm2", "muscle cm2", "muscle/body", "comps", "largest cm2",
              "cavity muscle", "cavity comps (cm2)", "organ-blob muscle", "notes")
    lines = ["\t".join(header)]
    for r in rows:
        lines.append("\t".join((
            str(r.slice_index), f"{r.body_cm2:.1f}", f"{r.muscle_cm2:.1f}", f"{r.muscle_body_share:.3f}",
            str(r.muscle_components), "/".join(f"{a:.1f}" for a in r.largest_components_cm2) or "-",
            f"{r.cavity_muscle_share:.3f}", f"{r.cavity_components} ({r.cavity_components_cm2:.1f})",
            f"{r.organ_blob_muscle_share:.3f}", "; ".join(r.notes) or "-",
        )))
    return "\n".join(lines)


def run(args) -> int:
    import numpy as np

    from sarco_app.inputs.ingest import load_image
    from sarco_app.segmentation.plausibility import volume_measures
    from sarco_app.measurement.quantify import clean_json, load_label

    image = load_image(args.image, series=args.series)
    depth = 1 if image.hu.ndim == 2 else image.hu.shape[2]
    slices = parse_slices(args.slices, depth)
    source = {}
    if args.label is not None:
        label = load_label(args.label, image)
        if slices is None:
            labelled = [0] if label.ndim == 2 else [int(k) for k in np.flatnonzero(label.any(axis=(0, 1)))]
            slices = labelled or list(range(depth))
        source["label"] = str(args.label)
    else:
        from sarco_app.segmentation.segment import segment_image

        slices = slices if slices is not None else list(range(depth))
        result = segment_image(image, slices if image.hu.ndim == 3 else None, method="unet", model=args.model)
        label = result.label
        source["label"] = f"segmented with {result.model_path}"
    rows = volume_measures(image.hu, label, image.pixel_spacing, None if image.hu.ndim == 2 else slices)
    if args.json:
        print(json.dumps(clean_json({"image": str(args.image), **source,
                                     "slices": [r.to_dict() for r in rows]}), indent=1))
    else:
        print(f"{args.image} ({source['label']}): shares are of the muscle area; see docs/plausibility.md")
        print(_table(rows))
    return 0
