"""The slice being drawn: pixel grid, tissue map and coordinates along the muscle envelope."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sarco_app.synthesis.phantom.geometry import Canvas
from sarco_app.synthesis.phantom.tissues import T


class Envelope:
    """The outer fascia of the muscle wall and back muscles (polygon in patient mm) and the
    signed arc length along it: 0 at the anterior midline, positive on the patient's left."""

    def __init__(self, polygon: np.ndarray):
        self.polygon = polygon
        seg = np.hypot(*np.diff(np.vstack([polygon, polygon[:1]]), axis=0).T)
        self._s = np.concatenate([[0.0], np.cumsum(seg)])  # len n+1, s[-1] = perimeter
        self.perimeter = float(self._s[-1])
        ang = np.unwrap(np.arctan2(polygon[:, 1], polygon[:, 0]))
        self._ang = np.append(ang, ang[0] + 2 * np.pi)
        self._rad = np.hypot(polygon[:, 0], polygon[:, 1])

    def arc_position(self, u, v) -> np.ndarray:
        """Signed arc length (mm) along the envelope from the anterior midline of the envelope
        point nearest to the polar angle of (u, v); positive on the patient's left."""
        ang = self._ang
        th = (np.arctan2(v, u) - ang[0]) % (2 * np.pi) + ang[0]
        arc = np.interp(th, ang, self._s)
        half = self.perimeter / 2
        return np.where(arc <= half, arc, arc - self.perimeter).astype(np.float32)

    def arc_of_point(self, u: float, v: float) -> float:
        return float(self.arc_position(np.array([u]), np.array([v]))[0])

    def point_at_arc(self, arc_signed: float):
        """Envelope point (u, v) and inward unit normal at a signed arc position."""
        env = self.polygon
        a = arc_signed % self.perimeter
        idx = int(np.clip(np.searchsorted(self._s, a), 1, len(env) - 1))
        p = env[idx % len(env)]
        tangent = env[(idx + 1) % len(env)] - env[(idx - 1) % len(env)]
        tangent = tangent / (np.linalg.norm(tangent) + 1e-9)
        normal = np.array([-tangent[1], tangent[0]])  # polygon runs counter-clockwise in (u, v)
        if normal @ (-p) < 0:
            normal = -normal
        return p, normal

    def polar(self, theta):
        """Envelope point at polar angle ``theta`` (interpolated on the polygon)."""
        ang, rad = self._ang[:-1], self._rad
        th = (np.asarray(theta) - ang[0]) % (2 * np.pi) + ang[0]
        r = np.interp(th, np.append(ang, ang[0] + 2 * np.pi), np.append(rad, rad[0]))
        return r * np.cos(theta), r * np.sin(theta)


@dataclass
class Scene:
    """The supersampled pixel grid of one phantom while its anatomy is drawn.

    ``tissue`` (uint8 :class:`~sarco_app.synthesis.phantom.tissues.T` ids) and ``hu_offset`` (per-object HU
    shifts) are painted in place by the drawing steps; the rest is fixed once the body outline
    exists. ``d_in`` and ``arc`` are curvilinear coordinates inside the envelope: depth (mm) and
    signed arc position of the nearest envelope point.
    """

    cv: Canvas
    size: int
    tissue: np.ndarray
    hu_offset: np.ndarray
    envelope: Envelope
    env_mask: np.ndarray
    body: np.ndarray
    d_in: np.ndarray
    arc: np.ndarray
    #: ``Phantom.params``, which the drawing steps extend.
    params: dict[str, Any]

    def free(self) -> np.ndarray:
        """Pixels still visceral fat (where organs, bowel and vessels may go)."""
        return self.tissue == T.VAT_FAT
