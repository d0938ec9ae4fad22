"""End-to-end figures of the daemon on simulated footage with known truth.

    python bench/daemon_e2e.py --model model.onnx
    python bench/daemon_e2e.py --model model.onnx --video X.mp4      # reuse X.mp4 + X.truth.jsonl

What it does:

1. renders the footage unless ``--video`` is given:
   ``python -m training synth video --out X.mp4 --seconds 60 --seed 4321``
   (1280x720 at 30 fps, H.264, plus ``X.truth.jsonl`` with every screw's trajectory);
2. connects a real ZeroMQ SUB, then starts the real daemon on the file
   (``python -m service run --source X.mp4 --pace realtime --exit-at-end``),
   scrapes its ``/metrics`` over HTTP while it runs;
3. matches every decision to a truth object: the truth trajectory's position in
   the decision's frame against the decision's bbox centre (nearest, within a
   gate); a screw "crosses" when its truth centre passes the decision line
   after it was fully visible for ``--min-frames`` frames;
4. prints the figures and checks them against the targets:

   - coverage: crossing screws with exactly one decision        >= 99.5 %
   - bin accuracy: those decisions whose bin is the truth's bin  >= 99 %
   - frames dropped (``beltsort_frames_dropped_total``)          == 0
   - p99 capture-to-publish (``t_publish_ns - t_capture_ns``)   <= 50 ms

   plus drops by reason, decisions by reason and latency percentiles.

Exit status 0 when every target is met, 1 when one is missed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"coverage": 0.995, "accuracy": 0.99, "frames_dropped": 0, "p99_ms": 50.0}


# ---------------------------------------------------------------- footage and truth


def render(out: Path, seconds: float, seed: int) -> None:
    command = [sys.executable, "-m", "training", "synth", "video", "--out", str(out)]
    command += ["--seconds", str(seconds), "--seed", str(seed)]
    print(f"rendering: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def load_truth(video: Path) -> list[dict]:
    path = video.with_suffix(".truth.jsonl")
    if not path.exists():
        sys.exit(f"daemon_e2e: error: no truth file {path} beside {video}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def crossings(objects: list[dict], line_x: float, direction: int, min_frames: int) -> dict:
    """truth id -> crossing frame, for screws whose centre passes the line with the belt."""
    found = {}
    for obj in objects:
        steps = obj["trajectory"]
        for i in range(1, len(steps)):
            a = (steps[i - 1]["cx"] - line_x) * direction
            b = (steps[i]["cx"] - line_x) * direction
            if a < 0 <= b:
                if sum(1 for s in steps[:i] if s["fully_visible"]) >= min_frames:
                    found[obj["id"]] = steps[i]["frame"]
                break
    return found


def match(decision: dict, by_frame: dict[int, list[tuple[int, dict]]], gate_px: float):
    """The truth id nearest to the decision's bbox centre in its frame, or None."""
    x, y, w, h = decision["bbox"]
    cx, cy = x + w / 2, y + h / 2
    best, best_d = None, math.inf
    for obj_id, step in by_frame.get(decision["frame"], []):
        d = math.hypot(step["cx"] - cx, step["cy"] - cy)
        if d < best_d:
            best, best_d = obj_id, d
    return best if best_d <= gate_px else None


# ---------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber(threading.Thread):
    """A plain SUB socket, connected before the daemon binds, collecting every message."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 10)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.decisions: list[dict] = []
        self.heartbeats = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.socket.poll(50):
                topic, payload = self.socket.recv_multipart()
                if topic == b"decision":
                    self.decisions.append(json.loads(payload))
                else:
                    self.heartbeats += 1

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.socket.close(linger=0)
        self.context.term()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {series: value} for the beltsort_ series."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("beltsort_"):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def run_daemon(args, video: Path, endpoint: str) -> tuple[int, list[str], dict[str, float]]:
    command = [sys.executable, "-m", "service", "run", "--model", str(args.model)]
    command += ["--source", str(video), "--pace", args.pace, "--exit-at-end"]
    command += ["--publish", endpoint, "--http", "127.0.0.1:0"]
    if args.config:
        command += ["--config", str(args.config)]
    print(f"daemon: {' '.join(command[1:])}", flush=True)
    proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port: list[int] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if args.verbose:
                print("  | " + lines[-1], flush=True)
            found = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port.append(int(found.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics: dict[str, float] = {}
    deadline = time.monotonic() + args.seconds * 3 + 120
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("daemon_e2e: error: the daemon did not exit at the end of the file")
        if port:
            with contextlib.suppress(OSError):  # the daemon is exiting
                metrics = scrape(port[0])
        time.sleep(0.5)
    reader.join(5)
    return proc.returncode, lines, metrics


# ---------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX model file (trained)")
    parser.add_argument("--video", type=Path, help="existing X.mp4 with X.truth.jsonl beside it")
    parser.add_argument("--seconds", type=float, default=60.0, help="footage length (60)")
    parser.add_argument("--seed", type=int, default=4321, help="footage seed (4321)")
    parser.add_argument("--config", type=Path, help="daemon config file (default: none)")
    parser.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    parser.add_argument("--line", type=float, default=0.5, help="decision line as in the config")
    parser.add_argument("--min-frames", type=int, default=3, help="visible frames before the line")
    parser.add_argument("--gate", type=float, default=60.0, help="match gate, px (60)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--verbose", action="store_true", help="echo the daemon's log")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"model {args.model} does not exist")

    with tempfile.TemporaryDirectory(prefix="beltsort-e2e-") as tmp:
        video = args.video or Path(tmp) / "belt.mp4"
        if args.video is None:
            render(video, args.seconds, args.seed)
        objects = load_truth(video)

        endpoint = f"tcp://127.0.0.1:{free_port()}"
        subscriber = Subscriber(endpoint)
        subscriber.start()
        try:
            code, log, metrics = run_daemon(args, video, endpoint)
            time.sleep(0.3)  # the last messages in flight on loopback
        finally:
            subscriber.close()

    # Truth and matching
    from service.model_file import check_model_file  # the daemon's own reading of the file

    labels = check_model_file(args.model).labels
    width = 1280
    for line in log:
        found = re.search(r"decision line at x = (\d+) px of (\d+)", line)
        if found:
            width = int(found.group(2))
    crossing = crossings(objects, args.line * width, 1, args.min_frames)
    label_of = {obj["id"]: obj["label"] for obj in objects}
    by_frame: dict[int, list[tuple[int, dict]]] = {}
    for obj in objects:
        for step in obj["trajectory"]:
            by_frame.setdefault(step["frame"], []).append((obj["id"], step))

    decisions = subscriber.decisions
    per_object: dict[int, list[dict]] = {}
    unmatched = 0
    for d in decisions:
        obj_id = match(d, by_frame, args.gate)
        if obj_id is None:
            unmatched += 1
        else:
            per_object.setdefault(obj_id, []).append(d)
    exactly_one = [i for i in crossing if len(per_object.get(i, [])) == 1]
    missing = [i for i in crossing if not per_object.get(i)]
    doubled = [i for i in crossing if len(per_object.get(i, [])) > 1]
    extra = sum(len(v) for i, v in per_object.items() if i not in crossing)
    correct = sum(
        1
        for i in exactly_one
        if label_of[i] in labels and per_object[i][0]["bin"] == labels.index(label_of[i])
    )
    errors = [
        f"{label_of[i]}->{d['label']}({d['reason']},{d['confidence']:.2f},{d['views']}v)"
        for i in exactly_one
        for d in per_object[i][:1]
        if label_of[i] not in labels or d["bin"] != labels.index(label_of[i])
    ]
    latencies_ms = [(d["t_publish_ns"] - d["t_capture_ns"]) / 1e6 for d in decisions]

    # Figures
    drops = {
        re.search(r'reason="(\w+)"', k).group(1): v
        for k, v in metrics.items()
        if k.startswith("beltsort_frames_dropped_total")
    }
    log_drops = next((line for line in log if "stopped:" in line), "")
    found = re.search(r"(\d+) dropped", log_drops)
    frames_dropped = int(found.group(1)) if found else int(sum(drops.values()))
    figures = {
        "daemon_exit": code,
        "truth_crossings": len(crossing),
        "decisions": len(decisions),
        "coverage": len(exactly_one) / len(crossing) if crossing else math.nan,
        "missing": len(missing),
        "doubled": len(doubled),
        "extra_decisions": extra,
        "unmatched_decisions": unmatched,
        "accuracy": correct / len(exactly_one) if exactly_one else math.nan,
        "frames_dropped": frames_dropped,
        "p50_ms": percentile(latencies_ms, 50),
        "p99_ms": percentile(latencies_ms, 99),
        "max_ms": max(latencies_ms, default=math.nan),
        "reasons": dict(Counter(d["reason"] for d in decisions)),
        "frames_dropped_by_reason_metrics": drops,
        "crops_dropped_metrics": {
            k: v for k, v in metrics.items() if k.startswith("beltsort_crops_dropped_total")
        },
        "publish_dropped_metrics": metrics.get("beltsort_publish_dropped_total"),
        "frames_metrics": metrics.get('beltsort_frames_total{source="src0"}'),
        "daemon_final_line": log_drops.split("service.pipeline: ")[-1],
    }
    checks = {
        "coverage": figures["coverage"] >= TARGETS["coverage"],
        "accuracy": figures["accuracy"] >= TARGETS["accuracy"],
        "frames_dropped": figures["frames_dropped"] == TARGETS["frames_dropped"],
        "p99_ms": figures["p99_ms"] <= TARGETS["p99_ms"],
    }
    print()
    print(f"truth crossings          {len(crossing)}  (decisions received: {len(decisions)})")
    print(
        f"coverage (exactly one)   {figures['coverage']:.2%}  target >= 99.5 %  "
        f"[{'PASS' if checks['coverage'] else 'FAIL'}]  missing {len(missing)}, "
        f"doubled {len(doubled)}, extra {extra}, unmatched {unmatched}"
    )
    print(
        f"bin accuracy             {figures['accuracy']:.2%}  target >= 99 %    "
        f"[{'PASS' if checks['accuracy'] else 'FAIL'}]  reasons {figures['reasons']}"
    )
    print(
        f"frames dropped           {frames_dropped}  target 0         "
        f"[{'PASS' if checks['frames_dropped'] else 'FAIL'}]  by reason (/metrics) {drops}"
    )
    print(
        f"p99 capture-to-publish   {figures['p99_ms']:.1f} ms  target <= 50 ms  "
        f"[{'PASS' if checks['p99_ms'] else 'FAIL'}]  p50 {figures['p50_ms']:.1f} ms, "
        f"max {figures['max_ms']:.1f} ms"
    )
    stages = {}
    for stage in ("locate", "queue", "infer", "decide", "publish"):
        total = metrics.get(f'beltsort_stage_seconds_sum{{stage="{stage}"}}')
        count = metrics.get(f'beltsort_stage_seconds_count{{stage="{stage}"}}')
        if total is not None and count:
            stages[stage] = round(total / count * 1000, 2)
    figures["stage_mean_ms"] = stages
    replay = next((line for line in log if "source src0 ended" in line), "")
    found = re.search(r"after (\d+) frames in ([\d.]+) s \(([\d.]+) fps\)", replay)
    figures["replay"] = (
        {"frames": int(found.group(1)), "seconds": float(found.group(2)),
         "fps": float(found.group(3))}
        if found else None
    )  # fmt: skip
    figures["errors"] = errors
    figures["doubled_detail"] = {
        i: [(d["track_id"], d["frame"], d["bbox"]) for d in per_object[i]] for i in doubled
    }
    if doubled:
        print(f"doubled (truth id: track, frame, bbox) {figures['doubled_detail']}")
    print(f"wrong bins (truth->label(reason,confidence,views)) {' '.join(errors) or 'none'}")
    print(f"stage means (ms)         {stages}")
    print(f"replay (delivered)       {figures['replay']}  (30 fps footage: real time if ~30)")
    print(f"crops dropped (/metrics) {figures['crops_dropped_metrics']}")
    print(f"publish dropped          {figures['publish_dropped_metrics']}")
    print(f"daemon                   exit {code}: {figures['daemon_final_line']}")
    if args.json:
        args.json.write_text(json.dumps({**figures, "checks": checks}, indent=2))
    return 0 if code == 0 and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
