"""``bodycomp_unet`` / ``bodycomp_threshold`` infer tasks and the ``bodycomp_unet`` trainer over
HTTP on the real MONAI Label server."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from requests_toolbelt.multipart.decoder import MultipartDecoder

from sarco_app import labels as L
from sarco_app.inputs.ingest import load_image, make_image, save_image
from sarco_app.synthesis.phantom import generate, write_phantom
from sarco_app.metrics import dice_per_tissue
from sarco_app.segmentation.segment import SHIPPED_MODEL_PATH


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("bodycomp_studies")
    write_phantom(generate(515151, spacing_mm=1.2, size=320), root, "ph_a", organs=True)
    write_phantom(generate(515152, spacing_mm=2.5, size=160), root, "ph_b")
    # A 3D image without label: three different phantom slices.
    slices = [generate(515160 + k, spacing_mm=2.0, size=200).hu for k in range(3)]
    save_image(make_image(np.stack(slices, axis=2), (2.0, 2.0, 5.0)), root / "vol.nii.gz")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bodycomp_model")


@pytest.fixture(scope="module")
def server(start_server, studies, model_dir):
    if not SHIPPED_MODEL_PATH.is_file():
        pytest.fail("models/bodycomp_unet.pt is missing")
    return start_server(studies, conf={"model_dir": str(model_dir)})


def infer(server, model, image, params=None):
    r = requests.post(f"{server}/infer/{model}", params={"image": image},
                      data={"params": json.dumps(params or {})}, timeout=300)
    return r


def decode(response):
    """(label array in file voxel order, affine, params JSON) of a multipart infer answer."""
    assert response.status_code == 200, response.text[:500]
    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    params, label = None, None
    for part in parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            raw = part.content
            if raw[:2] == b"\x1f\x8b":  # .nii.gz
                raw = gzip.decompress(raw)
            fh = nib.FileHolder(fileobj=io.BytesIO(raw))
            img = nib.Nifti1Image.from_file_map({"header": fh, "image": fh})
            label = (np.asarray(img.dataobj), img.affine)
    assert params is not None and label is not None
    return label[0], label[1], params


def test_info_lists_tasks(server):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["models"]["bodycomp_unet"]["type"] == "segmentation"
    assert "bodycomp_threshold" in info["models"] and "bodycomp_unet" in info["trainers"]


def test_trainer_defaults_are_the_cli_defaults(server):
    """One set of training defaults: the server's trainer shows TrainConfig's, which the CLI uses."""
    from sarco_app.segmentation.train import TrainConfig

    shown = requests.get(f"{server}/info/", timeout=30).json()["trainers"]["bodycomp_unet"]["config"]
    defaults = TrainConfig.param_defaults()
    for name in ("epochs", "batch_size", "crop", "lr", "seed", "split_head_iterations"):
        assert shown[name] == defaults[name], name
    assert shown["iterations_per_epoch"] == 0 and defaults["iterations_per_epoch"] is None  # one pass


def test_unet_infer_on_phantom(server, studies):
    start = time.time()
    data, affine, params = decode(infer(server, "bodycomp_unet", "ph_a"))
    image_file = nib.load(str(studies / "ph_a.nii.gz"))
    assert data.shape == image_file.shape and np.allclose(affine, image_file.affine, atol=1e-5)
    truth = np.asarray(nib.load(str(studies / "labels" / "final" / "ph_a.nii.gz")).dataobj)
    dice = dice_per_tissue(data, truth)
    assert dice["muscle"] > 0.9 and dice["sat"] > 0.9 and dice["vat"] > 0.85, dice
    assert params["model"] == str(SHIPPED_MODEL_PATH)
    assert set(params["confidence"]) == set(L.LABELS) and 0.5 < params["confidence"]["sat"] <= 1.0
    assert time.time() - start < 60


def test_threshold_infer_on_phantom(server, studies):
    data, affine, params = decode(infer(server, "bodycomp_threshold", "ph_b"))
    truth = np.asarray(nib.load(str(studies / "labels" / "final" / "ph_b.nii.gz")).dataobj)
    assert data.shape == truth.shape
    dice = dice_per_tissue(data, truth)
    assert dice["sat"] > 0.85 and dice["muscle"] > 0.5, dice
    assert params["method"] == "threshold" and params["confidence"] == {}


def test_volume_slice_params(server, studies):
    data, _, params = decode(infer(server, "bodycomp_unet", "vol", {"slice_index": 1}))
    assert data.shape == (200, 200, 3) and params["slices"] == [1] and params["slice_source"] == "request"
    image = load_image(studies / "vol.nii.gz")
    canonical = image.from_original(data)
    assert canonical[:, :, 1].any() and not canonical[:, :, [0, 2]].any()
    data, _, params = decode(infer(server, "bodycomp_unet", "vol", {"all_slices": True}))
    assert params["slices"] == [0, 1, 2] and all(data[:, :, k].any() for k in range(3))
    data, _, params = decode(infer(server, "bodycomp_unet", "vol"))
    assert len(params["slices"]) == 1 and params["slice_source"] in ("l3_locator", "middle")


def test_bad_slice_is_a_4xx(server):
    r = infer(server, "bodycomp_unet", "vol", {"slice_index": 9})
    assert r.status_code == 400 and "out of range" in r.text


def run_training(server, params) -> tuple[str, str]:
    """(final status, train log) of ``POST /train/bodycomp_unet`` with ``params``."""
    r = requests.post(f"{server}/train/bodycomp_unet", json=params, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + 400
    status = {}
    while time.time() < deadline:
        status = requests.get(f"{server}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    return status.get("status"), "\n".join(status.get("details", []))


def test_from_scratch_run_does_not_replace_the_served_model(server, model_dir):
    # Safe model swap: 10 iterations from scratch make a candidate that loses to the shipped
    # model on the validation slices, so the shipped model stays served.
    params = {"epochs": 1, "iterations_per_epoch": 10, "batch_size": 2, "crop": 64, "fine_tune": False,
              "relabel_muscle_by_hu": "true", "split_head_iterations": 2}
    status, log = run_training(server, params)
    assert status == "DONE", log
    assert "val dice" in log and "split head iter 2/2" in log
    assert "model swap: kept the served model: the candidate does not beat the served model" in log
    checkpoint, candidate = model_dir / "bodycomp_unet.pt", model_dir / "bodycomp_unet.candidate.pt"
    assert not checkpoint.exists() and candidate.is_file()
    ckpt = torch.load(candidate, weights_only=True)
    assert ckpt["meta"]["train_config"]["relabel_muscle_by_hu"] is True
    assert "split_head" in ckpt and ckpt["meta"]["split_head"]["iterations"] == 2
    last_round = requests.get(f"{server}/loop/rounds", timeout=30).json()["rounds"][-1]
    swap = last_round["model_swap"]
    assert swap["replaced"] is False and swap["served_model"] == str(SHIPPED_MODEL_PATH)
    assert last_round["checkpoint"].startswith("bodycomp_unet.pt@")  # the round names the model in use
    assert last_round["val_dice"]["sat"] > last_round["candidate_val_dice"]["sat"]
    for output in ("hu_refined", "raw"):
        assert swap["candidate"][output]["score"] < swap["served"][output]["score"]
    _, _, result = decode(infer(server, "bodycomp_unet", "ph_b"))
    assert result["model"] == str(SHIPPED_MODEL_PATH)
    # An admin may still put the candidate in place by hand: it is served without a restart.
    shutil.copyfile(candidate, checkpoint)
    try:
        _, _, result = decode(infer(server, "bodycomp_unet", "ph_b"))
        assert result["model"] == str(checkpoint)
    finally:
        checkpoint.unlink()


def test_damaged_retrained_checkpoint_falls_back_to_the_shipped_model(server, model_dir):
    checkpoint = model_dir / "bodycomp_unet.pt"
    backup = checkpoint.read_bytes() if checkpoint.is_file() else None
    checkpoint.write_bytes(b"PK\x03\x04 a checkpoint cut short by a full disk")
    try:
        _, _, result = decode(infer(server, "bodycomp_unet", "ph_b"))
        assert result["model"] == str(SHIPPED_MODEL_PATH)
        assert len(result["warnings"]) == 1 and "not a readable model checkpoint" in result["warnings"][0]
        assert result["pixels"]["muscle"] > 0
    finally:
        if backup is None:
            checkpoint.unlink()
        else:
            checkpoint.write_bytes(backup)


def train_jobs(server) -> list:
    """Every training job the server has run (``GET /train/?all=true``; 404 before the first)."""
    r = requests.get(f"{server}/train/", params={"all": "true"}, timeout=30)
    assert r.status_code in (200, 404), r.text
    return r.json() if r.status_code == 200 else []


def test_train_rejects_bad_params_before_a_job_starts(server, model_dir):
    """Bad params get a 422 naming every problem at once, and no training job starts (the
    route checks them in the server process; the job would check them again)."""
    before = sorted(p.name for p in model_dir.iterdir())
    jobs = train_jobs(server)
    for params, reasons in (
        ({"epochs": "ten", "crop": 100, "lr": -1, "split_head_iterations": -1, "pseudo_weight": 0},
         ("epochs must be an integer, not 'ten'", "crop must be a multiple of 16", "lr must be in [0, 1]",
          "split_head_iterations must be >= 0", "pseudo_weight must be in (0, 1]")),
        ({"epochs": 0, "fine_tune": False, "split_head_iterations": 3}, ("epochs 0 trains only the split head",)),
        ({"pseudo_min_confidence": "high"}, ("pseudo_min_confidence must be a number, not 'high'",)),
    ):
        r = requests.post(f"{server}/train/bodycomp_unet", json=params, timeout=30)
        assert r.status_code == 422, r.text
        assert all(reason in r.json()["detail"] for reason in reasons), r.json()["detail"]
    assert train_jobs(server) == jobs
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_fine_tune_skips_a_damaged_retrained_checkpoint(server, model_dir):
    checkpoint = model_dir / "bodycomp_unet.pt"
    backup = checkpoint.read_bytes() if checkpoint.is_file() else None
    checkpoint.write_bytes(b"PK\x03\x04 a checkpoint cut short by a full disk")
    try:
        params = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "crop": 64, "fine_tune": True}
        status, log = run_training(server, params)
        assert status == "DONE", log
        assert f"skipping unreadable checkpoint {checkpoint}" in log
        assert f"fine-tuning {SHIPPED_MODEL_PATH}" in log
    finally:
        if backup is None:
            checkpoint.unlink(missing_ok=True)
        else:
            checkpoint.write_bytes(backup)


def test_train_with_organ_classes_serves_only_tissue_values(server, model_dir):
    # ph_a has an organ map (labels/organs/), ph_b none: a slice with one is trained on all
    # classes, one without on the served ones (validation holds one of the two finals back).
    params = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "crop": 64, "fine_tune": False,
              "organ_classes": "true"}
    status, log = run_training(server, params)
    assert status == "DONE", log
    counted = re.search(r"(\d+) of (\d+) training slices have organ maps", log)
    assert counted and int(counted.group(2)) == 1 and int(counted.group(1)) in (0, 1), log
    candidate, checkpoint = model_dir / "bodycomp_unet.candidate.pt", model_dir / "bodycomp_unet.pt"
    ckpt = torch.load(candidate, weights_only=True)  # two iterations do not beat the shipped model
    assert ckpt["class_names"][L.NUM_CLASSES:] == list(L.ORGAN_NAMES)
    assert ckpt["meta"]["train_config"]["organ_classes"] is True
    shutil.copyfile(candidate, checkpoint)  # served by hand, to see what it answers
    try:
        for params in ({}, {"hu_refine": False}):
            data, _, result = decode(infer(server, "bodycomp_unet", "ph_a", params))
            assert result["model"] == str(checkpoint)
            assert set(np.unique(data)) <= set(range(L.NUM_CLASSES))
    finally:
        checkpoint.unlink()


def test_train_in_two_processes_and_serve(server, model_dir):
    """``nproc: 2``: the trainer runs torch DDP (gloo) under torchrun; rank 0's lines reach the
    train log, its candidate has the usual format and the server keeps answering. TensorBoard
    logs go to <model_dir>/train_logs/."""
    candidate = model_dir / "bodycomp_unet.candidate.pt"
    candidate.unlink(missing_ok=True)
    params = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "crop": 64, "fine_tune": False, "nproc": 2}
    status, log = run_training(server, params)
    assert status == "DONE", log
    assert "training in 2 processes (torch DDP, gloo)" in log and "(2 processes x 1)" in log
    assert re.search(r"epoch 1/1 iter 2 loss \d", log) and "model swap:" in log
    ckpt = torch.load(candidate, weights_only=True)  # two iterations from scratch lose to the served model
    assert ckpt["meta"]["train_config"]["nproc"] == 2 and ckpt["meta"]["iterations"] == 2
    assert list((model_dir / "train_logs").glob("events.out.tfevents.*"))
    data, _, result = decode(infer(server, "bodycomp_unet", "ph_b"))
    assert result["model"] == str(SHIPPED_MODEL_PATH) and data.any()
