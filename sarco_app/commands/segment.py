"""``python -m sarco_app segment``: automatic body-composition labels of a CT image."""

from __future__ import annotations

from pathlib import Path


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('image', '--model')
OUTPUTS = ('--out',)
OUTPUT_SUFFIXES = {"--out": (".nii.gz", ".nii")}


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "segment",
        help="label muscle, SAT, VAT and IMAT automatically (U-Net or HU-threshold baseline)",
        description=(
            "Label an axial CT slice or volume: 1 muscle, 2 SAT, 3 VAT, 4 IMAT. The label is "
            "written on the image's own grid (same shape and affine; for a DICOM series, the "
            "series' volume). Without --slice every slice of a 3D image is labelled."
        ),
    )
    parser.add_argument("image", type=Path, help="NIfTI file, DICOM file or DICOM folder")
    parser.add_argument("--out", required=True, type=Path, help="label file to write (.nii.gz)")
    parser.add_argument("--slice", default="all", metavar="K|all",
                        help="slice index of a 3D image to label, or 'all' (default)")
    parser.add_argument("--method", choices=("unet", "threshold"), default="unet",
                        help="unet: the network (default); threshold: the rule-based baseline")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint (.pt); default: $SARCO_BODYCOMP_MODEL, else models/bodycomp_unet.pt")
    parser.add_argument("--no-hu-refine", action="store_true",
                        help="raw network labels (the model's split head decides tissue, if it has one): skip "
                        "the HU rule (muscle -29..150, fat -190..-30) that is applied to the network's regions by default")
    parser.add_argument("--series", default=None, help="DICOM series UID or index when a folder holds several")
    parser.add_argument("--device", default="auto", help="where the network runs: auto (default: CUDA when a GPU is there, else CPU), cpu, cuda or cuda:N")
    return parser


def run(args) -> int:
    from sarco_app.errors import SarcoError
    from sarco_app.inputs.ingest import load_image, save_label
    from sarco_app.segmentation.segment import segment_image

    text = str(args.slice).strip().lower()
    if text == "all":
        slices = "all"
    else:
        try:
            slices = int(text)
        except ValueError:
            raise SarcoError(f"--slice must be an integer or 'all', not {args.slice!r}") from None
    image = load_image(args.image, series=args.series)
    result = segment_image(image, slices, method=args.method, model=args.model, hu_refine=not args.no_hu_refine,
                           device=args.device)
    out = save_label(result.label, image, args.out)
    what = "the 2D image" if image.hu.ndim == 2 else (
        f"{len(result.slices)} slice(s)" if len(result.slices) != 1 else f"slice {result.slices[0]}")
    print(f"labelled {what} with {args.method}; wrote {out} (shape {tuple(image.original_shape)})")
    if result.confidence:
        conf = ", ".join(f"{k} {v:.3f}" for k, v in result.confidence.items() if v is not None)
        print(f"mean confidence: {conf}")
    return 0
