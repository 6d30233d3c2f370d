"""Interaction: the annotator's corrections on top of an automatic segmentation.

The paper's two semi-automatic tools (``interactive``), the geometry of the regions a scribble
covers (``scribble_regions``) and the HU-edge stroke handling for organs labelled muscle
(``strokes``).
"""
