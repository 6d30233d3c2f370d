"""Measurement: from a labelled slice to sarcopenia numbers for one patient or a cohort.

Areas, indices and mean HU per tissue with the published cut-offs (``quantify``), T-scores
against reference tables (``reference``, data in ``references/``), label agreement against
reference labels (``evaluate``), and cohort tables from labels or raw CT (``cohort``,
``cohort_raw``).
"""
