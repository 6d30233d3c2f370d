"""The ``backprojection`` and ``grabcut`` scribbles tasks over HTTP on the real server."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from sarco_app import metrics
from sarco_app.inputs.ingest import load_image, make_image, save_image, save_label
from sarco_app.inputs.patient import PatientInfo
from sarco_app.labels import LABELS, MUSCLE, SAT, VAT
from tests.test_interactive import bowel_loop, muscle_plane, synthetic_slice
from tests.test_strokes import organ_against_wall, stroke_in

BG, FG = len(LABELS) + 1, len(LABELS) + 2  # MONAI Label's scribble values for 4 labels
SPACING = (1.5, 1.5)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("scribble_studies")
    hu, truth = synthetic_slice()
    image = make_image(hu, SPACING, PatientInfo(sex="M"))
    save_image(image, root / "syn.nii.gz")
    np.save(root.parent / "syn_truth.npy", truth)
    # The same slice with a stored label that took the bowel loop as muscle (editing with strokes).
    save_image(image, root / "withloop.nii.gz")
    stored = truth.copy()
    stored[bowel_loop(hu, truth)] = MUSCLE
    save_label(stored, image, root / "labels" / "final" / "withloop.nii.gz")
    # The same slice with a stored label holding VAT (merge rules over HTTP).
    save_image(image, root / "withvat.nii.gz")
    save_label(np.where(truth == VAT, VAT, 0).astype(np.uint8), image,
               root / "labels" / "final" / "withvat.nii.gz")
    # A slice whose stored label took a thin fat plane between muscle layers as muscle.
    plane_hu, plane_truth, plane, line = muscle_plane()
    plane_image = make_image(plane_hu, SPACING)
    save_image(plane_image, root / "withplane.nii.gz")
    save_label(np.where(plane, MUSCLE, plane_truth).astype(np.uint8), plane_image,
               root / "labels" / "final" / "withplane.nii.gz")
    np.save(root.parent / "plane_line.npy", line)
    np.save(root.parent / "plane_truth.npy", plane_truth)
    # A slice whose stored label took an organ glued to the muscle wall as muscle.
    organ_hu, organ_truth, organ, organ_stored = organ_against_wall(organ_hu=80.0, seed=5)
    organ_image = make_image(organ_hu, SPACING)
    save_image(organ_image, root / "withorgan.nii.gz")
    save_label(organ_stored, organ_image, root / "labels" / "final" / "withorgan.nii.gz")
    np.save(root.parent / "organ_truth.npy", organ_truth)
    np.save(root.parent / "organ.npy", organ)
    # A 3-slice volume whose middle slice is the phantom.
    vol = np.stack([np.full_like(hu, -1000), hu, np.full_like(hu, -1000)], axis=2)
    save_image(make_image(vol, SPACING + (5.0,)), root / "vol.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(start_server, studies):
    return start_server(studies)


@pytest.fixture(scope="module")
def truth(studies):
    return np.load(studies.parent / "syn_truth.npy")


def _nifti_bytes(array: np.ndarray, image_path: Path) -> bytes:
    """``array`` (canonical order) as a NIfTI on the image file's grid, like a client sends."""
    image = load_image(image_path)
    img = nib.Nifti1Image(image.to_original(array).astype(np.uint8), image.original_affine)
    return gzip.compress(img.to_bytes())


def _infer(server, model, image, params, scribbles: bytes | None = None):
    files = {"params": (None, json.dumps(params))}
    if scribbles is not None:
        files["label"] = ("scribbles.nii.gz", scribbles, "application/octet-stream")
    return requests.post(f"{server}/infer/{model}?image={image}&output=image", files=files,
                         timeout=120)


def _label(response, like: Path) -> np.ndarray:
    assert response.status_code == 200, response.text
    content = response.content
    if content[:2] == b"\x1f\x8b":  # .nii.gz
        content = gzip.decompress(content)
    img = nib.Nifti1Image.from_bytes(content)
    return load_image(like).from_original(np.asarray(img.dataobj))


def _box(mask, margin=3):
    xs, ys = np.nonzero(mask)
    return [int(xs.min()) - margin, int(xs.max()) + 1 + margin,
            int(ys.min()) - margin, int(ys.max()) + 1 + margin]


def test_tasks_listed_as_scribbles(server):
    models = requests.get(f"{server}/info/", timeout=10).json()["models"]
    for name in ("backprojection", "grabcut"):
        assert models[name]["type"] == "scribbles"
        assert models[name]["dimension"] == 2
        assert "tissue" in models[name]["config"]
    assert "iterations" in models["grabcut"]["config"]
    assert "bins" in models["backprojection"]["config"]


@pytest.mark.parametrize("model", ["backprojection", "grabcut"])
def test_rectangle(server, studies, truth, model):
    roi = _box(truth == SAT) + [0, 1]
    res = _infer(server, model, "syn", {"tissue": "sat", "roi": roi})
    label = _label(res, studies / "syn.nii.gz")
    assert metrics.iou(label == SAT, truth == SAT) >= 0.9


@pytest.mark.parametrize("model", ["backprojection", "grabcut"])
def test_scribble_file(server, studies, truth, model):
    scribbles = np.zeros(truth.shape, np.uint8)
    scribbles[60:90, 15] = FG  # front SAT
    scribbles[60:90, 60] = BG  # VAT (same HU as SAT)
    assert (truth[scribbles == FG] == SAT).all() and (truth[scribbles == BG] == VAT).all()
    res = _infer(server, model, "syn", {"tissue": "sat"},
                 _nifti_bytes(scribbles, studies / "syn.nii.gz"))
    label = _label(res, studies / "syn.nii.gz")
    assert metrics.iou(label == SAT, truth == SAT) >= 0.85
    assert not (label[truth == VAT] == SAT).any()


def test_merge_keeps_stored_other_tissue(server, studies, truth):
    roi = _box(truth == MUSCLE)
    res = _infer(server, "backprojection", "withvat", {"tissue": "muscle", "roi": roi})
    label = _label(res, studies / "withvat.nii.gz")
    assert (label[truth == VAT] == VAT).all()  # from the datastore's final label
    assert metrics.iou(label == MUSCLE, truth == MUSCLE) >= 0.85
    # The stored label is not changed by an infer call.
    stored = load_image(studies / "withvat.nii.gz").from_original(
        np.asarray(nib.load(studies / "labels" / "final" / "withvat.nii.gz").dataobj))
    assert not (stored == MUSCLE).any()


def test_background_stroke_edits_the_stored_label(server, studies, truth):
    stored = load_image(studies / "withloop.nii.gz").from_original(
        np.asarray(nib.load(studies / "labels" / "final" / "withloop.nii.gz").dataobj))
    wrong = (stored == MUSCLE) & (truth != MUSCLE)
    assert wrong.sum() > 50
    scribbles = np.zeros(truth.shape, np.uint8)
    xs, ys = np.nonzero(wrong)
    cx, cy = int(np.median(xs)), int(np.median(ys))
    scribbles[cx - 2:cx + 3, cy] = BG
    assert wrong[scribbles == BG].all()
    res = _infer(server, "grabcut", "withloop", {"tissue": "muscle"},
                 _nifti_bytes(scribbles, studies / "withloop.nii.gz"))
    label = _label(res, studies / "withloop.nii.gz")
    assert np.count_nonzero(label[wrong] == MUSCLE) < 0.1 * wrong.sum()
    assert metrics.iou(label == MUSCLE, truth == MUSCLE) >= 0.97


@pytest.mark.parametrize("model", ["backprojection", "grabcut"])
def test_one_background_stroke_removes_an_organ_glued_to_the_wall(server, studies, model):
    """The real-CT failure: the stored label took an organ pressed against the muscle wall as
    muscle; one short background stroke in it removes the whole organ and keeps the wall."""
    truth = np.load(studies.parent / "organ_truth.npy")
    organ = np.load(studies.parent / "organ.npy")
    scribbles = np.where(stroke_in(organ), BG, 0).astype(np.uint8)
    assert np.count_nonzero(scribbles) < 0.1 * organ.sum()
    res = _infer(server, model, "withorgan", {"tissue": "muscle"},
                 _nifti_bytes(scribbles, studies / "withorgan.nii.gz"))
    label = _label(res, studies / "withorgan.nii.gz")
    assert np.count_nonzero(label[organ] == MUSCLE) < 0.05 * organ.sum()
    assert metrics.iou(label == MUSCLE, truth == MUSCLE) >= 0.97


@pytest.mark.parametrize("model", ["backprojection", "grabcut"])
def test_background_line_along_a_plane_edits_only_the_plane(server, studies, model):
    line = np.load(studies.parent / "plane_line.npy")
    truth = np.load(studies.parent / "plane_truth.npy")
    scribbles = np.where(line, BG, 0).astype(np.uint8)
    res = _infer(server, model, "withplane", {"tissue": "muscle"},
                 _nifti_bytes(scribbles, studies / "withplane.nii.gz"))
    label = _label(res, studies / "withplane.nii.gz")
    assert not (label[line] == MUSCLE).any()
    assert ((truth == MUSCLE) & (label != MUSCLE)).sum() < 0.5 * line.sum()


def test_volume_with_slice_index(server, studies, truth):
    roi = _box(truth == SAT)
    res = _infer(server, "grabcut", "vol", {"tissue": "sat", "roi": roi, "slice_index": 1,
                                             "iterations": 3})
    label = _label(res, studies / "vol.nii.gz")
    assert label.shape == truth.shape + (3,)
    assert metrics.iou(label[:, :, 1] == SAT, truth == SAT) >= 0.9
    assert not label[:, :, 0].any() and not label[:, :, 2].any()
    assert res.headers.get("content-type", "").startswith("application/")


@pytest.mark.parametrize("model", ["backprojection", "grabcut"])
def test_bad_requests_are_4xx(server, studies, truth, model):
    empty = _nifti_bytes(np.zeros(truth.shape, np.uint8), studies / "syn.nii.gz")
    cases = [
        ({"tissue": "sat"}, empty, "no scribbles"),
        ({"tissue": "sat", "roi": [900, 1000, 0, 10]}, None, "outside the image"),
        ({"tissue": "liver", "roi": [0, 50, 0, 50]}, None, "unknown tissue"),
        ({"tissue": "sat"},
         gzip.compress(nib.Nifti1Image(np.full((20, 20), FG, np.uint8), np.eye(4)).to_bytes()),
         "shape"),
        ({"label": "sat", "roi": [0, 50, 0, 50]}, None, "'tissue'"),
        ({"tissue": "sat", "iterations": 0, "roi": [0, 50, 0, 50], "bins": 1}, None, ""),
        ({"tissue": "sat", "roi": [0, 50, 0, 50], "bins": "x", "window": "x"}, None, "must be"),
        ({"tissue": "sat", "roi": [0, 50, 0, 50], "threshold": "x", "window": [10, "x"]}, None, "must be"),
    ]
    for params, scribbles, message in cases:
        res = _infer(server, model, "syn", params, scribbles)
        assert 400 <= res.status_code < 500, (params, res.status_code, res.text)
        detail = res.json()["detail"]
        assert message in detail and "Traceback" not in detail, detail
    # The server still answers normally afterwards.
    assert _infer(server, model, "syn", {"tissue": "sat", "roi": _box(truth == SAT)}).status_code == 200
