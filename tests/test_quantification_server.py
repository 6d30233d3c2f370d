"""The ``quantification`` infer task over HTTP on the real MONAI Label server."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import requests

from sarco_app import labels as L
from sarco_app.inputs.ingest import load_image, make_image, save_image, save_label
from sarco_app.inputs.patient import PatientInfo
from sarco_app.measurement.quantify import clean_json, load_label, quantify_scan



def _slice(nx, ny, seed):
    """HU slice and label: SAT ring, muscle ring, VAT core (exact areas are what we compare)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    r = np.sqrt(((x - nx / 2) / (nx * 0.45)) ** 2 + ((y - ny / 2) / (ny * 0.45)) ** 2)
    label = np.zeros((nx, ny), dtype=np.uint8)
    label[r < 1.0] = L.SAT
    label[r < 0.8] = L.MUSCLE
    label[r < 0.6] = L.VAT
    hu = np.full((nx, ny), -1000.0, dtype=np.float32)
    for value, mean in {L.SAT: -100, L.MUSCLE: 45, L.VAT: -85}.items():
        mask = label == value
        hu[mask] = np.round(rng.normal(mean, 12, size=int(mask.sum())))
    return hu, label


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_studies")
    hu, label = _slice(96, 80, 1)
    image = make_image(hu, (0.78, 0.78), PatientInfo(sex="M", age=61, height_cm=175, weight_kg=80))
    save_image(image, root / "s1.nii.gz")
    save_label(label, image, root / "labels" / "final" / "s1.nii.gz")
    hu2, label2 = _slice(90, 70, 2)
    image2 = make_image(hu2, (0.7, 0.7), PatientInfo(sex="F"))
    save_image(image2, root / "s2.nii.gz")  # no stored label
    np.save(root.parent / "s2_label.npy", label2)
    # A 3D image labelled on one slice.
    vol = np.full((64, 56, 4), -1000.0, dtype=np.float32)
    lab3 = np.zeros(vol.shape, dtype=np.uint8)
    hu3, l3 = _slice(64, 56, 3)
    vol[:, :, 2], lab3[:, :, 2] = hu3, l3
    image3 = make_image(vol, (0.9, 0.9, 3.0), PatientInfo(sex="M", height_cm=180))
    save_image(image3, root / "s3.nii.gz")
    save_label(lab3, image3, root / "labels" / "final" / "s3.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(start_server, studies):
    return start_server(studies)


def _expected(studies, study_id, label_path=None, **manual):
    image = load_image(studies / f"{study_id}.nii.gz")
    label = load_label(label_path or studies / "labels" / "final" / f"{study_id}.nii.gz", image)
    return clean_json(quantify_scan(image, label, manual_patient=PatientInfo(**manual) if manual else None))


def _infer(server, image, params=None, label_file=None, output="json"):
    files = {"params": (None, json.dumps(params or {}))}
    if label_file is not None:
        files["label"] = ("label.nii.gz", label_file.read_bytes(), "application/octet-stream")
    url = f"{server}/infer/quantification?image={image}" + (f"&output={output}" if output else "")
    return requests.post(url, files=files, timeout=60)


def test_task_listed(server):
    info = requests.get(f"{server}/info/", timeout=10).json()
    assert "quantification" in info["models"]
    config = info["models"]["quantification"]["config"]
    assert {"height_cm", "weight_kg", "sex", "age", "reference", "slice"} <= set(config)


def test_stored_final_label_is_measured(server, studies):
    before = hashlib.sha256((studies / "labels/final/s1.nii.gz").read_bytes()).hexdigest()
    response = _infer(server, "s1")
    assert response.status_code == 200, response.text
    result = response.json()
    expected = _expected(studies, "s1")
    assert result["tissues"] == expected["tissues"]
    assert result["indices"] == pytest.approx(expected["indices"])
    assert result["t_scores"] == pytest.approx(expected["t_scores"])
    assert result["categories"] == expected["categories"]
    assert result["flags"] == expected["flags"]
    assert result["patient"]["source"]["height_cm"] == "sidecar"
    assert result["reference"] == expected["reference"]
    # The default output (no `output=`) is the same JSON, and no label file is produced.
    plain = _infer(server, "s1", output=None)
    assert plain.status_code == 200 and plain.json()["tissues"] == expected["tissues"]
    after = hashlib.sha256((studies / "labels/final/s1.nii.gz").read_bytes()).hexdigest()
    assert before == after  # stored label untouched


def test_params_override_patient_data(server, studies):
    response = _infer(server, "s1", {"height_cm": "160", "sex": "F", "weight_kg": 50})
    assert response.status_code == 200, response.text
    result = response.json()
    expected = _expected(studies, "s1", height_cm=160.0, sex="F", weight_kg=50.0)
    assert result["patient"]["source"] == {"sex": "manual", "age": "sidecar", "height_cm": "manual",
                                           "weight_kg": "manual", "bmi": "computed"}
    assert result["indices"]["smi_cm2_m2"] == pytest.approx(expected["indices"]["smi_cm2_m2"])
    assert result["t_scores"] == pytest.approx(expected["t_scores"])


def test_label_sent_with_request_then_saved_label(server, studies, tmp_path):
    # No stored label yet: a clear 404, not a crash.
    response = _infer(server, "s2")
    assert response.status_code == 404 and "no 'final' label" in response.json()["detail"]
    image = load_image(studies / "s2.nii.gz")
    label = np.load(studies.parent / "s2_label.npy")
    label_path = save_label(label, image, tmp_path / "s2_label.nii.gz")
    response = _infer(server, "s2", label_file=label_path)
    assert response.status_code == 200, response.text
    expected = _expected(studies, "s2", label_path=label_path)
    assert response.json()["tissues"] == expected["tissues"]
    assert response.json()["indices"]["smi_cm2_m2"] is None
    assert response.json()["reasons"]["smi_cm2_m2"] == "height unknown"
    # Save it as the final label through the datastore API; the task then finds it.
    with open(label_path, "rb") as handle:
        saved = requests.put(f"{server}/datastore/label?image=s2&tag=final",
                             files={"label": ("s2.nii.gz", handle)}, timeout=30)
    assert saved.status_code == 200, saved.text
    response = _infer(server, "s2")
    assert response.status_code == 200, response.text
    assert response.json()["tissues"] == expected["tissues"]


def test_3d_image_and_slice_param(server, studies):
    response = _infer(server, "s3")
    assert response.status_code == 200, response.text
    assert response.json()["slice_index"] == 2
    assert response.json()["tissues"] == _expected(studies, "s3")["tissues"]
    response = _infer(server, "s3", {"slice": 0})
    assert response.status_code == 200 and response.json()["tissues"]["muscle"]["pixels"] == 0
    assert response.json()["indices"]["sma_cm2"] is None  # nothing labelled: no SMA, not 0
    response = _infer(server, "s3", {"slice": 9})
    assert response.status_code == 400 and "out of range" in response.json()["detail"]


def test_bad_input_is_4xx(server, studies, tmp_path):
    response = _infer(server, "s1", {"height_cm": "tall"})
    assert response.status_code == 400 and "height_cm must be a number" in response.json()["detail"]
    response = _infer(server, "s1", {"reference": "no_such_table"})
    assert response.status_code == 400 and "unknown reference table" in response.json()["detail"]
    # A client must not make the server read its files: no paths in params.
    table = tmp_path / "table.csv"
    table.write_text("sex,index,mean,sd\nM,sma_cm2,100,10\n")
    response = _infer(server, "s1", {"reference": str(table)})
    assert response.status_code == 400 and "not a path" in response.json()["detail"]
    stored = studies / "labels" / "final" / "s1.nii.gz"
    response = _infer(server, "s2", {"label": str(stored)})
    assert response.status_code == 400 and "cannot name a server file" in response.json()["detail"]
    other = make_image(np.zeros((10, 10), np.float32), (1, 1))
    wrong = save_label(np.zeros((10, 10), np.uint8), other, tmp_path / "wrong.nii.gz")
    response = _infer(server, "s1", label_file=wrong)
    assert response.status_code == 400 and "shape" in response.json()["detail"]


def test_reference_table_in_studies_folder(server, studies):
    (studies / "references").mkdir(exist_ok=True)
    (studies / "references" / "ours.csv").write_text("# name: our clinic\nsex,index,mean,sd\nM,sma_cm2,100,10\n")
    response = _infer(server, "s1", {"reference": "ours"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["reference"] == "our clinic"
    assert result["t_scores"] == {"sma_cm2": pytest.approx((result["indices"]["sma_cm2"] - 100) / 10)}
