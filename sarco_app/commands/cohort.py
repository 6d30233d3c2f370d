"""``python -m sarco_app cohort``: quantify every labelled scan of a studies folder."""

from __future__ import annotations

import sys
from pathlib import Path


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('--studies', '--input', '--reference')
OUTPUTS = ('--out',)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "cohort",
        help="quantify every image with a final label into an Excel workbook, CSV and overlays",
        description=(
            "For every image in a studies folder with a label in labels/final/, measure the "
            "labelled slice (see `quantify`) and write an Excel workbook (sheets scans, summary by "
            "sex with mean ± SD, reference), the same tables as CSV and an overlay PNG per scan. "
            "Scans run in parallel on a local Dask cluster (--workers) or an existing one "
            "(--scheduler); each scan's row is kept in <out>.parts/ as soon as it is done, and a "
            "rerun measures only the scans not done yet."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--studies", type=Path, help="studies folder (MONAI Label layout)")
    # --input: raw scans without labels (sarco_app.measurement.cohort_raw): find L3, segment, quantify.
    source.add_argument("--input", type=Path, default=None,
                        help="folder of raw NIfTI files and DICOM studies without labels: find L3 "
                        "in each series, segment it, quantify (status column: ok / no L3 / "
                        "unreadable / skipped, with the reason)")
    parser.add_argument("--out", required=True, type=Path, help="Excel workbook to write (.xlsx)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index",
                        help="slice index for 3D images (default: each label's only labelled slice)")
    parser.add_argument("--reference", default=None, metavar="NAME_OR_CSV",
                        help="T-score table: a CSV path or a bundled table name (default: the paper's Table 4)")
    parser.add_argument("--no-overlays", action="store_true", help="do not write overlay PNGs")
    parser.add_argument("--method", choices=("unet", "threshold"), default=None,
                        help="with --input: segmentation method (default: unet when a model "
                        "checkpoint exists, else threshold)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="scans measured in parallel: N worker processes of a local Dask cluster "
                        "(default: the CPU cores; 1 runs in this process without Dask)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on an existing Dask cluster (e.g. tcp://host:8786) instead; its "
                        "workers must see the input and output folders at the same paths")
    parser.add_argument("--force", action="store_true",
                        help="measure every scan again (by default a rerun on the same --out reuses "
                        "the scans already done, kept in <out>.parts/)")
    return parser


def _announce(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _report_run(result) -> None:
    reused = f", {result['reused']} reused from {result['parts']}" if result["reused"] else ""
    print(f"measured {result['measured']} ({result['executor']}){reused}")


def run_raw(args) -> int:
    """``cohort --input DIR``: L3, segmentation and quantification of raw scans."""
    from sarco_app.measurement.cohort_raw import quantify_raw_folder
    from sarco_app.measurement.reference import find_reference

    result = quantify_raw_folder(args.input, args.out, reference=find_reference(args.reference),
                                 method=args.method, overlays=not args.no_overlays, workers=args.workers,
                                 scheduler=args.scheduler, force=args.force, announce=_announce)
    n = len(result["rows"])
    _report_run(result)
    print(f"{n} series: {n - result['failed']} quantified at L3 ({result['method']}), {result['failed']} not")
    for row in result["rows"]:
        if row["status"] != "ok":
            print(f"  {row['id']}: {row['status']}", file=sys.stderr)
    print(f"wrote {result['xlsx']}, {result['csv']}, {result['summary_csv']}")
    if result["overlay_dir"]:
        print(f"overlays in {result['overlay_dir']}")
    return 0 if result["failed"] < n else 1


def refuse_foreign_companions(out: Path) -> None:
    """The workbook's CSV companions (``<stem>.csv``, ``<stem>_summary.csv``) replace files of
    those names; when the workbook itself is not there, such a file is someone else's (a
    studies folder's ``manifest.csv`` beside ``--out manifest.xlsx``): refuse."""
    from sarco_app.errors import SarcoError
    from sarco_app.measurement.cohort import workbook_companions

    out = Path(out)
    foreign = [str(p) for p in workbook_companions(out) if p.exists() and not out.exists()]
    if foreign:
        raise SarcoError(f"--out {out} would overwrite {', '.join(foreign)}, which no earlier cohort run "
                         "wrote here; choose another --out")


def run(args) -> int:
    refuse_foreign_companions(args.out)
    if getattr(args, "input", None) is not None:
        return run_raw(args)
    from sarco_app.measurement.cohort import quantify_studies
    from sarco_app.measurement.reference import find_reference

    result = quantify_studies(
        args.studies,
        args.out,
        reference=find_reference(args.reference),
        slice_index=args.slice_index,
        overlays=not args.no_overlays,
        workers=args.workers,
        scheduler=args.scheduler,
        force=args.force,
        announce=_announce,
    )
    n = len(result["rows"])
    _report_run(result)
    print(f"{n - result['failed']} of {n} scan(s) quantified, {result['failed']} failed")
    for row in result["rows"]:
        if row["status"] != "ok":
            print(f"  {row['id']}: {row['status']}", file=sys.stderr)
    if result["unlabelled"]:
        print(f"{len(result['unlabelled'])} image(s) without a final label skipped")
    print(f"wrote {result['xlsx']}, {result['csv']}, {result['summary_csv']}")
    if result["overlay_dir"]:
        print(f"overlays in {result['overlay_dir']}")
    return 0 if result["failed"] < n else 1
