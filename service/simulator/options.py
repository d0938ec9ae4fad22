"""The knobs of a simulated belt scene, and their randomised defaults.

Every visual effect the simulator renders has one field here. ``SceneOptions()``
is a calm, mid-envelope scene (handy in tests and for a first look);
``SceneOptions.randomised(seed)`` draws every knob from a range that spans the
operating envelope in DESIGN.md, so a model trained on many seeds has seen
dim and bright light, warm and cold white balance, grey, green, blue and brown
belts, small and large screws, fast and slow belts. The belt's direction is
the one knob left at its default: a line's configuration fixes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from service.errors import UsageError

# The envelope DESIGN.md promises the locator (screw length in pixels).
MIN_SCREW_LENGTH = 40.0
MAX_SCREW_LENGTH = 200.0

HEAD_TYPES = ("pan", "hex", "countersunk", "socket")


@dataclass(frozen=True)
class SceneOptions:
    """One scene's look and motion. Colours are BGR in display units (0..255)."""

    # Belt motion
    direction: int = 1  # +1: belt runs left to right, -1: right to left
    crossing_s: float = 2.5  # seconds a point on the belt takes to cross the frame width

    # Screw population
    length_range: tuple[float, float] = (60.0, 160.0)  # px, whole screw incl. head
    slenderness_range: tuple[float, float] = (5.0, 9.0)  # length / shaft diameter
    head_types: tuple[str, ...] = HEAD_TYPES
    pointed_fraction: float = 0.5  # share of wood screws (pointed tip) vs machine screws
    band_width_range: tuple[float, float] = (0.12, 0.3)  # share of the shaft length
    band_position_range: tuple[float, float] = (0.25, 0.75)  # band centre along the shaft
    max_spin_deg_s: float = 15.0  # each screw spins at up to this rate, either way
    min_gap_px: float = 6.0  # clearance between any two screws' bounding circles

    # Materials
    zinc_bgr: tuple[float, float, float] = (205.0, 200.0, 192.0)  # clear zinc: cool silver
    metal_specular: float = 0.8  # strength of the highlight along the screw's axis
    metal_roughness: float = 0.3  # 0 mirror-like narrow highlight .. 1 broad and dull
    paint_gloss: float = 0.25  # highlight strength on the painted band
    paint_jitter: float = 0.04  # per-screw paint batch variation (relative, per channel)

    # Belt surface (moves with the belt)
    belt_bgr: tuple[float, float, float] = (62.0, 64.0, 66.0)
    belt_grain: float = 4.0  # fine grain, display units (std)
    belt_blotch: float = 5.0  # large soft patches (std)
    belt_weave: float = 2.0  # fabric weave amplitude
    belt_streaks: float = 2.0  # wear lines running along the belt
    belt_specks: float = 0.0004  # dust/debris specks per pixel
    belt_seam: bool = False  # a splice line across the belt

    # Light (fixed to the camera, drifting slowly)
    light_azimuth_deg: float = 225.0  # where the key light comes from, image coords
    light_elevation_deg: float = 60.0  # 90: straight above, low: long shadows
    light_gradient: float = 0.15  # relative brightness change across the frame
    vignetting: float = 0.15  # relative darkening in the corners
    exposure: float = 1.0  # mean exposure gain
    exposure_drift: float = 0.05  # relative amplitude of slow exposure drift
    white_balance: tuple[float, float] = (1.0, 1.0)  # (blue, red) gains vs green
    white_balance_drift: float = 0.02  # relative amplitude of slow white-balance drift
    drift_period_s: float = 30.0  # typical period of the slow drifts
    flicker: float = 0.0  # relative amplitude of mains flicker
    mains_hz: float = 50.0  # lamps flicker at twice this
    shadow_strength: float = 0.35  # 0 none .. 1 black under the screw
    shadow_softness_px: float = 2.0

    # Camera
    shutter_fraction: float = 0.2  # exposure time / frame time; sets motion blur length
    max_motion_blur_px: float = 12.0  # the exposure is kept short enough for this smear
    defocus_px: float = 0.0  # Gaussian blur sigma of a slightly soft lens
    read_noise: float = 1.5  # display units (std)
    shot_noise: float = 0.25  # std grows as sqrt(signal) times this
    gamma: float = 1.0  # tone curve of the camera's processing
    colour_mix: float = 0.0  # channel cross-talk of the camera's colour response
    saturation: float = 1.0  # the camera's processing: < 1 duller colours, > 1 more vivid
    jpeg_quality: int = 80  # "video-like compression" for frames kept in memory

    def __post_init__(self) -> None:
        self._check()

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        if self.direction not in (1, -1):
            raise UsageError(f"direction {self.direction!r} is not 1 (left to right) or -1")
        if not self.crossing_s > 0:
            raise UsageError(f"crossing_s {self.crossing_s!r} must be > 0 seconds")
        lo, hi = self.length_range
        if not MIN_SCREW_LENGTH <= lo <= hi <= MAX_SCREW_LENGTH:
            raise UsageError(
                f"length_range {self.length_range!r} must lie within "
                f"[{MIN_SCREW_LENGTH:g}, {MAX_SCREW_LENGTH:g}] px, low <= high"
            )
        slim, slender = self.slenderness_range
        if not 3.0 <= slim <= slender:
            raise UsageError(
                f"slenderness_range {self.slenderness_range!r}: length over shaft diameter, "
                f"3 or more, low <= high"
            )
        unknown = set(self.head_types) - set(HEAD_TYPES)
        if unknown or not self.head_types:
            raise UsageError(f"head_types {self.head_types!r}: allowed are {HEAD_TYPES}")
        if not 15 <= self.jpeg_quality <= 100:
            raise UsageError(f"jpeg_quality {self.jpeg_quality!r} is outside [15, 100]")
        for name in ("belt_grain", "belt_blotch", "belt_weave", "belt_streaks", "flicker",
                     "shadow_strength", "read_noise", "shot_noise", "defocus_px",
                     "max_spin_deg_s", "min_gap_px"):  # fmt: skip
            if getattr(self, name) < 0:
                raise UsageError(f"{name} {getattr(self, name)!r} must be >= 0")
        if not 0 <= self.saturation <= 3:
            raise UsageError(f"saturation {self.saturation!r} is outside [0, 3]")
        if self.max_motion_blur_px < 0:
            raise UsageError(f"max_motion_blur_px {self.max_motion_blur_px!r} must be >= 0")
        if not 0 <= self.shutter_fraction <= 1:
            raise UsageError(f"shutter_fraction {self.shutter_fraction!r} is outside [0, 1]")

    def replace(self, **changes) -> SceneOptions:
        """A copy with some knobs changed (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------- randomised
    @classmethod
    def randomised(cls, seed: int | None = None, **overrides) -> SceneOptions:
        """Every knob drawn from its randomised default range; ``overrides`` win."""
        rng = np.random.default_rng(seed)
        u = rng.uniform

        def log_uniform(lo: float, hi: float) -> float:
            return float(math.exp(u(math.log(lo), math.log(hi))))

        # Sizes: some scenes hold one size class, others a wide mix.
        lo = u(MIN_SCREW_LENGTH, 150.0)
        hi = min(MAX_SCREW_LENGTH, lo + u(10.0, 160.0))
        slender_lo = u(4.5, 8.0)
        heads = tuple(h for h in HEAD_TYPES if rng.random() < 0.6) or (str(rng.choice(HEAD_TYPES)),)
        band_lo = u(0.08, 0.2)

        # Belt: dark, matte, low saturation; grey, green, blue, brown or near black.
        tone = u(22.0, 105.0)
        hue_bgr = {
            "grey": (1.0, 1.0, 1.0),
            "green": (0.9, 1.12, 0.88),
            "blue": (1.2, 1.0, 0.85),
            "brown": (0.8, 0.95, 1.15),
            "black": (1.05, 1.0, 0.97),
        }[str(rng.choice(["grey", "grey", "green", "blue", "brown", "black"]))]
        tint = 1.0 + (np.asarray(hue_bgr) - 1.0) * u(0.3, 1.3)
        belt = tuple(float(tone * t) for t in tint)

        # Zinc: clear (cool silver) to slightly warm, always brighter than the belt.
        zinc_level = u(max(150.0, tone + 70.0), 225.0)
        warm = u(-0.06, 0.06)
        zinc = (zinc_level * (1 - warm), zinc_level, zinc_level * (1 + warm))

        # White balance error: mostly along warm-cold (blue against red), a
        # little green-magenta tint on both
        temperature, tint = u(-0.15, 0.15), u(-0.05, 0.05)
        drift_fast = rng.random() < 0.3
        options = cls(
            direction=1,
            crossing_s=log_uniform(0.8, 6.0),
            length_range=(float(lo), float(hi)),
            slenderness_range=(slender_lo, slender_lo + u(0.5, 3.5)),
            head_types=heads,
            pointed_fraction=u(0.0, 1.0),
            band_width_range=(band_lo, band_lo + u(0.02, 0.25)),
            band_position_range=(u(0.15, 0.45), u(0.55, 0.85)),
            max_spin_deg_s=u(0.0, 40.0),
            min_gap_px=u(3.0, 25.0),
            zinc_bgr=zinc,
            metal_specular=u(0.3, 1.2),
            metal_roughness=u(0.1, 0.8),
            paint_gloss=u(0.05, 0.5),
            paint_jitter=u(0.0, 0.08),
            belt_bgr=belt,
            belt_grain=u(1.0, 9.0),
            belt_blotch=u(0.0, 10.0),
            belt_weave=u(0.0, 5.0) if rng.random() < 0.6 else 0.0,
            belt_streaks=u(0.0, 3.0),
            belt_specks=log_uniform(1e-5, 2e-3),
            belt_seam=bool(rng.random() < 0.3),
            light_azimuth_deg=u(0.0, 360.0),
            light_elevation_deg=u(35.0, 85.0),
            light_gradient=u(0.0, 0.45),
            vignetting=u(0.0, 0.4),
            exposure=log_uniform(0.55, 1.35),
            exposure_drift=u(0.0, 0.2),
            white_balance=(math.exp(temperature + tint), math.exp(-temperature + tint)),
            white_balance_drift=u(0.0, 0.06),
            drift_period_s=u(4.0, 15.0) if drift_fast else u(15.0, 120.0),
            flicker=u(0.0, 0.12) if rng.random() < 0.5 else 0.0,
            mains_hz=float(rng.choice([50.0, 60.0])),
            shadow_strength=u(0.0, 0.6),
            shadow_softness_px=u(0.5, 5.0),
            shutter_fraction=log_uniform(0.02, 0.8),
            max_motion_blur_px=u(4.0, 20.0),
            defocus_px=u(0.0, 1.2) if rng.random() < 0.5 else 0.0,
            read_noise=u(0.5, 5.0),
            shot_noise=u(0.0, 0.6),
            gamma=u(0.8, 1.25),
            colour_mix=u(0.0, 0.12),
            saturation=u(0.7, 1.3),
            jpeg_quality=int(rng.integers(35, 96)),
        )
        return options.replace(**overrides) if overrides else options
