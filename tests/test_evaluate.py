"""Segmentation agreement (IoU / Dice per tissue) and the Table-3 summary of the evaluate command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sarco_app import labels as L
from sarco_app.__main__ import main as cli
from sarco_app.measurement.evaluate import agreement, table3, table3_counts
from sarco_app.inputs.ingest import make_image, save_label


def test_known_iou_and_dice():
    truth = np.zeros((10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0:4, 0:5] = L.MUSCLE  # 20 px
    pred[0:4, 1:6] = L.MUSCLE  # 20 px, 16 shared
    truth[5:10, 0:4] = L.SAT  # 20 px
    pred[5:10, 0:4] = L.SAT  # identical
    truth[5:7, 6:10] = L.VAT  # 8 px
    pred[5:7, 6:10] = L.MUSCLE  # all VAT called muscle
    result = agreement(pred, truth)
    assert result["M"]["iou"] == pytest.approx(16 / (20 + 28 - 16))  # pred muscle 28 px
    assert result["M"]["dice"] == pytest.approx(2 * 16 / (20 + 28))
    assert result["S"]["iou"] == 1.0 and result["S"]["dice"] == 1.0
    assert result["V"]["iou"] == 0.0 and result["V"]["dice"] == 0.0
    assert result["I"]["iou"] is None  # absent from both maps
    # MSV pools the classes: 16 + 20 + 0 agreeing over unions 32 + 20 + 8.
    assert result["MSV"]["iou"] == pytest.approx(36 / 60)
    assert result["MSV"]["dice"] == pytest.approx(2 * 36 / (48 + 48))


def _row(iou_m, iou_s=1.0, iou_v=1.0, iou_msv=1.0):
    row = {"id": "x"}
    for column, iou in (("M", iou_m), ("S", iou_s), ("V", iou_v), ("MSV", iou_msv)):
        row[f"{column}_iou"] = iou
        row[f"{column}_intersection"] = 0 if iou is None else int(round(iou * 100))
        row[f"{column}_union"] = 0 if iou is None else 100
    return row


def test_table3_bins_are_half_open():
    rows = [_row(v) for v in (0.95, 0.90, 0.8999, 0.80, 0.79, 0.70, 0.6999, 0.1)] + [_row(None)]
    counts = table3_counts(rows)
    assert counts["M"] == {"≥ 0.90": 2, "0.80-0.89": 2, "0.70-0.79": 2, "< 0.70": 2}
    assert counts["S"]["≥ 0.90"] == 9
    summary = table3(rows)
    assert summary.loc["≥ 0.90", "M"] == "2 (25.0%)"
    assert summary.loc["total", "M"] == "8"
    assert list(summary.columns) == ["M", "S", "V", "MSV"]


def _write_pair(folder_pred, folder_truth, name, truth, pred, spacing=(0.8, 0.8)):
    image = make_image(np.zeros(truth.shape, np.float32), spacing)
    save_label(truth, image, folder_truth / f"{name}.nii.gz")
    save_label(pred, image, folder_pred / f"{name}.nii.gz")


def test_evaluate_cli_folders_markdown_and_csv(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth" / "labels" / "final"
    expected = {}
    for i in range(4):
        truth = rng.integers(0, 5, size=(40, 30)).astype(np.uint8)
        pred = truth.copy()
        flip = rng.random(truth.shape) < 0.05 * (i + 1)  # more disagreement each image
        pred[flip] = rng.integers(0, 5, size=int(flip.sum()))
        _write_pair(pred_dir, truth_dir, f"s{i}", truth, pred)
        expected[f"s{i}"] = agreement(pred, truth)
    # A prediction without a reference is reported, not paired.
    save_label(np.zeros((40, 30), np.uint8), make_image(np.zeros((40, 30), np.float32), (1, 1)),
               pred_dir / "extra.nii.gz")
    out = tmp_path / "agree.csv"
    assert cli(["evaluate", "--pred", str(pred_dir), "--truth", str(tmp_path / "truth"), "--csv", str(out)]) == 0
    captured = capsys.readouterr()
    assert "extra" in captured.err
    assert "## Table 3" in captured.out and "| MSV IoU | MSV Dice |" in captured.out
    rows = pd.read_csv(out).set_index("id")
    assert list(rows.index) == ["s0", "s1", "s2", "s3"]
    for key, result in expected.items():
        for column in ("M", "S", "V", "I", "MSV"):
            assert rows.loc[key, f"{column}_iou"] == pytest.approx(result[column]["iou"])
            assert rows.loc[key, f"{column}_dice"] == pytest.approx(result[column]["dice"])
    summary = pd.read_csv(tmp_path / "agree_table3.csv", index_col=0)
    assert list(summary.index) == ["≥ 0.90", "0.80-0.89", "0.70-0.79", "< 0.70", "total", "mean IoU",
                                   "overall ratio"]
    for column in ("M", "S", "V", "MSV"):
        ious = np.array([expected[k][column]["iou"] for k in expected])
        counts = [int(np.sum(ious >= 0.9)), int(np.sum((ious >= 0.8) & (ious < 0.9))),
                  int(np.sum((ious >= 0.7) & (ious < 0.8))), int(np.sum(ious < 0.7))]
        assert [int(str(c).split()[0]) for c in summary[column].iloc[:4]] == counts
        assert float(summary.loc["mean IoU", column]) == pytest.approx(ious.mean(), abs=1e-4)
        pooled = sum(expected[k][column]["intersection"] for k in expected) / sum(
            expected[k][column]["union"] for k in expected)
        assert float(summary.loc["overall ratio", column]) == pytest.approx(pooled, abs=1e-4)


def test_evaluate_single_files_and_errors(tmp_path, capsys):
    truth = np.zeros((20, 20), np.uint8)
    truth[2:10, 2:10] = L.MUSCLE
    pred = np.zeros_like(truth)
    pred[2:10, 2:12] = L.MUSCLE
    image = make_image(np.zeros((20, 20), np.float32), (1, 1))
    save_label(truth, image, tmp_path / "t.nii.gz")
    save_label(pred, image, tmp_path / "p.nii.gz")
    md = tmp_path / "out.md"
    assert cli(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--truth", str(tmp_path / "t.nii.gz"),
                "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert f"| t | {64 / 80:.4f} | {128 / 144:.4f} |" in out
    assert md.read_text() == out
    other = make_image(np.zeros((20, 21), np.float32), (1, 1))
    save_label(np.zeros((20, 21), np.uint8), other, tmp_path / "w.nii.gz")
    assert cli(["evaluate", "--pred", str(tmp_path / "w.nii.gz"), "--truth", str(tmp_path / "t.nii.gz")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "shape" in err and err.count("\n") == 1
    assert cli(["evaluate", "--pred", str(tmp_path / "nothing"), "--truth", str(tmp_path / "t.nii.gz")]) != 0
    assert "no such file" in capsys.readouterr().err
    # Another grid of the same shape: compared voxel by voxel, with a logged warning on stderr.
    save_label(pred, make_image(np.zeros((20, 20), np.float32), (2, 2)), tmp_path / "far.nii.gz")
    assert cli(["evaluate", "--pred", str(tmp_path / "far.nii.gz"), "--truth", str(tmp_path / "t.nii.gz")]) == 0
    assert "warning: t: prediction and reference affines differ" in capsys.readouterr().err


def test_orientation_of_files_does_not_matter(tmp_path, capsys):
    """The same map stored in LPS and in RAS voxel order agrees perfectly."""
    import nibabel as nib

    truth = np.zeros((12, 9, 3), np.uint8)
    truth[1:5, 2:8, 1] = L.MUSCLE
    truth[6:11, 0:3, 2] = L.SAT
    image = make_image(np.zeros(truth.shape, np.float32), (0.8, 0.9, 2.0))
    save_label(truth, image, tmp_path / "t.nii.gz")  # canonical L,P,S order
    ras = nib.as_closest_canonical(nib.load(str(tmp_path / "t.nii.gz")))
    assert not np.array_equal(np.asarray(ras.dataobj), truth)  # really stored another way
    nib.save(ras, str(tmp_path / "p.nii.gz"))
    assert cli(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--truth", str(tmp_path / "t.nii.gz")]) == 0
    assert "| t | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in capsys.readouterr().out


def test_studies_folder_means_its_final_labels(tmp_path, capsys):
    """A studies folder holds images next to labels/final/: the labels are compared, and an
    image passed where a label is expected is refused."""
    hu = np.full((16, 12), -1000.0, np.float32)
    hu[2:10, 2:10] = 40.0
    truth = np.zeros((16, 12), np.uint8)
    truth[2:10, 2:10] = L.MUSCLE
    from sarco_app.inputs.ingest import save_image

    image = make_image(hu, (1, 1))
    save_image(image, tmp_path / "studies" / "a.nii.gz")
    save_label(truth, image, tmp_path / "studies" / "labels" / "final" / "a.nii.gz")
    save_label(truth, image, tmp_path / "pred" / "a.nii.gz")
    assert cli(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "studies")]) == 0
    assert "| a | 1.0000 | 1.0000 |" in capsys.readouterr().out
    assert cli(["evaluate", "--pred", str(tmp_path / "pred" / "a.nii.gz"),
                "--truth", str(tmp_path / "studies" / "a.nii.gz")]) != 0
    assert "an image rather than a label map" in capsys.readouterr().err
