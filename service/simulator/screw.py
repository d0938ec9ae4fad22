"""One screw: its shape (drawn at random within the scene's knobs) and its sprite.

A screw lies on its side on the belt and the camera looks straight down, so
the camera sees its profile: a head (pan, hex, countersunk or socket cap),
a smooth shank, a threaded part whose silhouette is serrated, a pointed
(wood screw) or chamfered (machine screw) end, and one painted band.

Geometry is in the screw's own frame: ``s`` runs along the axis from the
head's top (0) to the tip (``length``), ``v`` across it. Each sprite is
rendered in a small patch around the screw, with anti-aliased edges from the
distance to the silhouette and shading from a cylinder's normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from service.simulator.options import SceneOptions

# Resolution of the silhouette lookup along the axis: samples per pixel.
TABLE_STEPS = 4
# Head radius over shaft radius, at most (countersunk heads, below).
MAX_HEAD_RATIO = 2.1


def circle_per_length(options: SceneOptions) -> float:
    """Diameter of the circle holding any screw of the scene at any turn, per unit of
    length: the head is at most MAX_HEAD_RATIO shaft diameters wide."""
    widest_head = MAX_HEAD_RATIO / options.slenderness_range[0]
    return math.hypot(1.0, widest_head)


@dataclass(frozen=True)
class ScrewShape:
    """Dimensions in pixels; ``band`` is the painted stretch ``(s0, s1)`` along the axis."""

    length: float
    shaft_r: float
    head_r: float
    head_len: float
    head_type: str
    pointed: bool
    tip_len: float
    thread_start: float
    pitch: float
    thread_depth: float  # share of the shaft radius
    band: tuple[float, float]
    paint_bgr: tuple[float, float, float]
    zinc_bgr: tuple[float, float, float]

    @property
    def width(self) -> float:
        """Widest part across the axis: the head."""
        return 2.0 * self.head_r

    @property
    def radius(self) -> float:
        """Radius of the circle around the centre that holds the screw at any rotation."""
        return math.hypot(self.length / 2.0, self.head_r)

    def profile(self, sa: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Along-axis terms at positions ``sa``: radius without threads, whether in
        the head, how far into the head (0 top .. 1 face), and how threaded (0..1)."""
        rs, rh, hl = self.shaft_r, self.head_r, self.head_len
        head = sa < hl
        t_head = np.clip(sa / max(hl, 1e-3), 0.0, 1.0)
        if self.head_type == "pan":  # a dome
            head_profile = rh * (1.0 - (1.0 - t_head) ** 2.5) ** 0.4
        elif self.head_type == "countersunk":  # a cone
            head_profile = rh - (rh - rs) * t_head
        elif self.head_type == "hex":  # chamfered on top
            head_profile = rh * np.minimum(1.0, 0.88 + 0.8 * t_head)
        else:  # socket cap: a cylinder with a rounded top edge
            head_profile = rh * (1.0 - 0.2 * (1.0 - np.minimum(1.0, 4.0 * t_head)) ** 3)
        rb = np.where(head, head_profile, np.float32(rs))
        to_tip = np.clip((self.length - sa) / self.tip_len, 0.0, 1.0)
        rb *= to_tip if self.pointed else 0.75 + 0.25 * to_tip
        # Threads finer than about 3 px would only alias, so they fade out
        crisp = min(1.0, max(0.0, (self.pitch - 1.5) / 2.0))
        threaded = _smooth_step(sa - self.thread_start) * crisp
        return rb.astype(np.float32), head, t_head.astype(np.float32), threaded

    def thread_phase(self, sa: np.ndarray) -> np.ndarray:
        """Turns of the helix at ``sa`` on the axis (crest on the -v edge at whole turns)."""
        return (sa - self.thread_start) / self.pitch + 0.25

    @cached_property
    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Silhouette half-widths on the -v and +v sides, every 1/TABLE_STEPS px along
        the axis from -1 to length + 1 (a lookup is far cheaper than the formulas)."""
        sa = np.arange(-TABLE_STEPS, int((self.length + 1) * TABLE_STEPS) + 2, dtype=np.float32)
        sa = np.clip(sa / TABLE_STEPS, 0.0, self.length)  # ends: the end caps cut them
        rb, _, _, threaded = self.profile(sa)
        phase = self.thread_phase(sa)
        edges = []
        for side in (-0.25, 0.25):  # the crest on the +v edge is half a turn further
            root = 0.5 - 0.5 * np.cos(2 * np.pi * (phase + side))
            edges.append(rb * (1.0 - self.thread_depth * root * threaded))
        return edges[0], edges[1]


def make_shape(
    rng: np.random.Generator,
    options: SceneOptions,
    paint_bgr: tuple[float, float, float],
    zinc_bgr: tuple[float, float, float],
    max_length: float,
) -> ScrewShape:
    """A random screw within the scene's size, head and band knobs."""
    u = rng.uniform
    lo, hi = options.length_range
    hi = min(hi, max_length)
    length = float(u(min(lo, hi), hi))
    diameter = length / u(*options.slenderness_range)
    shaft_r = diameter / 2.0

    # Head
    head_type = str(rng.choice(options.head_types))
    if head_type == "pan":
        head_r, head_len = shaft_r * u(1.7, 2.0), diameter * u(0.55, 0.75)
    elif head_type == "hex":
        head_r, head_len = shaft_r * u(1.6, 1.9), diameter * u(0.6, 0.8)
    elif head_type == "countersunk":
        head_r = shaft_r * u(1.8, MAX_HEAD_RATIO)
        head_len = (head_r - shaft_r) * u(0.9, 1.2)  # a 90 degree cone
    else:  # socket cap: about as tall as it is wide
        head_r, head_len = shaft_r * u(1.45, 1.7), diameter * u(0.9, 1.05)
    head_len = min(head_len, 0.3 * length)

    # Shaft, threads and tip
    pointed = bool(rng.random() < options.pointed_fraction)
    tip_len = diameter * u(1.0, 1.8) if pointed else diameter * 0.15
    shaft_len = length - head_len
    thread_start = head_len + shaft_len * u(0.0, 0.4)
    pitch = max(1.6, diameter * u(0.3, 0.6))

    # Band: somewhere on the shaft, at least 4 px wide so even a 40 px screw shows it
    band_w = max(4.0, shaft_len * u(*options.band_width_range))
    centre = head_len + shaft_len * u(*options.band_position_range)
    s0 = max(head_len + 1.0, centre - band_w / 2)
    s1 = min(length - 0.5 * tip_len, s0 + band_w)
    s0 = max(head_len + 1.0, min(s0, s1 - 4.0))

    jitter = 1.0 + rng.uniform(-0.03, 0.03, 3)
    return ScrewShape(
        length=length,
        shaft_r=shaft_r,
        head_r=head_r,
        head_len=head_len,
        head_type=head_type,
        pointed=pointed,
        tip_len=tip_len,
        thread_start=thread_start,
        pitch=pitch,
        thread_depth=float(u(0.1, 0.2)),
        band=(float(s0), float(s1)),
        paint_bgr=paint_bgr,
        zinc_bgr=tuple(float(z * j) for z, j in zip(zinc_bgr, jitter, strict=True)),
    )


@dataclass
class Sprite:
    """A rendered screw: colour and coverage in a patch at (x0, y0) in frame pixels.

    ``shadow`` (or None) is the darkening of the belt, 0..1, in the same patch
    grown by ``shadow_pad`` on every side. ``bbox`` is the screw's axis-aligned
    box (x, y, w, h), not clipped to the frame, or None when nothing is covered.
    """

    x0: int
    y0: int
    colour: np.ndarray  # float32 (h, w, 3), display units under the belt's light
    alpha: np.ndarray  # float32 (h, w), 0..1
    shadow: np.ndarray | None  # float32 (h + 2 pad, w + 2 pad)
    shadow_pad: int
    bbox: tuple[int, int, int, int] | None


def _smooth_step(x: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by a half-plane at signed distance x (1 px ramp)."""
    return np.clip(x + 0.5, 0.0, 1.0)


def render(
    shape: ScrewShape,
    cx: float,
    cy: float,
    angle_deg: float,
    light: np.ndarray,
    options: SceneOptions,
) -> Sprite:
    """Draw ``shape`` with its axis centre at (cx, cy), head-to-tip at ``angle_deg``.

    ``light`` is the unit vector towards the key light (x right, y down, z up).
    """
    sh = shape
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    length, rh = sh.length, sh.head_r

    # The box around the rotated screw (and room for its shadow); shading is
    # computed only where the screw covers a pixel
    lx, ly, lz = (float(x) for x in light)  # Python floats keep the arrays float32
    lz = max(lz, 0.2)
    off_x, off_y = -lx / lz * rh, -ly / lz * rh
    pad = math.ceil(max(abs(off_x), abs(off_y)) + 3 * options.shadow_softness_px + 2)
    ex = abs(c) * length / 2 + abs(s) * rh
    ey = abs(s) * length / 2 + abs(c) * rh
    ix0, ix1 = math.floor(cx - ex) - 1, math.ceil(cx + ex) + 2
    iy0, iy1 = math.floor(cy - ey) - 1, math.ceil(cy + ey) + 2
    dx = np.arange(ix0, ix1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(iy0, iy1, dtype=np.float32)[:, None] - np.float32(cy)
    sa = dx * c + dy * s + np.float32(length / 2)  # along the axis, 0 at the head's top
    v = dy * c - dx * s  # across the axis

    # Coverage: distance to the silhouette (looked up by position on the axis
    # and side), times the end caps
    edge_neg, edge_pos = sh._edges
    k = np.clip((sa + 1.0) * TABLE_STEPS + 0.5, 0, edge_neg.size - 1).astype(np.intp)
    half_width = np.where(v > 0, edge_pos[k], edge_neg[k])
    ends = np.minimum(sa, length - sa)
    inner = _smooth_step(half_width - np.abs(v)) * _smooth_step(ends)

    # Shading, on the covered pixels only
    on = np.flatnonzero(inner)
    colour_inner = np.zeros((inner.size, 3), np.float32)
    if on.size:
        lu, lv = lx * c + ly * s, ly * c - lx * s
        colour_inner[on] = _shade(sh, options, sa.ravel()[on], v.ravel()[on], (lu, lv, lz))

    alpha = inner
    colour = colour_inner.reshape((*inner.shape, 3))

    # Shadow, in a patch padded around the screw: the blurred silhouette moved
    # away from the light (whole pixels are fine for a soft shadow), and a
    # contact shadow along the line where the screw rests on the belt
    shadow = None
    if options.shadow_strength > 0:
        padded = cv2.copyMakeBorder(alpha, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        soft = cv2.GaussianBlur(padded, (0, 0), max(options.shadow_softness_px, 0.3))
        shadow = 0.6 * soft
        ox, oy = round(off_x), round(off_y)
        h, w = soft.shape
        moved = shadow[max(oy, 0) : h + min(oy, 0), max(ox, 0) : w + min(ox, 0)]
        np.maximum(
            moved, soft[max(-oy, 0) : h + min(-oy, 0), max(-ox, 0) : w + min(-ox, 0)], out=moved
        )
        shadow *= np.float32(options.shadow_strength)

    # Box of the covered pixels
    covered = alpha > 0.5
    cols = np.flatnonzero(covered.any(axis=0))
    rows = np.flatnonzero(covered.any(axis=1))
    bbox = None
    if cols.size:
        bbox = (
            ix0 + int(cols[0]),
            iy0 + int(rows[0]),
            int(cols[-1] - cols[0] + 1),
            int(rows[-1] - rows[0] + 1),
        )
    return Sprite(
        x0=ix0,
        y0=iy0,
        colour=colour,
        alpha=alpha.astype(np.float32, copy=False),
        shadow=shadow,
        shadow_pad=pad,
        bbox=bbox,
    )


def _shade(
    sh: ScrewShape,
    options: SceneOptions,
    sa: np.ndarray,
    v: np.ndarray,
    light: tuple[float, float, float],
) -> np.ndarray:
    """Colour (N, 3) of covered pixels, from their axis coordinates and the light.

    ``light`` is the direction towards the key light in the screw's frame
    (along, across, up). Brightness is relative to the flat belt under the
    same light, so a band facing up shows its palette colour as the belt shows
    its own; the scene's light and white balance scale both alike later.
    """
    lu, lv, lz = light
    rb, head, t_head, threaded = sh.profile(sa)
    base_phase = sh.thread_phase(sa)

    # Normals: a cylinder across v; the pan dome and the cone lean towards the head
    nv = np.clip(v / np.maximum(rb, 0.5), -1.0, 1.0)
    if sh.head_type == "hex":  # flat faces of a hexagon seen across flats
        facet = np.where(np.abs(nv) < 0.5, 0.0, np.sign(nv) * 0.866).astype(np.float32)
        nv = np.where(head, facet, nv)
    nz = np.sqrt(1.0 - nv * nv)
    if sh.head_type == "pan":
        ns = np.where(head, -0.8 * (1.0 - t_head), 0.0).astype(np.float32)
    elif sh.head_type == "countersunk":
        ns = np.where(head, -0.5, 0.0).astype(np.float32)
    else:
        ns = np.zeros_like(nv)
    norm = np.sqrt(ns * ns + nv * nv + nz * nz)
    ns, nv, nz = ns / norm, nv / norm, nz / norm

    # Diffuse relative to the flat belt, Blinn highlight towards the camera
    h_norm = math.sqrt(lu * lu + lv * lv + (lz + 1.0) ** 2)
    hu, hv, hz = lu / h_norm, lv / h_norm, (lz + 1.0) / h_norm
    diffuse = np.clip(ns * lu + nv * lv + nz * lz, 0.0, None) / lz
    n_dot_h = np.clip(ns * hu + nv * hv + nz * hz, 0.0, 1.0)

    # Thread grooves, shaded darker, with the helix slanting across the shaft
    root = 0.5 - 0.5 * np.cos(2 * np.pi * (base_phase + 0.25 * np.clip(v / sh.shaft_r, -1, 1)))
    groove = root**1.5 * threaded

    # Zinc
    shininess = 8.0 + 250.0 * (1.0 - options.metal_roughness) ** 2
    metal_shade = (0.3 + 0.5 * diffuse + 0.2 * nz * nz) * (1.0 - 0.5 * groove)
    metal_spec = 255.0 * options.metal_specular * n_dot_h**shininess * (1.0 - 0.6 * groove)
    colour = metal_shade[:, None] * np.asarray(sh.zinc_bgr, np.float32) + metal_spec[:, None]

    # Paint: diffuse with a softer gloss, filling the grooves partly
    b0, b1 = sh.band
    band = _smooth_step(sa - b0) * _smooth_step(b1 - sa)
    painted = np.flatnonzero(band)
    if painted.size:
        p_shade = (0.3 + 0.7 * diffuse[painted]) * (1.0 - 0.25 * groove[painted])
        p_spec = 255.0 * options.paint_gloss * n_dot_h[painted] ** 24.0
        paint = p_shade[:, None] * np.asarray(sh.paint_bgr, np.float32) + p_spec[:, None]
        k = band[painted][:, None]
        colour[painted] += k * (paint - colour[painted])
    return colour
