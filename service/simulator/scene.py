"""The belt scene over time: arrivals, motion, rendering and the ground truth.

Screws arrive as a Poisson process at ``rate`` per second, enter at the
upstream edge and ride the belt, spinning slowly. Each one keeps a bounding
circle (its radius covers every rotation) clear of every other by at least
``min_gap_px``, so screws never touch however they spin. When there is no
room at the entry an arrival waits, as it would in the feeder.

NOTE: the bounding circles are conservative: two long screws lying side by
side are never closer than their lengths allow, so scenes are sparser than a
real feeder can pack them (and a rate the belt cannot hold drops arrivals,
counted in ``dropped_arrivals``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from service.errors import UsageError
from service.palette import BandColour, default_palette
from service.simulator import screw as screw_mod
from service.simulator.belt import BeltTexture, Lighting
from service.simulator.camera import Camera, apply_colour, colour_matrix, jpeg_round_trip
from service.simulator.options import MAX_SCREW_LENGTH, MIN_SCREW_LENGTH, SceneOptions

logger = logging.getLogger(__name__)

# Arrivals that found no room wait here; past this many the feeder is
# overrun and the oldest is dropped (counted in ``dropped_arrivals``).
MAX_WAITING = 32
# Tries at a random lateral position before an arrival waits a frame.
PLACEMENT_TRIES = 10
# Every screw is fully in view for at least this many frames (DESIGN.md says 3).
MIN_FRAMES_IN_VIEW = 4
# Space kept between a screw's bounding circle and the belt's top and bottom edges.
EDGE_MARGIN_PX = 2.0


@dataclass(frozen=True)
class ObjectTruth:
    """Where one screw is in one frame.

    ``angle_deg`` is the long axis's direction in image coordinates (x right,
    y down) in [0, 180); ``length`` and ``width`` (px) cover the whole screw
    with its head; ``bbox`` (x, y, w, h) is clipped to the frame, and
    ``fully_visible`` says no part of the screw lies outside it.
    """

    id: int
    label: str
    cx: float
    cy: float
    angle_deg: float
    length: float
    width: float
    bbox: tuple[int, int, int, int]
    fully_visible: bool


@dataclass(frozen=True)
class SimFrame:
    """One rendered frame: uint8 BGR ``image`` and every screw at least partly in it."""

    index: int
    image: np.ndarray
    objects: list[ObjectTruth]
    time_s: float = 0.0


@dataclass
class _Screw:
    id: int
    label: str
    shape: screw_mod.ScrewShape
    cx: float
    cy: float
    heading_deg: float  # head-to-tip direction, [0, 360)
    spin_deg_s: float


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise UsageError(f"{name} {value!r} is outside [{low:g}, {high:g}]")


class BeltSimulator:
    """Renders a conveyor belt carrying banded screws, frame by frame, with the truth.

    >>> sim = BeltSimulator(width=640, height=360, fps=30.0, rate=2.0, seed=1)
    >>> frame = sim.next_frame()  # SimFrame: index, image (H, W, 3) uint8 BGR, objects

    The same arguments and seed always give the same frames. ``options=None``
    draws every knob with ``SceneOptions.randomised(seed)``; ``labels=None``
    paints the default palette. Set ``label_weights`` before the first frame
    to steer which classes arrive (e.g. to balance a dataset).

    One line (one belt, light and camera) with new screws on it:
    ``options=SceneOptions.randomised(L), camera_seed=L`` with any other
    ``seed``; the seed then draws the screws, their arrivals and the noise.
    """

    def __init__(
        self,
        width: int = 1280,
        height: int = 720,
        fps: float = 30.0,
        rate: float = 2.0,
        seed: int | None = 0,
        options: SceneOptions | None = None,
        labels: Sequence[BandColour] | None = None,
        camera_seed: int | None = None,
    ) -> None:
        _check_range("width", width, 64, 3840)
        _check_range("height", height, 64, 2160)
        _check_range("fps", fps, 1.0, 1000.0)
        _check_range("rate", rate, 0.0, 1000.0)
        self.width, self.height = int(width), int(height)
        self.fps, self.rate = float(fps), float(rate)
        self.options = o = options if options is not None else SceneOptions.randomised(seed)
        self.labels: tuple[BandColour, ...] = tuple(labels) if labels else default_palette()
        self._weights = np.full(len(self.labels), 1.0 / len(self.labels))

        # Independent random streams, so e.g. a different noise level does not
        # change where the screws go
        streams = np.random.SeedSequence(seed).spawn(5)
        if camera_seed is not None:
            # One line's camera: the colour response of the scene `camera_seed`
            streams[4] = np.random.SeedSequence(camera_seed).spawn(5)[4]
        rng_belt, rng_light, rng_camera, self._rng_arrivals, rng_colour = (
            np.random.default_rng(s) for s in streams
        )

        # The largest screw whose bounding circle fits across the belt, and
        # that has room along it to be fully in view
        circle = screw_mod.circle_per_length(o)
        self.max_length = min(
            MAX_SCREW_LENGTH,
            (self.height - 2 * EDGE_MARGIN_PX) / circle,
            self.width / 2.0,
        )
        if self.max_length < MIN_SCREW_LENGTH:
            raise UsageError(
                f"frame {self.width}x{self.height} is too small for {MIN_SCREW_LENGTH:g} px "
                f"screws; use at least 160x120"
            )

        # Belt speed: capped so even the largest screw is fully in view for
        # MIN_FRAMES_IN_VIEW frames
        wanted = self.width / o.crossing_s / self.fps
        limit = (self.width - circle * self.max_length) / (MIN_FRAMES_IN_VIEW + 1)
        self.speed_px_per_frame = min(wanted, limit)
        self.speed_px_s = self.speed_px_per_frame * self.fps
        if wanted > limit:
            logger.debug("belt speed capped from %.1f to %.1f px/frame", wanted, limit)

        # Colours through the camera's response; the belt, light and camera
        self._colour_matrix = colour_matrix(o, rng_colour)
        belt_options = o.replace(belt_bgr=apply_colour(self._colour_matrix, o.belt_bgr))
        self._zinc = apply_colour(self._colour_matrix, o.zinc_bgr)
        self._belt = BeltTexture(self.width, self.height, belt_options, rng_belt)
        self._light = Lighting(self.width, self.height, self.fps, o, rng_light)
        self._camera = Camera(self.width, self.height, self.speed_px_per_frame, o, rng_camera)

        # State
        self.index = 0
        self._t = 0.0
        self._belt_shift = 0.0
        self._screws: list[_Screw] = []
        self._waiting: deque[tuple[float, str, screw_mod.ScrewShape]] = deque()
        self._next_id = 1
        self._next_arrival = self._draw_gap(0.0)
        self._started = False
        self.screws_placed = 0  # arrivals put on the belt so far (warm-up included)
        self.dropped_arrivals = 0  # arrivals dropped because the belt was full

    # ----------------------------------------------------------------- public
    @property
    def label_weights(self) -> np.ndarray:
        """Relative chance of each label (in ``labels`` order) for new arrivals."""
        return self._weights.copy()

    @label_weights.setter
    def label_weights(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(self.labels),) or (w < 0).any() or not w.sum() > 0:
            raise UsageError(
                f"label_weights needs {len(self.labels)} non-negative numbers, not all 0; "
                f"got {list(weights)!r}"
            )
        self._weights = w / w.sum()

    def next_frame(self, compress: bool = False) -> SimFrame:
        """Render the current frame, then move the belt on by one frame time.

        ``compress=True`` returns the image after a JPEG round trip at the
        scene's ``jpeg_quality``, like a frame decoded from an encoded stream.
        """
        self._start()
        image, objects = self._render()
        if compress:
            image = self.compress(image)
        frame = SimFrame(index=self.index, image=image, objects=objects, time_s=self._t)
        self._step()
        return frame

    def advance(self, frames: int) -> None:
        """Skip ``frames`` frames without rendering them (the belt keeps moving)."""
        self._start()
        for _ in range(frames):
            self._step()

    def compress(self, image: np.ndarray) -> np.ndarray:
        """``image`` with video-like compression artefacts at the scene's quality."""
        return jpeg_round_trip(image, self.options.jpeg_quality)

    # ----------------------------------------------------------------- motion
    def _start(self) -> None:
        """Run the belt (unrendered) until it is as full as in steady state."""
        if self._started:
            return
        self._started = True
        fill = math.ceil((self.width + 2 * self.max_length) / self.speed_px_per_frame)
        self._t = -fill / self.fps
        self._next_arrival = self._draw_gap(self._t)
        for _ in range(fill):
            self._step(count=False)

    def _draw_gap(self, after: float) -> float:
        if self.rate <= 0:
            return math.inf
        return after + float(self._rng_arrivals.exponential(1.0 / self.rate))

    def _step(self, count: bool = True) -> None:
        dt = 1.0 / self.fps
        self._t += dt
        if count:
            self.index += 1
        move = self.options.direction * self.speed_px_per_frame
        self._belt_shift += move
        for s in self._screws:
            s.cx += move
            s.heading_deg = (s.heading_deg + s.spin_deg_s * dt) % 360.0
        self._screws = [s for s in self._screws if not self._gone(s)]

        while self._next_arrival <= self._t:
            self._waiting.append(self._new_arrival(self._next_arrival))
            self._next_arrival = self._draw_gap(self._next_arrival)
        while len(self._waiting) > MAX_WAITING:
            self._waiting.popleft()
            if self.dropped_arrivals == 0:
                logger.warning(
                    "rate %.2g/s overruns a %dx%d belt; dropping arrivals (counted)",
                    self.rate, self.width, self.height,
                )  # fmt: skip
            self.dropped_arrivals += 1
        self._place_waiting()

    def _gone(self, s: _Screw) -> bool:
        r = s.shape.radius
        return s.cx - r > self.width if self.options.direction > 0 else s.cx + r < 0

    def _new_arrival(self, t: float) -> tuple[float, str, screw_mod.ScrewShape]:
        rng = self._rng_arrivals
        colour = self.labels[int(rng.choice(len(self.labels), p=self._weights))]
        jitter = 1.0 + self.options.paint_jitter * rng.standard_normal(3)
        paint = apply_colour(self._colour_matrix, np.asarray(colour.bgr) * jitter)
        shape = screw_mod.make_shape(rng, self.options, paint, self._zinc, self.max_length)
        return (t, colour.name, shape)

    def _place_waiting(self) -> None:
        rng = self._rng_arrivals
        o = self.options
        still_waiting: deque = deque()
        for t_arrival, label, shape in self._waiting:
            r = shape.radius
            # Where it would be had it entered on time, but never more than one
            # frame's travel inside (a late arrival must not pop up mid-frame)
            travel = min((self._t - t_arrival) * self.speed_px_s, self.speed_px_per_frame)
            cx = -r - 1.0 + travel if o.direction > 0 else self.width + r + 1.0 - travel
            low, high = r + EDGE_MARGIN_PX, self.height - r - EDGE_MARGIN_PX
            for _ in range(PLACEMENT_TRIES):
                cy = float(rng.uniform(low, high)) if high > low else self.height / 2.0
                if self._has_room(cx, cy, r):
                    spin = float(rng.uniform(-o.max_spin_deg_s, o.max_spin_deg_s))
                    heading = float(rng.uniform(0.0, 360.0))
                    self._screws.append(_Screw(self._next_id, label, shape, cx, cy, heading, spin))
                    self._next_id += 1
                    self.screws_placed += 1
                    break
            else:
                still_waiting.append((t_arrival, label, shape))
        self._waiting = still_waiting

    def _has_room(self, cx: float, cy: float, r: float) -> bool:
        gap = self.options.min_gap_px
        return all(
            math.hypot(s.cx - cx, s.cy - cy) >= s.shape.radius + r + gap for s in self._screws
        )

    # ------------------------------------------------------------- rendering
    def _render(self) -> tuple[np.ndarray, list[ObjectTruth]]:
        w, h = self.width, self.height
        belt = self._belt.view(self._belt_shift)

        # Sprites of the screws at least partly in view, with their truth
        placed = []
        objects = []
        for s in self._screws:
            if s.cx + s.shape.radius < -1 or s.cx - s.shape.radius > w + 1:
                continue
            sprite = screw_mod.render(
                s.shape, s.cx, s.cy, s.heading_deg, self._light.direction, self.options
            )
            if sprite.bbox is None:
                continue
            bx, by, bw, bh = sprite.bbox
            x0, y0, x1, y1 = max(bx, 0), max(by, 0), min(bx + bw, w), min(by + bh, h)
            if x1 <= x0 or y1 <= y0:
                continue
            placed.append(sprite)
            objects.append(
                ObjectTruth(
                    id=s.id,
                    label=s.label,
                    cx=s.cx,
                    cy=s.cy,
                    angle_deg=s.heading_deg % 180.0,
                    length=s.shape.length,
                    width=s.shape.width,
                    bbox=(x0, y0, x1 - x0, y1 - y0),
                    fully_visible=bx >= 0 and by >= 0 and bx + bw <= w and by + bh <= h,
                )
            )

        # The light on the belt; shadows next (one screw's shadow may reach a
        # neighbour), then the screws under the same light
        field = self._light.field(self._t)
        flicker = self._light.flicker_gain(self._t)
        frame = cv2.multiply(belt, field, scale=flicker, dtype=cv2.CV_8U)
        for sp in placed:
            if sp.shadow is not None:
                p = sp.shadow_pad
                fy, fx, py, px = self._clip(sp.x0 - p, sp.y0 - p, sp.shadow.shape)
                region = frame[fy, fx].astype(np.float32)
                region *= 1.0 - sp.shadow[py, px][:, :, None]
                frame[fy, fx] = cv2.convertScaleAbs(region)
        for sp in placed:
            fy, fx, py, px = self._clip(sp.x0, sp.y0, sp.alpha.shape)
            region = frame[fy, fx].astype(np.float32)
            lit = sp.colour[py, px] * (field[fy, fx] * np.float32(flicker))
            region += sp.alpha[py, px][:, :, None] * (lit - region)
            frame[fy, fx] = cv2.convertScaleAbs(region)

        return self._camera.expose(frame), objects

    def _clip(self, x0: int, y0: int, shape: tuple[int, ...]) -> tuple[slice, slice, slice, slice]:
        """Frame and patch slices of the part inside the frame of a patch at (x0, y0)."""
        ph, pw = shape[:2]
        fx0, fy0 = max(x0, 0), max(y0, 0)
        fx1, fy1 = min(x0 + pw, self.width), min(y0 + ph, self.height)
        return (
            slice(fy0, fy1),
            slice(fx0, fx1),
            slice(fy0 - y0, fy1 - y0),
            slice(fx0 - x0, fx1 - x0),
        )
