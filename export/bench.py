"""``python -m export bench FILE...``: crops/s and latency of model files vs PyTorch eager.

Every file (and, for a single ``model.onnx``, its siblings ``model.fp16.onnx``,
``model.int8.onnx``, ...) runs on onnxruntime's CPU provider, and on CUDA when
the installed onnxruntime has it, at batch sizes 1, 8 and 32 with random crops.
With ``--checkpoint`` the same weights run in PyTorch eager too, and every row
gets its speed as a ratio to eager at the same batch size and device.

Shared machines are noisy: compare the ratios measured in one run, not
absolute figures across runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.cli_support import bounded_float, bounded_int, existing_file
from service.errors import ModelFileError, UsageError
from service.model_file import INPUT_NAME, OUTPUT_NAME, ModelInfo, check_model_file

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 8, 32)
WARMUP_RUNS = 2
MIN_RUNS = 5


@dataclass(frozen=True)
class BenchRow:
    """One measured cell: a model on a device at a batch size."""

    name: str
    precision: str
    device: str  # "CPU" or "CUDA"
    batch: int
    p50_ms: float
    p90_ms: float
    runs: int

    @property
    def crops_per_s(self) -> float:
        return self.batch / (self.p50_ms / 1e3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        type=existing_file,
        metavar="FILE",
        help="model files; one file also brings its siblings FILESTEM[._-]*.onnx",
    )
    parser.add_argument(
        "--checkpoint",
        type=existing_file,
        metavar="RUN/best.pt",
        help="also time PyTorch eager on these weights, and print ratios to it",
    )
    parser.add_argument(
        "--batches",
        type=_batch_list,
        default=DEFAULT_BATCHES,
        metavar="1,8,32",
        help="batch sizes (default 1,8,32)",
    )
    parser.add_argument(
        "--seconds",
        type=bounded_float(0.0, 60.0, low_open=True),
        default=0.8,
        help="timed seconds per cell after warm-up (default 0.8)",
    )
    parser.add_argument(
        "--threads",
        type=bounded_int(1, 256),
        default=os.cpu_count() or 1,
        help="CPU threads for onnxruntime and torch alike (default: all cores)",
    )
    parser.add_argument("--no-siblings", action="store_true", help="time only the files given")


def run(args: argparse.Namespace) -> int:
    files = list(args.files) if args.no_siblings else with_siblings(args.files)
    rows = bench(files, args.checkpoint, args.batches, args.seconds, args.threads)
    print(
        f"bench: {args.threads} CPU threads, random uint8 crops, {args.seconds:g} s per cell "
        f"after {WARMUP_RUNS} warm-up runs. The CPU may be shared and noisy: compare ratios "
        "within one run, not absolute figures across runs."
    )
    print(format_table(rows))
    return 0


def _batch_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= 1024 for p in parts):
        raise argparse.ArgumentTypeError(
            f"batches {text!r} are not comma-separated whole numbers in 1..1024, e.g. 1,8,32"
        )
    return tuple(int(p) for p in parts)


def with_siblings(files: list[Path]) -> list[Path]:
    """One file brings ``STEM.*.onnx``, ``STEM_*.onnx`` and ``STEM-*.onnx`` from its folder."""
    if len(files) != 1:
        return list(files)
    first = files[0]
    found = {
        p for sep in "._-" for p in first.parent.glob(f"{first.stem}{sep}*.onnx") if p.is_file()
    }
    return [first, *sorted(found - {first})]


def bench(
    files: list[Path],
    checkpoint: Path | None,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    seconds: float = 0.8,
    threads: int = 1,
) -> list[BenchRow]:
    """Time every file (and PyTorch eager when ``checkpoint``) at each batch size."""
    import onnxruntime as ort

    infos = []
    for path in files:
        try:
            infos.append(check_model_file(path))
        except ModelFileError as exc:
            if len(files) == 1:
                raise
            log.warning("skipping %s: %s", path, exc)
    sizes = {info.input_size for info in infos}
    if len(sizes) != 1:
        raise UsageError(f"the files take different crop sizes {sorted(sizes)}; bench them apart")
    size = sizes.pop()
    rng = np.random.default_rng(0)
    crops = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in batches}

    devices = ["CPU"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        devices.append("CUDA")

    rows = []
    for info in infos:
        for device in devices:
            session = _session(info, device, threads)
            if session is None:
                continue
            for b in batches:
                step = _onnx_step(session, crops[b])
                rows.append(_time(info.path.name, info.precision, device, b, seconds, step))
    if checkpoint is not None:
        rows.extend(_bench_torch(checkpoint, infos[0], crops, seconds, threads, devices))
    return rows


def _session(info: ModelInfo, device: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "CUDA":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(info.model_bytes, options, providers=providers)
    if device == "CUDA" and session.get_providers()[0] != "CUDAExecutionProvider":
        log.warning("CUDA provider listed but not usable for %s; CUDA rows skipped", info.path)
        return None
    return session


def _bench_torch(checkpoint, info, crops, seconds, threads, devices) -> list[BenchRow]:
    import torch

    from export.onnx_export import CalibratedClassifier
    from training.model import load_checkpoint

    net, ckpt = load_checkpoint(checkpoint)
    if list(ckpt["labels"]) != info.labels or int(ckpt["img_size"]) != info.input_size:
        raise UsageError(
            f"checkpoint {checkpoint} ({len(ckpt['labels'])} labels, {ckpt['img_size']} px) is "
            f"not the model of {info.path} ({info.num_classes} labels, {info.input_size} px); "
            "give the checkpoint it was exported from"
        )
    model = CalibratedClassifier(net, float(ckpt.get("temperature", 1.0))).eval()
    torch.set_num_threads(threads)
    rows = []
    for device in devices:
        if device == "CUDA" and not torch.cuda.is_available():
            continue
        target = "cuda" if device == "CUDA" else "cpu"
        model.to(target)
        for b, batch in crops.items():
            step = _torch_step(model, torch.from_numpy(batch).to(target), target == "cuda")
            rows.append(_time("PyTorch eager", "fp32", device, b, seconds, step))
    return rows


def _onnx_step(session, batch: np.ndarray) -> Callable[[], object]:
    feed = {INPUT_NAME: batch}
    return lambda: session.run([OUTPUT_NAME], feed)


def _torch_step(model, x, synchronize: bool) -> Callable[[], object]:
    import torch

    def step():
        with torch.inference_mode():
            out = model(x)
        if synchronize:  # CUDA runs asynchronously; time the work, not the launch
            torch.cuda.synchronize()
        return out

    return step


def _time(
    name: str, precision: str, device: str, batch: int, seconds: float, step: Callable[[], object]
) -> BenchRow:
    for _ in range(WARMUP_RUNS):
        step()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < MIN_RUNS or time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    p50, p90 = np.percentile(times, [50, 90]) * 1e3
    return BenchRow(name, precision, device, batch, float(p50), float(p90), len(times))


def format_table(rows: list[BenchRow]) -> str:
    """The rows as a table, each with its speed relative to eager (and fp32) at the same batch."""
    eager = {(r.device, r.batch): r.crops_per_s for r in rows if r.name == "PyTorch eager"}
    fp32 = {}
    for r in rows:
        if r.precision == "fp32" and r.name != "PyTorch eager":
            fp32.setdefault((r.device, r.batch), r.crops_per_s)
    width = max(len(r.name) for r in rows)
    head = f"{'model':<{width}}  prec  device  batch  p50 ms   p90 ms   crops/s   x eager  x fp32"
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r.device, r.batch)
        vs_eager = f"{r.crops_per_s / eager[key]:7.2f}" if key in eager else "      -"
        vs_fp32 = f"{r.crops_per_s / fp32[key]:6.2f}" if key in fp32 else "     -"
        lines.append(
            f"{r.name:<{width}}  {r.precision:<4}  {r.device:<6}  {r.batch:>5}  "
            f"{r.p50_ms:7.2f}  {r.p90_ms:7.2f}  {r.crops_per_s:8.0f}  {vs_eager}  {vs_fp32}"
        )
    return "\n".join(lines)
