"""``python -m sarco_app evaluate``: IoU / Dice of predicted labels against reference labels."""

from __future__ import annotations

import sys
from pathlib import Path


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('--pred', '--truth')
OUTPUTS = ('--csv', '--markdown')


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="segmentation agreement (IoU, Dice per tissue) and the paper's Table-3 summary",
        description=(
            "Compare predicted label maps with reference label maps (files, or folders matched by "
            "file name; a studies folder means its labels/final/). Prints per-image IoU and Dice "
            "for M, S, V, I and MSV, and the Table-3 counts per IoU bin, as Markdown."
        ),
    )
    parser.add_argument("--pred", required=True, type=Path, help="predicted label file or folder")
    parser.add_argument("--truth", required=True, type=Path, help="reference label file or folder")
    parser.add_argument("--csv", type=Path, default=None,
                        help="write per-image CSV here and the Table-3 summary to <stem>_table3.csv")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the Markdown here")
    return parser


def run(args) -> int:
    import pandas as pd

    from sarco_app.measurement.evaluate import evaluate_files, to_markdown

    result = evaluate_files(args.pred, args.truth)
    text = to_markdown(result["rows"], result["table3"])
    for side, ids in (("prediction", result["only_pred"]), ("reference", result["only_truth"])):
        if ids:
            print(f"warning: {len(ids)} {side} file(s) without a partner: {', '.join(ids[:5])}",
                  file=sys.stderr)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame.from_records(result["rows"]).to_csv(args.csv, index=False)
        result["table3"].to_csv(args.csv.with_name(args.csv.stem + "_table3.csv"))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0
