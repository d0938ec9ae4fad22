"""Run the classifier: one onnxruntime session, and the thread that feeds it batches.

The model file is checked against the contract first
(:func:`service.model_file.check_model_file`), so a wrong file is refused with
a message that names it before onnxruntime sees it. Pre-processing lives inside
the graph: :meth:`InferenceEngine.run` takes the locator's uint8 BGR crops as
they are.

Execution providers: by default CUDA when this onnxruntime build offers it,
then CPU. onnxruntime does not fail when it cannot start a requested provider
(missing CUDA or cuDNN libraries, a CPU-only wheel); it quietly runs on the CPU.
The engine compares what it asked for with ``session.get_providers()`` and says
so with a WARNING that names the remedy, and exports the provider actually used
in ``beltsort_model_info``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.batcher import Batcher, CropJob
from service.errors import BeltsortError, ConfigError, ModelFileError
from service.model_file import ModelInfo, check_model_file

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Short names accepted in configs, for the providers a beltsort box plausibly has.
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider"}

# What an operator does when the GPU was asked for and not used.
GPU_REMEDY = (
    "install onnxruntime-gpu (not next to the CPU onnxruntime wheel) with the CUDA and cuDNN "
    "versions it was built for, check `python -c 'import onnxruntime as o; "
    'print(o.get_available_providers())\'`, or set providers = ["cpu"] to run on the CPU on purpose'
)


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """The provider list to ask onnxruntime for; ``None`` or ``[]``: CUDA when available, then CPU.

    Names are onnxruntime's (``CUDAExecutionProvider``) or a short alias
    (``cuda``, ``cpu``, ``tensorrt``). CPU is always appended as the last
    resort. A name onnxruntime does not know at all is a ConfigError.
    """
    available = ort.get_available_providers()
    if isinstance(requested, str):
        raise ConfigError(
            f'providers is {requested!r}, a string; give a list such as ["cuda", "cpu"]'
        )
    if not requested:
        return ([CUDA] if CUDA in available else []) + [CPU]
    known = ort.get_all_providers()
    chosen: list[str] = []
    for name in requested:
        full = PROVIDER_ALIASES.get(str(name).lower(), name)
        if full not in known:
            raise ConfigError(
                f"unknown onnxruntime provider {name!r}; use one of "
                f"{', '.join(sorted(PROVIDER_ALIASES))} or a full name from "
                f"onnxruntime.get_all_providers() (available here: {', '.join(available)})"
            )
        if full not in chosen:
            chosen.append(full)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


class InferenceEngine:
    """One onnxruntime session on a checked model file.

    ``providers``: see :func:`resolve_providers`. ``metrics``: a
    :class:`service.metrics.Metrics` whose ``model_info`` receives the model id,
    the provider in use, label count, input size and precision; None records
    nothing. ``intra_op_threads``: onnxruntime's CPU thread count (None or 0:
    its default, one per core). ``max_batch``: the largest batch the daemon runs,
    used by :meth:`warm_up`.

    :meth:`run` is safe to call from several threads (onnxruntime sessions are).
    """

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[str] | None = None,
        metrics=None,
        intra_op_threads: int | None = None,
        *,
        max_batch: int = 8,
    ) -> None:
        self.info: ModelInfo = check_model_file(model_path)
        self.path = Path(model_path)
        self.max_batch = max_batch
        self.requested = resolve_providers(providers)
        self.warmed_up = False

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:  # None or 0: onnxruntime's default, one thread per core
            if not isinstance(intra_op_threads, int) or intra_op_threads < 0:
                raise ConfigError(
                    f"intra_op_threads is {intra_op_threads!r}; it must be a whole number >= 1 "
                    "(or 0 for onnxruntime's default of one per core)"
                )
            options.intra_op_num_threads = intra_op_threads

        # Session: onnxruntime's errors are its own Exception subclasses
        # (onnxruntime.capi.onnxruntime_pybind11_state.*), not RuntimeError.
        try:
            with warnings.catch_warnings():
                # onnxruntime warns "Specified provider ... is not in available
                # provider names"; the fallback check below reports it with the remedy.
                warnings.simplefilter("ignore", UserWarning)
                # From the bytes that passed the check, not the path again: a file
                # replaced in between would otherwise run under the wrong model id.
                self._session = ort.InferenceSession(
                    self.info.model_bytes, sess_options=options, providers=self.requested
                )
        except Exception as exc:
            raise ModelFileError(
                f"model file {self.path}: onnxruntime cannot load it on {self.requested[0]} "
                f"({_first_line(exc)}); re-export it with `python -m export` using this "
                'beltsort version, or set providers = ["cpu"]'
            ) from exc

        # Provider check: onnxruntime falls back to the CPU without failing
        in_use = self._session.get_providers()
        self.provider = in_use[0]
        if self.provider != self.requested[0]:
            logger.warning(
                "model %s: asked onnxruntime for %s but it runs on %s; %s",
                self.info.model_id,
                self.requested[0],
                self.provider,
                GPU_REMEDY if self.requested[0] != CPU else "check the providers setting",
            )
        elif not providers and self.provider == CPU:
            logger.info(
                "model %s: no CUDA provider in this onnxruntime build (%s); running on the CPU",
                self.info.model_id,
                ", ".join(ort.get_available_providers()),
            )
        logger.info(
            "model %s loaded from %s: %d classes, %d px input, %s, provider %s",
            self.info.model_id,
            self.path,
            len(self.info.labels),
            self.info.input_size,
            self.info.precision,
            self.provider,
        )
        if metrics is not None:
            metrics.set_model(
                model_id=self.info.model_id,
                provider=self.provider,
                labels=len(self.info.labels),
                input_size=self.info.input_size,
                precision=str(self.info.precision),
            )

    @property
    def labels(self) -> list[str]:
        return list(self.info.labels)

    @property
    def input_size(self) -> int:
        return self.info.input_size

    def warm_up(self, batch_sizes: Sequence[int] | None = None, rounds: int = 2) -> float:
        """Run a few batches of grey crops so the first real batch is not slow.

        The first runs allocate memory arenas and, on CUDA, pick convolution
        algorithms and load kernels; that can take a second that belongs before
        the daemon reports ready, not inside a real object's latency. Default
        batch sizes: 1 and ``max_batch``. Returns the seconds the last round took.
        """
        sizes = sorted(set(batch_sizes or (1, self.max_batch)))
        s = self.input_size
        t0 = time.perf_counter()
        last = 0.0
        for _ in range(max(1, rounds)):
            t_round = time.perf_counter()
            for n in sizes:
                self.run(np.full((n, s, s, 3), 128, dtype=np.uint8))
            last = time.perf_counter() - t_round
        self.warmed_up = True
        logger.info(
            "model %s warmed up on %s (batches %s): %.3f s in all, last round %.1f ms",
            self.info.model_id,
            self.provider,
            sizes,
            time.perf_counter() - t0,
            last * 1000,
        )
        return last

    def run(self, crops: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 BGR crops -> ``(N, C)`` float32 class probabilities."""
        s = self.input_size
        if (
            not isinstance(crops, np.ndarray)
            or crops.dtype != np.uint8
            or crops.ndim != 4
            or crops.shape[1:] != (s, s, 3)
        ):
            got = f"{crops.dtype} {crops.shape}" if isinstance(crops, np.ndarray) else type(crops)
            raise ValueError(
                f"model {self.info.model_id} takes uint8 crops of shape (N, {s}, {s}, 3), "
                f"got {got}; cut them with service.locate.cut_crop(frame, det, {s})"
            )
        try:
            (probs,) = self._session.run(
                [self.info.output_name], {self.info.input_name: np.ascontiguousarray(crops)}
            )
        except Exception as exc:  # onnxruntime's own exception types, see __init__
            raise BeltsortError(
                f"onnxruntime failed on a batch of {len(crops)} crops with {self.path} "
                f"on {self.provider}: {_first_line(exc)}"
            ) from exc
        if probs.shape != (len(crops), len(self.info.labels)):
            raise ModelFileError(
                f"{self.path}: output {self.info.output_name!r} has shape {probs.shape}, expected "
                f"({len(crops)}, {len(self.info.labels)}) for {len(self.info.labels)} labels; "
                "re-export the model"
            )
        return probs.astype(np.float32, copy=False)


def _first_line(exc: BaseException) -> str:
    """onnxruntime's messages run over several lines; an operator's log line needs one."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class InferenceWorker:
    """Thread: batcher.next_batch -> engine.run -> on_result(job, probs) for each job.

    ``on_failed(job)`` is called for every job of a batch that could not be
    classified (inference error), so the decider stops waiting for it; such
    crops are counted in ``beltsort_crops_dropped_total{reason="infer_error"}``.
    Records ``beltsort_inference_seconds``, ``beltsort_batch_size`` and
    ``beltsort_stage_seconds{stage="infer"}`` per batch when ``metrics`` is given.

    A callback that raises is logged and does not stop the thread. Run one
    worker per batcher: the decider counts on results coming back in queue order.
    """

    POLL_S = 0.1  # how often an idle worker checks for stop()

    def __init__(
        self,
        engine: InferenceEngine,
        batcher: Batcher,
        on_result: Callable[[CropJob, np.ndarray], None],
        metrics=None,
        *,
        on_failed: Callable[[CropJob], None] | None = None,
        name: str = "beltsort-infer",
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.on_result = on_result
        self.on_failed = on_failed
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False
        self.batches = 0  # batches run since start
        self.crops = 0  # crops classified since start
        self.failures = 0  # batches that failed
        self.callback_errors = 0  # callbacks that raised
        self.last_progress_mono = time.monotonic()  # for a watchdog: last batch or idle poll

    def start(self) -> None:
        if self._started:
            raise RuntimeError("InferenceWorker.start() called twice; build a new worker")
        self._started = True
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> bool:
        """Stop after the batch in hand; False when the thread did not end within ``timeout_s``."""
        self._stop.set()
        if not self._started:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("inference thread did not stop within %.1f s", timeout_s)
            return False
        return True

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_progress_mono = time.monotonic()
            jobs = self.batcher.next_batch(self.POLL_S)
            if jobs:
                self._run_batch(jobs)
            elif self.batcher.closed:
                # Closed and drained: nothing more will come.
                self._stop.wait(self.POLL_S)

    def _run_batch(self, jobs: list[CropJob]) -> None:
        t0 = time.perf_counter()
        try:
            probs = self.engine.run(np.stack([job.crop for job in jobs]))
        except Exception as exc:  # a bad batch must not kill the thread
            self.failures += 1
            # One line per failed batch: failures are rare and each one loses objects.
            logger.error("inference failed, %d crops lost: %s", len(jobs), exc)
            if self._metrics is not None:
                self._metrics.crops_dropped.labels(reason="infer_error").inc(len(jobs))
            for job in jobs:
                self._call(self.on_failed, job)
            return
        elapsed = time.perf_counter() - t0
        self.batches += 1
        self.crops += len(jobs)
        if self._metrics is not None:
            self._metrics.inference.observe(elapsed)
            self._metrics.stage.labels(stage="infer").observe(elapsed)
            self._metrics.batch_size.observe(len(jobs))
        for job, p in zip(jobs, probs, strict=True):
            self._call(self.on_result, job, p)

    def _call(self, callback, *args) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            # A callback that raises is a bug downstream; log the first few with
            # their traceback, then one in a thousand, not one line per crop.
            self.callback_errors += 1
            if self.callback_errors <= 3 or self.callback_errors % 1000 == 0:
                logger.exception(
                    "inference callback %r raised (%d times so far)", callback, self.callback_errors
                )
