"""Bounded inputs and inference off the event loop (apps/sarcopenia/lib/limits.py) over HTTP on
the real MONAI Label server: 413 from headers, 400 for a gzip that is not NIfTI, the matrix cap,
and ``/info/`` answering while an inference runs."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from sarco_app.inputs.ingest import make_image, save_image
from sarco_app.inputs.limits import InputLimits, InputTooLarge, check_image_file, read_image_header
from sarco_app.synthesis.phantom import generate, write_phantom


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits_studies")
    write_phantom(generate(707001, spacing_mm=1.0, size=320), root, "big")  # over the test's 300 cap
    write_phantom(generate(707002, spacing_mm=2.0, size=160), root, "small")
    # A volume whose every-slice U-Net inference takes seconds: the in-flight request below.
    slices = [generate(707010 + k, spacing_mm=1.0, size=288).hu for k in range(16)]
    # 48 slices (the 16 three times): an all-slices inference that lasts seconds on any machine.
    save_image(make_image(np.stack(slices * 3, axis=2), (1.0, 1.0, 5.0)), root / "vol.nii.gz")
    return root


@pytest.fixture(scope="module")
def server(start_server, studies):
    # Small limits so that the refused inputs stay small too; one inference worker.
    return start_server(studies, conf={"max_upload_mb": 2, "max_decompressed_mb": 64, "max_matrix": 300,
                                       "infer_workers": 1})


def nifti_bomb(shape=(8192, 8192, 2)) -> bytes:
    """A gzip NIfTI whose header promises ``shape`` int16 voxels but whose few KB hold zeros."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 200_000)


def nifti_bytes(array, spacing=(1.0, 1.0, 1.0)) -> bytes:
    affine = np.diag([*spacing, 1.0])
    buffer = io.BytesIO()
    image = nib.Nifti1Image(np.asarray(array), affine)
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return gzip.compress(buffer.getvalue())


def test_header_checks_read_only_the_header():
    bomb = nifti_bomb()
    assert len(bomb) < 300_000
    header = read_image_header(io.BytesIO(bomb))
    assert header.kind == "nifti" and header.data_bytes == 8192 * 8192 * 2 * 2
    with pytest.raises(InputTooLarge, match="exceeds the limit of 1024 MiB"):
        check_image_file(io.BytesIO(nifti_bomb((32767, 32767, 1))), InputLimits())
    with pytest.raises(InputTooLarge, match="matrix limit of 2048 x 2048"):
        check_image_file(io.BytesIO(nifti_bomb((4096, 512, 1))), InputLimits())
    # A sagittal stack: 3000 slices along the file's first axis, 512 x 512 axial planes.
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 512, 512))
    header.set_sform(np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]]), code=1)
    assert read_image_header(io.BytesIO(header.binaryblock + b"\0" * 4)).in_plane == (512, 512)


def test_body_over_the_upload_limit_is_413(server, studies):
    payload = np.random.default_rng(0).bytes(3 * 1024 * 1024)
    r = requests.put(f"{server}/datastore/", params={"image": "too_big"},
                     files={"file": ("too_big.nii.gz", payload)}, timeout=60)
    assert r.status_code == 413 and "upload limit of 2 MiB" in r.json()["detail"]

    def chunks():  # a multipart upload without Content-Length: counted while it streams in
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.nii.gz"\r\n\r\n'
        for _ in range(6):
            yield payload[: 1024 * 1024]
        yield b"\r\n--B--\r\n"

    r = requests.post(f"{server}/infer/bodycomp_threshold", data=chunks(),
                      headers={"Content-Type": "multipart/form-data; boundary=B"}, timeout=60)
    assert r.status_code == 413 and "upload limit" in r.json()["detail"]
    assert not list(studies.glob("too_big*"))


def test_gzip_bomb_is_413_before_it_is_unpacked(server, studies):
    bomb = nifti_bomb()
    r = requests.put(f"{server}/datastore/", params={"image": "bomb"},
                     files={"file": ("bomb.nii.gz", bomb)}, timeout=60)
    assert r.status_code == 413, r.text
    assert "256 MiB of pixel data once unpacked" in r.json()["detail"] and "limit of 64 MiB" in r.json()["detail"]
    r = requests.post(f"{server}/infer/bodycomp_threshold", files={"file": ("bomb.nii.gz", bomb)}, timeout=60)
    assert r.status_code == 413
    r = requests.put(f"{server}/datastore/label", params={"image": "small", "tag": "final"},
                     files={"label": ("small.nii.gz", bomb)}, timeout=60)
    assert r.status_code == 413
    assert not list(studies.glob("bomb*"))
    listing = requests.get(f"{server}/datastore/?output=all", timeout=30).json()["objects"]
    assert "bomb" not in listing


def test_gzip_that_is_not_nifti_is_400(server):
    r = requests.post(f"{server}/infer/bodycomp_threshold",
                      files={"file": ("x.nii.gz", gzip.compress(b"not an image " * 1000))}, timeout=60)
    assert r.status_code == 400 and "must be a NIfTI image" in r.json()["detail"]


def test_matrix_cap_on_uploads_and_stored_images(server, studies):
    r = requests.post(f"{server}/infer/bodycomp_threshold", params={"image": "big"}, timeout=60)
    assert r.status_code == 413 and "320 x 320 slice exceeds the matrix limit of 300 x 300" in r.json()["detail"]
    r = requests.post(f"{server}/infer/bodycomp_threshold",
                      files={"file": ("wide.nii.gz", nifti_bytes(np.zeros((301, 20, 1), np.int16)))}, timeout=60)
    assert r.status_code == 413
    r = requests.post(f"{server}/infer/bodycomp_threshold", params={"image": "small", "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["pixels"]["muscle"] > 0


def test_info_answers_while_an_inference_is_in_flight(server):
    finished = {}

    def long_infer():
        r = requests.post(f"{server}/infer/bodycomp_unet", params={"image": "vol", "output": "json"},
                          data={"params": json.dumps({"all_slices": True})}, timeout=600)
        finished["infer"] = (time.monotonic(), r.status_code)

    worker = threading.Thread(target=long_infer)
    worker.start()
    returned = []  # when each /info/ sent during the inference came back
    while worker.is_alive():
        info = requests.get(f"{server}/info/", timeout=120)
        assert info.status_code == 200
        returned.append(time.monotonic())
        time.sleep(0.2)
    worker.join(timeout=600)
    assert finished["infer"][1] == 200
    # Ordering, not timing: with inference on the event loop every /info/ waits for the inference
    # to end (one might slip in before it starts); here several come back while it runs.
    assert sum(t < finished["infer"][0] for t in returned) >= 2, (returned, finished)


def test_infers_in_worker_threads_and_saves_to_one_id_do_not_mix(server, studies, tmp_path):
    """20 infers (the quantification reads the stored final label) alongside 10 saves of
    different final labels to the same id: every answer is 200, the stored label is
    byte-identical to one that was sent, and the datastore JSON stays valid."""
    from concurrent.futures import ThreadPoolExecutor

    image = nib.load(str(studies / "small.nii.gz"))
    sent = []
    for k in range(10):
        label = np.zeros(image.shape, np.uint8)
        label[20 + k : 90 + k, 30:100] = 1
        label[5:15, 5:150] = 2
        path = tmp_path / f"label{k}.nii.gz"
        nib.save(nib.Nifti1Image(label, image.affine), str(path))
        sent.append(path.read_bytes())

    def save(k):
        return requests.put(f"{server}/datastore/label", params={"image": "small", "tag": "final"},
                            files={"label": ("small.nii.gz", sent[k])}, timeout=300).status_code

    def infer(k):
        task = "quantification" if k % 2 else "bodycomp_threshold"
        return requests.post(f"{server}/infer/{task}", params={"image": "small", "output": "json"},
                             timeout=300).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        saves = [pool.submit(save, k) for k in range(10)]
        infers = [pool.submit(infer, k) for k in range(20)]
        statuses = [f.result() for f in saves + infers]
    assert statuses == [200] * 30
    assert (studies / "labels" / "final" / "small.nii.gz").read_bytes() in sent
    assert "small" in json.loads((studies / "datastore_v2.json").read_text())["objects"]
    listing = requests.get(f"{server}/datastore/?output=all", timeout=30).json()["objects"]
    assert "final" in listing["small"]["labels"]
