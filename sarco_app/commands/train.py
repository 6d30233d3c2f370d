"""``python -m sarco_app train``: train the body-composition network on labelled scans."""

from __future__ import annotations

from pathlib import Path


#: File options (as typed; a positional by its name) checked by sarco_app.__main__.refuse_overwrites.
INPUTS = ('--data', '--init')
OUTPUTS = ('--out', '--last')


def add_parser(subparsers):
    from sarco_app.segmentation.train import TrainConfig

    default = TrainConfig.param_defaults()
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
    # Defaults (None here) come from TrainConfig, shared with the MONAI Label trainer.
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs (default {default['epochs']}; 0 with --init and --split-head-iterations "
                             "trains only the split head)")
    parser.add_argument("--iterations-per-epoch", type=int, default=None,
                        help="batches per epoch (default: one pass over the slices)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {default['batch_size']}")
    parser.add_argument("--crop", type=int, default=None,
                        help=f"training crop in working pixels (default {default['crop']})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {default['lr']:g})")
    parser.add_argument("--seed", type=int, default=None, help=f"default {default['seed']}")
    parser.add_argument("--init", type=Path, default=None, help="checkpoint to fine-tune from")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--relabel-muscle-by-hu", action="store_true",
                        help="after HU augmentation, split the muscle compartment into muscle (-29..150 HU) and "
                             "IMAT (-190..-30 HU) again, as the L3 protocol does (see models/MODEL_CARD.md)")
    parser.add_argument("--split-head-iterations", type=int, default=0,
                        help="then train the split head (tissue by HU on each slice's own grid, backbone frozen) "
                             "for this many iterations of 2 slices (default 0: none; a retrained backbone then drops an old head)")
    parser.add_argument("--organ-classes", action="store_true",
                        help="also learn the organ classes of labels/organs/ (written by `phantom --organs`); the "
                             "served label keeps the five values, organs are background")
    parser.add_argument("--class-weights", default=None, metavar="NAME:W,...",
                        help="cross-entropy weight per class, e.g. 'diaphragm:3,liver:2,imat:2' (names: background, "
                             "muscle, sat, vat, imat and, with --organ-classes, the organ classes; others 1)")
    parser.add_argument("--class-weight-border-mm", type=float, default=None, metavar="MM",
                        help="spread the class weights this far (mm) across every border, so both sides of a "
                             "weighted organ's border weigh alike (default 0: off)")
    parser.add_argument("--last", type=Path, default=None,
                        help="also write every epoch's network here (no split head), whatever its validation Dice")
    parser.add_argument("--device", default=None, help="where the network runs: auto (the default: CUDA when a GPU is there, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads per process (default {default['threads']})")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes training together under torch DDP (torchrun: gloo on CPU, nccl with one GPU "
                             "each on CUDA); each takes batch-size / nproc crops of every batch, so the run matches "
                             f"one process (default {default['nproc']}; must divide the batch size)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="folder for a resume state written after every epoch; started again with the same "
                             "options, a run continues from the last one there")
    parser.add_argument("--tensorboard-dir", type=Path, default=None,
                        help="write TensorBoard logs here (loss per iteration; loss and validation Dice per epoch)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="log the run to this MLflow tracking URI, e.g. sqlite:///runs/mlflow.db (experiment "
                             "sarco_bodycomp)")
    return parser


def run(args) -> int:
    from sarco_app.segmentation.train import TrainConfig, train_from_folder

    # Bad settings fail here, before the studies are read.
    config = TrainConfig.from_params({
        "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch,
        "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "seed": args.seed,
        "init_from": str(args.init) if args.init else None, "augment": not args.no_augment,
        "relabel_muscle_by_hu": args.relabel_muscle_by_hu, "split_head_iterations": args.split_head_iterations,
        "threads": args.threads, "organ_classes": args.organ_classes, "device": args.device,
        "last_path": str(args.last) if args.last else None, "nproc": args.nproc, "state_dir": str(args.state_dir) if args.state_dir else None,
        "tensorboard_dir": str(args.tensorboard_dir) if args.tensorboard_dir else None, "mlflow_uri": args.mlflow_uri,
        "class_weights": args.class_weights, "class_weight_border_mm": args.class_weight_border_mm,
    })
    result = train_from_folder(args.data, args.out, config, log=lambda line: print(line, flush=True))
    dice = ", ".join(f"{k} {v:.4f}" for k, v in result["best_dice"].items() if v is not None)
    if result["checkpoint"] is None:
        print(f"nothing beat the initial model{f' ({dice})' if dice else ''}; {args.out} not written")
        return 0
    head = result.get("split_head")
    if result["best_epoch"]:
        print(f"wrote {result['checkpoint']} (best epoch {result['best_epoch']}: {dice})")
    else:
        print(f"wrote {result['checkpoint']} (backbone kept from {args.init})")
    if head:
        dice = head["val_raw_dice"]
        print("split head: validation raw Dice " + " ".join(f"{k} {v:.4f}" for k, v in dice["head"].items() if v is not None)
              + " (backbone alone " + " ".join(f"{k} {v:.4f}" for k, v in dice["backbone"].items() if v is not None) + ")")
    return 0
