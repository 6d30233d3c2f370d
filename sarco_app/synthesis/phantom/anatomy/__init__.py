"""Anatomy drawing: the tissue map of one phantom, painted step by step from its plan.

:func:`draw_anatomy` is the one place that says in which order the structures are painted;
later steps paint over earlier ones only where the tissue is still free (mostly visceral fat),
and each step draws from the random streams in turn, so the order is part of the phantom.
The steps live in:

* :mod:`.surface`: body outline and SAT, septa, skin, arms, table, field of view;
* :mod:`.musculoskeletal`: spine, back muscles, abdominal wall, psoas, ribs, IMAT;
* :mod:`.viscera`: diaphragm and lungs, vessels, organs, bowel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sarco_app.synthesis.phantom.anatomy.musculoskeletal import (
    abdominal_wall, back_muscles, imat, psoas_and_quadratus, ribs, spine_layout, vertebra,
)
from sarco_app.synthesis.phantom.anatomy.scene import Envelope, Scene
from sarco_app.synthesis.phantom.anatomy.surface import arms, body_outline, field_of_view, sat_details, skin, table
from sarco_app.synthesis.phantom.anatomy.viscera import (
    Organs, abdominal_organs, bowel, crura, diaphragm_and_lungs, great_vessels, small_vessels,
)
from sarco_app.synthesis.phantom.plan import Plan

__all__ = ["Anatomy", "Envelope", "Organs", "Scene", "draw_anatomy"]


@dataclass
class Anatomy:
    """The drawn slice (:class:`Scene`: supersampled tissue map, per-object HU offsets, body
    mask, params) and the organ choices the rendering needs (contrast phase)."""

    scene: Scene
    organs: Organs


def draw_anatomy(plan: Plan, rng: np.random.Generator, rng_upper: np.random.Generator,
                 params: dict) -> Anatomy:
    """Paint the tissue map of ``plan``. ``rng`` is the main random stream (continued after
    the plan); ``rng_upper`` the upper-abdomen stream (diaphragm, crura, lung bases,
    intercostal muscles). ``params`` (``Phantom.params``) receives what the steps record."""
    s = body_outline(plan, rng, params)
    spine = spine_layout(plan, rng)
    es_lat = back_muscles(s, plan, spine, rng)
    abdominal_wall(s, plan, es_lat, rng)
    psoas_lat, kidney_anchor = psoas_and_quadratus(s, plan, spine, rng)
    vertebra(s, plan, spine, rng)
    ribs(s, plan, rng, rng_upper)
    diaphragm_and_lungs(s, plan, rng_upper)
    vessels = great_vessels(s, plan, spine, rng)
    crura(s, plan, spine, vessels, rng_upper)
    organs = abdominal_organs(s, plan, spine, vessels, psoas_lat, kidney_anchor, rng)
    bowel(s, plan, organs, rng)
    small_vessels(s, plan, vessels, rng)
    imat(s, plan, rng)
    sat_details(s, plan, rng)
    skin(s, plan)
    if plan.arms:
        arms(s, plan, rng)
    table(s, rng)
    field_of_view(s, rng)
    return Anatomy(scene=s, organs=organs)
