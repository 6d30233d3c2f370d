"""Segmentation: labelling muscle, SAT, VAT and IMAT on an axial slice.

The network (``network``) and its training (``train``), inference over slices and volumes
(``segment``), the HU-threshold baseline and its morphology kernels (``threshold``),
pseudo-labels for the human-in-the-loop cycle (``pseudo``) and the anatomical plausibility
checks that flag a doubtful result (``plausibility``).
"""
