"""Smaller, faster copies of an fp32 model: fp16 weights, or int8 static quantization.

Both keep the contract's signature: uint8 crops in, float32 probabilities out.
The temperature division and the softmax stay in float32 in both, so the
probabilities keep their resolution and sum to 1 (an 8-bit softmax output has
steps of 1/256 and rows summing to 1.008; an fp16 one, 3 digits).

The accuracy gate lives here too: a copy that loses more than
:data:`MAX_ACCURACY_LOSS_POINTS` of validation accuracy is refused unless forced.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from export import ExportError
from service.model_file import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

# Percentage points of validation accuracy a reduced-precision copy may lose.
MAX_ACCURACY_LOSS_POINTS = 0.5
# Ops kept in float32: the calibrated softmax (see the module docstring).
FLOAT_OPS = ("Div", "Softmax")
CALIBRATION_BATCH = 32


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations inside; uint8 in, float32 out, and a float32 softmax.

    onnxruntime's converter keeps a blocked op in float32 but casts its output
    back to fp16 before the graph's float32 output, which would round the
    probabilities to 3 digits. So the tail (``Div`` by T, ``Softmax``) is cut off
    first, the body converted with float32 logits out, and the tail put back.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    body, tail, temperature = _split_tail(proto)
    try:
        half = convert_float_to_float16(body, keep_io_types=True)
    except Exception as exc:  # the converter raises plain Exceptions and KeyErrors
        raise ExportError(f"fp16 conversion failed: {exc}") from exc
    half.graph.initializer.append(temperature)
    half.graph.node.extend(tail)
    del half.graph.output[:]
    half.graph.output.extend(proto.graph.output)
    return half


def _split_tail(
    proto: onnx.ModelProto,
) -> tuple[onnx.ModelProto, list[onnx.NodeProto], onnx.TensorProto]:
    """``(body with logits out, [Div, Softmax], temperature initializer)`` of an fp32 export."""
    nodes = list(proto.graph.node)
    if len(nodes) < 3 or [n.op_type for n in nodes[-2:]] != list(FLOAT_OPS):
        raise ExportError(
            "fp16: the graph does not end in Div(temperature) -> Softmax as export writes it"
        )
    div, softmax = nodes[-2:]
    logits_name, temperature_name = div.input
    initializers = {t.name: t for t in proto.graph.initializer}
    if temperature_name not in initializers or list(softmax.output) != [OUTPUT_NAME]:
        raise ExportError(
            "fp16: the temperature is not an initializer or the softmax not the output"
        )

    body = onnx.ModelProto()
    body.CopyFrom(proto)
    del body.graph.node[-2:]
    # Left in, the tail's value_info would be turned to fp16 with everything else.
    tail_values = {temperature_name, *div.output, *softmax.output}
    kept_info = [v for v in body.graph.value_info if v.name not in tail_values]
    del body.graph.value_info[:]
    body.graph.value_info.extend(kept_info)
    kept = [t for t in body.graph.initializer if t.name != temperature_name]
    del body.graph.initializer[:]
    body.graph.initializer.extend(kept)
    logits = onnx.helper.make_tensor_value_info(
        logits_name,
        onnx.TensorProto.FLOAT,
        [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim],
    )
    del body.graph.output[:]
    body.graph.output.append(logits)
    return body, [div, softmax], initializers[temperature_name]


def to_int8(proto: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """Static QDQ quantization with onnxruntime's tools, ranges from ``calibration`` crops.

    uint8 activations and per-channel int8 weights (U8S8), the format
    onnxruntime's CPU kernels run fastest on x86-64 (VNNI/AVX2).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class CropReader(CalibrationDataReader):
        def __init__(self, crops: np.ndarray) -> None:
            self._batches = iter(
                [
                    {INPUT_NAME: np.ascontiguousarray(crops[i : i + CALIBRATION_BATCH])}
                    for i in range(0, len(crops), CALIBRATION_BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="beltsort-int8-") as tmp:
        fp32_path, pre_path, out_path = (Path(tmp) / n for n in ("fp32", "pre", "int8"))
        onnx.save(proto, str(fp32_path), save_as_external_data=False)
        try:
            # Shape inference and graph clean-up first, as onnxruntime advises for static
            # quantization: it gives the quantizer every tensor's shape.
            quant_pre_process(str(fp32_path), str(pre_path))
            pre = onnx.load(str(pre_path))
            keep_float = [n.name for n in pre.graph.node if n.op_type in FLOAT_OPS]
            quantize_static(
                str(pre_path),
                str(out_path),
                CropReader(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
            )
        except Exception as exc:  # onnxruntime's tools raise plain Exceptions
            raise ExportError(f"int8 quantization failed: {exc}") from exc
        return onnx.load(str(out_path))


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(np.mean(probs.argmax(axis=1) == targets) * 100.0)


def accuracy_gate(precision: str, fp32_acc: float, reduced_acc: float, force: bool) -> float:
    """Refuse a copy losing more than the allowed points unless ``force``; returns the change."""
    change = reduced_acc - fp32_acc
    if -change > MAX_ACCURACY_LOSS_POINTS:
        message = (
            f"the {precision} model loses {-change:.2f} points of validation accuracy "
            f"(fp32 {fp32_acc:.2f}% -> {precision} {reduced_acc:.2f}%), more than the "
            f"{MAX_ACCURACY_LOSS_POINTS} allowed"
        )
        if not force:
            raise ExportError(
                f"{message}; nothing written. Calibrate on more representative crops, keep "
                f"fp32, or pass --force to write it anyway"
            )
        log.warning("%s; writing it anyway (--force)", message)
    return change
