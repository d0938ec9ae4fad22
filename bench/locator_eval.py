"""Accuracy of the locator and the tracker against ground truth.

Two sources of frames with truth:

* a video and its truth file, as ``python -m training synth video`` writes
  them (``X.mp4`` and ``X.truth.jsonl``: one screw a line, with its per-frame
  trajectory);
* ``--simulate``: frames rendered in memory by ``service.simulator`` and
  JPEG round-tripped like decoded video (no encoder needed, quicker to vary).

Figures printed:

* locator recall: fully visible screws (object-frames) matched by a
  detection whose centre lies within ``max(6 px, 0.2 x length)`` of the
  truth and whose length is within 0.7..1.4 x the truth's;
* locator precision: detections (not flagged partial) that match a screw,
  fully visible or not, over all such detections;
* tracking: of the screws seen fully before the decision line and crossing
  it, the share whose matched detections carry one track id from their first
  fully visible frame to the crossing, and the share reported ``crossed``
  exactly once.

    python bench/locator_eval.py belt.mp4
    python bench/locator_eval.py --simulate --seed 1234 --seconds 60
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from service.cli_support import (
    Parser,
    bounded_float,
    bounded_int,
    existing_file,
    frame_size,
    output_dir,
    run_main,
)
from service.errors import SourceError, UsageError
from service.locate import Detection, Locator
from service.track import Tracker

# Matching a detection to a truth object (same rule as the crops dataset).
MATCH_FLOOR_PX = 6.0
MATCH_SHARE_OF_LENGTH = 0.2
LENGTH_RATIO = (0.7, 1.4)
# Annotated frames written with --save-misses, at most.
MAX_SAVED_FRAMES = 30


@dataclass(frozen=True)
class Truth:
    id: int
    cx: float
    cy: float
    length: float
    fully_visible: bool


@dataclass
class Scores:
    visible: int = 0  # fully visible object-frames
    found: int = 0  # ... matched by a detection
    detections: int = 0  # detections not flagged partial
    true_detections: int = 0  # ... matching some screw
    frames: int = 0
    seconds: float = 0.0  # time in locate (all frames)
    ids: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    crossed: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # track -> count


# ---------------------------------------------------------------- frame sources
def _truth_by_frame(path: Path) -> tuple[dict[int, list[Truth]], int]:
    """Truth objects per frame index, and the belt direction (+1 / -1) they show."""
    by_frame: dict[int, list[Truth]] = defaultdict(list)
    steps = []
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as exc:
        raise SourceError(f"cannot read truth file {str(path)!r}: {exc.strerror}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            screw = json.loads(line)
            points = screw["trajectory"]
            for p in points:
                by_frame[int(p["frame"])].append(
                    Truth(int(screw["id"]), p["cx"], p["cy"], screw["length"], p["fully_visible"])
                )
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"truth file {str(path)!r} line {number} is not a screw with a trajectory "
                f"({exc}); expected the format of `python -m training synth video`"
            ) from exc
        if len(points) >= 2:
            steps.append(points[-1]["cx"] - points[0]["cx"])
    return by_frame, (-1 if steps and np.median(steps) < 0 else 1)


def _video_frames(path: Path, truth: dict[int, list[Truth]]) -> Iterator:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"OpenCV cannot open video {str(path)!r}; is it a video file?")
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            yield index, image, truth.get(index, [])
            index += 1
    finally:
        capture.release()


def _simulated_frames(args) -> Iterator:
    from service.simulator import BeltSimulator  # only this mode needs it

    width, height = args.size
    sim = BeltSimulator(width, height, args.fps, args.rate, seed=args.seed)
    for _ in range(max(1, round(args.seconds * args.fps))):
        frame = sim.next_frame(compress=True)
        truths = [Truth(t.id, t.cx, t.cy, t.length, t.fully_visible) for t in frame.objects]
        yield frame.index, frame.image, truths


# --------------------------------------------------------------------- scoring
def match(dets: list[Detection], truths: list[Truth]) -> dict[int, int]:
    """Detection index -> truth index, closest pairs first, one to one."""
    pairs = []
    for i, d in enumerate(dets):
        for j, t in enumerate(truths):
            dist = math.hypot(d.cx - t.cx, d.cy - t.cy)
            ratio = d.length / t.length
            gate = max(MATCH_FLOOR_PX, MATCH_SHARE_OF_LENGTH * t.length)
            if dist <= gate and LENGTH_RATIO[0] <= ratio <= LENGTH_RATIO[1]:
                pairs.append((dist, i, j))
    pairs.sort()
    out: dict[int, int] = {}
    used = set()
    for _, i, j in pairs:
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


def _annotate(image, dets, truths, matched) -> np.ndarray:
    out = image.copy()
    hit = set(matched.values())
    for j, t in enumerate(truths):
        colour = (0, 255, 0) if j in hit else (0, 0, 255)
        cv2.circle(out, (round(t.cx), round(t.cy)), 4, colour, -1)
    for i, d in enumerate(dets):
        box = cv2.boxPoints(((d.cx, d.cy), (d.length, d.width), d.angle_deg))
        colour = (0, 255, 0) if i in matched else (0, 0, 255)
        cv2.polylines(out, [np.int32(np.round(box))], True, colour, 1)
    return out


def evaluate(
    frames: Iterator,
    width: int,
    line_x: float,
    direction: int,
    save: Path | None,
    verbose: bool = False,
):
    locator = Locator()
    tracker = Tracker(line_x, direction=direction, frame_width=width)
    s = Scores()
    crossing: dict[int, int] = {}  # truth id -> first frame past the line
    first_seen: dict[int, int] = {}  # truth id -> first fully visible frame
    saved = 0
    for index, image, truths in frames:
        started = time.perf_counter()
        dets = locator.detect(image)
        s.seconds += time.perf_counter() - started
        s.frames += 1
        step = tracker.update(dets)
        for tid in step.crossed:
            s.crossed[tid] += 1
        track_of = {id(d): tid for tid, d in step.views}

        whole = [d for d in dets if not d.partial]
        matched = match(whole, truths)
        s.detections += len(whole)
        s.true_detections += len(matched)
        visible = {j for j, t in enumerate(truths) if t.fully_visible}
        s.visible += len(visible)
        s.found += sum(1 for j in matched.values() if j in visible)
        for i, j in matched.items():
            s.ids[truths[j].id].append((index, track_of.get(id(whole[i]), -1)))
        for t in truths:
            if t.fully_visible:
                first_seen.setdefault(t.id, index)
            if t.id not in crossing and (t.cx - line_x) * direction >= 0:
                crossing[t.id] = index

        missed = visible - set(matched.values())
        if save is not None and saved < MAX_SAVED_FRAMES and (missed or len(matched) < len(whole)):
            cv2.imwrite(
                str(save / f"frame_{index:06d}.png"), _annotate(image, whole, truths, matched)
            )
            saved += 1

    # One id from entry to the line, for screws seen whole before it
    counted = kept = reported = 0
    for truth_id, cross in crossing.items():
        entry = first_seen.get(truth_id)
        if entry is None or entry >= cross:
            continue
        counted += 1
        seen = [(frame, tid) for frame, tid in s.ids.get(truth_id, []) if entry <= frame <= cross]
        ids = {tid for _, tid in seen}
        if len(ids) == 1:
            kept += 1
            if s.crossed.get(next(iter(ids)), 0) == 1:
                reported += 1
                continue
        if verbose:
            print(
                f"screw {truth_id}: fully visible from frame {entry}, crosses at {cross}; "
                f"(frame, track id) {seen}; crossed reports "
                f"{ {tid: s.crossed.get(tid, 0) for tid in ids} }"
            )
    return s, counted, kept, reported


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="locator_eval.py",
        description="Locator recall/precision and tracker id stability against ground truth.",
    )
    parser.add_argument(
        "video", nargs="?", type=existing_file, help="video file with <stem>.truth.jsonl beside it"
    )
    parser.add_argument("--truth", type=existing_file, help="truth file (default: beside video)")
    parser.add_argument(
        "--simulate", action="store_true", help="render frames in memory instead of a video"
    )
    parser.add_argument("--seed", type=int, default=1234, help="--simulate: scene seed (1234)")
    parser.add_argument(
        "--seconds", type=bounded_float(0.0, 3600.0, low_open=True), default=60.0,
        help="--simulate: seconds of footage (60)",
    )  # fmt: skip
    parser.add_argument(
        "--size", type=frame_size, default=(1280, 720), help="--simulate: WIDTHxHEIGHT (1280x720)"
    )
    parser.add_argument(
        "--fps", type=bounded_float(15.0, 120.0), default=30.0, help="--simulate: fps (30)"
    )
    parser.add_argument(
        "--rate", type=bounded_float(0.0, 50.0), default=2.0, help="--simulate: screws/s (2)"
    )
    parser.add_argument(
        "--line-x", type=float, default=None, help="decision line x in px (frame centre)"
    )
    parser.add_argument(
        "--max-frames", type=bounded_int(1, 10_000_000), default=None, help="stop after N frames"
    )
    parser.add_argument(
        "--save-misses", type=output_dir, default=None,
        help=f"write up to {MAX_SAVED_FRAMES} annotated frames with a miss or a false detection",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--verbose", action="store_true", help="list every screw that lost its id or crossing"
    )
    args = parser.parse_args(argv)

    if args.simulate == (args.video is not None):
        raise UsageError("give either a video file or --simulate (not both, not neither)")
    if args.simulate:
        width = args.size[0]
        direction = 1  # the simulator's default belt runs left to right
        frames = _simulated_frames(args)
        source = f"simulated seed {args.seed}, {args.seconds:g} s, {args.size[0]}x{args.size[1]}"
    else:
        truth_path = args.truth or args.video.with_name(args.video.stem + ".truth.jsonl")
        if not truth_path.is_file():
            raise UsageError(f"no truth file {str(truth_path)!r}; pass --truth")
        truth, direction = _truth_by_frame(truth_path)
        capture = cv2.VideoCapture(str(args.video))
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        capture.release()
        frames = _video_frames(args.video, truth)
        source = str(args.video)
    if args.max_frames:
        frames = (f for f, _ in zip(frames, range(args.max_frames), strict=False))
    line_x = args.line_x if args.line_x is not None else width / 2

    s, counted, kept, reported = evaluate(
        frames, width, line_x, direction, args.save_misses, args.verbose
    )
    figures = {
        "source": source,
        "frames": s.frames,
        "visible_object_frames": s.visible,
        "recall": s.found / s.visible if s.visible else None,
        "precision": s.true_detections / s.detections if s.detections else None,
        "screws_crossing": counted,
        "one_id_share": kept / counted if counted else None,
        "crossed_once_share": reported / counted if counted else None,
        "locate_ms_mean": 1000 * s.seconds / max(1, s.frames),
    }
    print(f"source              {source}, {s.frames} frames, line x={line_x:g}")
    print(
        f"locator recall      {_percent(s.found, s.visible)}  ({s.found}/{s.visible} object-frames)"
    )
    print(
        f"locator precision   {_percent(s.true_detections, s.detections)}  "
        f"({s.true_detections}/{s.detections} detections)"
    )
    print(f"one id to the line  {_percent(kept, counted)}  ({kept}/{counted} screws)")
    print(f"crossed once        {_percent(reported, counted)}  ({reported}/{counted} screws)")
    print(f"locate time         {figures['locate_ms_mean']:.2f} ms/frame mean (all threads)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
