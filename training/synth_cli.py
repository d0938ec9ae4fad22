"""``python -m training synth``: simulated belt video with its truth, or a crops dataset.

``synth video`` renders the belt simulator (``service.simulator``) and pipes
the frames to the ffmpeg binary (H.264, yuv420p: a real encoded file, as a
camera recording would be), and writes ``<stem>.truth.jsonl`` beside it: one
screw a line with its label, size and per-frame trajectory.

``synth crops`` writes a labelled dataset, one folder per class, whose crops
are cut by the service's own locator from simulated frames (many randomised
scenes, JPEG round-tripped like video), so training sees exactly the crops
the daemon will cut.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from service.cli_support import (
    bounded_float,
    bounded_int,
    frame_size,
    output_dir,
    output_file,
    setup_logging,
)
from service.errors import BeltsortError, DatasetError, UsageError
from service.palette import default_palette
from service.simulator import BeltSimulator, SceneOptions, SimFrame
from training.data import make_class_folder

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")
# x264's presets from fastest (largest file) to slower; superfast keeps the
# encoder well behind the renderer on two cores.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
# How long ffmpeg may take to finish the file once the last frame is written.
FFMPEG_FINISH_TIMEOUT_S = 120.0

# Crops: frames taken from each randomised scene before drawing the next one,
# so the light, belt and camera vary across the set.
FRAMES_PER_SCENE = 4
# A screw is cut at most this often per scene (at different places and turns).
MAX_CUTS_PER_SCREW = 2
# A scene gives at most this many crops (the default of --per-scene). Errors
# come from light, belts and cameras the model has not seen, so every crop of a
# training set gets a scene of its own: 600 crops then span 600 scenes. Measured
# against 6 a scene (about 110 scenes), on the same held-out and test crops:
# 93.2 % against 92.5 % and 94.5 % against 93.0 % (README, Training). Rendering
# takes about five times as long (100 s for 600 crops through JPEG; the H.264
# round trips of --codec mixed bring it to 3-6 minutes).
MAX_CROPS_PER_SCENE = 1
# A detection matches a truth object when their centres are this close
# (the larger of a floor in px and a share of the screw's length).
MATCH_FLOOR_PX = 6.0
MATCH_SHARE_OF_LENGTH = 0.2
# Give up when this many frames in a row yield no crop at all.
MAX_FRAMES_WITHOUT_CROP = 60
# With --line, the camera's frame rate (the same as `synth video`'s default).
LINE_FPS = 30.0
# The daemon reads footage through a codec, and the crops a plant collects come
# through the same one, so each scene's frames pass through one before the
# locator: H.264 for most (x264 at a CRF drawn from the range below; `synth
# video` writes 23), the simulator's own JPEG (an MJPEG camera) for the rest.
# Measured: a model trained on JPEG crops only read 100 % of a line's JPEG
# crops right, and 98.5 % of the same frames after H.264 (beige lost to white
# and gray), which is what it met in the daemon.
# NOTE: each frame is encoded alone, as an intra frame; a stream's predicted
# frames at the same CRF are a little worse, which the upper end of the range
# stands in for.
CODECS = ("mixed", "h264", "jpeg")
H264_SHARE = 2 / 3  # of the scenes, with --codec mixed
H264_CRF_RANGE = (18, 32)


def add_arguments(parser) -> None:
    """Sub-commands ``video`` and ``crops``."""
    sub = parser.add_subparsers(dest="synth_command", required=True, metavar="WHAT")

    video = sub.add_parser(
        "video",
        help="an H.264 video of the simulated belt, with <stem>.truth.jsonl beside it",
        description="Render the simulated belt to an H.264 video (via ffmpeg) and write "
        "the ground truth of every screw beside it as <stem>.truth.jsonl.",
    )
    # fmt: off
    arg = video.add_argument
    arg("--out", type=output_file, required=True, metavar="FILE",
        help="video file (.mp4, .mkv, .mov, .avi)")
    arg("--seconds", type=bounded_float(0.0, 86400.0, low_open=True), required=True, metavar="S",
        help="length of the video in seconds")
    arg("--fps", type=bounded_float(15.0, 120.0), default=30.0, help="frame rate, 15..120 (30)")
    arg("--size", type=frame_size, default=(1280, 720), metavar="WxH",
        help="frame size, even width and height (1280x720)")
    arg("--rate", type=bounded_float(0.0, 50.0), default=2.0, metavar="N",
        help="screws per second, 0..50 (2)")
    arg("--seed", type=int, default=0, help="scene seed: same seed, same video (0)")
    arg("--line", type=int, default=None, metavar="SEED",
        help="the belt, light, zinc and camera of `--seed SEED`, with the screws, arrivals "
        "and noise of --seed: new footage of one line (default: the scene of --seed)")
    arg("--only", type=_colour_list, default=None, metavar="NAME[,NAME...]",
        help="paint only these colours, e.g. `--only red` for a run of red screws to cut "
        "training crops from (`python -m training cut`) (default: all twenty)")
    arg("--crf", type=bounded_int(0, 51), default=23, metavar="Q",
        help="x264 quality, 0 (lossless) .. 51 (worst) (23)")
    arg("--preset", choices=X264_PRESETS, default="superfast", metavar="NAME",
        help=f"x264 speed against file size: {', '.join(X264_PRESETS)} (superfast)")
    # fmt: on
    video.set_defaults(synth_run=_run_video)

    crops = sub.add_parser(
        "crops",
        help="a labelled crops dataset cut by the service's locator from simulated frames",
        description="Render many randomised belt scenes, find the screws with the service's "
        "locator and save its crops in one folder per class (DIR/<label>/<label>_00001.png).",
    )
    # fmt: off
    arg = crops.add_argument
    arg("--out", type=output_dir, required=True, metavar="DIR", help="dataset folder")
    arg("--per-class", type=bounded_int(1, 100000), required=True, metavar="N",
        help="crops per class")
    arg("--seed", type=int, default=0, help="seed of the scenes (0)")
    arg("--per-scene", type=bounded_int(1, 1000), default=MAX_CROPS_PER_SCENE, metavar="N",
        help=f"at most N crops from one scene: fewer, more scenes ({MAX_CROPS_PER_SCENE})")
    arg("--size", type=bounded_int(16, 512), default=128, metavar="PX",
        help="crop side, 16..512 (128; the same as fit --img-size)")
    arg("--frame-size", type=frame_size, default=(1280, 720), metavar="WxH",
        help="size of the simulated frames (1280x720)")
    arg("--line", type=int, default=None, metavar="SEED",
        help="one line: every scene has the belt, light, zinc and camera settings of "
        "`synth video --seed SEED`, with its own screws, minute and noise "
        "(default: every scene is randomised across the whole envelope)")
    arg("--codec", choices=CODECS, default="mixed",
        help="what each scene's frames pass through before the locator: h264 (a stream or "
        f"file, CRF {H264_CRF_RANGE[0]}-{H264_CRF_RANGE[1]}), jpeg (an MJPEG camera) or mixed "
        f"({H264_SHARE:.0%} of the scenes H.264) (mixed)")
    # fmt: on
    crops.set_defaults(synth_run=_run_crops)


def run(args) -> int:
    """Run the chosen sub-command; 0 on success (errors raise BeltsortError)."""
    setup_logging()
    return args.synth_run(args)


# ---------------------------------------------------------------------- video
def _run_video(args) -> int:
    out: Path = args.out
    width, height = args.size
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(
            f"video file {str(out)!r} has no video suffix; use one of {', '.join(VIDEO_SUFFIXES)}"
        )
    if width % 2 or height % 2:
        raise UsageError(
            f"size {width}x{height}: H.264 yuv420p needs even width and height; "
            f"use e.g. {width // 2 * 2}x{height // 2 * 2}"
        )
    frames = max(1, round(args.seconds * args.fps))
    truth_path = out.with_name(out.stem + ".truth.jsonl")

    started = time.perf_counter()
    line = SceneOptions.randomised(args.line) if args.line is not None else None
    sim = BeltSimulator(
        width, height, args.fps, args.rate, seed=args.seed, options=line, camera_seed=args.line
    )
    if args.only:
        sim.label_weights = [float(c.name in args.only) for c in sim.labels]
    tracks: dict[int, dict] = {}
    with _Encoder(out, width, height, args.fps, args.crf, args.preset) as encoder:
        for _ in range(frames):
            frame = sim.next_frame()
            encoder.write(frame.image)
            _record(tracks, frame)
    _write_truth(truth_path, tracks)

    fully = sum(t["first_fully_visible"] is not None for t in tracks.values())
    print(
        f"wrote {out}: {frames} frames {width}x{height} at {args.fps:g} fps, "
        f"{len(tracks)} objects ({fully} fully visible), truth in {truth_path.name}; "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def _colour_list(text: str) -> tuple[str, ...]:
    """``--only``: comma-separated names from the default palette."""
    known = [c.name for c in default_palette()]
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {', '.join(unknown) or 'no colour'} is not in the palette; "
            f"use names from: {', '.join(known)}"
        )
    return names


def _record(tracks: dict[int, dict], frame: SimFrame) -> None:
    """Add one frame's objects to their trajectories."""
    for obj in frame.objects:
        track = tracks.setdefault(
            obj.id,
            {
                "id": obj.id,
                "label": obj.label,
                "length": round(obj.length, 2),
                "width": round(obj.width, 2),
                "first_fully_visible": None,
                "last_fully_visible": None,
                "trajectory": [],
            },
        )
        if obj.fully_visible:
            if track["first_fully_visible"] is None:
                track["first_fully_visible"] = frame.index
            track["last_fully_visible"] = frame.index
        track["trajectory"].append(
            {
                "frame": frame.index,
                "cx": round(obj.cx, 2),
                "cy": round(obj.cy, 2),
                "angle": round(obj.angle_deg, 2),
                "bbox": list(obj.bbox),
                "fully_visible": obj.fully_visible,
            }
        )


def _write_truth(path: Path, tracks: dict[int, dict]) -> None:
    try:
        with path.open("w", encoding="utf-8") as f:
            for track_id in sorted(tracks):
                f.write(json.dumps(tracks[track_id]) + "\n")
    except OSError as exc:
        raise BeltsortError(f"cannot write truth file {str(path)!r}: {exc.strerror}") from exc


class _Encoder:
    """Raw BGR frames piped into ffmpeg, which writes H.264 yuv420p."""

    def __init__(
        self, out: Path, width: int, height: int, fps: float, crf: int, preset: str
    ) -> None:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise UsageError(
                "ffmpeg was not found on PATH; install it (Debian: apt-get install ffmpeg)"
            )
        self.out = out
        self._frame_bytes = width * height * 3
        cmd = [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-nostats", "-y",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", f"{fps:g}",
            "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
            "-pix_fmt", "yuv420p",
        ]  # fmt: skip
        if out.suffix.lower() in (".mp4", ".mov"):
            cmd += ["-movflags", "+faststart"]
        cmd.append(str(out))
        # stderr to a file, not a pipe: a chatty ffmpeg can never block on it
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
        )

    def __enter__(self) -> _Encoder:
        return self

    def write(self, image: np.ndarray) -> None:
        try:
            self._proc.stdin.write(np.ascontiguousarray(image).data)
        except BrokenPipeError:
            self._fail("stopped reading frames")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._proc.kill()
                self._proc.wait(timeout=FFMPEG_FINISH_TIMEOUT_S)
                return
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            try:
                rc = self._proc.wait(timeout=FFMPEG_FINISH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
                self._fail(f"did not finish within {FFMPEG_FINISH_TIMEOUT_S:g} s")
            if rc != 0:
                self._fail(f"exited with status {rc}")
        finally:
            self._log.close()

    def _fail(self, what: str) -> None:
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        detail = f": {lines[-1]}" if lines else ""
        raise BeltsortError(f"ffmpeg {what} while writing {str(self.out)!r}{detail}")


# ---------------------------------------------------------------------- crops
def _run_crops(args) -> int:
    # Imported here: the locator is the service's, and only this command needs it
    from service.locate import Locator, cut_crop

    out: Path = args.out
    width, height = args.frame_size
    if args.codec != "jpeg" and (width % 2 or height % 2):
        raise UsageError(
            f"frame size {width}x{height}: H.264 yuv420p needs even width and height; "
            f"use e.g. {width // 2 * 2}x{height // 2 * 2}, or --codec jpeg"
        )
    mode = args.codec
    if mode == "mixed" and shutil.which("ffmpeg") is None:
        # The default must not stop `make demo` on a box without ffmpeg; the
        # model is then weaker on H.264 footage, which the operator is told.
        logger.warning(
            "ffmpeg is not on PATH, so every scene goes through JPEG only; a model "
            "trained on these crops reads H.264 files and streams less well. Install "
            "ffmpeg (Debian: apt-get install ffmpeg) for the H.264 share of --codec mixed"
        )
        mode = "jpeg"
    names = [c.name for c in default_palette()]
    for name in names:
        make_class_folder(out / name)
    try:
        locator = Locator()
    except NotImplementedError:
        raise UsageError("service.locate.Locator is not implemented yet; crops need it") from None
    writer = _CropWriter(
        out, names, args.per_class, args.size, locator, cut_crop, per_scene=args.per_scene
    )

    # A line's crops: what a plant collects on its own belt under its own camera
    line = SceneOptions.randomised(args.line) if args.line is not None else None

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    scenes = frames = dry_frames = 0
    codecs = dict.fromkeys(CODECS[1:], 0)
    while writer.short():
        # A fresh scene, steered towards the classes still short. Every draw is
        # made whatever the options, so a seed gives the same scenes with any codec.
        scenes += 1
        fps, rate, seed = rng.uniform(15.0, 120.0), rng.uniform(1.0, 4.0), rng.integers(0, 2**31)
        h264 = rng.random() < H264_SHARE
        crf = int(rng.integers(H264_CRF_RANGE[0], H264_CRF_RANGE[1], endpoint=True))
        codec = mode if mode != "mixed" else ("h264" if h264 else "jpeg")
        codecs[codec] += 1
        sim = BeltSimulator(
            width,
            height,
            fps=LINE_FPS if line else float(fps),
            rate=float(rate),
            seed=int(seed),
            options=line,
            camera_seed=args.line,
        )
        sim.label_weights = writer.shortfall()
        # Frames a third of a crossing apart: each screw is seen a few times
        spacing = max(1, int(width / sim.speed_px_per_frame / 3))
        for k in range(FRAMES_PER_SCENE):
            if k:
                sim.advance(spacing - 1)
            frames += 1
            frame = sim.next_frame(compress=codec == "jpeg")
            if codec == "h264":
                image = _h264_round_trip(frame.image, crf)
                frame = dataclasses.replace(frame, image=image)
            matched = writer.cut(frame, scene=scenes)
            dry_frames = 0 if matched else dry_frames + 1
            if dry_frames >= MAX_FRAMES_WITHOUT_CROP:
                raise DatasetError(
                    f"the locator matched no screw in {dry_frames} simulated frames in a row "
                    f"({writer.matched} matched before); check service.locate on a frame "
                    f"of `synth video`"
                )
            if not writer.short() or writer.scene_full(scenes):
                break

    recall = writer.matched / max(writer.visible, 1)
    print(
        f"wrote {writer.written} crops ({args.per_class} per class x {len(names)} classes, "
        f"{args.size} px) to {out} from {frames} frames of {scenes} scenes "
        f"({codecs['h264']} through H.264, {codecs['jpeg']} through JPEG); "
        f"the locator matched {recall:.0%} of fully visible screws, "
        f"{writer.unmatched} detections matched none; {time.perf_counter() - started:.1f} s"
    )
    return 0


def _h264_round_trip(image: np.ndarray, crf: int) -> np.ndarray:
    """``image`` after x264 at ``crf`` (one intra frame) and OpenCV's decoder, as the
    daemon reads a file or stream."""
    height, width = image.shape[:2]
    with tempfile.TemporaryDirectory(prefix="beltsort-h264-") as folder:
        path = Path(folder) / "frame.mkv"
        with _Encoder(path, width, height, LINE_FPS, crf, "superfast") as encoder:
            encoder.write(image)
        capture = cv2.VideoCapture(str(path))
        try:
            ok, decoded = capture.read()
        finally:
            capture.release()
    if not ok:
        raise BeltsortError(f"OpenCV could not decode the H.264 frame ffmpeg wrote to {path}")
    return decoded


class _CropWriter:
    """Matches the locator's detections to the truth and saves the crops still needed."""

    def __init__(
        self, out: Path, names, per_class: int, size: int, locator, cut_crop, *, per_scene: int
    ) -> None:
        self.out, self.names, self.per_class, self.size = out, names, per_class, size
        self.locator, self.cut_crop = locator, cut_crop
        self.counts = dict.fromkeys(names, 0)
        self.cuts: dict[tuple[int, int], int] = {}  # (scene, screw id) -> crops taken
        self.per_scene = per_scene  # crops at most from one scene
        self.visible = self.matched = self.unmatched = self.written = 0

    def short(self) -> bool:
        return min(self.counts.values()) < self.per_class

    def shortfall(self) -> list[int]:
        """Crops still needed per class, in palette order."""
        return [max(self.per_class - self.counts[n], 0) for n in self.names]

    def scene_full(self, scene: int) -> bool:
        """True once ``scene`` gave its ``per_scene`` crops."""
        return sum(n for (s, _), n in self.cuts.items() if s == scene) >= self.per_scene

    def cut(self, frame: SimFrame, scene: int) -> int:
        """Detect, match one-to-one by centre distance, save; returns how many matched."""
        truths = [t for t in frame.objects if t.fully_visible]
        detections = self.locator.detect(frame.image)
        self.visible += len(truths)

        # Greedy matching, closest pairs first
        pairs = sorted(
            (math.hypot(d.cx - t.cx, d.cy - t.cy), i, j)
            for i, d in enumerate(detections)
            for j, t in enumerate(truths)
        )
        used_d: set[int] = set()
        used_t: set[int] = set()
        for dist, i, j in pairs:
            truth = truths[j]
            too_far = dist > max(MATCH_FLOOR_PX, MATCH_SHARE_OF_LENGTH * truth.length)
            if i in used_d or j in used_t or too_far:
                continue
            used_d.add(i)
            used_t.add(j)
            key = (scene, truth.id)
            if (
                self.counts[truth.label] < self.per_class
                and self.cuts.get(key, 0) < MAX_CUTS_PER_SCREW
                and not self.scene_full(scene)
            ):
                self.cuts[key] = self.cuts.get(key, 0) + 1
                self._save(truth.label, self.cut_crop(frame.image, detections[i], self.size))
        self.matched += len(used_t)
        self.unmatched += len(detections) - len(used_d)
        return len(used_t)

    def _save(self, label: str, crop: np.ndarray) -> None:
        self.counts[label] += 1
        path = self.out / label / f"{label}_{self.counts[label]:05d}.png"
        if not cv2.imwrite(str(path), crop):
            raise DatasetError(f"OpenCV could not write crop {str(path)!r}")
        self.written += 1
