"""``python -m sarco_app phantom``: write synthetic L1-L4 CT slices with exact tissue labels."""

from __future__ import annotations

from pathlib import Path

from sarco_app.errors import SarcoError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "phantom",
        help="write synthetic abdominal CT slices with exact muscle/SAT/VAT/IMAT labels",
        description=(
            "Write COUNT synthetic axial CT slices (varied sex, BMI, sarcopenia, contrast phase, "
            "noise, field of view) into a MONAI Label studies folder: OUT/<id>.nii.gz with a "
            "patient sidecar (or a one-slice DICOM folder OUT/<id>/), the exact label in "
            "OUT/labels/final/<id>.nii.gz and OUT/manifest.csv with patient data and tissue areas."
        ),
    )
    parser.add_argument("--count", type=int, required=True, help="number of phantoms (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0; default 0)")
    parser.add_argument("--out", type=Path, required=True, help="studies folder to write into")
    parser.add_argument("--format", default="nifti", help="nifti (default) or dicom")
    parser.add_argument("--size", type=int, default=512, help="matrix size in pixels (default 512)")
    parser.add_argument("--level", default="L3",
                        help="vertebral level L1, L2, L3 (default) or L4, or 'mixed' for a random level each")
    parser.add_argument("--organs", action="store_true",
                        help="also write each phantom's organ map (liver, spleen, kidney, bowel, bone, diaphragm, "
                             "other) to OUT/labels/organs/<id>.nii.gz, for `train --organ-classes`")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds phantoms, replacing their images, final "
                             "labels and manifest (refused without it)")
    return parser


def run(args) -> int:
    from sarco_app.synthesis import phantom

    if args.count < 1:
        raise SarcoError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        raise SarcoError(f"--seed must be >= 0, got {args.seed}")
    fmt = str(args.format).strip().lower()
    if fmt not in phantom.FORMATS:
        raise SarcoError(f"--format must be one of {', '.join(phantom.FORMATS)}, got {args.format!r}")
    level = str(args.level).strip()
    if level.lower() != "mixed" and level.upper() not in phantom.LEVELS:
        raise SarcoError(f"--level must be one of {', '.join(phantom.LEVELS)} or mixed, got {args.level!r}")
    lo, hi = phantom.SIZE_LIMITS
    if not lo <= args.size <= hi:
        raise SarcoError(f"--size must be {lo}-{hi} pixels, got {args.size}")
    manifest = phantom.write_cohort(args.out, args.count, args.seed, fmt, size=args.size,
                                    level=level if level.lower() == "mixed" else level.upper(), organs=args.organs,
                                    force=args.force)
    print(f"wrote {args.count} phantom(s) ({fmt}, {args.size}x{args.size}, level {level}) to {args.out}")
    print(f"manifest: {manifest}")
    return 0
