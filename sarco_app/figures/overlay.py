"""PNG overlays of a labelled axial slice (for review, reports and the cohort export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sarco_app import labels as L

#: Soft-tissue display window (width, level) in HU.
WINDOW = (400.0, 40.0)
#: Opacity of the label colours over the grey image.
LABEL_ALPHA = 0.4
DISPLAY_NAMES = {L.MUSCLE: "Muscle", L.SAT: "SAT", L.VAT: "VAT", L.IMAT: "IMAT"}
#: Line colours of ``overlay_png``'s outlines, in order (white, magenta, orange, blue).
OUTLINE_COLORS = ("#ffffff", "#ff00ff", "#ff9900", "#3399ff")


def label_rgba(label_yx: np.ndarray, alpha: float = LABEL_ALPHA) -> np.ndarray:
    """An RGBA float image (values 0-1) with ``labels.COLORS`` where ``label_yx`` > 0."""
    rgba = np.zeros(label_yx.shape + (4,), dtype=np.float32)
    for value, colour in L.COLORS.items():
        mask = label_yx == value
        rgba[mask, :3] = np.asarray(colour, dtype=np.float32) / 255.0
        rgba[mask, 3] = alpha
    return rgba


def overlay_png(
    hu_xy: np.ndarray,
    label_xy: np.ndarray | None,
    spacing: tuple[float, float],
    path: str | Path,
    title: str | None = None,
    areas: dict[str, float] | None = None,
    window: tuple[float, float] = WINDOW,
    dpi: int = 100,
    outlines: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a PNG of an axial slice with coloured labels and a legend.

    Parameters
    ----------
    hu_xy : ndarray, shape (X, Y)
        The slice in HU, canonical order (shown radiologically: anterior up, patient right on
        the picture's left).
    label_xy : ndarray, shape (X, Y), or None
        Label values 0-4; None draws the image only.
    spacing : (float, float)
        Pixel size (sx, sy) in mm; the picture keeps the true aspect ratio.
    path : str or Path
        Output PNG (parent folders are created).
    title : str, optional
        Text above the image.
    areas : dict, optional
        Tissue name ('muscle', 'sat', 'vat', 'imat') -> area in cm², shown in the legend.
    window : (float, float)
        Display window (width, level) in HU; W400/L40 by default.
    outlines : dict, optional
        Legend text -> boolean ``(X, Y)`` mask whose border is drawn as a line (e.g. the
        regions :mod:`sarco_app.segmentation.plausibility` derives), in ``OUTLINE_COLORS`` order.

    Returns
    -------
    Path of the written file.
    """
    # A Figure of its own (no pyplot, no matplotlib.use): the caller's backend is left alone.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    hu_xy = np.asarray(hu_xy)
    if hu_xy.ndim != 2:
        raise ValueError(f"overlay_png needs a 2D (X, Y) slice, got shape {hu_xy.shape}")
    if label_xy is not None and np.asarray(label_xy).shape != hu_xy.shape:
        raise ValueError(f"label shape {np.asarray(label_xy).shape} differs from slice {hu_xy.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, level = window
    sx, sy = float(spacing[0]), float(spacing[1])
    nx, ny = hu_xy.shape
    extent = (0.0, nx * sx, ny * sy, 0.0)  # millimetres, so the aspect ratio is physical

    aspect = (ny * sy) / max(nx * sx, 1e-6)
    fig_w = 7.0
    fig = Figure(figsize=(fig_w, fig_w * aspect * 0.78 + 0.8), dpi=dpi)
    ax = fig.subplots()
    ax.imshow(
        hu_xy.T,
        cmap="gray",
        vmin=level - width / 2,
        vmax=level + width / 2,
        extent=extent,
        interpolation="nearest",
    )
    handles = []
    if label_xy is not None:
        label_yx = np.asarray(label_xy).T
        ax.imshow(label_rgba(label_yx), extent=extent, interpolation="nearest")
        for value, name in DISPLAY_NAMES.items():
            tissue = L.NAMES[value]
            text = name
            if areas and areas.get(tissue) is not None:
                text += f": {areas[tissue]:.1f} cm²"
            handles.append(Patch(facecolor=np.asarray(L.COLORS[value]) / 255.0, edgecolor="none", label=text))
    for (text, mask), colour in zip((outlines or {}).items(), OUTLINE_COLORS):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != hu_xy.shape:
            raise ValueError(f"outline {text!r} shape {mask.shape} differs from slice {hu_xy.shape}")
        if mask.any():
            # Pixel centres in mm, so the line sits on the image drawn with ``extent``.
            xs = (np.arange(nx) + 0.5) * sx
            ys = (np.arange(ny) + 0.5) * sy
            ax.contour(xs, ys, mask.T.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.9)
        handles.append(Line2D([0], [0], color=colour, lw=1.2, label=text))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            fontsize=9,
        )
    ax.set_axis_off()
    # Radiological convention reminder: patient right is on the picture's left.
    ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="white", fontsize=9, va="center")
    ax.text(0.99, 0.5, "L", transform=ax.transAxes, color="white", fontsize=9, va="center", ha="right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight", dpi=dpi)
    return path
