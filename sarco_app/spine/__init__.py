"""Spine: finding the L3 vertebra in a CT volume, the level where body composition is measured.

``l3`` locates the third lumbar vertebra, picks the slice to measure and reports its answer.
"""
