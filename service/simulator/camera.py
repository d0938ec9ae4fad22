"""What the camera does to the light: colour response, blur, noise, tone and compression.

``Camera.expose`` turns the simulated scene (float BGR, display units) into
the uint8 frame a real camera would deliver: motion blur along the belt for
the time the shutter is open, a slightly soft lens, shot and read noise,
the tone curve, then 8 bits. ``jpeg_round_trip`` adds the block and chroma
artefacts of an encoded stream to a frame kept in memory.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.simulator.options import SceneOptions

# The noise is drawn once, a little larger than the frame, and each frame
# reads it at a random offset: fresh-looking noise without drawing millions
# of normals per frame (a large share of the render time otherwise).
# NOTE: so the noise of two frames is the same pattern shifted, which no
# real sensor does; nothing here looks at noise across frames.
NOISE_MARGIN_PX = 64


def colour_matrix(options: SceneOptions, rng: np.random.Generator) -> np.ndarray:
    """The camera's colour response: a 3x3 BGR matrix, rows summing to 1 (grey stays grey).

    Random channel cross-talk near identity, then the saturation setting,
    which moves each colour towards or away from its own grey.
    """
    mix = rng.uniform(-options.colour_mix, options.colour_mix, (3, 3))
    np.fill_diagonal(mix, 0.0)
    np.fill_diagonal(mix, 1.0 - mix.sum(axis=1))
    luma = np.array([0.114, 0.587, 0.299])  # BT.601 weights, in BGR order
    grey = np.tile(luma, (3, 1))
    saturate = options.saturation * np.eye(3) + (1.0 - options.saturation) * grey
    return saturate @ mix


def apply_colour(matrix: np.ndarray, bgr) -> tuple[float, float, float]:
    """One BGR colour through the camera's colour response, clipped to 0..255."""
    out = np.clip(matrix @ np.asarray(bgr, np.float64), 0.0, 255.0)
    return (float(out[0]), float(out[1]), float(out[2]))


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` (uint8 BGR) after JPEG encoding at ``quality`` (1..100) and decoding."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 BGR image (H, W, 3), got {image.dtype} {image.shape}")
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode an image of shape {image.shape}")
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


class Camera:
    """Sensor and processing effects of one simulated camera."""

    def __init__(
        self,
        width: int,
        height: int,
        speed_px_per_frame: float,
        options: SceneOptions,
        rng: np.random.Generator,
    ) -> None:
        self.width, self.height = width, height
        self.options = options
        self.rng = rng
        # The belt moves this far while the shutter is open
        self.blur_px = min(
            speed_px_per_frame * options.shutter_fraction, options.max_motion_blur_px
        )
        self._noise = rng.standard_normal(
            (height + NOISE_MARGIN_PX, width + NOISE_MARGIN_PX, 3), dtype=np.float32
        )
        levels = np.arange(256, dtype=np.float64)
        self._tone = np.clip(255.0 * (levels / 255.0) ** options.gamma + 0.5, 0, 255)
        self._tone = self._tone.astype(np.uint8)
        # Noise std by level: shot noise grows as the square root of the signal
        self._noise_std = np.sqrt(options.read_noise**2 + options.shot_noise**2 * levels)
        self._noise_std = self._noise_std.astype(np.float32)

    def expose(self, frame: np.ndarray) -> np.ndarray:
        """The delivered uint8 BGR frame for the lit scene ``frame`` (uint8 BGR).

        The scene arrives as 8 bits: the blurs are linear and the noise is
        added on top, and uint8 images take a quarter of the memory traffic
        of float32 ones (the render time is mostly memory traffic).
        """
        o = self.options

        # Motion blur along the belt while the shutter is open, then the lens.
        # NOTE: the blur follows the belt only; a spinning screw's turn during
        # the exposure is not smeared (a degree or so at most).
        length = round(self.blur_px)
        if length >= 2:
            frame = cv2.blur(frame, (length, 1))
        if o.defocus_px > 0.3:
            frame = cv2.GaussianBlur(frame, (0, 0), o.defocus_px)

        # Sensor noise, read at a random offset in the bank
        dy, dx = (int(d) for d in self.rng.integers(0, NOISE_MARGIN_PX, 2))
        noise = self._noise[dy : dy + self.height, dx : dx + self.width]
        noise = cv2.multiply(cv2.LUT(frame, self._noise_std), noise)
        frame = cv2.add(frame, noise, dtype=cv2.CV_8U)

        # The camera's tone curve
        return cv2.LUT(frame, self._tone)
