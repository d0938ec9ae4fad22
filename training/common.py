"""Small pieces the training commands share: arch names, device, seeding, threads.

Importing this module does not import torch (the CLI builds ``--help`` from
it); the functions that need torch import it when called.
"""

from __future__ import annotations

import logging
import os
import random
import sys

from service.errors import UsageError

log = logging.getLogger(__name__)

# Same keys as training.model.ARCHS (a test checks), without importing torch.
ARCH_NAMES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
DEVICES = ("auto", "cpu", "cuda")


# libgomp (torch's CPU thread pool) spin-waits between parallel regions by
# default. On a machine shared with other busy processes a spinning thread holds
# a core its partner needs: measured here with ~9 runnable processes on 2 cores,
# a MobileNetV2 training step took 8.3 s with spinning and 0.6 s with passive
# waiting. Only read when the OpenMP runtime loads, i.e. before torch is imported.
OMP_WAIT_POLICY = "PASSIVE"


def prepare_torch_env() -> None:
    """Set OpenMP's wait policy for a shared CPU, unless the user chose one.

    Call from a command's ``run`` before torch is imported; later it has no effect.
    """
    if "torch" in sys.modules:
        log.debug("torch already imported; OMP_WAIT_POLICY left as it is")
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)


def resolve_device(name: str):
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name not in DEVICES:
        raise UsageError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a repeatable run."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads, default: the cores this process may run on.

    torch's own default counts physical cores of the machine, which
    oversubscribes a container limited to fewer; the affinity mask is what the
    scheduler will actually give us.
    """
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads


def add_compute_arguments(parser) -> None:
    """``--device``, ``--threads`` and ``--log-level``: the same on every torch command."""
    from service.cli_support import bounded_int

    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto (CUDA when present), cpu or cuda (default auto)",
    )
    parser.add_argument(
        "--threads",
        type=bounded_int(1, 256),
        help="CPU threads for torch (default: the cores this process may use)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def start_command(args) -> None:
    """First lines of a torch command's ``run``: OpenMP's wait policy, then logging."""
    from service.cli_support import setup_logging

    prepare_torch_env()
    setup_logging(args.log_level)
