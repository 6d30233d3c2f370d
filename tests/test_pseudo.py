"""The pseudo-label loop's library (:mod:`sarco_app.segmentation.pseudo`), ``python -m sarco_app loop`` and
``python -m scripts.simulate_loop --quick``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sarco_app.segmentation import pseudo
from sarco_app.__main__ import main
from sarco_app.errors import SarcoError
from sarco_app.synthesis.phantom import generate, write_phantom
from sarco_app.segmentation.segment import SHIPPED_MODEL_PATH, get_model
from sarco_app.segmentation.train import TrainConfig, train
from sarco_app.segmentation.training_data import Sample


def test_entropy_confidence_is_one_for_certain_and_zero_for_uniform_pixels():
    probs = np.zeros((5, 2, 2), np.float32)
    probs[1] = 1.0  # certain muscle everywhere
    probs[:, 1, 1] = 0.2  # one uniform pixel
    label = np.ones((2, 2), np.uint8)
    sums = pseudo.ConfidenceSums()
    sums.add(probs, label)
    result = sums.result()
    assert result["muscle"] == pytest.approx(0.75, abs=1e-4)  # three certain pixels, one uniform
    assert result["sat"] is None and result["overall"] == pytest.approx(0.75, abs=1e-4)
    # A background pixel the network half gives to a tissue counts for overall.
    probs2 = np.zeros((5, 1, 2), np.float32)
    probs2[0] = 1.0
    probs2[:, 0, 1] = [0.5, 0.5, 0, 0, 0]
    sums = pseudo.ConfidenceSums()
    sums.add(probs2, np.zeros((1, 2), np.uint8))
    assert sums.result()["overall"] == pytest.approx(1 - np.log(2) / np.log(5), abs=1e-4)


def test_queue_orders_and_nothing_left():
    queue = pseudo.candidates(["c", "a", "b", "d"], final_ids=["d"])
    assert queue == ["a", "b", "c"]
    scores = {"a": 0.95, "b": 0.80, "c": None}
    assert pseudo.next_image("first", queue) == "a"
    assert pseudo.next_image("pseudo_review", queue, scores) == "b"  # least confident; c has none
    assert pseudo.next_image("uncertainty", queue, {"a": 0.1, "b": 0.3, "c": None}) == "b"
    assert pseudo.next_image("random", queue) in queue
    assert pseudo.next_image("random", []) is None and pseudo.next_image("pseudo_review", ["c"], scores) is None
    with pytest.raises(SarcoError, match="unknown strategy"):
        pseudo.next_image("smallest", queue)
    assert "all 3 images have a final label" in pseudo.nothing_left_message("first", 3, 0)
    assert "run batch pseudo-labelling first" in pseudo.nothing_left_message("pseudo_review", 3, 2)


def test_training_pairs_final_wins_and_threshold_is_inclusive():
    images = {i: f"/{i}.nii.gz" for i in ("a", "b", "c", "d", "e")}
    finals = {"a": "/final/a", "b": "/final/b"}
    pseudos = {"b": ("/p/b", {"confidence": {"overall": 0.99}}), "c": ("/p/c", {"confidence": {"overall": 0.9}}),
               "d": ("/p/d", {"confidence": {"overall": 0.89}}), "e": ("/p/e", {})}
    chosen = pseudo.training_pairs(images, finals, pseudos, include_pseudo=True, min_confidence=0.9)
    assert chosen.final_ids == ["a", "b"] and chosen.pseudo_ids == ["c"]
    assert chosen.finals == [("/a.nii.gz", "/final/a"), ("/b.nii.gz", "/final/b")]
    assert chosen.counts() == {"finals": 2, "pseudo": 1, "pseudo_below_threshold": 1, "pseudo_without_confidence": 1,
                               "pseudo_overridden_by_final": 1}
    assert pseudo.training_pairs(images, finals, pseudos, include_pseudo=False, min_confidence=0).pseudo == []


def test_weighted_training_runs_and_rounds_are_recorded(tmp_path):
    ph = [generate(7100 + k, size=96) for k in range(2)]
    samples = [Sample(p.hu, p.label, p.spacing, f"s{k}") for k, p in enumerate(ph)]
    samples[1].weight = 0.25
    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=64, threads=1)
    result = train(samples, tmp_path / "m.pt", config, val_samples=samples[:1], log=lambda line: None)
    assert result["iterations"] == 2 and np.isfinite(result["history"][0]["loss"])
    chosen = pseudo.TrainingSet(finals=[("x", "y")], pseudo=[("x2", "y2")])
    for _ in range(2):
        pseudo.append_round(tmp_path / "rounds.json", pseudo.round_record("m@1", chosen, {"muscle": 0.9}, 3.0))
    rounds = pseudo.read_rounds(tmp_path / "rounds.json")
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["finals"] == 1 and rounds[1]["pseudo"] == 1
    assert pseudo.plot_learning_curve(rounds, tmp_path / "curve.png")[:4] == b"\x89PNG"
    with pytest.raises(SarcoError, match="no rounds"):
        pseudo.plot_learning_curve([])


def test_loop_cli_pseudo_labels_queues_and_retrains(tmp_path, capsys):
    studies = tmp_path / "studies"
    for k in range(5):
        write_phantom(generate(7200 + k, size=96), studies, f"case{k}")
    final_dir = studies / "labels" / "final"
    finals_before = {p.name: p.read_bytes() for p in final_dir.iterdir()}
    for k in (3, 4):
        (final_dir / f"case{k}.nii.gz").unlink()
        del finals_before[f"case{k}.nii.gz"]
    code = main(["loop", "--studies", str(studies), "--rounds", "2", "--init", str(SHIPPED_MODEL_PATH),
                 "--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--crop", "64",
                 "--min-confidence", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 1/2: 3 finals, 2 images to pseudo-label" in out and "round 2/2" in out
    assert sorted(p.name for p in (studies / "labels" / "pseudo").iterdir()) == ["case3.nii.gz", "case4.nii.gz"]
    assert {p.name: p.read_bytes() for p in final_dir.iterdir()} == finals_before  # finals untouched
    info = json.loads((studies / "labels" / "pseudo_info.json").read_text())
    assert set(info) == {"case3", "case4"} and info["case3"]["checkpoint"].startswith(("bodycomp_unet.pt@", "round1.pt@"))
    assert 0 < info["case3"]["confidence"]["overall"] <= 1
    rounds = json.loads((studies / "loop" / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    # Validation takes one final out, the two pseudo-labels (min confidence 0) go in.
    assert rounds[0]["finals"] == 3 and rounds[0]["pseudo"] == 2 and rounds[0]["train_slices"] == 4
    assert "training BasicUNet on 4 slices, validating on 1" in out
    with open(studies / "loop" / "queue_round1.csv") as fh:
        queue = list(csv.DictReader(fh))
    conf = [float(r["overall_confidence"]) for r in queue]
    assert [r["image"] for r in queue] and conf == sorted(conf)  # least confident first
    assert (studies / "loop" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    pseudo_label = np.asarray(nib.load(str(studies / "labels" / "pseudo" / "case3.nii.gz")).dataobj)
    assert set(np.unique(pseudo_label)) <= {0, 1, 2, 3, 4} and (pseudo_label == 2).any()


def test_loop_cli_errors(tmp_path, capsys):
    assert main(["loop", "--studies", str(tmp_path / "none"), "--rounds", "1"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["loop", "--studies", str(tmp_path), "--rounds", "0"]) == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert main(["loop", "--studies", str(tmp_path), "--pseudo-weight", "0"]) == 1
    assert "--pseudo-weight must be in (0, 1]" in capsys.readouterr().err


def test_simulate_loop_quick(tmp_path):
    # In-process (the script's main), so the test shares this session's imports of torch/MONAI.
    from scripts import simulate_loop as script
    out = tmp_path / "sim"
    assert script.main(["--quick", "--out", str(out)]) == 0
    with open(f"{out}.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["arm"], int(r["round"])) for r in rows] == [
        (arm, k) for arm in ("loop", "finals", "review_finals", "random_pseudo") for k in range(3)]
    # Finals-only arms never train on pseudo-labels; the pseudo arms do from round 1.
    assert all(int(r["pseudo_used"]) == 0 for r in rows if r["arm"] in ("finals", "review_finals"))
    assert all(int(r["pseudo_used"]) > 0 for r in rows if r["arm"] in ("loop", "random_pseudo") and r["round"] == "1")
    for r in rows:
        assert 0 <= float(r["heldout_dice_sat"]) <= 1 and 0 <= float(r["pseudo_share_iou90"]) <= 1
        if int(r["round"]) > 0:
            assert int(r["corrected_this_round"]) >= 1 and float(r["interactions_per_image"]) >= 1
            # Reaching 0.90 never takes more interactions than reaching 0.95 in the same session.
            assert 1 <= float(r["interactions_to_090"]) <= float(r["interactions_per_image"])
            assert r["model_replaced"] in ("0", "1")
        assert -1 <= float(r["confidence_iou_spearman"]) <= 1 or r["confidence_iou_spearman"] == "nan"
    assert int(rows[2]["corrected_total"]) == 2 * int(rows[1]["corrected_total"])
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_loop_quick_from_a_start_model_on_upper_levels(tmp_path):
    # The shipped model as the start, pool and held-out phantoms at T11/T12/L1, through main().
    from scripts import simulate_loop as script
    out = tmp_path / "good"
    levels = ["T11", "T12", "L1"]
    assert script.main(["--quick", "--out", str(out), "--start-model", str(SHIPPED_MODEL_PATH),
                        "--pool-levels", ",".join(levels), "--arms", "loop,finals"]) == 0
    with open(f"{out}.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["arm"], int(r["round"])) for r in rows] == [(arm, k) for arm in ("loop", "finals") for k in range(3)]
    assert all(int(r["corrected_this_round"]) == 1 for r in rows if r["round"] != "0")
    # Round 0 is the start model itself on the held-out phantoms of those levels (one in --quick,
    # 96 px): a model trained here for four iterations would not give the shipped model's Dice.
    heldout = [script.shifted_phantom(script.HELDOUT_SEED0, 96, (1.5, 2.4), levels)]
    expected = script.heldout_dice(get_model(SHIPPED_MODEL_PATH), heldout)
    for row in (rows[0], rows[3]):
        for tissue in ("muscle", "sat", "vat"):
            assert float(row[f"heldout_dice_{tissue}"]) == pytest.approx(expected[tissue], abs=1e-4)
    assert Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_loop_pool_levels_and_bad_options(tmp_path, capsys, monkeypatch):
    from scripts import simulate_loop as script
    generated = []
    real_generate = script.generate

    def spy(seed, **kwargs):
        generated.append(kwargs["level"])
        return real_generate(seed, **kwargs)

    monkeypatch.setattr(script, "generate", spy)
    for seed in range(12):
        script.shifted_phantom(script.POOL_SEED0 + seed, 64, (1.5, 2.4), ["T11", "T12"])
    assert set(generated) == {"T11", "T12"}
    for argv, message in ((["--pool-levels", "T11,L9"], "--pool-levels: unknown ['L9']"),
                          (["--start-model", str(tmp_path / "none.pt")], "no such file")):
        with pytest.raises(SystemExit):
            script.main(["--quick", "--out", str(tmp_path / "x"), *argv])
        assert message in capsys.readouterr().err


def test_annotator_counts_a_tissue_absent_from_label_and_truth_as_done():
    # metrics.iou is None for two empty masks (the library's rule); the annotator needs a number:
    # a label that rightly holds none of a tissue is finished at its first interaction.
    from scripts import simulate_annotator as annotator
    hu = np.zeros((32, 32), np.float32)
    truth = np.zeros((32, 32), np.uint8)
    truth[4:20, 4:20] = 1  # muscle only: no VAT anywhere
    assert annotator.session_iou(truth == 3, truth == 3) == 1.0
    assert annotator.session_iou(truth == 1, truth == 3) == 0.0

    def tool(*args):  # never called: the first interaction is the automatic label
        raise AssertionError("a finished tissue needs no stroke")

    session = annotator.run_session(tool, hu, truth, "vat", truth.copy(), (1.0, 1.0), auto_seconds=0.0)
    assert session["ious"] == [1.0] and session["reached"] and session["interactions"] == 1


def test_pseudo_label_is_the_default_segmentation_output():
    from sarco_app.segmentation.segment import segment_volume

    ph = generate(7300, size=128)
    model = get_model(SHIPPED_MODEL_PATH)
    label, confidence = pseudo.pseudo_label_volume(ph.hu, ph.spacing, model, [0])
    assert np.array_equal(label, segment_volume(ph.hu, ph.spacing, model=model).label)
    assert all(0 < confidence[k] <= 1 for k in ("muscle", "sat", "vat", "overall"))
