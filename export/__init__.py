"""Checkpoint -> ONNX model file: the one contract between training and the line.

``python -m export --checkpoint RUN/best.pt --out model.onnx`` writes a
self-contained ONNX file that takes uint8 BGR crops and gives calibrated
probabilities, checks it (onnx's full checker, onnxruntime against PyTorch on
validation crops, the daemon's own contract check) and, on request, makes an
fp16 or int8 copy that must keep its validation accuracy. ``inspect`` prints a
file's contract; ``bench`` times files against PyTorch eager.

Heavy imports (torch, onnxruntime's quantization tools) stay inside the
functions that need them, so ``inspect`` and ``--help`` start fast.
"""

from service.errors import BeltsortError


class ExportError(BeltsortError):
    """An export that cannot be made, or made a file that failed its own checks."""


__all__ = ["ExportError"]
