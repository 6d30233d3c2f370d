"""Training (``sarco_app.segmentation.train`` and its modules, and ``python -m sarco_app train``): data loading, augmentation
and a short real run whose checkpoint inference then loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sarco_app import labels as L
from sarco_app.__main__ import main
from sarco_app.errors import SarcoError
from sarco_app.segmentation.network import load_checkpoint
from sarco_app.synthesis.phantom import generate, write_cohort
from sarco_app.segmentation.segment import segment_volume
from sarco_app.segmentation.augment import augment_intensity, relabel_muscle_by_hu, sample_crop
from sarco_app.segmentation.training_data import Sample, load_studies, to_working


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies")
    write_cohort(folder, 3, seed=5, format="nifti", size=256)
    return folder


def test_load_studies_reads_labelled_slices(studies, tmp_path):
    samples = load_studies(studies)
    assert len(samples) == 3
    for s in samples:
        assert s.hu.shape == s.label.shape and s.label.max() <= 4 and s.label.any()
        assert 0.5 <= s.spacing[0] <= 3.0
    with pytest.raises(SarcoError, match="labels/final"):
        load_studies(tmp_path)


def test_augmented_crops_keep_image_and_label_aligned():
    ph = generate(8, spacing_mm=0.8)
    hu, lab = to_working(Sample(ph.hu, ph.label, ph.spacing), 2.0)
    gen = torch.Generator().manual_seed(0)
    crops = [sample_crop(hu, lab, 96, gen, augment=True) for _ in range(6)]
    H = torch.stack([c[0] for c in crops])
    Y = torch.stack([c[1] for c in crops])
    assert H.shape == (6, 96, 96) and Y.dtype == torch.long
    # Geometry moved image and label together: fat labels sit on fat HU, muscle on soft tissue.
    assert H[Y == L.SAT].median() < -60 and H[Y == L.MUSCLE].median() > -10
    A = augment_intensity(H, Y, gen)
    assert A.shape == H.shape and not torch.equal(A, H)
    assert A[Y == L.SAT].median() < -40 and A[Y == L.MUSCLE].median() > -20
    # Without augmentation the crop is a plain window: same values as the source.
    plain_hu, plain_lab = sample_crop(hu, lab, 64, gen, augment=False)
    assert set(np.unique(plain_lab.numpy())) <= set(range(5))


def test_relabel_muscle_by_hu_resplits_only_the_muscle_compartment():
    lab = torch.tensor([[[L.MUSCLE, L.MUSCLE, L.IMAT, L.IMAT, L.SAT, L.VAT, L.BACKGROUND, L.MUSCLE]]])
    hu = torch.tensor([[[40.0, -45.0, 10.0, -90.0, 20.0, 30.0, -60.0, 400.0]]])
    out = relabel_muscle_by_hu(hu, lab)
    # Muscle at fat HU -> IMAT, IMAT at muscle HU -> muscle, bone HU -> background; SAT and VAT
    # keep their label even off the fat range (only the muscle split follows the augmented HU).
    assert out.tolist() == [[[L.MUSCLE, L.IMAT, L.MUSCLE, L.IMAT, L.SAT, L.VAT, L.BACKGROUND, L.BACKGROUND]]]
    assert out.dtype == lab.dtype


def test_train_cli_writes_a_checkpoint_inference_loads(studies, tmp_path):
    out = tmp_path / "model.pt"
    code = main(["train", "--data", str(studies), "--out", str(out), "--epochs", "2",
                 "--iterations-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--threads", "1",
                 "--relabel-muscle-by-hu"])
    assert code == 0 and out.is_file()
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["meta"]["train_config"]["relabel_muscle_by_hu"] is True
    assert ckpt["meta"]["iterations"] >= 2 and set(ckpt["meta"]["val_dice"]) == set(L.LABELS)
    model = load_checkpoint(out)
    ph = generate(9, spacing_mm=2.0, size=200)
    result = segment_volume(ph.hu, ph.spacing, model=model)
    assert result.label.shape == ph.hu.shape and result.model_path == str(out)


def test_train_cli_errors(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt")]) != 0
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--epochs", "0"]) != 0
    assert "epochs 0 trains only the split head: it needs a model to start from" in capsys.readouterr().err
    # Settings are checked before the (missing) studies are read: the message names the setting.
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"), "--crop", "100"]) != 0
    assert "crop must be a multiple of 16" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"), "--crop", "100000"]) != 0
    assert "crop must be a multiple of 16 in 32-1024 pixels" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"), "--lr", "nan"]) != 0
    assert "lr must be in [0, 1]" in capsys.readouterr().err
    # An output that cannot be written fails before the studies are read, not after training.
    (tmp_path / "a_file").write_text("x")
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "a_file" / "m.pt")]) != 0
    assert "cannot create its folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) != 0
    assert "is a folder, not a checkpoint file" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"), "--device", "tpu"]) != 0
    assert "unknown device 'tpu'" in capsys.readouterr().err
    # Class weights: every bad entry named, before the studies are read.
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"),
                 "--class-weights", "diaphragm:3,lung:2,imat:0,liver:-1,sat:x,vat"]) != 0
    err = capsys.readouterr().err
    assert "unknown class 'lung'" in err and "diaphragm" not in err.split("unknown class")[0]
    for name in ("imat", "liver", "sat", "vat"):
        assert f"class weight of {name} must be a number > 0" in err
    assert not (tmp_path / "m.pt").exists()


def test_class_weights_parse_from_request_text():
    from sarco_app.segmentation.train import TrainConfig

    config = TrainConfig.from_params({"class_weights": " Diaphragm:3, liver:2.5 ,imat:2"})
    assert config.class_weights == {"diaphragm": 3.0, "liver": 2.5, "imat": 2.0}
    assert TrainConfig.from_params({"class_weights": ""}).class_weights is None
    assert TrainConfig.from_params({"class_weights": {"muscle": "2"}}).class_weights == {"muscle": 2.0}
    with pytest.raises(SarcoError, match="class muscle weighted twice"):
        TrainConfig.from_params({"class_weights": "muscle:2,muscle:3"})
    with pytest.raises(SarcoError, match="class weight of spleen must be a number > 0"):
        TrainConfig(class_weights={"spleen": float("inf")}).check()


def test_class_weights_weight_the_cross_entropy_per_class():
    """The weighted loss's cross-entropy is torch's class-weighted mean on each slice (slices
    without an organ map on the five served classes), and up-weighting a class makes the
    gradient on its pixels larger relative to the others'."""
    from sarco_app.segmentation.network import ORGAN_CLASS_NAMES
    from sarco_app.segmentation.network import tissue_logits
    from sarco_app.segmentation.train import SliceWeightedDiceCE, class_weight_vector

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, len(ORGAN_CLASS_NAMES), 16, 16, generator=gen)
    label = torch.randint(0, len(ORGAN_CLASS_NAMES), (2, 16, 16), generator=gen)
    label[1] = label[1] % L.NUM_CLASSES  # the slice without an organ map holds tissue values only
    target = {"label": label, "weight": torch.ones(2), "organs": torch.tensor([True, False])}
    weights = class_weight_vector({"diaphragm": 3, "liver": 2, "imat": 0.5}, ORGAN_CLASS_NAMES)
    assert weights.tolist() == [1, 1, 1, 1, 0.5, 2, 1, 1, 1, 1, 3, 1]
    plain, weighted = SliceWeightedDiceCE(), SliceWeightedDiceCE(weights)
    dice = [plain.per_slice(logits[:1], label[:1]) - F.cross_entropy(logits[:1], label[:1]),
            plain.per_slice(tissue_logits(logits[1:]), label[1:]) - F.cross_entropy(tissue_logits(logits[1:]), label[1:])]
    expected = 0.5 * (dice[0] + F.cross_entropy(logits[:1], label[:1], weight=weights)
                      + dice[1] + F.cross_entropy(tissue_logits(logits[1:]), label[1:], weight=weights[:L.NUM_CLASSES]))
    assert torch.allclose(weighted(logits, target), expected.squeeze(), atol=1e-6)
    assert not torch.allclose(weighted(logits, target), plain(logits, target), atol=1e-3)
    # Equal weights are the unweighted loss (the weighted mean is normalised per slice).
    assert torch.allclose(SliceWeightedDiceCE(torch.full((12,), 2.0))(logits, target), plain(logits, target), atol=1e-6)

    def gradient_share(loss_fn) -> float:
        x = logits.clone().requires_grad_(True)
        loss_fn(x, target).backward()
        per_pixel = x.grad[0].abs().sum(0)
        return float(per_pixel[label[0] == ORGAN_CLASS_NAMES.index("diaphragm")].sum() / per_pixel.sum())

    assert gradient_share(weighted) > 1.5 * gradient_share(plain)
    with pytest.raises(SarcoError, match="does not predict"):
        class_weight_vector({"liver": 2}, ORGAN_CLASS_NAMES[: L.NUM_CLASSES])


def test_class_weight_border_spreads_the_weight_to_both_sides_of_a_border():
    """With a border of r pixels, a muscle pixel within r of a weighted organ weighs as the organ
    does (its loss counts as much as the organ pixel across the border), one farther away keeps
    weight 1; without a border the muscle pixel next to the organ keeps weight 1."""
    from sarco_app.segmentation.network import ORGAN_CLASS_NAMES
    from sarco_app.segmentation.train import SliceWeightedDiceCE, TrainConfig, class_weight_vector

    liver = ORGAN_CLASS_NAMES.index("liver")
    label = torch.full((1, 16, 16), L.MUSCLE, dtype=torch.long)
    label[0, :, :8] = liver  # organ left of column 8, muscle from column 8
    weights = class_weight_vector({"liver": 3}, ORGAN_CLASS_NAMES)

    def muscle_gradient(border_px: int, column: int) -> float:
        x = torch.zeros(1, len(ORGAN_CLASS_NAMES), 16, 16, requires_grad=True)
        SliceWeightedDiceCE(weights, border_px=border_px).per_slice(x, label).sum().backward()
        return float(x.grad[0, :, :, column].abs().sum())

    # Equal logits: every pixel's cross-entropy gradient is the same up to its weight; the Dice
    # term does not depend on the weights, so differences between the two runs are the weights'.
    near, far = muscle_gradient(2, 9), muscle_gradient(2, 12)
    assert muscle_gradient(0, 9) == pytest.approx(muscle_gradient(0, 12), rel=1e-5)
    assert near > 1.5 * far  # within 2 px of the organ: weight 3; beyond: weight 1
    assert muscle_gradient(2, 10) < 1.5 * far  # column 10 lies 3 px from the organ
    with pytest.raises(SarcoError, match="class_weight_border_mm must be in"):
        TrainConfig.from_params({"class_weight_border_mm": -1})


def test_train_config_from_params_reads_request_text():
    from sarco_app.segmentation.train import TrainConfig

    config = TrainConfig.from_params({"epochs": "3", "lr": "0.01", "iterations_per_epoch": 0,
                                      "time_limit_s": "0", "organ_classes": "true", "crop": None})
    assert (config.epochs, config.lr, config.organ_classes) == (3, 0.01, True)
    assert config.iterations_per_epoch is None and config.time_limit_s is None  # 0 means none
    assert config.crop == TrainConfig().crop  # None takes the default
    with pytest.raises(SarcoError) as err:
        TrainConfig.from_params({"epochs": "2.5", "augment": "maybe", "epoch": 3})
    for text in ("epochs must be an integer, not '2.5'", "augment must be true or false", "unknown setting 'epoch'"):
        assert text in str(err.value)
    # A value of the wrong kind does not hide the others' range problems: one reply names all.
    with pytest.raises(SarcoError) as err:
        TrainConfig.from_params({"epochs": "ten", "crop": 100, "lr": -1})
    for text in ("epochs must be an integer, not 'ten'", "crop must be a multiple of 16", "lr must be in [0, 1]"):
        assert text in str(err.value)


def test_train_config_check_names_every_bad_setting():
    from sarco_app.segmentation.train import TrainConfig, train

    TrainConfig().check()  # the defaults are valid
    with pytest.raises(SarcoError) as err:
        TrainConfig(epochs=-1, lr=float("nan"), batch_size=-1, time_limit_s=-5, split_head_iterations=-2).check()
    text = str(err.value)
    for setting in ("epochs", "lr", "batch_size", "time_limit_s", "split_head_iterations"):
        assert f"{setting} must be" in text
    with pytest.raises(SarcoError, match="epochs 0"):
        TrainConfig(epochs=0, split_head_iterations=5).check()  # no checkpoint to keep the backbone of
    TrainConfig(epochs=0, split_head_iterations=5, init_from="model.pt").check()
    ph = generate(8, spacing_mm=2.0, size=128)
    with pytest.raises(SarcoError, match="iterations_per_epoch"):
        train([Sample(ph.hu, ph.label, ph.spacing)], "unused.pt", TrainConfig(iterations_per_epoch=0))


def test_fine_tune_that_does_not_improve_keeps_the_model(studies, tmp_path, capsys):
    """lr 0 cannot beat the initial model: the checkpoint is not (over)written."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "models" / "bodycomp_unet.pt"
    if not shipped.is_file():
        pytest.skip("no shipped model")
    out = tmp_path / "tuned.pt"
    code = main(["train", "--data", str(studies), "--out", str(out), "--epochs", "1",
                 "--iterations-per-epoch", "1", "--batch-size", "2", "--crop", "64", "--threads", "1",
                 "--lr", "0", "--init", str(shipped)])
    assert code == 0 and not out.exists()
    assert "not written" in capsys.readouterr().out


def test_split_head_only_training_keeps_the_backbone(studies, tmp_path, capsys):
    """``--epochs 0 --split-head-iterations N``: the backbone of --init is kept bit for bit, the
    checkpoint gains a trained split head and inference uses it."""
    from sarco_app.segmentation.segment import predict_probabilities

    init = tmp_path / "init.pt"
    code = main(["train", "--data", str(studies), "--out", str(init), "--epochs", "1",
                 "--iterations-per-epoch", "1", "--batch-size", "2", "--crop", "64", "--threads", "1"])
    assert code == 0 and init.is_file() and "split_head" not in torch.load(init, weights_only=True)
    out = tmp_path / "with_head.pt"
    code = main(["train", "--data", str(studies), "--out", str(out), "--epochs", "0", "--init", str(init),
                 "--split-head-iterations", "3", "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file(), printed
    assert "split head iter 3/3" in printed and "backbone kept from" in printed
    assert "split head: validation raw Dice muscle" in printed
    before, after = torch.load(init, weights_only=True), torch.load(out, weights_only=True)
    assert before["state_dict"].keys() == after["state_dict"].keys()
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert after["meta"]["split_head"]["iterations"] == 3 and after["meta"]["best_epoch"] == 1
    plain, headed = load_checkpoint(init), load_checkpoint(out)
    assert plain.split_head is None and headed.split_head is not None
    ph = generate(9, spacing_mm=2.0, size=200)
    p0 = predict_probabilities(ph.hu, ph.spacing, plain)[0]
    p1 = predict_probabilities(ph.hu, ph.spacing, headed)[0]
    # The head re-splits each tissue's probability by HU (muscle compartment -> muscle / IMAT /
    # background, SAT and VAT -> kept / background) but never moves it to another tissue.
    eps = 1e-5
    assert np.allclose(p1.sum(0), 1.0, atol=1e-4)
    assert (p1[L.SAT] <= p0[L.SAT] + eps).all() and (p1[L.VAT] <= p0[L.VAT] + eps).all()
    assert (p1[L.MUSCLE] + p1[L.IMAT] <= p0[L.MUSCLE] + p0[L.IMAT] + eps).all()
    assert (p1[L.BACKGROUND] >= p0[L.BACKGROUND] - eps).all()
    assert not np.allclose(p0[L.MUSCLE], p1[L.MUSCLE], atol=1e-3)
    # The default output (HU rule) decides on the backbone's compartments: the head does not
    # change it; the raw labels are the head's.
    default = segment_volume(ph.hu, ph.spacing, model=headed).label
    assert np.array_equal(default, segment_volume(ph.hu, ph.spacing, model=plain).label)
    raw_headed = segment_volume(ph.hu, ph.spacing, model=headed, hu_refine=False).label
    assert not np.array_equal(raw_headed, segment_volume(ph.hu, ph.spacing, model=plain, hu_refine=False).label)
    # A head-only run replaces an existing head only when its raw validation Dice is higher.
    from sarco_app.segmentation.train import TrainConfig, train

    lines = []
    again = train(load_studies(studies), tmp_path / "again.pt",
                  TrainConfig(epochs=0, init_from=str(out), split_head_iterations=2, split_head_lr=1e-12, threads=1),
                  log=lines.append)
    assert again["checkpoint"] is None and not (tmp_path / "again.pt").exists()
    assert any("does not beat the current one" in line for line in lines)


@pytest.fixture(scope="module")
def phantom_samples():
    return [Sample(ph.hu, ph.label, ph.spacing) for ph in (generate(s, spacing_mm=2.0, size=200) for s in (31, 32, 33))]


def test_train_split_head_learns(phantom_samples):
    """The head's loss falls and the backbone's weights stay as they were."""
    from pathlib import Path

    from sarco_app.segmentation.split_head import train_split_head

    shipped = Path(__file__).resolve().parents[1] / "models" / "bodycomp_unet.pt"
    if not shipped.is_file():
        pytest.skip("no shipped model")
    model = load_checkpoint(shipped)
    model.split_head = None  # a new head
    backbone = {k: v.clone() for k, v in model.network.state_dict().items()}
    result = train_split_head(model, phantom_samples[:2], 40, val_samples=phantom_samples[2:], log=lambda line: None)
    assert result["final_loss"] < 0.75 * result["first_loss"], result
    assert set(result["val_raw_dice"]) == {"backbone", "head"}
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in backbone.items())


def test_retraining_the_backbone_drops_a_head_that_no_longer_fits(phantom_samples, tmp_path):
    from sarco_app.segmentation.network import TissueSplitHead, new_model, save_checkpoint
    from sarco_app.segmentation.train import TrainConfig, train

    torch.manual_seed(0)
    init = new_model()
    torch.nn.init.zeros_(init.network.final_conv.weight)  # predicts background everywhere:
    torch.nn.init.zeros_(init.network.final_conv.bias)  # any trained epoch beats it
    init.split_head = TissueSplitHead()
    save_checkpoint(init, tmp_path / "init.pt")
    lines = []
    config = TrainConfig(epochs=2, iterations_per_epoch=4, batch_size=2, crop=64, lr=1e-2, threads=1,
                         init_from=str(tmp_path / "init.pt"))
    result = train(phantom_samples[:2], tmp_path / "out.pt", config, val_samples=phantom_samples[2:], log=lines.append)
    assert result["checkpoint"] is not None, lines
    assert any("split head is set aside" in line for line in lines)
    assert load_checkpoint(tmp_path / "out.pt").split_head is None


def test_add_organ_classes_keeps_the_served_output():
    from sarco_app.segmentation.network import (
        CLASS_NAMES,
        ORGAN_CLASS_NAMES,
        add_organ_classes,
        new_model,
        tissue_logits,
    )

    torch.manual_seed(0)
    model = new_model()  # a five-class network
    assert model.class_names == CLASS_NAMES and not model.organ_classes
    x = torch.rand(1, len(model.windows), 64, 64)
    before = torch.softmax(model.network(x), 1)
    add_organ_classes(model)
    logits = model.network(x)
    assert logits.shape[1] == len(ORGAN_CLASS_NAMES) and model.num_classes == L.NUM_CLASSES
    assert torch.allclose(torch.softmax(tissue_logits(logits), 1), before, atol=1e-3)
    # Folding organ classes into background is the sum of their probabilities.
    p = torch.softmax(logits, 1)
    merged = torch.softmax(tissue_logits(logits), 1)
    assert torch.allclose(merged[:, 0], p[:, 0] + p[:, L.NUM_CLASSES:].sum(1), atol=1e-5)


def test_training_label_puts_organs_on_background_only():
    from sarco_app.segmentation.training_data import training_label

    ph = generate(12, size=96, level="T12")
    sample = Sample(ph.hu, ph.label, ph.spacing, organs=ph.organ_label)
    lab = training_label(sample, organ_classes=True)
    tissue = ph.label > 0
    assert np.array_equal(lab[tissue], ph.label[tissue])
    assert np.array_equal(lab[~tissue & (ph.organ_label > 0)], ph.organ_label[~tissue & (ph.organ_label > 0)] + 4)
    assert lab.max() > L.IMAT and np.array_equal(training_label(sample, organ_classes=False), ph.label)


def test_train_cli_with_organ_classes_serves_only_tissue_values(tmp_path, capsys):
    from sarco_app.segmentation.network import ORGAN_CLASS_NAMES, new_model, save_checkpoint

    data = tmp_path / "studies"
    assert main(["phantom", "--count", "3", "--seed", "6", "--size", "128", "--level", "T12", "--organs",
                 "--out", str(data)]) == 0
    out = tmp_path / "organs.pt"
    # From scratch the first epoch is always written.
    assert main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--iterations-per-epoch", "2",
                 "--batch-size", "2", "--crop", "64", "--threads", "1", "--organ-classes",
                 "--class-weights", "diaphragm:3,liver:2", "--class-weight-border-mm", "4"]) == 0
    text = capsys.readouterr().out
    assert "3 of 3 training slices have organ maps" in text
    assert "class weights diaphragm 3, liver 2, spread 4 mm across borders" in text
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["class_names"] == ORGAN_CLASS_NAMES and ckpt["meta"]["train_config"]["organ_classes"] is True
    assert ckpt["meta"]["train_config"]["class_weights"] == {"diaphragm": 3.0, "liver": 2.0}
    assert ckpt["meta"]["train_config"]["class_weight_border_mm"] == 4.0
    # An organ weight needs the organ classes: a five-class network fails before training.
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "five_w.pt"), "--epochs", "1",
                 "--batch-size", "2", "--crop", "64", "--threads", "1", "--class-weights", "liver:2"]) != 0
    assert "does not predict" in capsys.readouterr().err and not (tmp_path / "five_w.pt").exists()
    model = load_checkpoint(out)
    ph = generate(13, size=128, level="T12")
    result = segment_volume(ph.hu, ph.spacing, model=model)
    assert set(np.unique(result.label)) <= set(range(L.NUM_CLASSES))
    raw = segment_volume(ph.hu, ph.spacing, model=model, hu_refine=False)
    assert set(np.unique(raw.label)) <= set(range(L.NUM_CLASSES))
    # A five-class model to fine-tune gets the organ outputs.
    five = save_checkpoint(new_model(), tmp_path / "five.pt")
    main(["train", "--data", str(data), "--out", str(tmp_path / "tuned.pt"), "--epochs", "1",
          "--iterations-per-epoch", "1", "--batch-size", "2", "--crop", "64", "--threads", "1", "--organ-classes",
          "--init", str(five)])
    assert "organ output classes added" in capsys.readouterr().out


def test_learning_rate_follows_iterations_and_the_time_limit_only_stops(phantom_samples, tmp_path):
    """Two runs with the same settings are the same run (the schedule counts iterations, not
    seconds); a time limit stops a run early without changing its schedule."""
    from sarco_app.segmentation.train import TrainConfig, train

    config = dict(epochs=2, iterations_per_epoch=3, batch_size=2, crop=64, lr=1e-2, threads=1, seed=4)
    runs = [train(phantom_samples[:2], tmp_path / f"run{k}.pt", TrainConfig(**config), val_samples=phantom_samples[2:],
                  log=lambda line: None) for k in range(2)]
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    assert runs[0]["iterations"] == 6
    lines = []
    capped = train(phantom_samples[:2], tmp_path / "capped.pt", TrainConfig(**config, time_limit_s=1e-6),
                   val_samples=phantom_samples[2:], log=lines.append)
    assert capped["iterations"] == 0 and any("time limit" in line for line in lines)


def test_compare_models_keeps_the_served_model_unless_beaten(phantom_samples, tmp_path):
    """The safe-swap rule: an untrained network loses to the shipped model, a copy of the
    served model does not beat it (a tie keeps it), and anything wins when nothing is served."""
    from pathlib import Path

    from sarco_app.segmentation.network import new_model, save_checkpoint
    from sarco_app.segmentation.validation import compare_models

    shipped = Path(__file__).resolve().parents[1] / "models" / "bodycomp_unet.pt"
    if not shipped.is_file():
        pytest.skip("no shipped model")
    served = load_checkpoint(shipped)
    untrained = save_checkpoint(new_model(served.config, served.spacing_mm, served.windows), tmp_path / "new.pt")
    samples = phantom_samples[:1]
    result = compare_models(untrained, shipped, samples)
    assert result["replace"] is False and "does not beat" in result["reason"]
    for output in ("hu_refined", "raw"):
        assert result["candidate"][output]["score"] < result["served"][output]["score"]
        assert result["served"][output]["score"] > 0.9
    tie = compare_models(shipped, shipped, samples)
    assert tie["replace"] is False and tie["candidate"] == tie["served"]
    first = compare_models(untrained, None, samples)
    assert first["replace"] is True and first["served"] is None


def test_training_quiets_the_engine_loggers_for_its_run_only(phantom_samples, tmp_path):
    """ignite's and MONAI's engine loggers are raised to WARNING while a run trains (MONAI Label
    keeps only a train log's last lines) and get their levels back when it ends."""
    import logging

    from sarco_app.segmentation.train import TrainConfig, train

    names = ("ignite", "monai.engines")
    before = {name: logging.getLogger(name).level for name in names}
    # The validation engine's own logger is quieted only while it runs, too.
    evaluator_logger = logging.getLogger("ignite.engine.engine.SupervisedEvaluator")
    evaluator_level = evaluator_logger.level
    seen = {}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.DEBUG)

        def log(line: str) -> None:
            if line.startswith("epoch "):  # printed from inside the run
                seen.update({name: logging.getLogger(name).level for name in names})

        train(phantom_samples[:2], tmp_path / "m.pt", TrainConfig(epochs=1, iterations_per_epoch=1, batch_size=2,
                                                                   crop=64, threads=1), log=log)
        assert seen == {name: logging.WARNING for name in names}
        assert {name: logging.getLogger(name).level for name in names} == {name: logging.DEBUG for name in names}
        assert evaluator_logger.level == evaluator_level
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
