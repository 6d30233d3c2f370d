"""The rule-based baseline (``sarco_app.segmentation.threshold``) on a synthetic slice with a known answer and
on phantoms."""

from __future__ import annotations

import numpy as np
import pytest

from sarco_app import labels as L
from sarco_app.synthesis.phantom import generate
from sarco_app.metrics import dice_per_tissue
from sarco_app.segmentation.segment import segment_volume
from sarco_app.segmentation.threshold import body_mask, threshold_segment


def ring_slice(spacing=1.0, n=400):
    """Concentric ellipses: skin, SAT, muscle ring, VAT with a soft-tissue organ, a table below
    the body joined to it by a thin pad. Returns hu (X, Y) and the exact label."""
    x = (np.arange(n) - n / 2) * spacing
    X, Y = np.meshgrid(x, x, indexing="ij")  # axis 1 toward posterior

    def ellipse(a, b, cx=0.0, cy=0.0):
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1

    hu = np.full((n, n), -1000.0, np.float32)
    label = np.zeros((n, n), np.uint8)
    hu[ellipse(150, 110)] = 40  # skin
    sat = ellipse(147, 107) & ~ellipse(125, 88)
    hu[sat], label[sat] = -100, L.SAT
    muscle = ellipse(125, 88) & ~ellipse(110, 75)
    hu[muscle], label[muscle] = 45, L.MUSCLE
    vat = ellipse(110, 75)
    hu[vat], label[vat] = -95, L.VAT
    organ = ellipse(45, 35, 0, -10)  # bowel/organ: soft tissue inside, not muscle
    hu[organ], label[organ] = 35, L.BACKGROUND
    table = (Y > 125) & (Y < 140) & (np.abs(X) < 190)
    hu[table] = 300
    pad = (Y >= 109) & (Y <= 125) & (np.abs(X) < 4)  # thin (8 mm) bridge body -> table
    hu[pad & (label == 0)] = -50
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 8, hu.shape).astype(np.float32)
    return hu, label, (spacing, spacing)


@pytest.mark.parametrize("spacing", [0.7, 1.0])
def test_threshold_on_known_geometry(spacing):
    hu, truth, sp = ring_slice(spacing, n=int(400 / spacing))
    label = threshold_segment(hu, sp)
    assert label.shape == hu.shape and label.dtype == np.uint8
    dice = dice_per_tissue(label, truth)
    assert dice["sat"] > 0.97 and dice["vat"] > 0.97 and dice["muscle"] > 0.95, dice
    # The organ inside the wall is soft tissue but not muscle, and the table is never tissue.
    x = (np.arange(hu.shape[1]) - hu.shape[1] / 2) * spacing
    assert not label[:, x > 120].any()


def test_body_mask_cuts_table_and_fills_holes():
    hu, truth, sp = ring_slice(1.0)
    hu[190:210, 190:210] = -1000  # bowel gas inside the body
    body = body_mask(hu, sp)
    x = (np.arange(hu.shape[1]) - hu.shape[1] / 2)
    assert body[190:210, 190:210].all()
    assert not body[:, x > 124].any()
    assert body[truth > 0].all()


def test_threshold_on_phantoms_is_a_usable_baseline():
    for seed in (11, 12):
        ph = generate(seed)
        label = segment_volume(ph.hu, ph.spacing, method="threshold").label
        dice = dice_per_tissue(label, ph.label)
        # A baseline, not the final method: SAT is easy, the wall and psoas are not.
        assert dice["sat"] > 0.9 and dice["vat"] > 0.6 and dice["muscle"] > 0.65, (seed, dice)
        # Labels follow the HU rule exactly.
        assert np.all((ph.hu[label == L.MUSCLE] >= -29) & (ph.hu[label == L.MUSCLE] <= 150))
        fat = np.isin(label, (L.SAT, L.VAT, L.IMAT))
        assert np.all((ph.hu[fat] >= -190) & (ph.hu[fat] <= -30))


def test_threshold_empty_slice():
    hu = np.full((64, 64), -1000.0, np.float32)
    assert not threshold_segment(hu, (1.0, 1.0)).any()
