"""The server on a real PACS: Orthanc with DICOMweb (and authentication), phantom series
uploaded, ``bodycomp_unet`` over HTTP, the label saved back as a DICOM SEG in Orthanc."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import requests

from sarco_app.inputs import dicom_seg, ingest, pacs
from sarco_app.labels import LABELS
from sarco_app.synthesis.phantom import generate, write_phantom
from sarco_app.measurement.quantify import load_label


if pacs.orthanc_available():
    pytest.skip(f"Orthanc server tests skipped: {pacs.orthanc_available()}", allow_module_level=True)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs_dicom")
    for case, seed in (("ph_a", 606061), ("ph_b", 606062)):
        write_phantom(generate(seed, spacing_mm=1.5, size=256), root, case, format="dicom")
    return root


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, phantoms):
    from tests.harness import running_orthanc

    yield from running_orthanc(tmp_path_factory, phantoms)


@pytest.fixture(scope="module")
def server(start_server, orthanc, tmp_path_factory):
    from tests.harness import start_dicomweb_server

    return start_dicomweb_server(start_server, orthanc, tmp_path_factory)


def series_uid(folder) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def seg_instances(orthanc, source_series: str) -> list:
    return pacs.segs_of_series(orthanc.dicomweb_root, source_series, orthanc.session())


def infer_label(server, image_id: str) -> bytes:
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": image_id, "output": "image"},
                             data={"params": "{}"}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    return response.content


def test_orthanc_requires_the_credentials_the_server_was_given(orthanc):
    assert requests.get(f"{orthanc.dicomweb_root}/series", timeout=10).status_code == 401
    assert orthanc.session().get(f"{orthanc.dicomweb_root}/series", timeout=10).status_code == 200


def test_infer_and_save_store_a_seg_equal_to_the_prediction(server, orthanc, phantoms, tmp_path):
    folder = phantoms / "ph_a"
    image_id = series_uid(folder)
    predicted = tmp_path / "pred.nii.gz"
    predicted.write_bytes(infer_label(server, image_id))
    image = ingest.load_image(folder)
    prediction = load_label(predicted, image)
    assert set(np.unique(prediction)) >= {1, 2, 3}  # a real body-composition label, not empty
    with open(predicted, "rb") as f:
        response = requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                                files={"label": ("label.nii.gz", f)},
                                data={"params": json.dumps({"model": "bodycomp_unet"})}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    segs = seg_instances(orthanc, image_id)
    assert len(segs) == 1
    seg = segs[0]
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == sorted(
        (v, k) for k, v in LABELS.items())
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "127954009"
    assert seg.StudyInstanceUID == pydicom.dcmread(next(folder.glob("*.dcm"))).StudyInstanceUID
    assert np.array_equal(dicom_seg.seg_to_label(seg, image), prediction)

    # The server reads the label back (from its cache, which holds the same pixels).
    back = requests.get(f"{server}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
    assert back.status_code == 200
    (tmp_path / "back.nii.gz").write_bytes(back.content)
    assert np.array_equal(load_label(tmp_path / "back.nii.gz", image), prediction)

    # Saving the same series' label again replaces its SEG; the other series has none.
    edited = prediction.copy()
    edited[edited == LABELS["imat"]] = LABELS["muscle"]
    ingest.save_label(edited, image, tmp_path / "edited.nii.gz")
    with open(tmp_path / "edited.nii.gz", "rb") as f:
        response = requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                                files={"label": ("label.nii.gz", f)}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    segs = seg_instances(orthanc, image_id)
    assert len(segs) == 1 and segs[0].SOPInstanceUID == seg.SOPInstanceUID
    assert np.array_equal(dicom_seg.seg_to_label(segs[0], image), edited)
    assert seg_instances(orthanc, series_uid(phantoms / "ph_b")) == []


def test_a_seg_already_in_orthanc_is_the_series_label(server, orthanc, phantoms, tmp_path):
    folder = phantoms / "ph_b"
    image = ingest.load_image(folder)
    label = np.zeros(image.hu.shape, np.uint8)
    label[40:80, 50:90] = LABELS["sat"]
    label[100:120, 100:130] = LABELS["vat"]
    seg = dicom_seg.build_seg(dicom_seg.series_datasets(folder, image), image, label, tag="from-slicer")
    seg.save_as(tmp_path / "seg.dcm")
    pacs.upload(orthanc.dicomweb_root, tmp_path / "seg.dcm", session=orthanc.session())
    response = requests.get(f"{server}/datastore/label", params={"label": image.meta["series_uid"], "tag": "final"},
                            timeout=60)
    assert response.status_code == 200, response.text[:500]
    (tmp_path / "label.nii.gz").write_bytes(response.content)
    assert np.array_equal(load_label(tmp_path / "label.nii.gz", image), label)


def test_bad_saves_are_clear_errors_and_store_nothing(server, orthanc, phantoms, tmp_path):
    image_id = series_uid(phantoms / "ph_b")
    before = len(seg_instances(orthanc, image_id))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((30, 30, 1), np.uint8), np.eye(4)), tmp_path / "small.nii.gz")
    with open(tmp_path / "small.nii.gz", "rb") as f:
        response = requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                                files={"label": ("label.nii.gz", f)}, timeout=60)
    assert response.status_code == 400
    assert "shape (30, 30, 1)" in response.json()["detail"]
    assert len(seg_instances(orthanc, image_id)) == before
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": "x/../not-a-uid"}, timeout=60)
    # The request guard refuses the id before the DICOMweb datastore sees it.
    assert response.status_code == 400 and "invalid image id" in response.json()["detail"]
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": "1.2.3.999"}, timeout=60)
    assert response.status_code == 404 and "no such series" in response.json()["detail"]


def test_orthanc_unreachable_is_a_clear_error(server, orthanc):
    orthanc.stop()
    try:  # a series the server has not cached yet must come from Orthanc
        response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": "1.2.3.4.5"}, timeout=60)
        assert response.status_code == 502
        assert "unreachable" in response.json()["detail"] and orthanc.dicomweb_root in response.json()["detail"]
    finally:
        orthanc.start()
    assert len(orthanc.session().get(f"{orthanc.dicomweb_root}/series").json()) >= 2  # storage kept


def test_ohif_asks_for_nrrd_and_label_lists(server, orthanc, phantoms, tmp_path):
    """What OHIF's MONAI Label panel needs: /info/ labels as a list, the label as raw NRRD,
    and a saved label.bin with its own segment indices mapped by name (label_info)."""
    import nrrd

    assert requests.get(f"{server}/info/", timeout=30).json()["labels"] == ["muscle", "sat", "vat", "imat"]
    folder = phantoms / "ph_b"
    image_id, image = series_uid(folder), ingest.load_image(folder)
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": image_id, "output": "image"},
                             data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8",
                                                         "result_compress": False})}, timeout=300)
    assert response.status_code == 200, response.text[:300]
    (tmp_path / "pred.nrrd").write_bytes(response.content)
    data, header = nrrd.read(str(tmp_path / "pred.nrrd"), index_order="F")
    assert header["encoding"] == "raw" and data.shape == image.original_shape
    prediction = image.from_original(data)
    # OHIF numbers segments alphabetically (imat 1, muscle 2, sat 3, vat 4) and says so.
    ohif_index = {"imat": 1, "muscle": 2, "sat": 3, "vat": 4}
    raw = np.zeros(data.shape, np.uint8)
    for name, value in LABELS.items():
        raw[data == value] = ohif_index[name]
    (tmp_path / "label.bin").write_bytes(raw.tobytes(order="F"))
    info = {"label_info": [{"name": k, "idx": v} for k, v in ohif_index.items()]}
    with open(tmp_path / "label.bin", "rb") as f:
        response = requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                                files={"label": ("label.bin", f)}, data={"params": json.dumps(info)}, timeout=120)
    assert response.status_code == 200, response.text[:300]
    assert any(np.array_equal(dicom_seg.seg_to_label(seg, image), prediction) for seg in seg_instances(orthanc, image_id))


def test_series_without_pixel_data_is_a_clear_error(server, orthanc, tmp_path):
    from tests.dicom_factory import write_ct_slice

    write_ct_slice(tmp_path / "nopix.dcm", np.zeros((4, 4), np.int16), position=(0, 0, 0),
                   series_uid="1.2.3.4.77", pixel_data=False)
    pacs.upload(orthanc.dicomweb_root, tmp_path / "nopix.dcm", session=orthanc.session())
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": "1.2.3.4.77"}, timeout=60)
    assert response.status_code == 400
    assert "series 1.2.3.4.77" in response.json()["detail"] and "without pixel data" in response.json()["detail"]
