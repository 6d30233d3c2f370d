"""The ``l3_locator`` infer task (and L3 as the default slice of ``bodycomp_threshold``) over
HTTP on the real MONAI Label server."""

from __future__ import annotations

import base64
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import requests

from sarco_app.inputs.ingest import load_image, make_image, save_image
from sarco_app.spine.l3 import locate_l3
from sarco_app.synthesis.phantom3d.build import make_volume_phantom
from sarco_app.synthesis.phantom3d.writing import save_volume

FAST = dict(matrix=160, pixel_spacing=2.4)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("l3_studies")
    image, truth = make_volume_phantom(31, slice_thickness=3.0, variants=[], **FAST)
    save_volume(image, root / "abdomen.nii.gz", flip_z=True, truth=truth)  # stored top-down
    chest, _ = make_volume_phantom(32, slice_thickness=3.0, coverage="chest", variants=[], **FAST)
    save_volume(chest, root / "chest.nii.gz")
    save_image(make_image(np.full((64, 64), -1000.0, np.float32), (0.8, 0.8)), root / "flat2d.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(start_server, studies):
    return start_server(studies)


def _infer(server, model, image, output, params=None):
    files = {"params": (None, json.dumps(params or {}))}
    return requests.post(f"{server}/infer/{model}?image={image}&output={output}", files=files, timeout=120)


def _nifti(content: bytes) -> nib.Nifti1Image:
    data = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(data)


def test_task_listed(server):
    info = requests.get(f"{server}/info/", timeout=10).json()
    assert "l3_locator" in info["models"]


def test_l3_locator_json_label_and_views(server, studies):
    truth = json.loads((studies / "abdomen.json").read_text())["phantom_truth"]
    image = load_image(studies / "abdomen.nii.gz")
    response = _infer(server, "l3_locator", "abdomen", "json")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["found"] is True
    assert abs(answer["z_mm"] - truth["l3_z_mm"]) <= 5.0
    n = image.num_slices
    assert answer["slice_index"] == n - 1 - answer["canonical_slice_index"]  # file order, flipped file
    assert answer["canonical_slice_index"] == locate_l3(image).slice_index
    import cv2

    png = base64.b64decode(answer["views_png_base64"])
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[0] > 100

    label_response = _infer(server, "l3_locator", "abdomen", "image")
    assert label_response.status_code == 200
    label = _nifti(label_response.content)
    stored = nib.load(str(studies / "abdomen.nii.gz"))
    assert label.shape == stored.shape and np.allclose(label.affine, stored.affine)
    data = np.asarray(label.dataobj)
    marked = np.nonzero(data.any(axis=(0, 1)))[0]
    assert marked.tolist() == [answer["slice_index"]]  # the L3 slice, in the file's own order
    assert data[:, :, answer["slice_index"]].all()


def test_not_in_field_of_view_and_bad_input(server):
    response = _infer(server, "l3_locator", "chest", "json", {"views": False})
    assert response.status_code == 200
    answer = response.json()
    assert answer["found"] is False and answer["slice_index"] is None and answer["z_mm"] is None
    assert "not in field of view" in answer["reason"] and "views_png_base64" not in answer
    bad = _infer(server, "l3_locator", "flat2d", "json")
    assert bad.status_code == 400 and "3D" in bad.text


def test_bodycomp_defaults_to_the_l3_slice(server, studies):
    image = load_image(studies / "abdomen.nii.gz")
    expected = locate_l3(image).slice_index
    response = _infer(server, "bodycomp_threshold", "abdomen", "json")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["slice_source"] == "l3_locator" and answer["slices"] == [expected]
