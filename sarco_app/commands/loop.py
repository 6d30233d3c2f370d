"""``python -m sarco_app loop``: the pseudo-label retraining loop on a studies folder, no server.

Each round: pseudo-label every image without a final label with the current model (stored in
``labels/pseudo/``, never over a final label; info with checkpoint id, time and confidence in
``labels/pseudo_info.json``), write the review queue (least confident first), then retrain on
the finals plus the pseudo-labels at or above ``--min-confidence`` (weighted ``--pseudo-weight``)
and record the round. Corrections saved as ``labels/final/<id>.nii.gz`` between runs take an
image out of the queue, exactly as ``PUT /datastore/label?tag=final`` does on the server.
"""

from __future__ import annotations

import csv
from pathlib import Path


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "loop",
        help="pseudo-label, queue and retrain rounds on a studies folder (the server's loop without HTTP)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--studies", required=True, type=Path,
                        help="studies folder: DIR/<id>.nii.gz, finals in DIR/labels/final/")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of pseudo-label + retrain (default 1)")
    parser.add_argument("--init", type=Path, default=None,
                        help="model of round 1 (default: $SARCO_BODYCOMP_MODEL, else the shipped one)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="checkpoints, rounds.json, queue CSVs and learning_curve.png (default DIR/loop)")
    parser.add_argument("--min-confidence", type=float, default=0.9,
                        help="use pseudo-labels whose overall confidence is at least this (default 0.9)")
    parser.add_argument("--pseudo-weight", type=float, default=0.5,
                        help="loss weight of a pseudo-label slice, finals 1 (default 0.5)")
    parser.add_argument("--no-pseudo", action="store_true", help="retrain on the finals only")
    # Training settings default to TrainConfig's (the same as `train` and the server's trainer).
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="images pseudo-labelled in parallel: N worker processes of a local Dask "
                        "cluster, each loading the model once (default 1: in this process)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="pseudo-label on an existing Dask cluster (e.g. tcp://host:8786); its "
                        "workers must see the studies folder at the same path")
    parser.add_argument("--device", default=None, help="where the network runs: auto (the default: CUDA when a GPU is there, else CPU), cpu, cuda or cuda:N")
    return parser


def run(args) -> int:
    from sarco_app.errors import SarcoError
    from sarco_app.parallel import Executor
    from sarco_app.segmentation import pseudo
    from sarco_app.segmentation.segment import default_model_path, get_model
    from sarco_app.segmentation.train import TrainConfig

    if args.rounds < 1:
        raise SarcoError(f"--rounds must be >= 1 (got {args.rounds})")
    if not 0 <= args.min_confidence <= 1:
        raise SarcoError(f"--min-confidence must be in [0, 1] (got {args.min_confidence})")
    if not 0 < args.pseudo_weight <= 1:
        raise SarcoError(f"--pseudo-weight must be in (0, 1] (got {args.pseudo_weight})")
    # Bad settings fail before any work.
    config = TrainConfig.from_params({
        "epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "batch_size": args.batch_size,
        "crop": args.crop, "lr": args.lr, "seed": args.seed, "threads": args.threads, "device": args.device,
        "init_from": "checked below"})
    folder = pseudo.StudyFolder(args.studies)
    out_dir = args.out_dir or folder.root / "loop"
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds_path = out_dir / "rounds.json"
    current = Path(args.init) if args.init else default_model_path()
    import torch

    torch.set_num_threads(config.threads)
    for round_index in range(1, args.rounds + 1):
        get_model(current)  # a missing or broken checkpoint fails here, before any work
        model_id = pseudo.checkpoint_id(current)
        finals = folder.labels(pseudo.FINAL_TAG)
        queue = pseudo.candidates(folder.images, finals)
        print(f"round {round_index}/{args.rounds}: {len(finals)} finals, {len(queue)} images to pseudo-label "
              f"with {current} ({model_id})", flush=True)
        scores = {}
        with Executor(args.workers, args.scheduler, n_tasks=len(queue),
                      announce=lambda line: print(line, flush=True)) as executor:
            for done in executor.map_unordered(
                    pseudo.pseudo_label_task, [(i, folder.images[i]) for i in queue],
                    desc=f"pseudo-labels round {round_index}", unit="image",
                    root=str(folder.root.resolve()), model_path=str(Path(current).resolve()), model_id=model_id):
                if done.error is not None:  # as before: a failed image stops the round, with its reason
                    raise SarcoError(f"pseudo-labelling {queue[done.index]}: {done.error}") from done.error
                scores[queue[done.index]] = done.value
        queue_csv = out_dir / f"queue_round{round_index}.csv"
        with open(queue_csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["rank", "image", "overall_confidence"])
            for rank, image_id in enumerate(pseudo.review_order("pseudo_review", queue, scores), 1):
                writer.writerow([rank, image_id, scores[image_id]])
        if queue:
            first = pseudo.next_image("pseudo_review", queue, scores)
            print(f"review queue (least confident first) in {queue_csv}; next: {first} "
                  f"(confidence {scores[first]:.4f})", flush=True)
        chosen = pseudo.training_pairs(folder.images, finals, folder.pseudos(), include_pseudo=not args.no_pseudo,
                                       min_confidence=args.min_confidence)
        config.init_from = str(current)
        out_path = out_dir / f"round{round_index}.pt"
        result = pseudo.retrain_round(chosen, out_path, config, rounds_path, pseudo_weight=args.pseudo_weight,
                                      log=lambda line: print(line, flush=True), min_confidence=args.min_confidence,
                                      include_pseudo=not args.no_pseudo)
        if result["checkpoint"]:
            current = Path(result["checkpoint"])
        else:
            print(f"round {round_index}: no epoch beat {current}; it stays the model", flush=True)
    png = out_dir / "learning_curve.png"
    pseudo.plot_learning_curve(pseudo.read_rounds(rounds_path), png)
    print(f"model after {args.rounds} round(s): {current}; rounds in {rounds_path}; curve {png}")
    return 0
