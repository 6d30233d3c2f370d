"""End to end in a browser: Orthanc + the server + OHIF in headless Debian chromium (Selenium).

Opens the phantom study in OHIF's MONAI Label mode, runs ``bodycomp_unet`` from the MONAI Label
panel, checks that the segmentation is drawn (screenshot kept in ``test-artifacts/ohif/`` and
checked for the segment colours), saves OHIF's labelmap to the server as the panel's client does
(``PUT /datastore/label`` with ``label.bin``), and checks the DICOM SEG that arrives in Orthanc.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from sarco_app.inputs import dicom_seg, ingest, pacs
from sarco_app.labels import LABELS
from sarco_app.measurement.quantify import load_label

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ohif"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Headless, no GPU, and nothing that reaches the network on its own.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000"]

if pacs.orthanc_available():
    pytest.skip(f"browser test skipped: {pacs.orthanc_available()}", allow_module_level=True)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("browser test skipped: Debian chromium and chromium-driver are not installed "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="browser test skipped: selenium is not installed")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An L1-L5 volume phantom (OHIF's MONAI Label mode builds a volume: one slice is not
    enough), 256x256 at 1.5 mm, 5 mm slices."""
    from sarco_app.synthesis.phantom3d.build import make_volume_phantom
    from sarco_app.synthesis.phantom3d.writing import write_volume_dicom

    volume, _ = make_volume_phantom(707071, slice_thickness=5.0, matrix=256, coverage="mid")
    return write_volume_dicom(volume, tmp_path_factory.mktemp("browser_dicom") / "vol", "vol", seed=707071)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, series):
    from tests.harness import running_orthanc

    yield from running_orthanc(tmp_path_factory, series)


@pytest.fixture(scope="module")
def server(start_server, orthanc, tmp_path_factory):
    from tests.harness import start_dicomweb_server

    return start_dicomweb_server(start_server, orthanc, tmp_path_factory)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sarco-chromium-")  # empty profile: no state, no sync
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(what: str, check, timeout: float = 60.0, step: float = 0.5):
    deadline = time.time() + timeout
    from selenium.common.exceptions import StaleElementReferenceException

    while time.time() < deadline:
        try:
            value = check()
        except StaleElementReferenceException:  # OHIF re-rendered the element meanwhile: look again
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def screenshot(driver, name: str) -> np.ndarray:
    from PIL import Image

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def pixels_near(picture: np.ndarray, rgb, tolerance: int = 30) -> int:
    return int((np.abs(picture - np.array(rgb)).max(axis=2) <= tolerance).sum())


# OHIF's labelmap (segment index per voxel, x fastest) and its segments {index: (name, rgb)}.
LABELMAP_JS = """
const seg = window.services.segmentationService.getSegmentations()[0];
if (!seg) return null;
const rd = seg.representationData;
const lm = rd.Labelmap || rd.LABELMAP || rd.labelmap;
const volume = lm && lm.volumeId ? window.cornerstone.cache.getVolume(lm.volumeId) : null;
if (!volume) return null;
const data = volume.voxelManager ? volume.voxelManager.getCompleteScalarDataArray() : volume.getScalarData();
let set = 0;
for (let i = 0; i < data.length; i++) if (data[i]) set++;
const viewportId = window.services.viewportGridService.getActiveViewportId();
const segments = {};
for (const [index, s] of Object.entries(seg.segments || {})) {
  if (s) segments[index] = [s.label, Array.from(window.services.segmentationService.getSegmentColor(
    viewportId, seg.segmentationId, Number(index))).slice(0, 3)];
}
const ct = window.cornerstone.cache.getVolumes().find(
  v => v.volumeId !== lm.volumeId && v.imageIds && !String(v.imageIds[0]).startsWith('derived'));
const sops = ct ? ct.imageIds : [];
const perSlice = [];
const sliceSize = volume.dimensions[0] * volume.dimensions[1];
for (let k = 0; k < volume.dimensions[2]; k++) {
  let n = 0;
  for (let i = k * sliceSize; i < (k + 1) * sliceSize; i++) if (data[i]) n++;
  perSlice.push(n);
}
return {set: set, dims: volume.dimensions, segments: segments, sops: sops, perSlice: perSlice};
"""

# True once OHIF's CT volume (not a derived labelmap) has every frame loaded.
CT_LOADED_JS = """
if (!window.cornerstone) return false;
const ct = window.cornerstone.cache.getVolumes().find(
  v => v.imageIds && v.imageIds.length && !String(v.imageIds[0]).startsWith('derived'));
if (!ct) return false;
const status = ct.loadStatus;
return status ? Boolean(status.loaded) : true;
"""

# What the MONAI Label panel's client does in save_label: PUT the labelmap as label.bin.
SAVE_JS = """
const [server, image, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const seg = window.services.segmentationService.getSegmentations()[0];
const rd = seg.representationData;
const lm = rd.Labelmap || rd.LABELMAP || rd.labelmap;
const volume = window.cornerstone.cache.getVolume(lm.volumeId);
const data = volume.voxelManager ? volume.voxelManager.getCompleteScalarDataArray() : volume.getScalarData();
const labelInfo = Object.entries(seg.segments).filter(([i, s]) => s).map(([i, s]) => ({name: s.label, idx: Number(i)}));
const form = new FormData();
form.append('params', JSON.stringify({label_info: labelInfo}));
form.append('label', new Blob([new Uint8Array(data)]), 'label.bin');
fetch(server + '/datastore/label?image=' + encodeURIComponent(image), {method: 'PUT', body: form})
  .then(r => r.text().then(t => done([r.status, t])))
  .catch(e => done([0, String(e)]));
"""


def test_ohif_runs_bodycomp_and_the_saved_label_arrives_as_seg(server, orthanc, series, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    browser.get(f"{server}/ohif/")
    # The panel's server URL defaults to port 8000 on the page's host.
    browser.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": f"{server}/"})
    browser.get(f"{server}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
    wait_for("the MONAI Label panel", lambda: browser.find_elements(By.CSS_SELECTOR, "button.actionButton"))
    # The viewports load the series (over the server's DICOMweb proxy, with Orthanc's auth); the
    # panel segments OHIF's CT volume, so every frame must be in before "Run Segmentation".
    wait_for("the CT volume in OHIF", lambda: browser.execute_script(CT_LOADED_JS))
    before = screenshot(browser, "before_infer.png")

    browser.find_elements(By.CSS_SELECTOR, "button.actionButton")[0].click()  # connect: GET /info/
    select = wait_for("the model list", lambda: [
        s for s in browser.find_elements(By.CSS_SELECTOR, "select.selectBox")
        if "bodycomp_unet" in [o.get_attribute("value") for o in s.find_elements(By.TAG_NAME, "option")]])
    Select(select[0]).select_by_value("bodycomp_unet")
    run = [b for b in browser.find_elements(By.CSS_SELECTOR, "button.actionButton")
           if b.get_attribute("title") == "Run Segmentation"]
    run[0].click()
    state = wait_for("the segmentation in OHIF", lambda: (lambda s: s if s and s["set"] > 0 else None)(
        browser.execute_script(LABELMAP_JS)), timeout=120)
    time.sleep(2)  # let the viewport render the labelmap
    after = screenshot(browser, "after_infer.png")

    # The picture shows the tissues in OHIF's segment colours; before inference it did not.
    names = {name: rgb for name, rgb in state["segments"].values()}
    assert {"muscle", "sat", "vat"} <= set(names)
    for name in ("muscle", "sat", "vat"):
        assert pixels_near(after, names[name]) > 50 + 5 * pixels_near(before, names[name]), name

    status, text = browser.execute_async_script(SAVE_JS, server, series_uid)
    assert status == 200, text

    # The SEG in Orthanc: our four segments, pixels equal to the prediction made over HTTP.
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": series_uid, "output": "image"},
                             data={"params": "{}"}, timeout=300)
    assert response.status_code == 200
    (tmp_path / "pred.nii.gz").write_bytes(response.content)
    image = ingest.load_image(series)
    prediction = load_label(tmp_path / "pred.nii.gz", image)
    # OHIF drew it on the slice the server labelled: OHIF's volume holds the instances in the
    # series' file order (the order of the NRRD it was given) and the labelled slice is that one.
    sops = [re.search(r"instances/([0-9.]+)|objectUID=([0-9.]+)", i) for i in state["sops"]]
    assert [m and (m.group(1) or m.group(2)) for m in sops] == image.meta["sop_instance_uids"], state["sops"][:2]
    labelled = [k for k, n in enumerate(state["perSlice"]) if n]
    assert labelled == [image.file_slice(k) for k in range(image.hu.shape[2]) if prediction[:, :, k].any()]
    segs = pacs.segs_of_series(orthanc.dicomweb_root, series_uid, orthanc.session())
    assert len(segs) == 1
    assert [s.SegmentLabel for s in segs[0].SegmentSequence] == list(LABELS)
    assert np.array_equal(dicom_seg.seg_to_label(segs[0], image), prediction)
    (ARTIFACTS / "result.json").write_text(json.dumps({"segments": state["segments"], "set_voxels": state["set"],
                                                        "labelled_slices": labelled}))


def test_ohif_displays_the_seg_stored_in_orthanc(server, orthanc, series, browser, tmp_path):
    """Our highdicom SEG is a SEG viewers read: OHIF lists it with the CT, loads its four
    segments, and puts its pixels on the slice the server labelled."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    first = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    response = requests.post(f"{server}/infer/bodycomp_unet", params={"image": series_uid, "output": "image"},
                             data={"params": "{}"}, timeout=300)
    (tmp_path / "pred.nii.gz").write_bytes(response.content)
    with open(tmp_path / "pred.nii.gz", "rb") as f:
        saved = requests.put(f"{server}/datastore/label", params={"image": series_uid, "tag": "final"},
                             files={"label": ("label.nii.gz", f)}, timeout=120)
    assert saved.status_code == 200, saved.text[:300]
    image = ingest.load_image(series)
    prediction = load_label(tmp_path / "pred.nii.gz", image)
    per_file_slice = [int(prediction[:, :, image.canonical_slice(k)].astype(bool).sum())
                      for k in range(image.hu.shape[2])]

    browser.get(f"{server}/ohif/viewer?StudyInstanceUIDs={study_uid}")
    seg_thumb = wait_for("the SEG in the study browser", lambda: [
        t for t in browser.find_elements(By.CSS_SELECTOR, "[data-cy^='study-browser-thumbnail']")
        if "SEG" in t.text])
    ActionChains(browser).double_click(seg_thumb[0]).perform()
    yes = wait_for("OHIF's offer to open the SEG", lambda: [
        b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Yes"])
    yes[0].click()
    loaded = wait_for("the SEG's labelmap", lambda: browser.execute_script("""
      const seg = window.services.segmentationService.getSegmentations()[0];
      if (!seg) return null;
      const rd = seg.representationData;
      const lm = rd.Labelmap || rd.LABELMAP || rd.labelmap || {};
      const ids = lm.imageIds || (lm.volumeId ? window.cornerstone.cache.getVolume(lm.volumeId).imageIds : []);
      const counts = [];
      for (const id of ids) {
        const im = window.cornerstone.cache.getImage(id);
        if (!im) return null;
        const d = im.voxelManager ? im.voxelManager.getScalarData() : im.getPixelData();
        let n = 0;
        for (let i = 0; i < d.length; i++) if (d[i]) n++;
        counts.push(n);
      }
      return counts.length ? {segments: Object.values(seg.segments || {}).filter(x => x).map(x => x.label),
                              counts: counts} : null;
    """), timeout=60)
    screenshot(browser, "seg_in_ohif.png")
    assert loaded["segments"] == list(LABELS)
    assert loaded["counts"] == per_file_slice
