"""``python -m sarco_app quantify``: areas, HU, indices, T-scores and flags of one labelled scan."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sarco_app.errors import SarcoError


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def sex_value(text: str) -> str:
    from sarco_app.inputs.patient import normalise_sex

    sex = normalise_sex(text)
    if sex is None:
        raise argparse.ArgumentTypeError(f"sex must be M or F, got {text!r}")
    return sex


def add_patient_options(parser: argparse.ArgumentParser) -> None:
    """--height-cm, --weight-kg, --sex, --age (override or fill the image's patient data)."""
    parser.add_argument("--height-cm", type=positive_float, help="height in cm (overrides DICOM/sidecar)")
    parser.add_argument("--weight-kg", type=positive_float, help="weight in kg (overrides DICOM/sidecar)")
    parser.add_argument("--sex", type=sex_value, help="M or F (overrides DICOM/sidecar)")
    parser.add_argument("--age", type=positive_float, help="age in years (overrides DICOM/sidecar)")


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('--image', '--label', '--reference')
OUTPUTS = ('--json', '--overlay')


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "quantify",
        help="measure one labelled CT slice (areas, HU, SMI, T-scores, flags)",
        description=(
            "Measure muscle, SAT, VAT and IMAT on one axial slice of a labelled CT: areas (cm²) "
            "from the pixel spacing, HU statistics, BMI, SMI and other indices, T-scores against "
            "a young-adult reference and published cut-off flags. Prints JSON."
        ),
    )
    parser.add_argument("--image", required=True, type=Path, help="CT image: NIfTI, DICOM file/folder/zip")
    parser.add_argument("--label", required=True, type=Path, help="label NIfTI on the image's grid (0-4)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index",
                        help="axial slice index for 3D images (default: the only labelled slice, else L3)")
    add_patient_options(parser)
    parser.add_argument("--reference", default=None, metavar="NAME_OR_CSV",
                        help="T-score table: a CSV path or a bundled table name "
                        "(default: lee2022_young_adults, the paper's Table 4)")
    parser.add_argument("--json", type=Path, default=None, dest="json_out", help="also write the JSON here")
    parser.add_argument("--overlay", type=Path, default=None, help="write an overlay PNG of the slice here")
    return parser


def run(args) -> int:
    from sarco_app.inputs.ingest import load_image
    from sarco_app.inputs.patient import PLAUSIBLE_PATIENT, PatientInfo, check_plausible
    from sarco_app.measurement.quantify import clean_json, load_label, quantify_scan

    image = load_image(args.image)
    label = load_label(args.label, image)
    manual = PatientInfo(sex=args.sex, **{key: check_plausible(key, getattr(args, key)) for key in PLAUSIBLE_PATIENT})
    from sarco_app.measurement.reference import find_reference

    reference = find_reference(args.reference)
    result = clean_json(quantify_scan(image, label, args.slice_index, manual, reference))
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if args.json_out:
        try:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise SarcoError(f"--json {args.json_out}: cannot write ({exc.strerror})") from exc
    if args.overlay:
        from sarco_app.figures.overlay import overlay_png

        k = result["slice_index"]
        hu_xy = image.hu if image.hu.ndim == 2 else image.hu[:, :, k]
        label_xy = label if label.ndim == 2 else label[:, :, k]
        areas = {t: v["area_cm2"] for t, v in result["tissues"].items()}
        overlay_png(hu_xy, label_xy, result["pixel_spacing_mm"], args.overlay,
                    title=f"{Path(args.image).name} — slice {k}", areas=areas)
    print(text)
    return 0
