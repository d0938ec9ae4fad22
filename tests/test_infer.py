"""The onnxruntime engine and the inference thread, on a real exported model file."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from service.batcher import Batcher, CropJob
from service.decide import Decider, DecisionConfig
from service.errors import ConfigError, ModelFileError
from service.infer import CPU, CUDA, InferenceEngine, InferenceWorker, resolve_providers
from service.metrics import Metrics
from service.palette import default_labels

SIZE = 64
LABELS = default_labels()


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny, untrained MobileNetV2 exported by the project's own exporter.

    The checkpoint is written in training's format and `python -m export` (the
    real command, in a subprocess) turns it into a checked model file; the
    validation folder it checks parity on holds one random crop per class.
    """
    torch = pytest.importorskip("torch")
    cv2 = pytest.importorskip("cv2")
    from training.model import CHECKPOINT_FORMAT, build_model

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", len(LABELS), SIZE, weights="none")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": "mobilenet_v2",
        "img_size": SIZE,
        "labels": LABELS,
        "state_dict": net.state_dict(),
        "temperature": 1.0,
        "weights_origin": "none",
        "dataset_fingerprint": "sha256:test",
        "config": {},
        "metrics": {},
        "created": "2026-12-03T19:00:00+00:00",
    }
    torch.save(checkpoint, folder / "best.pt")
    rng = np.random.default_rng(0)
    for label in LABELS:
        (folder / "val" / label).mkdir(parents=True)
        cv2.imwrite(str(folder / "val" / label / "0.png"), crops(1, rng)[0])

    out = folder / "tiny.onnx"
    command = [sys.executable, "-m", "export", "--log-level", "WARNING"]
    command += ["--checkpoint", str(folder / "best.pt"), "--out", str(out)]
    command += ["--val", str(folder / "val")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def engine(model_path):
    return InferenceEngine(model_path, intra_op_threads=1, max_batch=4)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def crops(n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


# ---------------------------------------------------------------- engine


def test_engine_loads_model_and_reports_provider(model_path, metrics, caplog):
    caplog.set_level(logging.INFO, logger="service.infer")
    eng = InferenceEngine(model_path, metrics=metrics, intra_op_threads=1)
    assert eng.labels == LABELS and eng.input_size == SIZE
    assert eng.provider == eng.requested[0]  # auto: CUDA where usable, else the CPU
    sample = metrics.registry.get_sample_value(
        "beltsort_model_info",
        {
            "model_id": eng.info.model_id,
            "provider": eng.provider,
            "labels": str(len(LABELS)),
            "input_size": str(SIZE),
            "precision": eng.info.precision,
        },
    )
    assert sample == 1.0
    assert f"provider {eng.provider}" in caplog.text


def test_run_gives_one_probability_row_per_crop(engine):
    batch = crops(5)
    probs = engine.run(batch)
    assert probs.shape == (5, len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # batching must not change a crop's answer
    one_by_one = np.concatenate([engine.run(batch[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 32, 32, 3), np.uint8),
        np.zeros((2, SIZE, SIZE, 3), np.float32),
        np.zeros((SIZE, SIZE, 3), np.uint8),
    ],
)
def test_run_refuses_wrong_crops_with_the_expected_shape(engine, bad):
    with pytest.raises(ValueError, match=rf"uint8 crops of shape \(N, {SIZE}, {SIZE}, 3\)"):
        engine.run(bad)


def test_warm_up_runs_the_batch_sizes(model_path, caplog):
    caplog.set_level(logging.INFO, logger="service.infer")
    eng = InferenceEngine(model_path, intra_op_threads=1, max_batch=4)
    seen: list[int] = []
    run = eng.run
    eng.run = lambda x: seen.append(len(x)) or run(x)  # record, then really run
    assert not eng.warmed_up
    last_round_s = eng.warm_up(rounds=2)
    assert eng.warmed_up and last_round_s > 0
    assert seen == [1, 4, 1, 4]
    assert "warmed up" in caplog.text


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA is usable here")
def test_silent_cpu_fallback_is_reported_with_the_remedy(model_path, metrics, caplog):
    caplog.set_level(logging.WARNING, logger="service.infer")
    eng = InferenceEngine(model_path, providers=["cuda", "cpu"], metrics=metrics)
    assert eng.requested == [CUDA, CPU]
    assert eng.provider == CPU
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "asked onnxruntime for CUDAExecutionProvider but it runs on CPUExecutionProvider" in (
        warning[0].getMessage()
    )
    assert "install onnxruntime-gpu" in warning[0].getMessage()
    families = {m.name: m for m in metrics.registry.collect()}
    assert families["beltsort_model"].samples[0].labels["provider"] == CPU


def test_provider_names_are_checked():
    assert resolve_providers(None) == resolve_providers([])
    assert resolve_providers(None)[-1] == CPU
    assert resolve_providers(["CPU"]) == [CPU]
    with pytest.raises(ConfigError, match=r"unknown onnxruntime provider 'cudaa'.*cpu, cuda"):
        resolve_providers(["cudaa"])
    with pytest.raises(ConfigError, match="a string"):
        resolve_providers("cuda")


def test_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelFileError, match=rf"{path}.*does not exist"):
        InferenceEngine(path)


def test_broken_file_is_refused_with_a_clear_message(tmp_path, model_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match=rf"{junk}.*not an ONNX model.*python -m export"):
        InferenceEngine(junk)

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[:100_000])
    with pytest.raises(ModelFileError, match=str(truncated)) as info:
        InferenceEngine(truncated)
    assert "\n" not in str(info.value).strip()  # one line for the operator


def test_model_without_contract_metadata_is_refused(tmp_path, model_path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(model_path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelFileError, match=r"beltsort.labels"):
        InferenceEngine(bare)


def test_bad_thread_count_is_refused(model_path):
    with pytest.raises(ConfigError, match="intra_op_threads is -2"):
        InferenceEngine(model_path, intra_op_threads=-2)


# ---------------------------------------------------------------- worker


def job(source: str, track_id: int, crop: np.ndarray) -> CropJob:
    return CropJob(source=source, track_id=track_id, frame_index=track_id, crop=crop)


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_worker_classifies_crops_from_two_sources(engine, metrics):
    batcher = Batcher(max_batch=4, max_wait_ms=5, capacity=64, metrics=metrics)
    results: dict[tuple[str, int], np.ndarray] = {}
    lock = threading.Lock()

    def on_result(j: CropJob, p: np.ndarray) -> None:
        with lock:
            results[(j.source, j.track_id)] = p

    worker = InferenceWorker(engine, batcher, on_result, metrics)
    worker.start()
    try:
        batch = crops(10, seed=1)
        for i in range(10):
            assert batcher.put(job("cam0" if i % 2 else "cam1", i, batch[i]))
        assert wait_for(lambda: len(results) == 10)
    finally:
        assert worker.stop(timeout_s=5.0)
    assert not worker.is_alive()

    expected = engine.run(batch)
    for i in range(10):
        np.testing.assert_allclose(
            results[("cam0" if i % 2 else "cam1", i)], expected[i], atol=1e-5
        )
    get = metrics.registry.get_sample_value
    assert get("beltsort_batch_size_sum") == 10
    assert get("beltsort_inference_seconds_count") == worker.batches >= 3  # 10 crops, max 4
    assert get("beltsort_stage_seconds_count", {"stage": "infer"}) == worker.batches
    assert get("beltsort_stage_seconds_count", {"stage": "queue"}) == 10


def test_worker_survives_a_failed_batch_and_a_raising_callback(engine, metrics, caplog):
    batcher = Batcher(max_batch=2, max_wait_ms=500, capacity=16, metrics=metrics)
    failed: list[int] = []
    good: list[int] = []

    def on_result(j: CropJob, p: np.ndarray) -> None:
        good.append(j.track_id)
        if j.track_id == 3:
            raise RuntimeError("downstream bug")

    worker = InferenceWorker(
        engine, batcher, on_result, metrics, on_failed=lambda j: failed.append(j.track_id)
    )
    worker.start()
    try:
        # two crops of a wrong size form one failed batch
        batcher.put(job("cam0", 1, np.zeros((32, 32, 3), np.uint8)))
        batcher.put(job("cam0", 2, np.zeros((32, 32, 3), np.uint8)))
        assert wait_for(lambda: len(failed) == 2)
        for tid in (3, 4):
            batcher.put(job("cam0", tid, crops(1)[0]))
        assert wait_for(lambda: len(good) == 2)
    finally:
        assert worker.stop(timeout_s=5.0)
    assert failed == [1, 2] and good == [3, 4]
    assert worker.failures == 1 and worker.callback_errors == 1
    get = metrics.registry.get_sample_value
    assert get("beltsort_crops_dropped_total", {"reason": "infer_error"}) == 2
    assert "inference failed, 2 crops lost" in caplog.text
    assert "downstream bug" in caplog.text


def test_batcher_worker_decider_decide_each_object(engine, metrics):
    """The middle of the daemon, wired as the pipeline wires it."""
    batcher = Batcher(max_batch=4, max_wait_ms=2, capacity=64, metrics=metrics)
    # min_confidence 0: the untrained model is unsure, this test is about the flow
    decider = Decider(
        engine.labels,
        DecisionConfig(min_confidence=0.0, min_margin=0.0, view_wait_ms=10_000),
        engine.info.model_id,
        metrics=metrics,
    )
    worker = InferenceWorker(
        engine,
        batcher,
        lambda j, p: decider.view_result(j.source, j.track_id, p),
        metrics,
        on_failed=lambda j: decider.view_dropped(j.source, j.track_id, in_flight=True),
    )
    views = crops(9, seed=2)
    worker.start()
    try:
        for tid in range(3):
            for k in range(3):
                decider.view_submitted("cam0", tid)
                assert batcher.put(job("cam0", tid, views[tid * 3 + k]))
            now = time.monotonic_ns()
            decider.crossed(
                "cam0", tid, frame=tid, pts_ms=0.0, bbox=(0, 0, 10, 10),
                t_capture_ns=time.time_ns(), t_capture_mono_ns=now,
            )  # fmt: skip
        decisions: list[dict] = []
        assert wait_for(lambda: decisions.extend(decider.ready()) or len(decisions) == 3)
    finally:
        assert worker.stop(timeout_s=5.0)
    assert [d["track_id"] for d in decisions] == [0, 1, 2]
    assert {d["views"] for d in decisions} == {3}
    assert {d["reason"] for d in decisions} == {"ok"}
    for d in decisions:
        mean = engine.run(views[d["track_id"] * 3 : d["track_id"] * 3 + 3]).mean(axis=0)
        assert d["label"] == LABELS[int(mean.argmax())]
        assert d["confidence"] == pytest.approx(float(mean.max()), abs=1e-5)
