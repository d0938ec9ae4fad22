"""``python -m training cut``: training crops from a recording of one colour.

How a plant makes its own dataset: run screws of one colour down the line,
record the camera, and cut the recording into crops with the daemon's own
locator, tracker and crop function, so training sees exactly what the daemon
will see on that belt, under that light, through that camera and codec::

    python -m training cut --video red.mp4 --label red --out data/line1
    python -m training cut --video blue.mp4 --label blue --out data/line1
    ...
    python -m training fit --data data/line1 --out runs/line1

Each screw gives up to ``--per-screw`` crops taken at different places along
the belt. Only screws the tracker follows to the decision line are kept, the
rule the daemon uses to decide, so a speck of dirt seen in one frame is not
cut. Files are named after the video and the screw, so cutting a second
recording of the same colour adds to the folder and cutting the same one
again replaces its own crops.

``python -m training synth video --only red --line L --seed S`` renders such a
recording from the simulator, to try the whole path without a camera.

NOTE: every screw in the recording is taken to be ``--label``; a stray screw
of another colour, or a hand in the picture, becomes a wrongly labelled crop.
Look through the folder before training (the crops are small PNGs), and after
it, through ``misclassified.png`` in the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from service.cli_support import bounded_int, existing_file, output_dir, setup_logging
from service.config import DIRECTIONS, PipelineSection
from service.errors import DatasetError, UsageError
from service.locate import Locator, cut_crop
from service.track import Tracker
from training.data import make_class_folder

log = logging.getLogger(__name__)

# A screw's crops are this share of the frame width apart along the belt (at
# most), so they see it under different parts of the light.
SPREAD_SHARE = 0.4
# The daemon's defaults: a screw that reaches its decision line is kept, and a
# track ends after as many missed frames as the daemon allows.
DAEMON = PipelineSection()
# A recording with no screw in this many frames from the start is probably not
# a belt at all (or the belt runs the other way): stop and say so.
FRAMES_BEFORE_GIVING_UP = 900


def add_arguments(parser) -> None:
    # fmt: off
    arg = parser.add_argument
    arg("--video", type=existing_file, required=True, metavar="FILE",
        help="recording of screws of one colour (any file OpenCV's FFmpeg reads)")
    arg("--label", required=True, metavar="NAME",
        help="their colour: the class (folder) name the crops go under")
    arg("--out", type=output_dir, required=True, metavar="DIR",
        help="dataset folder; crops go to DIR/NAME/")
    arg("--per-screw", type=bounded_int(1, 20), default=2, metavar="N",
        help="crops at most from one screw, spread along the belt (2)")
    arg("--max", type=bounded_int(1, 1_000_000), default=None, metavar="N",
        help="stop after N crops (default: the whole recording)")
    arg("--size", type=bounded_int(16, 512), default=128, metavar="PX",
        help="crop side (128; the same as fit --img-size)")
    arg("--direction", choices=DIRECTIONS, default=DAEMON.direction,
        help=f"belt direction in the image ({DAEMON.direction})")
    arg("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    # fmt: on


def run(args) -> int:
    setup_logging(args.log_level)
    label = args.label.strip()
    if not label or label in (".", "..") or any(c in label for c in "/\\"):
        raise UsageError(f"--label {args.label!r} is not usable as a folder name")
    folder = args.out / label
    make_class_folder(folder)

    started = time.perf_counter()
    cutter = Cutter(
        folder,
        prefix=args.video.stem,
        size=args.size,
        per_screw=args.per_screw,
        direction=1 if args.direction == "left_to_right" else -1,
        limit=args.max,
    )
    capture = cv2.VideoCapture(str(args.video))
    if not capture.isOpened():
        raise DatasetError(
            f"OpenCV cannot open {str(args.video)!r}; is it a video file its FFmpeg reads?"
        )
    try:
        while not cutter.full():
            ok, image = capture.read()
            if not ok:
                break
            cutter.add(image)
            if cutter.frames >= FRAMES_BEFORE_GIVING_UP and cutter.screws_seen == 0:
                break
    finally:
        capture.release()
    cutter.finish()

    if cutter.frames == 0:
        raise DatasetError(f"no frame could be read from {str(args.video)!r}")
    if cutter.written == 0:
        raise DatasetError(
            f"no screw reached the decision line in {cutter.frames} frames of "
            f"{str(args.video)!r}; check that screws cross the frame along x and the "
            f"--direction ({args.direction}), and the operating envelope in the README"
        )
    print(
        f"cut {cutter.written} crops of {cutter.kept} screws ({label}) from {cutter.frames} "
        f"frames of {args.video.name} into {folder}; {cutter.dropped} tracks that never "
        f"reached the line left out; {time.perf_counter() - started:.1f} s"
    )
    return 0


@dataclass
class _Screw:
    crops: list[np.ndarray] = field(default_factory=list)
    last_x: float | None = None  # centre x of the last crop taken
    crossed: bool = False


class Cutter:
    """Frames in, crops of the screws that reach the decision line out.

    Memory stays bounded: a live track holds at most ``per_screw`` crops.
    """

    def __init__(
        self,
        folder: Path,
        *,
        prefix: str,
        size: int,
        per_screw: int,
        direction: int = 1,
        limit: int | None = None,
    ) -> None:
        self.folder, self.prefix, self.size = folder, prefix, size
        self.per_screw, self.direction, self.limit = per_screw, direction, limit
        self.locator = Locator()
        self.tracker = None
        self.spread_px = 0.0
        self.screws: dict[int, _Screw] = {}
        self.done: set[int] = set()  # written, still in view
        self.frames = self.written = self.kept = self.dropped = self.screws_seen = 0

    def full(self) -> bool:
        return self.limit is not None and self.written >= self.limit

    def add(self, image: np.ndarray) -> None:
        if self.tracker is None:
            width = image.shape[1]
            self.tracker = Tracker(
                DAEMON.decision_line * width,
                self.direction,
                max_missed=DAEMON.max_missed,
                frame_width=width,
            )
            self.spread_px = SPREAD_SHARE * width / self.per_screw
        step = self.tracker.update(self.locator.detect(image))
        self.frames += 1

        for track_id, det in step.views:
            if track_id in self.done:
                continue
            screw = self.screws.get(track_id)
            if screw is None:
                screw = self.screws[track_id] = _Screw()
                self.screws_seen += 1
                continue  # its first view: it may still be coming into the frame
            far_enough = screw.last_x is None or abs(det.cx - screw.last_x) >= self.spread_px
            if len(screw.crops) < self.per_screw and far_enough:
                screw.crops.append(cut_crop(image, det, self.size))
                screw.last_x = det.cx
        for track_id in step.crossed:
            if track_id in self.screws:
                self.screws[track_id].crossed = True
        for track_id in step.ended:
            self._close(track_id)
            self.done.discard(track_id)
        # A screw that crossed and has all its crops is written now; its track
        # lives on until it leaves the frame, and is ignored until then
        for track_id in [
            t for t, s in self.screws.items() if s.crossed and len(s.crops) >= self.per_screw
        ]:
            self._close(track_id)
            self.done.add(track_id)

    def finish(self) -> None:
        """End of the recording: keep the screws that reached the line."""
        for track_id in list(self.screws):
            self._close(track_id)

    def _close(self, track_id: int) -> None:
        screw = self.screws.pop(track_id, None)
        if screw is None:
            return
        if not screw.crossed or not screw.crops:
            self.dropped += 1
            return
        self.kept += 1
        for k, crop in enumerate(screw.crops):
            if self.full():
                return
            path = self.folder / f"{self.prefix}_{track_id:05d}_{k}.png"
            if not cv2.imwrite(str(path), crop):
                raise DatasetError(f"OpenCV could not write crop {str(path)!r}")
            self.written += 1
