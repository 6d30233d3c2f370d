"""``python -m sarco_app l3 IMAGE``: find the axial slice at the middle of the L3 vertebral body.

The JSON answer's ``slice_index`` is the index in the **file's own voxel order** (what a viewer
shows for that file); ``canonical_slice_index`` is the same slice in sarco's canonical order
(axis 2 toward superior, as :func:`sarco_app.inputs.ingest.load_image` returns it). They differ for
z-flipped files (e.g. feet-first or NIfTI written top-down). For a DICOM series the "file
order" is the slices sorted by ImagePositionPatient along the slice normal (ascending), never
by file name or InstanceNumber. ``z_mm`` is the slice centre's world z (RAS / DICOM patient
superior coordinate) in mm, the same whatever the order.
Exit status: 0 L3 found, 2 L3 not in the field of view (JSON still written, with nulls and the
reason), 1 unreadable input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sarco_app.errors import SarcoError

#: Exit status when the scan does not show L3.
NOT_IN_FOV = 2


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('image',)
OUTPUTS = ('--json', '--png')
OUTPUT_SUFFIXES = {"--png": (".png",)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "l3",
        help="find the axial slice through the middle of the L3 vertebra in a 3D CT",
        description=(
            "Count vertebrae up from the iliac crests and down from the last ribs to find the "
            "middle of the L3 vertebral body. Prints JSON {slice_index, z_mm, confidence, "
            "reason, ...}; slice_index is in the file's own voxel order. Exit status 0 when L3 "
            "is found, 2 when it is not in the field of view, 1 for unreadable input."
        ),
    )
    parser.add_argument("image", type=Path, help="3D CT: NIfTI file, or DICOM file/folder/zip")
    parser.add_argument("--series", default=None, help="DICOM series index or UID (default: largest CT)")
    parser.add_argument("--json", type=Path, default=None, dest="json_out", help="also write the JSON here")
    parser.add_argument("--png", type=Path, default=None,
                        help="write a sagittal + coronal view with the L3 level drawn here")
    return parser


def locate_file(path: Path, series: str | None = None) -> tuple[Any, Any, dict]:
    """Load ``path``, locate L3 and build the CLI/server JSON answer.

    Returns ``(image, result, answer)``.
    """
    from sarco_app.inputs import ingest
    from sarco_app.spine.l3 import answer_json, locate_l3

    image = ingest.load_image(path, series=series)
    if image.hu.ndim != 3 or image.num_slices < 3:
        raise SarcoError(f"{Path(path).name}: L3 location needs a 3D volume (got shape {image.hu.shape})")
    result = locate_l3(image)
    return image, result, answer_json(image, result, source=str(path))


def run(args: argparse.Namespace) -> int:
    image, result, answer = locate_file(args.image, args.series)
    text = json.dumps(answer, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    if args.png:
        from sarco_app.figures.views import save_l3_views

        save_l3_views(image, result, args.png)
    return 0 if result.found else NOT_IN_FOV
