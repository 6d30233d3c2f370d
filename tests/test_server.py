"""End to end: the real MONAI Label server on a studies folder of phantoms made by the CLI."""

from __future__ import annotations

import csv

import pytest
import requests

from sarco_app.__main__ import main as cli


@pytest.fixture(scope="module")
def demo_studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_studies")
    assert cli(["phantom", "--count", "3", "--seed", "11", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(start_server, demo_studies):
    return start_server(demo_studies)


def test_info_names_app_labels_and_models(server):
    info = requests.get(f"{server}/info/", timeout=30).json()
    assert info["name"] == "sarcopenia"
    assert info["labels"] == {"muscle": 1, "sat": 2, "vat": 3, "imat": 4}
    assert isinstance(info["models"], dict)


def test_datastore_lists_the_phantoms(server, demo_studies):
    listing = requests.get(f"{server}/datastore/?output=all", timeout=30).json()
    with open(demo_studies / "manifest.csv") as fh:
        ids = {row["id"] for row in csv.DictReader(fh)}
    assert len(ids) == 3
    assert set(listing["objects"]) == ids
    for case in ids:  # the phantoms' exact labels are stored as final labels
        assert "final" in listing["objects"][case]["labels"]


def test_image_download_round_trip(server, demo_studies):
    case = sorted(p.name for p in demo_studies.glob("*.nii.gz"))[0].removesuffix(".nii.gz")
    response = requests.get(f"{server}/datastore/image", params={"image": case}, timeout=30)
    assert response.status_code == 200
    assert response.content == (demo_studies / f"{case}.nii.gz").read_bytes()
