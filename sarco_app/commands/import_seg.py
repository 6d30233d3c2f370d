"""``python -m sarco_app import-seg IMAGE_SERIES SEG --out label.nii.gz``: a DICOM SEG as a label
NIfTI on its CT series' grid (the reverse of ``export-seg``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sarco_app.inputs import dicom_seg, ingest
from sarco_app.labels import NAMES


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('image_series', 'seg')
OUTPUTS = ('--out',)
OUTPUT_SUFFIXES = {"--out": (".nii.gz", ".nii")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-seg",
        help="read a DICOM SEG as a label NIfTI on its CT series' grid",
        description="Read SEG (a DICOM Segmentation of muscle, SAT, VAT and IMAT segments, e.g. from "
        "'export-seg' or a PACS) and write it as a label NIfTI (values 0-4) on IMAGE_SERIES' own "
        "grid and affine. Fails when SEG references another series.",
    )
    parser.add_argument("image_series", type=Path, help="the CT series the SEG references")
    parser.add_argument("seg", type=Path, help="DICOM SEG file")
    parser.add_argument("--out", required=True, type=Path, help="label NIfTI to write (.nii.gz)")
    parser.add_argument("--series", default=None, help="DICOM series index or UID (default: largest CT)")
    return parser


def run(args: argparse.Namespace) -> int:
    image = ingest.load_dicom(args.image_series, series=args.series)
    label = dicom_seg.seg_to_label(args.seg, image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ingest.save_label(label, image, args.out)
    counts = np.bincount(label.ravel(), minlength=max(NAMES) + 1)
    pixels = ", ".join(f"{NAMES[v]} {int(counts[v])}" for v in sorted(NAMES))
    print(f"wrote {args.out}: pixels {pixels}")
    return 0
