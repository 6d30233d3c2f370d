"""``python -m sarco_app train``: train the body-composition network on labelled scans."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help="train the body-composition U-Net on a studies folder's final labels",
        description=(
            "Train (or fine-tune) the 2D body-composition network on every labelled slice of a "
            "studies folder (DIR/<id>.nii.gz with DIR/labels/final/<id>.nii.gz); the best "
            "checkpoint by validation Dice is written to --out. The same code runs the MONAI "
            "Label trainer `bodycomp_unet`."
        ),
    )
    parser.add_argument("--data", required=True, type=Path, help="studies folder with labels/final/")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write (.pt)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    parser.add_argument("--iterations-per-epoch", type=int, default=None,
                        help="batches per epoch (default: one pass over the slices)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=160, help="training crop in working pixels (default 160)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="checkpoint to fine-tune from")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--relabel-muscle-by-hu", action="store_true",
                        help="after HU augmentation, split the muscle compartment into muscle (-29..150 HU) and "
                             "IMAT (-190..-30 HU) again, as the L3 protocol does (see models/MODEL_CARD.md)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    return parser


def run(args) -> int:
    from sarco_app.train import TrainConfig, train_from_folder

    config = TrainConfig(
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        seed=args.seed,
        init_from=str(args.init) if args.init else None,
        augment=not args.no_augment,
        relabel_muscle_by_hu=args.relabel_muscle_by_hu,
        threads=args.threads,
    )
    config.check()  # bad settings fail before the studies are read
    result = train_from_folder(args.data, args.out, config, log=lambda line: print(line, flush=True))
    dice = ", ".join(f"{k} {v:.4f}" for k, v in result["best_dice"].items() if v is not None)
    if result["checkpoint"] is None:
        print(f"no epoch beat the initial model ({dice}); {args.out} not written")
        return 0
    print(f"wrote {result['checkpoint']} (best epoch {result['best_epoch']}: {dice})")
    return 0
