"""``python -m sarco_app export-seg IMAGE_SERIES LABEL --out seg.dcm``: a tissue label as a DICOM
SEG referencing its CT series (for users without a PACS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sarco_app.inputs import dicom_seg, ingest
from sarco_app.measurement.quantify import load_label


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('image_series', 'label')
OUTPUTS = ('--out',)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-seg",
        help="write a label NIfTI as a DICOM SEG that references its CT series",
        description="Write LABEL (a NIfTI on the series' own grid, values 0-4, as MONAI Label and "
        "'import-seg' write it) as a DICOM Segmentation with one segment per tissue (muscle, SAT, "
        "VAT, IMAT: labels, colours, SNOMED CT codes) referencing every instance of IMAGE_SERIES.",
    )
    parser.add_argument("image_series", type=Path, help="the CT series: DICOM folder, zip or file")
    parser.add_argument("label", type=Path, help="label NIfTI on the series' grid (values 0-4)")
    parser.add_argument("--out", required=True, type=Path, help="SEG file to write (.dcm)")
    parser.add_argument("--series", default=None, help="DICOM series index or UID (default: largest CT)")
    parser.add_argument("--tag", default="final", help="label tag, part of the SEG's UIDs (default: final)")
    parser.add_argument("--algorithm", default=None,
                        help="name of the model that made the label (default: a manual label)")
    return parser


def run(args: argparse.Namespace) -> int:
    image = ingest.load_dicom(args.image_series, series=args.series)
    label = load_label(args.label, image)
    datasets = dicom_seg.series_datasets(args.image_series, image)
    seg = dicom_seg.build_seg(datasets, image, label, tag=args.tag, algorithm=args.algorithm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(args.out))
    segments = ", ".join(f"{item.SegmentLabel}" for item in seg.SegmentSequence)
    print(f"wrote {args.out}: {int(seg.NumberOfFrames)} frame(s), segments {segments}, "
          f"series {image.meta['series_uid']}")
    return 0
