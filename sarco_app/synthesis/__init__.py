"""Synthesis: synthetic abdominal CT with exact body-composition labels, the training and test bed.

``phantom`` draws a randomised patient plan, lays out the anatomy of one axial slice at L1-L4,
renders it to HU (blur, noise) and writes NIfTI/DICOM with a manifest; ``phantom3d`` stacks such
slices into a lumbar volume with vertebrae, for the L3 locator and the volume-level tools.
"""
