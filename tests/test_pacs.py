"""UID repair before a PACS upload: deterministic, valid, one series stays one series."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
from pydicom.uid import UID

from sarco_app.inputs import pacs
from tests.dicom_factory import write_series


def _uids(datasets):
    return [tuple(str(ds.get(k)) for k in pacs.UID_KEYWORDS) for ds in datasets]


def test_empty_uids_get_deterministic_valid_uids_with_a_warning(tmp_path, caplog):
    raw = np.full((3, 6, 5), 1000, np.int16) + np.arange(3, dtype=np.int16)[:, None, None]
    write_series(tmp_path / "anon", raw, [0.0, 2.0, 4.0], series_uid=None, StudyInstanceUID="")
    write_series(tmp_path / "ok", raw, [0.0, 2.0, 4.0], series_uid="1.2.3.4")
    for ds_path in (tmp_path / "anon").iterdir():  # an anonymiser blanked the SOP UID too
        ds = pydicom.dcmread(ds_path)
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(ds_path)
    ok, ok_names, _ = pacs.read_datasets(tmp_path / "ok")
    before_ok = _uids(ok)
    with caplog.at_level(logging.WARNING, logger="sarco_app.inputs.pacs"):
        first, names, _ = pacs.read_datasets(tmp_path / "anon")
        repaired = pacs.repair_uids(first, names)
    assert pacs.repair_uids(ok, ok_names) == [] and _uids(ok) == before_ok  # complete UIDs untouched
    assert len(repaired) == 3 and all("StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID" in r for r in repaired)
    assert all(name in caplog.text for name in names)
    uids = _uids(first)
    assert len({u[0] for u in uids}) == 1 and len({u[1] for u in uids}) == 1  # one study, one series
    assert len({u[2] for u in uids}) == 3  # distinct instances
    assert all(UID(u).is_valid for row in uids for u in row)
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in first)
    again, again_names, _ = pacs.read_datasets(tmp_path / "anon")
    pacs.repair_uids(again, again_names)
    assert _uids(again) == uids  # same files, same UIDs


def test_repair_of_the_real_anonymised_series(real_data, tmp_path):
    from sarco_app.inputs import ingest

    folder = real_data / "totalsegmentator-dicom-series"
    datasets, names, _ = pacs.read_datasets(folder)
    assert all(not str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets)
    assert len(pacs.repair_uids(datasets, names)) == len(datasets)
    assert len({str(ds.SeriesInstanceUID) for ds in datasets}) == 1
    assert len({str(ds.SOPInstanceUID) for ds in datasets}) == len(datasets)
    for ds, name in zip(datasets, names):
        ds.save_as(tmp_path / name)
    original, repaired = ingest.load_image(folder), ingest.load_image(tmp_path)
    assert np.array_equal(original.hu, repaired.hu)
    assert repaired.meta["series_uid"] == str(datasets[0].SeriesInstanceUID)


def test_volume_phantom_as_a_dicom_series_reads_back_exactly(tmp_path):
    """The run-pacs demo's volume: HU, geometry and patient data survive the DICOM series."""
    from sarco_app.inputs import dicom, ingest
    from sarco_app.synthesis.phantom3d.build import make_volume_phantom
    from sarco_app.synthesis.phantom3d.writing import write_volume_dicom

    volume, _ = make_volume_phantom(11, slice_thickness=5.0, matrix=96, coverage="mid")
    write_volume_dicom(volume, tmp_path / "vol", "vol", seed=11)
    back = ingest.load_image(tmp_path / "vol")
    assert back.hu.shape == volume.hu.shape
    assert np.array_equal(back.hu, np.maximum(np.round(volume.hu), dicom.AIR_HU))
    assert np.allclose(back.affine, volume.affine, atol=1e-3)
    assert back.patient == volume.patient
    assert len(set(back.meta["sop_instance_uids"])) == volume.hu.shape[2]
