"""The pipeline in-process, with real parts: an ffmpeg-encoded simulated belt video,
a model file made by the project's exporter, onnxruntime, a ZeroMQ SUB, HTTP probes.

``make_model`` and ``make_video`` are shared with ``test_daemon_cli.py``; both cache
their output in the session's base temp folder, so each is built once per run.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from service.config import Config
from service.errors import UsageError
from service.palette import default_labels
from service.pipeline import Pipeline, decision_config, parse_listen

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg"),
]

MODEL_SIZE = 64  # px: a small input keeps inference cheap on a 2-core CI box
VIDEO_SEED = 1  # its first screw crosses the line at frame 16: subscribers are connected by then
VIDEO_SECONDS = 3
DECISION_FIELDS = {
    "seq", "run_id", "source", "track_id", "label", "confidence", "bin", "reason", "views",
    "frame", "pts_ms", "bbox", "t_capture_ns", "t_publish_ns", "eject_at_ns", "model",
}  # fmt: skip


# ---------------------------------------------------------------- shared builders


def shared_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "daemon-shared"
    path.mkdir(exist_ok=True)
    return path


def make_model(folder: Path) -> Path:
    """An untrained MobileNetV2 checkpoint turned into a model file by `python -m export`."""
    out = folder / "model.onnx"
    if out.exists():
        return out
    torch = pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    from training.model import CHECKPOINT_FORMAT, build_model

    labels = default_labels()
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", len(labels), MODEL_SIZE, weights="none")
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "arch": "mobilenet_v2", "img_size": MODEL_SIZE,
        "labels": labels, "state_dict": net.state_dict(), "temperature": 1.0,
        "weights_origin": "none", "dataset_fingerprint": "sha256:test", "config": {},
        "metrics": {}, "created": "2026-12-03T19:00:00+00:00",
    }  # fmt: skip
    torch.save(checkpoint, folder / "best.pt")
    rng = np.random.default_rng(0)
    for label in labels:  # the exporter checks parity on one crop per class
        (folder / "val" / label).mkdir(parents=True, exist_ok=True)
        crop = rng.integers(0, 256, (MODEL_SIZE, MODEL_SIZE, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / "val" / label / "0.png"), crop)
    command = [sys.executable, "-m", "export", "--log-level", "WARNING", "--force"]
    command += ["--checkpoint", str(folder / "best.pt"), "--out", str(out)]
    command += ["--val", str(folder / "val")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def make_video(folder: Path) -> tuple[Path, list[dict]]:
    """`python -m training synth video`: an H.264 belt video and its truth objects."""
    out = folder / "belt.mp4"
    truth = folder / "belt.truth.jsonl"
    if not truth.exists():
        command = [sys.executable, "-m", "training", "synth", "video", "--out", str(out)]
        command += ["--seconds", str(VIDEO_SECONDS), "--seed", str(VIDEO_SEED)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    objects = [json.loads(line) for line in truth.read_text().splitlines() if line.strip()]
    return out, objects


def truth_crossings(objects: list[dict], line_x: float, min_frames_before: int = 3) -> dict:
    """id -> (frame, bbox) where the truth centre crosses ``line_x`` left to right, for
    objects fully visible for ``min_frames_before`` frames first (the envelope's minimum)."""
    found = {}
    for obj in objects:
        steps = obj["trajectory"]
        for i in range(1, len(steps)):
            before, at = steps[i - 1], steps[i]
            if before["cx"] < line_x <= at["cx"]:
                seen = [s for s in steps[:i] if s["fully_visible"]]
                if len(seen) >= min_frames_before:
                    found[obj["id"]] = (at["frame"], at["bbox"])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """A real SUB socket on its own thread, connected before the daemon binds."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 10)  # find the daemon within ms of its bind
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.messages: list[tuple[str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket.poll(50):
                topic, payload = self.socket.recv_multipart()
                self.messages.append((topic.decode(), json.loads(payload)))

    def decisions(self) -> list[dict]:
        return [body for topic, body in self.messages if topic == "decision"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(linger=0)
        self.context.term()


def match(decisions: list[dict], crossings: dict, max_frame_gap: int = 2) -> dict:
    """truth id -> the decisions whose crossing frame and box centre fit that object."""
    matched: dict = {tid: [] for tid in crossings}
    for d in decisions:
        x, y, w, h = d["bbox"]
        for tid, (frame, (tx, ty, tw, th)) in crossings.items():
            near_x = abs((x + w / 2) - (tx + tw / 2)) < 40 + 10 * max_frame_gap
            near_y = abs((y + h / 2) - (ty + th / 2)) < 40
            if abs(d["frame"] - frame) <= max_frame_gap and near_x and near_y:
                matched[tid].append(d)
    return matched


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return make_model(shared_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def belt_video(tmp_path_factory) -> tuple[Path, list[dict]]:
    return make_video(shared_dir(tmp_path_factory))


def pipeline_config(model: Path, uris: list[str], endpoint: str, **sections: dict) -> Config:
    """Test settings; ``sections`` such as ``sources={"pace": "fast"}`` go on top."""
    config = Config()
    config = config.replace("model", path=str(model), intra_op_threads=1)
    config = config.replace("sources", uris=tuple(uris))
    config = config.replace("publish", endpoint=endpoint, heartbeat_s=0.2)
    config = config.replace("http", listen="127.0.0.1:0")
    for section, values in sections.items():
        config = config.replace(section, **values)
    return config


def run_in_thread(pipeline: Pipeline) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["rc"] = pipeline.run()
        finally:
            pipeline.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
            code = response.status
    except urllib.error.HTTPError as exc:
        body, code = exc.read().decode(), exc.code
    try:
        return code, json.loads(body)
    except json.JSONDecodeError:
        return code, body


# ---------------------------------------------------------------- small parts


def test_parse_listen():
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen(":0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen("off") is None and parse_listen("") is None
    with pytest.raises(UsageError, match="'localhost' is not HOST:PORT"):
        parse_listen("localhost")


def test_decision_config_maps_the_sections():
    config = Config().replace("decide", reject_bin=7, class_to_bin={"red": 3}, view_wait_ms=80)
    config = config.replace("pipeline", direction="right_to_left")
    dc = decision_config(config, num_classes=20)
    assert (dc.reject_bin, dc.class_to_bin, dc.view_wait_ms, dc.direction) == (
        7, {"red": 3}, 80.0, -1
    )  # fmt: skip
    assert dc.belt_speed_mm_s is None  # geometry not configured: no eject times
    config = config.replace("belt", speed_mm_s=200, px_per_mm=2, ejector_distance_mm=[100.0] * 21)
    dc = decision_config(config, num_classes=20)
    assert dc.belt_speed_mm_s == 200 and len(dc.ejector_distance_mm) == 21
    assert decision_config(Config(), 20).reject_bin is None  # -1: the decider's default (C)


def test_no_model_is_a_config_error():
    with pytest.raises(Exception, match="--model"):
        Pipeline(Config())


# ---------------------------------------------------------------- the whole line


def test_a_file_gets_one_decision_per_crossing_and_exits_at_end(model_path, belt_video):
    video, objects = belt_video
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    collector = Collector(endpoint)
    config = pipeline_config(model_path, [str(video)], endpoint, sources={"pace": "fast"})
    pipeline = Pipeline(config, exit_at_end=True, registry=CollectorRegistry())
    try:
        pipeline.start()
        code, body = get(f"http://127.0.0.1:{pipeline.http.port}/healthz")
        assert code == 200, body
        thread, result = run_in_thread(pipeline)
        thread.join(120)
        assert not thread.is_alive(), "the pipeline did not exit at the end of the file"
    finally:
        pipeline.close()
        time.sleep(0.2)
        collector.close()
    assert result["rc"] == 0

    registry = pipeline.metrics.registry
    frames = registry.get_sample_value("beltsort_frames_total", {"source": "src0"})
    assert frames == VIDEO_SECONDS * 30
    for reason in ("queue_full", "stale", "overload"):
        labels = {"source": "src0", "reason": reason}
        assert not registry.get_sample_value("beltsort_frames_dropped_total", labels)
    # fast pace: back-pressure, not drops, all the way to inference
    assert not registry.get_sample_value("beltsort_crops_dropped_total", {"reason": "queue_full"})

    crossings = truth_crossings(objects, line_x=640)
    decisions = collector.decisions()
    assert len(crossings) >= 5
    matched = match(decisions, crossings)
    missing = [tid for tid, found in matched.items() if not found]
    doubled = [tid for tid, found in matched.items() if len(found) > 1]
    assert not missing and not doubled, (missing, doubled, decisions)
    assert len(decisions) == len(crossings)  # nothing decided that did not cross
    for d in decisions:
        assert set(d) == DECISION_FIELDS
        assert d["views"] >= 1 and d["model"] == pipeline.engine.info.model_id
        assert d["t_publish_ns"] >= d["t_capture_ns"]
    assert [d["seq"] for d in decisions] == sorted(d["seq"] for d in decisions)
    heartbeats = [body for topic, body in collector.messages if topic == "heartbeat"]
    assert heartbeats and "sources_up" in heartbeats[0]


def test_stop_decides_everything_in_flight_within_the_bound(model_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    collector = Collector(endpoint)
    source = "synthetic:?fps=30&size=640x360&rate=6&seed=2"
    config = pipeline_config(
        model_path, [source], endpoint, decide={"view_wait_ms": 2000.0}
    )  # a long view wait: crossed objects are still waiting when the stop comes
    pipeline = Pipeline(config, registry=CollectorRegistry())
    try:
        pipeline.start()
        thread, result = run_in_thread(pipeline)
        url = f"http://127.0.0.1:{pipeline.http.port}/readyz"
        deadline = time.monotonic() + 30
        while get(url)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        code, body = get(url)
        assert code == 200 and body  # model warm, the source up
        while pipeline.crossings < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.crossings >= 3, "no screw crossed the line in 30 s"

        t0 = time.monotonic()
        pipeline.request_stop()
        thread.join(10)
        elapsed = time.monotonic() - t0
    finally:
        pipeline.close()
        time.sleep(0.2)
        collector.close()
    assert not thread.is_alive() and result["rc"] == 0
    assert elapsed < config.pipeline.shutdown_timeout_s
    assert pipeline.decisions == pipeline.crossings
    assert len(collector.decisions()) == pipeline.crossings
    last = [body for topic, body in collector.messages if topic == "heartbeat"][-1]
    assert last["status"] == "stopping"


def test_realtime_sheds_whole_frames_and_counts_them(model_path, belt_video):
    video, _ = belt_video
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Frames are shed when they wait (stale after 1 ms) or while too many crops
    # are in flight. Waiting depends on the machine's load, so crops are also
    # held in the batcher for up to a second (a batch of 1024 never fills):
    # with more than one view in flight, the frames of that second are shed.
    config = pipeline_config(
        model_path,
        [str(video)],
        endpoint,
        sources={"max_frame_age_ms": 1.0},
        pipeline={"max_inflight_views": 1, "max_batch": 1024, "max_wait_ms": 1000.0},
    )
    pipeline = Pipeline(config, exit_at_end=True, registry=CollectorRegistry())
    try:
        pipeline.start()
        thread, _ = run_in_thread(pipeline)
        thread.join(60)
        assert not thread.is_alive()
    finally:
        pipeline.close()
    registry = pipeline.metrics.registry
    frames = registry.get_sample_value("beltsort_frames_total", {"source": "src0"})
    dropped = sum(
        registry.get_sample_value(
            "beltsort_frames_dropped_total", {"source": "src0", "reason": reason}
        )
        or 0
        for reason in ("queue_full", "stale", "overload")
    )
    assert frames == VIDEO_SECONDS * 30
    assert dropped > 0
    assert pipeline.frames_located + dropped == frames  # every frame accounted for
