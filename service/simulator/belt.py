"""The belt's surface texture (which moves with the belt) and the scene's light.

The texture is one periodic tile, ``period`` pixels long along the belt and
as tall as the frame; a frame shows a window into it at the belt's current
displacement, so every grain, speck and seam travels exactly as far as the
screws lying on the belt do.

The light is fixed to the camera: a slow gradient across the frame,
vignetting and a broad hotspot, scaled by exposure and white-balance gains
that drift slowly and by mains flicker sampled at the frame rate. It is
computed on a coarse grid and resized, since it has no fine detail.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from service.simulator.options import SceneOptions

# The light field is smooth: one sample per 16 px is plenty, and resizing the
# small grid is much cheaper than evaluating the field at every pixel.
LIGHT_GRID_PX = 16
# The field drifts over seconds (periods of 2 s and more); recomputing it
# every 0.1 s changes it by well under 1 % per step. Flicker is per frame.
LIGHT_REFRESH_S = 0.1


def _wrap_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur that wraps around in x (so the tile stays seamless)."""
    pad = math.ceil(3 * sigma) + 1
    padded = np.concatenate([image[:, -pad:], image, image[:, :pad]], axis=1)
    blurred = cv2.GaussianBlur(padded, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return blurred[:, pad:-pad]


def _smooth_noise(rng: np.random.Generator, height: int, period: int, cell: int) -> np.ndarray:
    """Unit-std noise with features about ``cell`` px big, periodic in x."""
    cols = period // cell
    rows = height // cell + 4
    low = rng.standard_normal((rows, cols)).astype(np.float32)
    low = np.concatenate([low[:, -2:], low, low[:, :2]], axis=1)
    big = cv2.resize(low, ((cols + 4) * cell, rows * cell), interpolation=cv2.INTER_CUBIC)
    out = big[2 * cell : 2 * cell + height, 2 * cell : 2 * cell + period]
    return out / max(float(out.std()), 1e-6)


class BeltTexture:
    """A seamless tile of belt surface; ``view(displacement)`` is one frame's belt."""

    def __init__(
        self, width: int, height: int, options: SceneOptions, rng: np.random.Generator
    ) -> None:
        self.width = width
        self.height = height
        # Twice the frame width, so the same patch of belt does not come back
        # every frame-width; a multiple of 64 so every noise cell divides it.
        self.period = int(math.ceil(2 * width / 64) * 64)
        tile = self._render(options, rng)
        # Keep the first frame-width again at the end: any window is one slice.
        self._tile = np.ascontiguousarray(np.concatenate([tile, tile[:, :width]], axis=1))

    def _render(self, o: SceneOptions, rng: np.random.Generator) -> np.ndarray:
        h, p = self.height, self.period
        lum = np.zeros((h, p), np.float32)

        # Grain, blotches
        grain = _wrap_blur(rng.standard_normal((h, p)).astype(np.float32), 0.7)
        lum += o.belt_grain * grain / max(float(grain.std()), 1e-6)
        blotch = _smooth_noise(rng, h, p, 64) + 0.6 * _smooth_noise(rng, h, p, 16)
        lum += o.belt_blotch * blotch / max(float(blotch.std()), 1e-6)

        # Weave: a fine fabric pattern whose x period divides the tile
        if o.belt_weave > 0:
            xs = np.arange(p, dtype=np.float32)[None, :]
            ys = np.arange(h, dtype=np.float32)[:, None]
            kx = round(p / rng.uniform(3.0, 9.0))
            py = rng.uniform(3.0, 9.0)
            # a slight twill slant, kept a whole number of turns per tile
            slant = round(kx * rng.uniform(-0.3, 0.3))
            phase_x = 2 * np.pi * xs / p
            lum += (
                o.belt_weave * np.cos(kx * phase_x) * np.cos(2 * np.pi * ys / py + slant * phase_x)
            )

        # Wear lines run along the belt: constant in x
        if o.belt_streaks > 0:
            line = rng.standard_normal(h).astype(np.float32)
            line = cv2.GaussianBlur(line[:, None], (0, 0), rng.uniform(0.6, 3.0))[:, 0]
            lum += o.belt_streaks * (line / max(float(line.std()), 1e-6))[:, None]

        # Specks of dust and debris, light or dark, one to a few pixels across:
        # impulses, spread by a small blur
        for sigma in (0.6, 1.2):
            count = int(o.belt_specks * h * p / 2)
            impulses = np.zeros((h, p), np.float32)
            ys, xs = rng.integers(0, h, count), rng.integers(0, p, count)
            impulses[ys, xs] = rng.choice([-1.0, 1.0], count) * rng.uniform(10.0, 50.0, count)
            lum += _wrap_blur(impulses, sigma) * np.float32(2 * np.pi * sigma**2)

        # A splice seam across the belt
        if o.belt_seam:
            x0 = int(rng.integers(0, p - 12))
            width = int(rng.integers(2, 8))
            lum[:, x0 : x0 + width] += rng.uniform(-14.0, 10.0)
            lum[:, x0] -= 6.0
            lum[:, x0 + width] -= 6.0

        # Colour: the texture mostly changes brightness, with a faint chroma wander
        base = np.asarray(o.belt_bgr, np.float32)
        scale = base / max(float(base.mean()), 1.0)
        tile = base[None, None, :] + lum[:, :, None] * scale[None, None, :]
        for c in range(3):
            tile[:, :, c] += 0.03 * base[c] * _smooth_noise(rng, h, p, 32)
        return np.clip(tile, 0, 255).astype(np.uint8)

    def view(self, displacement_px: float) -> np.ndarray:
        """The belt as seen when it has moved ``displacement_px`` along +x (uint8 view)."""
        start = round(-displacement_px) % self.period
        return self._tile[:, start : start + self.width]


class _SlowWave:
    """A smooth signal in about [-1, 1]: three sines with random periods and phases."""

    def __init__(self, rng: np.random.Generator, period_s: float) -> None:
        self.periods = period_s * rng.uniform(0.5, 2.0, 3)
        self.phases = rng.uniform(0, 2 * np.pi, 3)

    def __call__(self, t: float) -> float:
        waves = np.sin(2 * np.pi * t / self.periods + self.phases)
        return float(waves.sum() / math.sqrt(3.0))


class Lighting:
    """Light on the belt: where it comes from, and its per-pixel gain at a time."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        options: SceneOptions,
        rng: np.random.Generator,
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.options = o = options

        # Key light direction (towards the lamp), image coords with z up to the camera
        az, el = math.radians(o.light_azimuth_deg), math.radians(o.light_elevation_deg)
        self.direction = np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        )

        # Coarse grid in normalised coordinates, x in [-1, 1], y scaled alike
        gw = width // LIGHT_GRID_PX + 2
        gh = height // LIGHT_GRID_PX + 2
        aspect = height / width
        self._x = np.linspace(-1, 1, gw, dtype=np.float32)[None, :]
        self._y = np.linspace(-aspect, aspect, gh, dtype=np.float32)[:, None]
        r2 = self._x**2 + self._y**2
        self._vignette = 1.0 - o.vignetting * r2 / (1.0 + aspect**2)
        spot_x, spot_y = rng.uniform(-1, 1), rng.uniform(-aspect, aspect)
        spot = np.exp(-((self._x - spot_x) ** 2 + (self._y - spot_y) ** 2) / rng.uniform(0.3, 2))
        self._spot = rng.uniform(0.0, 0.5) * o.light_gradient * spot

        self._gradient_angle = rng.uniform(0, 2 * np.pi)
        self._angle_wave = _SlowWave(rng, o.drift_period_s)
        self._gradient_wave = _SlowWave(rng, o.drift_period_s)
        self._exposure_wave = _SlowWave(rng, o.drift_period_s)
        self._wb_waves = (_SlowWave(rng, o.drift_period_s), _SlowWave(rng, o.drift_period_s))
        self._flicker_phase = rng.uniform(0, 2 * np.pi)
        self._field: np.ndarray | None = None
        self._field_t = -math.inf

    def flicker_gain(self, t: float) -> float:
        """Lamp brightness seen by a frame exposed from ``t``.

        Lamps on AC mains flicker at twice the mains frequency; averaging over
        the exposure time damps it (a sinc), and sampling at the frame rate
        aliases it into a slow beat, or freezes it when the rates line up.
        """
        o = self.options
        if o.flicker <= 0:
            return 1.0
        f = 2.0 * o.mains_hz
        exposure_s = max(o.shutter_fraction, 1e-3) / self.fps
        damping = abs(np.sinc(f * exposure_s))
        return 1.0 + o.flicker * damping * math.cos(2 * np.pi * f * t + self._flicker_phase)

    def field(self, t: float) -> np.ndarray:
        """Per-pixel, per-channel (BGR) gain at time ``t`` without flicker: float32 (H, W, 3).

        Recomputed every ``LIGHT_REFRESH_S``; do not modify the array returned.
        """
        if self._field is None or abs(t - self._field_t) >= LIGHT_REFRESH_S:
            self._field = self._compute_field(t)
            self._field_t = t
        return self._field

    def _compute_field(self, t: float) -> np.ndarray:
        o = self.options
        angle = self._gradient_angle + 0.5 * self._angle_wave(t)
        strength = o.light_gradient * (1.0 + 0.3 * self._gradient_wave(t))
        ramp = 0.5 * strength * (math.cos(angle) * self._x + math.sin(angle) * self._y)
        field = (1.0 + ramp + self._spot) * self._vignette

        exposure = o.exposure * (1.0 + o.exposure_drift * self._exposure_wave(t))
        wb_blue = o.white_balance[0] * (1.0 + o.white_balance_drift * self._wb_waves[0](t))
        wb_red = o.white_balance[1] * (1.0 + o.white_balance_drift * self._wb_waves[1](t))
        gains = exposure * np.array([wb_blue, 1.0, wb_red], np.float32)
        grid = field[:, :, None] * gains[None, None, :]
        return cv2.resize(grid, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
