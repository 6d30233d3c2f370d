"""sarco: body-composition labelling and sarcopenia measurement on abdominal CT.

The domain library. Plain numpy / torch / OpenCV functions, no server imports:
the MONAI Label app in ``apps/sarcopenia`` and the CLI (``python -m sarco_app``)
are thin layers over it.
"""

__version__ = "0.1.0"
