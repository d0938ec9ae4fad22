"""The model-file contract: what an ONNX file must be for the daemon to load it.

One check, used by the daemon when it loads (or hot-swaps) a model and by
``python -m export inspect``. It needs numpy, onnx and onnxruntime only. A file
passes when:

- it is one self-contained ONNX protobuf (no external-data files) that onnx's
  checker accepts;
- its one input is ``crops``: uint8 ``[N, S, S, 3]`` (BGR), ``N`` dynamic;
- its one output is ``probs``: float32 ``[N, C]``;
- ``metadata_props`` holds ``beltsort.labels`` (a JSON list of ``C`` distinct
  names) and ``beltsort.input_size`` (``S``);
- onnxruntime builds a CPU session on it, and a dummy batch gives ``(N, C)``
  float32 probabilities whose rows sum to 1.

The model id is the first 12 hex digits of the SHA-256 of the file's bytes,
computed here at load, so it never has to be stored inside the file it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from service.errors import ModelFileError

log = logging.getLogger(__name__)

INPUT_NAME = "crops"
OUTPUT_NAME = "probs"
MODEL_ID_HEX = 12

# metadata_props keys; the export package writes them, the daemon reads them.
KEY_PREFIX = "beltsort."
LABELS_KEY = "beltsort.labels"
INPUT_SIZE_KEY = "beltsort.input_size"
PRECISION_KEY = "beltsort.precision"
PRECISIONS = ("fp32", "fp16", "int8")

# Rows of a probability output sum to 1 up to float32 rounding over C terms;
# an int8 file keeps its softmax in float, so the same bound holds for it.
PROB_SUM_TOLERANCE = 1e-3
# The dummy batch: small enough to keep the check fast, more than one row so
# a graph with a batch size frozen to 1 is caught.
DUMMY_BATCH = 2

FIX_EXPORT = "re-export it with `python -m export --checkpoint RUN/best.pt --out FILE`"


@dataclass(frozen=True)
class ModelInfo:
    """What the daemon needs to know about a model file that passed the check."""

    path: Path
    model_id: str
    sha256: str
    size_bytes: int
    labels: list[str]
    input_size: int
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    precision: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    # The exact bytes that passed the check: build the session from these, not
    # from the path, so a file replaced in between can never run under this id.
    model_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def model_id_of(sha256_hex: str) -> str:
    """The short model id the daemon puts in every decision."""
    return sha256_hex[:MODEL_ID_HEX]


def check_model_file(path: str | Path, *, run_session: bool = True) -> ModelInfo:
    """Check ``path`` against the model-file contract and describe it.

    Raises :class:`~service.errors.ModelFileError` naming the file, what is
    wrong and what to do. ``run_session=False`` skips the onnxruntime session
    and dummy batch (structure and metadata only).
    """
    path = Path(path)
    data = _read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    model = _parse(path, data)

    _check_no_external_data(path, model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"model file {path}: onnx's checker rejects it ({first}); {FIX_EXPORT}"
        ) from exc

    metadata = {p.key: p.value for p in model.metadata_props}
    labels = _labels(path, metadata)
    input_size = _input_size(path, metadata)
    precision = metadata.get(PRECISION_KEY, "unknown")
    if PRECISION_KEY in metadata and precision not in PRECISIONS:
        raise ModelFileError(
            f"model file {path}: {PRECISION_KEY} is {precision!r}, not one of "
            f"{', '.join(PRECISIONS)}; {FIX_EXPORT}"
        )
    _check_input(path, model, input_size)
    _check_output(path, model, len(labels))

    if run_session:
        _check_session(path, data, input_size, len(labels))

    return ModelInfo(
        path=path,
        model_id=model_id_of(sha256),
        sha256=sha256,
        size_bytes=len(data),
        labels=labels,
        input_size=input_size,
        precision=precision,
        metadata=metadata,
        model_bytes=data,
    )


# ---------------------------------------------------------------- file and protobuf


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ModelFileError(f"model file {path}: does not exist; give the path of an .onnx file")
    if not path.is_file():
        raise ModelFileError(f"model file {path}: is not a file; give the path of an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"model file {path}: cannot be read ({exc.strerror})") from exc
    if not data:
        raise ModelFileError(f"model file {path}: is empty (0 bytes); {FIX_EXPORT}")
    return data


def _parse(path: Path, data: bytes) -> onnx.ModelProto:
    not_onnx = (
        f"model file {path}: is not an ONNX model ({len(data)} bytes that do not parse as one: "
        f"truncated, or another kind of file); {FIX_EXPORT}"
    )
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(not_onnx) from exc
    # Random or cut bytes sometimes decode into a protobuf with no graph.
    if not model.graph.node or not model.opset_import:
        raise ModelFileError(not_onnx)
    return model


def _all_tensors(graph: onnx.GraphProto):
    """Every tensor stored in ``graph``: initializers, tensor attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_no_external_data(path: Path, model: onnx.ModelProto) -> None:
    external = [
        t.name or "(unnamed)"
        for t in _all_tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        locations = {
            entry.value
            for t in _all_tensors(model.graph)
            for entry in t.external_data
            if entry.key == "location"
        }
        raise ModelFileError(
            f"model file {path}: {len(external)} tensors (e.g. {external[0]!r}) live in external "
            f"data files ({', '.join(sorted(locations)) or 'unnamed'}); the model must be one "
            f"self-contained file: {FIX_EXPORT}"
        )


# ---------------------------------------------------------------- metadata


def _labels(path: Path, metadata: dict[str, str]) -> list[str]:
    if LABELS_KEY not in metadata:
        raise ModelFileError(
            f"model file {path}: metadata has no {LABELS_KEY} (the class names); "
            f"is it a beltsort model? {FIX_EXPORT}"
        )
    text = metadata[LABELS_KEY]
    try:
        labels = json.loads(text)
    except json.JSONDecodeError:
        labels = None
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(x, str) and x for x in labels)
    ):
        raise ModelFileError(
            f"model file {path}: {LABELS_KEY} is {text[:80]!r}, not a JSON list of two or more "
            f"non-empty class names; {FIX_EXPORT}"
        )
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise ModelFileError(
            f"model file {path}: {LABELS_KEY} repeats {', '.join(dupes)}; class names must be "
            f"distinct; {FIX_EXPORT}"
        )
    return labels


def _input_size(path: Path, metadata: dict[str, str]) -> int:
    text = metadata.get(INPUT_SIZE_KEY)
    if text is None:
        raise ModelFileError(
            f"model file {path}: metadata has no {INPUT_SIZE_KEY} (the crop side S); {FIX_EXPORT}"
        )
    if not text.isdigit() or not 8 <= int(text) <= 1024:
        raise ModelFileError(
            f"model file {path}: {INPUT_SIZE_KEY} is {text!r}, not a whole number of pixels in "
            f"8..1024; {FIX_EXPORT}"
        )
    return int(text)


# ---------------------------------------------------------------- graph signature


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Static sizes as int, symbolic ones as their name, unknown as None."""
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _type_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):
        return f"onnx type {elem_type}"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # Older exporters list initializers among the inputs; they are not fed.
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def _check_input(path: Path, model: onnx.ModelProto, size: int) -> None:
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    if names != [INPUT_NAME]:
        raise ModelFileError(
            f"model file {path}: inputs are {names}, the contract is exactly one named "
            f"{INPUT_NAME!r}; {FIX_EXPORT}"
        )
    value = inputs[0]
    elem = value.type.tensor_type.elem_type
    dims = _dims(value)
    want = f"uint8 [N, {size}, {size}, 3]"
    if elem != onnx.TensorProto.UINT8:
        raise ModelFileError(
            f"model file {path}: input {INPUT_NAME!r} is {_type_name(elem)}, the contract is "
            f"{want} (BGR crops as OpenCV gives them, pre-processing inside the graph); "
            f"{FIX_EXPORT}"
        )
    if len(dims) != 4 or dims[1:] != [size, size, 3]:
        raise ModelFileError(
            f"model file {path}: input {INPUT_NAME!r} has shape {dims}, the contract is {want} "
            f"({INPUT_SIZE_KEY} = {size}); {FIX_EXPORT}"
        )
    if isinstance(dims[0], int):
        raise ModelFileError(
            f"model file {path}: input {INPUT_NAME!r} has a fixed batch size {dims[0]}; the batch "
            f"axis must be dynamic; {FIX_EXPORT}"
        )


def _check_output(path: Path, model: onnx.ModelProto, num_classes: int) -> None:
    names = [o.name for o in model.graph.output]
    if names != [OUTPUT_NAME]:
        raise ModelFileError(
            f"model file {path}: outputs are {names}, the contract is exactly one named "
            f"{OUTPUT_NAME!r}; {FIX_EXPORT}"
        )
    value = model.graph.output[0]
    elem = value.type.tensor_type.elem_type
    dims = _dims(value)
    if elem != onnx.TensorProto.FLOAT:
        raise ModelFileError(
            f"model file {path}: output {OUTPUT_NAME!r} is {_type_name(elem)}, the contract is "
            f"float32 [N, {num_classes}]; {FIX_EXPORT}"
        )
    classes = dims[1] if len(dims) == 2 else None
    if len(dims) != 2 or (isinstance(classes, int) and classes != num_classes):
        raise ModelFileError(
            f"model file {path}: output {OUTPUT_NAME!r} has shape {dims}, the contract is "
            f"[N, {num_classes}] with {num_classes} = the number of labels; {FIX_EXPORT}"
        )


# ---------------------------------------------------------------- onnxruntime


def _check_session(path: Path, data: bytes, size: int, num_classes: int) -> None:
    # Imported here: `inspect --no-run` and tests of the structure need no runtime.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the check reports its own findings
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        dummy = np.zeros((DUMMY_BATCH, size, size, 3), dtype=np.uint8)
        (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: dummy})
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"model file {path}: onnxruntime {ort.__version__} cannot run it on the CPU "
            f"({first}); {FIX_EXPORT}"
        ) from exc

    if probs.dtype != np.float32 or probs.shape != (DUMMY_BATCH, num_classes):
        raise ModelFileError(
            f"model file {path}: a batch of {DUMMY_BATCH} gave {probs.dtype} {probs.shape}, "
            f"the contract is float32 ({DUMMY_BATCH}, {num_classes}); {FIX_EXPORT}"
        )
    sums = probs.sum(axis=1)
    if not np.all(np.isfinite(probs)) or not np.allclose(sums, 1.0, atol=PROB_SUM_TOLERANCE):
        raise ModelFileError(
            f"model file {path}: output {OUTPUT_NAME!r} is not probabilities (row sums "
            f"{np.round(sums, 4).tolist()}, expected 1); export applies the softmax inside "
            f"the graph: {FIX_EXPORT}"
        )
    log.debug("model file %s passed the contract check", path)
