"""Track objects frame to frame along the belt and report decision-line crossings.

INTERFACE STUB written by the coordinator; the locator helper replaces the
bodies (keep the names and signatures: the daemon calls them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.locate import Detection


@dataclass
class TrackStep:
    """What one ``Tracker.update`` call found.

    ``views``: (track_id, detection) for every object seen in this frame.
    ``crossed``: track ids whose centre crossed the decision line in this frame
    (each track is reported once in its life).
    ``ended``: track ids dropped this step (left the frame or lost for longer
    than the allowed misses) that never crossed the line.
    """

    views: list[tuple[int, Detection]] = field(default_factory=list)
    crossed: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)


class Tracker:
    """Keeps one id per screw from entry to exit, using the belt's motion.

    ``line_x`` is the decision line in pixels; ``direction`` is +1 when the
    belt runs left to right along x, -1 for right to left.
    """

    def __init__(self, line_x: float, direction: int = 1, max_missed: int = 2) -> None:
        raise NotImplementedError

    def update(self, detections: list[Detection]) -> TrackStep:
        raise NotImplementedError
