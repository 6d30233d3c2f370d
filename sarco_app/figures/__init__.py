"""Figures: pictures of the results for people to check.

Label overlays on the CT slice (``overlay``) and sagittal/coronal reconstructions with the
chosen L3 level drawn, checked before a slice is labelled (``views``).
"""
