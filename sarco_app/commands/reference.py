"""``python -m sarco_app reference``: derive a young-adult T-score table from a cohort export."""

from __future__ import annotations

from pathlib import Path


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('--cohort',)
OUTPUTS = ('--out',)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "reference",
        help="derive a T-score reference table (mean, SD, T=-1/-2 cut-offs) from a cohort CSV",
        description=(
            "Build a reference table in the same form as the default (the paper's Table 4): "
            "mean, SD and the T = -1 and T = -2 cut-offs per sex and index, from the CSV written "
            "by `python -m sarco_app cohort`, keeping scans with status ok and age <= --age-max. "
            "Without --cohort, print the default table."
        ),
    )
    parser.add_argument("--cohort", type=Path, help="cohort CSV (columns sex, age, sma_cm2, ...)")
    parser.add_argument("--out", type=Path, help="write the table (CSV) here")
    parser.add_argument("--age-max", type=float, default=39.0, help="oldest age kept, years (default 39)")
    parser.add_argument("--age-min", type=float, default=None, help="youngest age kept, years (default none)")
    parser.add_argument("--name", default=None, help="name recorded in the table")
    parser.add_argument(
        "--indices",
        default="sma_cm2,smi_cm2_m2,sma_per_weight,sma_per_bmi",
        help="comma-separated indices (default: the paper's four; muscle_hu_mean is also allowed)",
    )
    return parser


def _print_table(table) -> None:
    print(f"# {table.describe()}")
    print(f"{'sex':<4}{'index':<16}{'n':>5}{'mean':>10}{'sd':>9}{'T=-1':>10}{'T=-2':>10}")
    for row in table.rows():
        n = "" if row["n"] is None else row["n"]
        print(
            f"{row['sex']:<4}{row['index']:<16}{n!s:>5}{row['mean']:>10.2f}{row['sd']:>9.2f}"
            f"{row['t_minus1']:>10.2f}{row['t_minus2']:>10.2f}"
        )


def run(args) -> int:
    from sarco_app.errors import SarcoError
    from sarco_app.measurement.reference import derive_reference, load_reference, write_reference

    if args.cohort is None:
        if args.out is not None:
            raise SarcoError("--out needs --cohort (the cohort CSV to derive the table from)")
        _print_table(load_reference())
        return 0
    if args.out is None:
        raise SarcoError("--out is required with --cohort")
    indices = [i for i in args.indices.split(",") if i.strip()]
    table = derive_reference(args.cohort, age_max=args.age_max, age_min=args.age_min,
                             indices=indices, name=args.name)
    write_reference(table, args.out)
    _print_table(load_reference(args.out))  # read back: what was written is what later runs use
    print(f"wrote {args.out}")
    return 0
