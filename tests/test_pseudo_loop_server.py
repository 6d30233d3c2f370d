"""The pseudo-label retraining loop over HTTP on the real MONAI Label server: batch
pseudo-labelling into the ``pseudo`` tag, the active-learning strategies, training with
pseudo-labels and its round record, and concurrent batch runs."""

from __future__ import annotations

import hashlib
import json
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from sarco_app.synthesis.phantom import generate, write_phantom
from sarco_app.metrics import dice_per_tissue
from sarco_app.segmentation.segment import SHIPPED_MODEL_PATH

FINALS = [f"fin{k}" for k in range(3)]
UNLABELLED = [f"unl{k:02d}" for k in range(12)]
STRATEGIES = ("random", "first", "uncertainty", "pseudo_review")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_studies")
    truth = {}
    for k, image_id in enumerate(FINALS + UNLABELLED):
        phantom = generate(616100 + k, size=128)
        write_phantom(phantom, root, image_id)
        truth[image_id] = phantom.label
    for image_id in UNLABELLED:  # these have no final label: the loop's pool
        (root / "labels" / "final" / f"{image_id}.nii.gz").unlink()
    return root, truth


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loop_model")


@pytest.fixture(scope="module")
def server(start_server, studies, model_dir):
    if not SHIPPED_MODEL_PATH.is_file():
        pytest.fail("models/bodycomp_unet.pt is missing")
    return start_server(studies[0], conf={"model_dir": str(model_dir)}, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def final_bytes(studies):
    """SHA-256 of every final label file before the server touched anything."""
    root, _ = studies
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "labels" / "final").iterdir()}


def stored(root) -> dict:
    """The datastore file (the state every MONAI Label process shares)."""
    return json.loads((root / "datastore_v2.json").read_text())["objects"]


def pseudo_label(root, image_id) -> np.ndarray:
    return np.asarray(nib.load(str(root / "labels" / "pseudo" / f"{image_id}.nii.gz")).dataobj)


def batch(server, params=None, run_sync=True):
    return requests.post(f"{server}/batch/infer/bodycomp_pseudo", params={"run_sync": str(run_sync).lower()},
                         json=params or {}, timeout=300)


def assert_pseudo_labels_sound(root, truth, final_bytes, image_ids):
    objects = stored(root)
    for image_id in image_ids:
        info = objects[image_id]["labels"]["pseudo"]["info"]
        assert info["checkpoint"].startswith("bodycomp_unet.pt@") and info["time"].endswith("+00:00")
        confidence = info["confidence"]
        assert set(confidence) == {"muscle", "sat", "vat", "imat", "overall"}
        assert 0.5 < confidence["overall"] <= 1.0 and 0.5 < confidence["sat"] <= 1.0
        assert info["uncertainty"] == pytest.approx(1 - confidence["overall"], abs=1e-4)
        label = pseudo_label(root, image_id)
        assert label.shape == truth[image_id].shape and set(np.unique(label)) <= {0, 1, 2, 3, 4}
        dice = dice_per_tissue(label, truth[image_id])
        assert dice["muscle"] > 0.85 and dice["sat"] > 0.85, (image_id, dice)
    for image_id in FINALS:
        assert "pseudo" not in objects[image_id]["labels"]
    now = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "labels" / "final").iterdir()}
    assert {k: now[k] for k in final_bytes} == final_bytes  # byte for byte


def test_batch_pseudo_labels_unlabelled_images_only(server, studies, final_bytes):
    root, truth = studies
    refused = batch(server, {"label_tag": "final"})
    assert refused.status_code == 400 and "never writes final labels" in refused.json()["detail"]
    r = batch(server)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["tag"] == "pseudo" and sorted(answer["labelled"]) == UNLABELLED
    assert_pseudo_labels_sound(root, truth, final_bytes, UNLABELLED)
    # The server's own view (GET /datastore/label/info) has the same info.
    info = requests.get(f"{server}/datastore/label/info", params={"label": UNLABELLED[0], "tag": "pseudo"},
                        timeout=30).json()
    assert info["confidence"] == stored(root)[UNLABELLED[0]]["labels"]["pseudo"]["info"]["confidence"]


def test_strategies_hand_out_unlabelled_images_in_their_order(server, studies):
    root, _ = studies
    confidence = {i: stored(root)[i]["labels"]["pseudo"]["info"]["confidence"]["overall"] for i in UNLABELLED}
    least_confident = min(UNLABELLED, key=lambda i: (confidence[i], i))
    picks = {}
    for strategy in STRATEGIES:
        r = requests.post(f"{server}/activelearning/{strategy}", json={}, timeout=120)
        assert r.status_code == 200, r.text
        picks[strategy] = r.json()["id"]
        assert picks[strategy] in UNLABELLED and r.json()["path"].endswith(f"{picks[strategy]}.nii.gz")
    assert picks["first"] == UNLABELLED[0]
    assert picks["pseudo_review"] == least_confident
    # Same model, same entropy: the most uncertain image is the least confident pseudo-label.
    assert picks["uncertainty"] == least_confident


def test_training_with_pseudo_labels_uses_the_counts_it_reports(server, studies, tmp_path):
    root, truth = studies
    # An annotator corrects the least confident image and saves it as final: it leaves the
    # queue, and its final wins over its pseudo-label in training.
    confidence = {i: stored(root)[i]["labels"]["pseudo"]["info"]["confidence"]["overall"] for i in UNLABELLED}
    corrected = min(UNLABELLED, key=lambda i: (confidence[i], i))
    save_final(server, root, corrected, truth[corrected], tmp_path)
    assert requests.post(f"{server}/activelearning/pseudo_review", json={}, timeout=60).json()["id"] != corrected
    rest = sorted(confidence[i] for i in UNLABELLED if i != corrected)
    threshold = rest[len(rest) // 2]  # about half of the pseudo-labels pass
    expected = [i for i in UNLABELLED if i != corrected and confidence[i] >= threshold]
    params = {"epochs": 1, "iterations_per_epoch": 2, "batch_size": 4, "crop": 64, "fine_tune": True,
              "include_pseudo": True, "pseudo_min_confidence": threshold, "pseudo_weight": 0.5}
    r = requests.post(f"{server}/train/bodycomp_unet", json=params, timeout=30)
    assert r.status_code == 200, r.text
    deadline, status = time.time() + 300, {}
    while time.time() < deadline:
        status = requests.get(f"{server}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(1)
    log = "\n".join(status.get("details", []))
    assert status.get("status") == "DONE", log
    rounds = requests.get(f"{server}/loop/rounds", timeout=30).json()["rounds"]
    last = rounds[-1]
    assert last["finals"] == len(FINALS) + 1 and last["pseudo"] == len(expected)
    assert last["pseudo_overridden_by_final"] == 1
    assert last["pseudo_below_threshold"] == len(UNLABELLED) - 1 - len(expected)
    assert last["pseudo_slices"] == len(expected) and last["val_slices"] == 1
    assert last["train_slices"] == len(FINALS) + 1 - 1 + len(expected)
    # train() itself says what it trained on: the same numbers.
    assert f"on {last['train_slices']} slices, validating on {last['val_slices']}" in log
    assert set(last["val_dice"]) == {"muscle", "sat", "vat", "imat"} and last["val_dice"]["sat"] > 0.5
    assert last["checkpoint"].startswith("bodycomp_unet.pt@") and last["seconds"] > 0
    png = requests.get(f"{server}/loop/learning_curve.png", timeout=60)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    stats = requests.get(f"{server}/info/", timeout=30).json()["train_stats"]["bodycomp_unet"]
    assert stats["loop"]["rounds"] == len(rounds)


def save_final(server, root, image_id, label, folder) -> str:
    """PUT ``label`` as ``image_id``'s final label (as Slicer does); returns the file's SHA-256."""
    path = folder / f"{image_id}.nii.gz"  # outside the studies folder
    image = nib.load(str(root / f"{image_id}.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), image.affine), str(path))
    with open(path, "rb") as fh:
        r = requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": (f"{image_id}.nii.gz", fh)}, timeout=60)
    assert r.status_code == 200, r.text
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_concurrent_batch_runs_do_not_corrupt_labels(server, studies, final_bytes, tmp_path):
    """A second batch run while one is running is refused with a clear 429 (MONAI Label runs one
    batch task at a time); a final label saved while the background run writes pseudo-labels
    (two processes writing the datastore) is kept, and every label stays whole."""
    root, truth = studies
    queue = sorted(i for i in UNLABELLED if "final" not in stored(root)[i]["labels"])
    before = {i: (root / "labels" / "pseudo" / f"{i}.nii.gz").stat().st_mtime_ns for i in queue}
    r = batch(server, run_sync=False)  # MONAI Label's background process
    assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the background run is writing labels
        if any((root / "labels" / "pseudo" / f"{i}.nii.gz").stat().st_mtime_ns != before[i] for i in queue):
            break
        time.sleep(0.05)
    second = batch(server)  # meanwhile a second run
    corrected = queue[-1]  # the background run reaches it last
    final_sha = save_final(server, root, corrected, truth[corrected], tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        status = requests.get(f"{server}/batch/infer", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(0.5)
    assert status.get("status") == "DONE", status
    if second.status_code == 429:
        assert "Already Running" in second.json()["detail"]
    else:  # the background run was already done: the second one ran on its own
        assert second.status_code == 200, second.text
    # The final saved by the server process survived the background process's writes.
    assert stored(root)[corrected]["labels"]["final"]["info"]["name"] == f"{corrected}.nii.gz"
    assert hashlib.sha256((root / "labels" / "final" / f"{corrected}.nii.gz").read_bytes()).hexdigest() == final_sha
    final_bytes = dict(final_bytes, **{f"{corrected}.nii.gz": final_sha})
    assert_pseudo_labels_sound(root, truth, final_bytes, [i for i in queue if i != corrected])


def test_strategies_say_when_nothing_is_left(server, studies, tmp_path):
    root, truth = studies
    for image_id in UNLABELLED:
        if "final" in stored(root)[image_id]["labels"]:
            continue
        save_final(server, root, image_id, truth[image_id], tmp_path)
    for strategy in STRATEGIES:
        r = requests.post(f"{server}/activelearning/{strategy}", json={}, timeout=60)
        assert r.status_code == 404, (strategy, r.status_code, r.text)
        assert "no unlabelled image left" in r.json()["detail"]
    r = batch(server)
    assert r.status_code == 200 and r.json()["labelled"] == []
