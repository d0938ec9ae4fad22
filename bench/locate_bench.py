"""Speed of locate + crop on one core: median milliseconds per frame.

Frames come from ``service.simulator`` (rendered first, JPEG round-tripped
like decoded video, so rendering is not timed) or from a video file. Each
timed step is what the daemon does per frame: ``Locator.detect`` and one
``cut_crop`` per fully visible object. OpenCV is held to one thread
(``cv2.setNumThreads(1)``), as one camera's locate stage gets one core.

    python bench/locate_bench.py                      # 1280x720, 150 frames
    python bench/locate_bench.py --size 1920x1080 --crop 128
    python bench/locate_bench.py --video belt.mp4
"""

from __future__ import annotations

import statistics
import sys
import time

import cv2
import numpy as np

from service.cli_support import (
    Parser,
    bounded_float,
    bounded_int,
    existing_file,
    frame_size,
    run_main,
)
from service.errors import SourceError
from service.locate import Locator, cut_crop


def _simulated(size: tuple[int, int], frames: int, seed: int, rate: float) -> list[np.ndarray]:
    from service.simulator import BeltSimulator

    sim = BeltSimulator(size[0], size[1], 30.0, rate, seed=seed)
    return [sim.next_frame(compress=True).image for _ in range(frames)]


def _from_video(path, frames: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"OpenCV cannot open video {str(path)!r}; is it a video file?")
    images = []
    try:
        while len(images) < frames:
            ok, image = capture.read()
            if not ok:
                break
            images.append(image)
    finally:
        capture.release()
    if not images:
        raise SourceError(f"video {str(path)!r} gave no frames")
    return images


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="locate_bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=existing_file, help="time on this video's frames")
    parser.add_argument(
        "--size", type=frame_size, default=(1280, 720), help="simulated WIDTHxHEIGHT (1280x720)"
    )
    parser.add_argument(
        "--frames", type=bounded_int(10, 100_000), default=150, help="frames to time (150)"
    )
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    parser.add_argument(
        "--rate", type=bounded_float(0.0, 50.0), default=2.0, help="simulated screws/s (2)"
    )
    parser.add_argument(
        "--crop", type=bounded_int(8, 512), default=96, help="crop side S in px (96)"
    )
    parser.add_argument(
        "--repeat", type=bounded_int(1, 20), default=3,
        help="passes over the frames; the median is over all of them (3)",
    )  # fmt: skip
    parser.add_argument("--threads", type=bounded_int(1, 64), default=1, help="OpenCV threads (1)")
    args = parser.parse_args(argv)

    cv2.setNumThreads(args.threads)
    if args.video:
        images = _from_video(args.video, args.frames)
        source = str(args.video)
    else:
        images = _simulated(args.size, args.frames, args.seed, args.rate)
        source = f"simulated {args.size[0]}x{args.size[1]}, seed {args.seed}"

    locator = Locator()
    for image in images[:5]:  # warm-up: first calls allocate
        locator.detect(image)

    # Wall time, and this thread's CPU time: on a shared machine the CPU time
    # leaves out the waits for a core, so it is the steadier figure
    locate_ms, total_ms, cpu_ms, objects = [], [], [], []
    for _ in range(args.repeat):
        for image in images:
            started, cpu_started = time.perf_counter(), time.thread_time()
            dets = locator.detect(image)
            located = time.perf_counter()
            for det in dets:
                if not det.partial:
                    cut_crop(image, det, args.crop)
            done, cpu_done = time.perf_counter(), time.thread_time()
            locate_ms.append(1000 * (located - started))
            total_ms.append(1000 * (done - started))
            cpu_ms.append(1000 * (cpu_done - cpu_started))
            objects.append(len(dets))

    h, w = images[0].shape[:2]
    p90 = float(np.percentile(total_ms, 90))
    print(f"source            {source}: {len(images)} frames {w}x{h}, {args.repeat} passes")
    print(f"opencv threads    {cv2.getNumThreads()}")
    print(f"objects/frame     {statistics.mean(objects):.1f} mean, {max(objects)} max")
    print(f"locate            {statistics.median(locate_ms):.2f} ms median")
    print(
        f"locate + crop     {statistics.median(total_ms):.2f} ms median, {p90:.2f} ms p90 "
        f"(crop {args.crop}x{args.crop}), wall clock"
    )
    print(f"locate + crop     {statistics.median(cpu_ms):.2f} ms median, CPU time of the thread")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
