"""``python -m sarco_app info PATH``: what ingest finds in a file or folder."""

from __future__ import annotations

import argparse
import json

from sarco_app.inputs import dicom, ingest
from sarco_app.errors import IngestError


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="show the series, slices, spacing and patient data found in a file or folder",
        description="Read a NIfTI file, or a DICOM file / folder / zip, and print what ingest "
        "found: series, slices, spacing (mm), HU range and patient data.",
    )
    parser.add_argument("path", help="NIfTI file, DICOM file, folder (searched recursively) or zip")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def describe(path: str) -> dict:
    """Summary of every loadable series under ``path`` (a NIfTI file counts as one)."""
    if ingest.is_nifti(path):
        images = [ingest.load_image(path)]
        others = []
    else:
        found = dicom.list_series(path)
        images, others = [], []
        for index, series in enumerate(found):
            if series.modality in ("CT", ""):
                images.append(ingest.load_dicom(path, series=index))
            else:
                others.append({"series_uid": series.series_uid, "modality": series.modality,
                               "description": series.description, "files": series.num_slices,
                               "note": "not CT; skipped"})
    series_out = []
    for image in images:
        series_out.append({
            "format": image.meta.get("format"),
            "series_uid": image.meta.get("series_uid"),
            "description": image.meta.get("description"),
            "shape": list(image.hu.shape),
            "slices": image.num_slices,
            "spacing_mm": [round(s, 4) for s in image.spacing],
            "hu_min": float(image.hu.min()),
            "hu_max": float(image.hu.max()),
            "patient_position": image.meta.get("patient_position"),
            "patient": image.patient.to_dict(),
        })
    return {"path": str(path), "series": series_out, "other_series": others}


def run(args: argparse.Namespace) -> int:
    summary = describe(args.path)
    if not summary["series"]:
        skipped = ", ".join(f"{o['modality'] or '?'} ({o['files']} file(s))" for o in summary["other_series"])
        raise IngestError(f"{summary['path']}: no CT series found" + (f"; skipped {skipped}" if skipped else ""))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['path']}: {len(summary['series'])} CT series")
    for i, s in enumerate(summary["series"]):
        spacing = " x ".join(f"{v:g}" for v in s["spacing_mm"])
        print(f"[{i}] {s['format']} {s['description'] or ''} uid={s['series_uid'] or '-'}")
        print(f"    shape {tuple(s['shape'])}, {s['slices']} slice(s), spacing {spacing} mm, "
              f"HU {s['hu_min']:.0f}..{s['hu_max']:.0f}")
        p = s["patient"]
        print(f"    patient: sex {p['sex'] or '?'}, age {p['age'] if p['age'] is not None else '?'}, "
              f"height {p['height_cm'] if p['height_cm'] is not None else '?'} cm, "
              f"weight {p['weight_kg'] if p['weight_kg'] is not None else '?'} kg")
    for o in summary["other_series"]:
        print(f"    skipped {o['modality']} series {o['description']!r} ({o['files']} file(s)): {o['note']}")
    return 0
