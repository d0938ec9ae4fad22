"""The edge box installs only ``service``: it must never import torch, torchvision or training.

Two checks, because either alone can miss a breach: a static scan of every
import statement (catches an import hidden inside a function that a runtime
check would not execute), and a runtime import of every service module in a
fresh interpreter (catches an indirect import through a third-party package).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
FORBIDDEN = ("torch", "torchvision", "training")


def _service_modules() -> list[str]:
    names = []
    for path in sorted(SERVICE.rglob("*.py")):
        parts = path.relative_to(SERVICE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _top_level(name: str | None) -> str:
    return (name or "").split(".")[0]


def test_no_forbidden_import_statement_in_service():
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{path.relative_to(SERVICE.parent)}:{node.lineno} imports {name}"
                for name in names
                if _top_level(name) in FORBIDDEN
            ]
    assert offenders == [], "service/ must not import torch/torchvision/training:\n" + "\n".join(
        offenders
    )


def test_importing_every_service_module_loads_no_forbidden_package():
    modules = _service_modules()
    assert "service.locate" in modules  # the scan found the package
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
