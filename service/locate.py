"""Find screws on the belt: one oriented box per object, and the crop cut from it.

INTERFACE STUB written by the coordinator; the locator helper replaces the
bodies (keep the names and signatures: the simulator, the training crops and
the daemon all call them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    """One object found in one frame.

    ``angle_deg`` is the direction of the screw's long axis in image
    coordinates (x right, y down), in [0, 180). ``bbox`` is the axis-aligned
    box ``(x, y, w, h)`` in whole pixels, clipped to the frame.
    """

    cx: float
    cy: float
    length: float
    width: float
    angle_deg: float
    bbox: tuple[int, int, int, int]
    area: float


class Locator:
    """Segments objects from the belt in BGR frames of one source."""

    def __init__(self, config=None) -> None:
        raise NotImplementedError

    def detect(self, frame: np.ndarray) -> list[Detection]:
        raise NotImplementedError


def cut_crop(frame: np.ndarray, det: Detection, size: int) -> np.ndarray:
    """The object rotated so its axis is horizontal, fixed margin, padded square,
    resized to ``size x size``: uint8 BGR ``(size, size, 3)``."""
    raise NotImplementedError
