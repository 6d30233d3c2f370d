"""Tissue classes of the phantom's tissue map and the per-level anatomy tables.

The tissue map holds one small integer per pixel (:class:`T`); :data:`LABEL_OF` and
:data:`ORGAN_OF` turn it into body-composition labels and organ classes. :data:`LEVEL_ANATOMY`
holds, per vertebral level, the sizes and probabilities of the structures that change along the
spine: the place to tune the anatomy of one level.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sarco_app import labels

# --------------------------------------------------------------------------- tissue classes

TISSUE_NAMES = (
    "air", "outside_fov", "skin", "sat_fat", "sat_septum", "vat_fat", "imat_fat", "fascia",
    "rectus", "wall_muscle", "psoas", "quadratus", "erector", "latissimus",
    "bone_cortex", "bone_marrow", "csf", "epidural_fat", "cartilage",
    "kidney_cortex", "kidney_medulla", "urine", "liver", "spleen", "pancreas", "gallbladder",
    "artery", "vein", "small_vessel", "calcification", "thrombus",
    "bowel_wall", "bowel_fluid", "bowel_air", "bowel_contrast", "feces", "stomach_wall",
    "table_shell", "table_core", "pad",
    "arm_skin", "arm_fat", "arm_muscle",
    "diaphragm", "lung",
)


class T:
    """Integer id of every tissue class of the tissue map."""


for _i, _name in enumerate(TISSUE_NAMES):
    setattr(T, _name.upper(), _i)

MUSCLES = (T.RECTUS, T.WALL_MUSCLE, T.PSOAS, T.QUADRATUS, T.ERECTOR, T.LATISSIMUS)
BOWEL = (T.BOWEL_WALL, T.BOWEL_FLUID, T.BOWEL_AIR, T.BOWEL_CONTRAST, T.FECES)
#: Tissue id -> label value.
LABEL_OF = np.zeros(len(TISSUE_NAMES), dtype=np.uint8)
LABEL_OF[list(MUSCLES)] = labels.MUSCLE
LABEL_OF[T.SAT_FAT] = labels.SAT
LABEL_OF[T.SAT_SEPTUM] = labels.SAT  # thin septa are part of the fat compartment
LABEL_OF[T.VAT_FAT] = labels.VAT
LABEL_OF[T.IMAT_FAT] = labels.IMAT
#: Tissue id -> organ class (position in ``labels.ORGAN_NAMES`` + 1; 0 none).
ORGAN_OF = np.zeros(len(TISSUE_NAMES), dtype=np.uint8)
for _names, _organ in (
    (("liver", "gallbladder"), "liver"),
    (("spleen",), "spleen"),
    (("kidney_cortex", "kidney_medulla", "urine"), "kidney"),
    (("bowel_wall", "bowel_fluid", "bowel_air", "bowel_contrast", "feces", "stomach_wall"), "bowel"),
    (("bone_cortex", "bone_marrow", "cartilage", "csf", "epidural_fat"), "bone"),
    (("diaphragm",), "diaphragm"),
    (("pancreas", "artery", "vein", "calcification", "thrombus", "lung"), "other_organ"),
):
    ORGAN_OF[[TISSUE_NAMES.index(n) for n in _names]] = labels.ORGAN_NAMES.index(_organ) + 1

# Per level: relative sizes / probabilities of the structures that change along the spine.
LEVEL_ANATOMY: dict[str, dict[str, Any]] = {
    #        share of the skeletal muscle area          vertebra half width/depth (mm)
    # T11/T12: the liver and spleen fill the cavity and lie on the diaphragm against the ribs and
    # intercostal muscles; lung bases behind the diaphragm; hardly any psoas yet.
    "T11": dict(es=0.52, psoas=0.004, ql=0.01, rectus=0.07, wall=0.40, vb_w=17.5, vb_d=13.5,
                tp=0.35, kidney=0.45, kidney_p=0.25, hilum_p=0.0, liver=1.3, spleen_p=0.95,
                stomach_p=0.9, pancreas_p=0.1, gallbladder_p=0.3, duodenum_p=0.0, ribs=5,
                latissimus_p=1.0, cavity=1.35, iliac_p=0.0, sma_p=0.1,
                dia=1.0, crus=1.0, lung=0.85, rib_arc=(0.12, 0.92)),
    "T12": dict(es=0.47, psoas=0.012, ql=0.025, rectus=0.075, wall=0.42, vb_w=18.5, vb_d=14.0,
                tp=0.4, kidney=0.7, kidney_p=0.7, hilum_p=0.15, liver=1.2, spleen_p=0.95,
                stomach_p=0.9, pancreas_p=0.45, gallbladder_p=0.35, duodenum_p=0.05, ribs=4.5,
                latissimus_p=1.0, cavity=1.28, iliac_p=0.0, sma_p=0.5,
                dia=0.95, crus=1.0, lung=0.5, rib_arc=(0.15, 0.9)),
    "L1": dict(es=0.38, psoas=0.035, ql=0.045, rectus=0.08, wall=0.46, vb_w=20.0, vb_d=14.5,
               tp=0.45, kidney=1.0, kidney_p=0.97, hilum_p=0.55, liver=1.0, spleen_p=0.9,
               stomach_p=0.85, pancreas_p=0.75, gallbladder_p=0.3, duodenum_p=0.2, ribs=4,
               latissimus_p=1.0, cavity=1.18, iliac_p=0.0, sma_p=0.9,
               dia=0.7, crus=0.9, lung=0.0, rib_arc=(0.3, 0.85)),
    "L2": dict(es=0.34, psoas=0.075, ql=0.06, rectus=0.08, wall=0.445, vb_w=21.5, vb_d=15.5,
               tp=0.8, kidney=0.95, kidney_p=0.95, hilum_p=0.7, liver=0.55, spleen_p=0.35,
               stomach_p=0.3, pancreas_p=0.55, gallbladder_p=0.25, duodenum_p=0.45, ribs=1.5,
               latissimus_p=0.8, cavity=1.07, iliac_p=0.0, sma_p=0.85,
               dia=0.3, crus=0.6, lung=0.0, rib_arc=(0.3, 0.85)),
    "L3": dict(es=0.30, psoas=0.125, ql=0.045, rectus=0.09, wall=0.44, vb_w=23.0, vb_d=16.5,
               tp=1.0, kidney=0.8, kidney_p=0.75, hilum_p=0.2, liver=0.25, spleen_p=0.06,
               stomach_p=0.0, pancreas_p=0.0, gallbladder_p=0.05, duodenum_p=0.5, ribs=0.2,
               latissimus_p=0.45, cavity=1.0, iliac_p=0.0, sma_p=0.7,
               dia=0.0, crus=0.0, lung=0.0, rib_arc=(0.3, 0.85)),
    "L4": dict(es=0.27, psoas=0.18, ql=0.05, rectus=0.08, wall=0.42, vb_w=24.0, vb_d=17.0,
               tp=0.85, kidney=0.35, kidney_p=0.2, hilum_p=0.0, liver=0.0, spleen_p=0.0,
               stomach_p=0.0, pancreas_p=0.0, gallbladder_p=0.0, duodenum_p=0.15, ribs=0.0,
               latissimus_p=0.1, cavity=0.95, iliac_p=0.6, sma_p=0.3,
               dia=0.0, crus=0.0, lung=0.0, rib_arc=(0.3, 0.85)),
}


#: Calibrated ratio planned / drawn muscle area (bone overlap, envelope clipping, IMAT).
MUSCLE_GAIN = 1.0 / 0.90
