"""PyTorch -> ONNX: the calibrated classifier graph, its metadata, and the runs that check it.

The graph is :class:`training.model.BeltNet` (uint8 BGR crops in, pre-processing
inside) followed by ``softmax(logits / T)`` with the checkpoint's temperature,
traced with torch's ``torch.export``-based exporter (``dynamo=True``, the
default since torch 2.9). It gives a clean graph for this model (batch norm
folded, about half the nodes of the legacy TorchScript path) with a symbolic
batch axis.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export import ExportError
from service.model_file import (
    INPUT_NAME,
    INPUT_SIZE_KEY,
    LABELS_KEY,
    OUTPUT_NAME,
    PRECISION_KEY,
)

log = logging.getLogger(__name__)

# torch's exporter emits opset 18 natively; asking it for 17 silently keeps 18
# (its down-converter fails on this graph's Reduce ops), so 18 is the floor.
# onnxruntime 1.31 (the GPU image) and 1.32 run 18..21.
DEFAULT_OPSET = 18
OPSETS = (18, 19, 20, 21)
MODEL_FORMAT = "beltsort.model/1"
# Batch size of the example input used for tracing: 2, not 1, because
# torch.export specialises a dimension whose example size is 0 or 1.
TRACE_BATCH = 2
# Rows per onnxruntime / torch call when scoring validation crops.
SCORE_BATCH = 64


class CalibratedClassifier(nn.Module):
    """uint8 BGR crops ``(N, S, S, 3)`` in, ``softmax(logits / T)`` ``(N, C)`` out."""

    def __init__(self, net: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ExportError(f"checkpoint temperature is {temperature!r}; it must be > 0")
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(crops) / self.temperature, dim=1)


def torch_probs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """``model``'s probabilities for ``images`` (uint8 BGR), in batches, on the CPU."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), SCORE_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + SCORE_BATCH]))
            out.append(model(batch).float().numpy())
    return np.concatenate(out)


def onnx_probs(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """The ONNX model's probabilities for ``images`` on onnxruntime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(images), SCORE_BATCH):
        batch = np.ascontiguousarray(images[start : start + SCORE_BATCH])
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    return np.concatenate(out)


def export_graph(model: CalibratedClassifier, img_size: int, opset: int) -> onnx.ModelProto:
    """Trace ``model`` into an in-memory ONNX model with a dynamic batch axis."""
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {OPSETS}")
    example = torch.zeros((TRACE_BATCH, img_size, img_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1)
    with tempfile.TemporaryDirectory(prefix="beltsort-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                model.eval(),
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"crops": {0: batch}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # torch raises many unrelated types from deep inside export
            raise ExportError(
                f"torch {torch.__version__} could not export the model to ONNX opset {opset}: "
                f"{_first_line(exc)}"
            ) from exc
        # Loads any external-data file the exporter might still have written,
        # so the proto is whole before the folder goes away.
        proto = onnx.load(str(path), load_external_data=True)
    got = {o.domain: o.version for o in proto.opset_import}.get("")
    if got != opset:
        raise ExportError(f"asked torch for ONNX opset {opset} and it wrote {got}; choose {got}")
    return proto


def model_metadata(checkpoint: dict, precision: str, opset: int) -> dict[str, str]:
    """The ``metadata_props`` of an exported file: the contract keys and the training facts."""
    metrics = checkpoint.get("metrics") or {}
    val_accuracy = metrics.get("val_accuracy")
    facts = {
        "beltsort.format": MODEL_FORMAT,
        LABELS_KEY: json.dumps(list(checkpoint["labels"])),
        INPUT_SIZE_KEY: str(int(checkpoint["img_size"])),
        PRECISION_KEY: precision,
        "beltsort.arch": str(checkpoint.get("arch", "unknown")),
        "beltsort.weights_origin": str(checkpoint.get("weights_origin", "unknown")),
        "beltsort.dataset_fingerprint": str(checkpoint.get("dataset_fingerprint", "unknown")),
        "beltsort.val_accuracy": "unknown" if val_accuracy is None else f"{val_accuracy:.6f}",
        "beltsort.temperature": repr(float(checkpoint.get("temperature", 1.0))),
        "beltsort.trained_at": str(checkpoint.get("created", "unknown")),
        "beltsort.created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "beltsort.version": _beltsort_version(),
        "beltsort.opset": str(opset),
        "beltsort.exporter": f"torch {torch.__version__} (dynamo)",
    }
    return facts


def set_metadata(proto: onnx.ModelProto, facts: dict[str, str]) -> None:
    """Replace ``proto``'s ``metadata_props`` with ``facts``."""
    del proto.metadata_props[:]
    for key, value in facts.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def write_model(model_bytes: bytes, out: Path) -> None:
    """Write the serialized model as one file, atomically (a watcher never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        tmp.write_bytes(model_bytes)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {out}: {exc.strerror}") from exc


def serialize(proto: onnx.ModelProto) -> bytes:
    """One self-contained protobuf: every weight inside it, no external-data file."""
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"tensor {tensor.name!r} still points to external data")
    # NOTE: protobuf caps one message at 2 GiB; a MobileNet is ~10 MB, far below it.
    return proto.SerializeToString()


def full_check(proto: onnx.ModelProto, what: str) -> None:
    """onnx's full checker (structure, types and shape inference)."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ExportError(f"onnx's checker rejects the {what} model: {_first_line(exc)}") from exc


def _beltsort_version() -> str:
    try:
        return importlib_metadata.version("beltsort")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
