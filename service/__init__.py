"""beltsort's sorting daemon: capture, locate and track, batch, infer, decide, publish.

This package is what the edge box installs. It must never import torch,
torchvision or the ``training`` package (``tests/test_import_contract.py``
enforces it), so everything in here runs on numpy, OpenCV and onnxruntime.
"""

__version__ = "0.1.0"
