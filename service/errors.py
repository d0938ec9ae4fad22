"""beltsort's own error types.

Errors from OpenCV, onnxruntime and ZeroMQ are caught where they happen and
raised again as one of these, ``from`` the original, with the context added
(the camera URI, the endpoint, the file). Command-line entry points turn any
of them into one line on stderr and exit status 2, never a traceback.

    BeltsortError
    ├── UsageError        a command-line value is malformed (size "12x", rate -1)
    ├── ConfigError       a config file key is unknown, mistyped or out of range
    ├── DatasetError      a training folder is missing, empty or unusable
    ├── ModelFileError    an ONNX file breaks the model contract
    ├── SourceError       a camera, stream or video cannot be opened or read
    └── PublishError      a ZeroMQ endpoint cannot be bound or connected
"""

from __future__ import annotations


class BeltsortError(Exception):
    """Base of every error beltsort raises on purpose; the message is for a person."""


class UsageError(BeltsortError):
    pass


class ConfigError(BeltsortError):
    pass


class DatasetError(BeltsortError):
    pass


class ModelFileError(BeltsortError):
    pass


class SourceError(BeltsortError):
    pass


class PublishError(BeltsortError):
    pass
