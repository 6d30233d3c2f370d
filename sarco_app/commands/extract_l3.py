"""``python -m sarco_app extract-l3 IMAGE --out DIR``: write the L3 slice of a 3D CT into a
studies folder (2D NIfTI + patient sidecar), ready for labelling.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from sarco_app.errors import SarcoError

NOT_IN_FOV = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "extract-l3",
        help="write the L3 slice of a 3D CT as a 2D NIfTI into a studies folder",
        description=(
            "Find the middle of L3 (as the 'l3' command) and write that axial slice as "
            "DIR/<id>.nii.gz with the patient data in DIR/<id>.json, the layout the MONAI "
            "Label app reads. Exit status 2 when L3 is not in the field of view."
        ),
    )
    parser.add_argument("image", type=Path, help="3D CT: NIfTI file, or DICOM file/folder/zip")
    parser.add_argument("--out", required=True, type=Path, help="studies folder to write into")
    parser.add_argument("--id", default=None, dest="study_id",
                        help="image id in the studies folder (default: from the input name + _L3)")
    parser.add_argument("--series", default=None, help="DICOM series index or UID (default: largest CT)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index",
                        help="use this slice (file voxel order) instead of locating L3")
    parser.add_argument("--force", action="store_true", help="replace an existing image with that id")
    return parser


def default_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan") + "_L3"


def slice_image(image, canonical_index: int):
    """The canonical axial slice ``canonical_index`` as a 2D CTImage with its world position."""
    from sarco_app.inputs.ingest import CTImage

    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0.0, 0.0, float(canonical_index)]) + image.affine[:3, 3]
    hu = np.ascontiguousarray(image.hu[:, :, canonical_index])
    return CTImage(hu=hu, affine=affine, patient=image.patient, meta=dict(image.meta),
                   original_affine=affine.copy(), original_shape=hu.shape)


def run(args: argparse.Namespace) -> int:
    from sarco_app.inputs import ingest
    from sarco_app.commands.l3 import locate_file

    study_id = args.study_id or default_id(args.image)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", study_id):
        raise SarcoError(f"id {study_id!r} may only contain letters, digits, '.', '_' and '-'")
    out_image = args.out / f"{study_id}.nii.gz"
    if out_image.exists() and not args.force:
        raise SarcoError(f"{out_image} already exists (use --force to replace the image; labels are never touched)")
    stored = sorted((args.out / "labels").glob(f"*/{study_id}.nii.gz")) if args.force else []
    if stored:
        # A new image under an id that has labels would pair them with the wrong slice.
        raise SarcoError(f"{study_id} has stored labels ({stored[0]}): use another --id or remove them first")
    if args.slice_index is None:
        image, result, answer = locate_file(args.image, args.series)
        if not result.found:
            print(json.dumps(answer, indent=2))
            print(f"error: {result.reason}", file=__import__("sys").stderr)
            return NOT_IN_FOV
        canonical = result.slice_index
    else:
        image = ingest.load_image(args.image, series=args.series)
        if image.hu.ndim != 3:
            raise SarcoError("--slice needs a 3D image")
        n = image.num_slices
        if not 0 <= args.slice_index < n:
            raise SarcoError(f"--slice {args.slice_index} out of range 0..{n - 1}")
        canonical = image.canonical_slice(args.slice_index)
        if canonical is None:
            raise SarcoError("--slice needs an axial series: this file's slices are not axial")
        answer = {"slice_index": args.slice_index, "canonical_slice_index": canonical,
                  "reason": "slice given by the user", "found": True, "confidence": None,
                  "z_mm": round(float(image.affine[2, 2] * canonical + image.affine[2, 3]), 2)}
    slice2d = slice_image(image, canonical)
    ingest.save_image(slice2d, out_image, patient_sidecar=False)
    sidecar = ingest.sidecar_path(out_image)
    sidecar.write_text(json.dumps({
        "patient": image.patient.to_dict(),
        "source": {"path": str(args.image), "series_uid": image.meta.get("series_uid"),
                   "l3": {k: answer.get(k) for k in ("slice_index", "canonical_slice_index", "z_mm",
                                                     "confidence", "reason")}},
    }, indent=2))
    print(json.dumps({"image": str(out_image), "sidecar": str(sidecar), **{
        k: answer.get(k) for k in ("slice_index", "canonical_slice_index", "z_mm", "confidence", "reason")}}, indent=2))
    return 0
