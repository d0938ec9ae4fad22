"""The daemon's TOML config: defaults, the example file, and one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.cli import build_parser, resolve_config
from service.config import SECTIONS, Config, config_from_dict, load_config
from service.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "beltsort.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "beltsort.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_example_file_lists_every_key_at_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    for name, cls in SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(cls)}
        assert set(data[name]) == keys, f"[{name}] in the example differs from the config"
    assert load_config(EXAMPLE) == Config()


def test_no_file_and_empty_file_give_the_defaults(tmp_path):
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()


def test_values_are_read_and_converted(tmp_path):
    config = load_config(
        write(
            tmp_path,
            """
            [model]
            path = "models/m.onnx"
            [sources]
            uris = ["a.mp4", "synthetic:?fps=15"]
            [pipeline]
            max_wait_ms = 3          # an integer is fine where a number is asked
            direction = "right_to_left"
            [decide]
            class_to_bin = { red = 0, blue = 0 }
            [belt]
            speed_mm_s = 250
            px_per_mm = 2.0
            ejector_distance_mm = [100, 150.5]
            """,
        )
    )
    assert config.sources.uris == ("a.mp4", "synthetic:?fps=15")
    assert config.pipeline.max_wait_ms == 3.0 and isinstance(config.pipeline.max_wait_ms, float)
    assert config.pipeline.direction == "right_to_left"
    assert config.decide.class_to_bin == {"red": 0, "blue": 0}
    assert config.belt.ejector_distance_mm == (100.0, 150.5)
    assert config.belt.configured
    # a relative model path is taken from the config file's folder
    assert config.model.path == str(tmp_path / "models" / "m.onnx")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[pipeline]\ndecision_lin = 0.5",
            ["unknown key [pipeline] decision_lin", "decision_line"],
        ),
        ("[pipline]\nmax_batch = 4", ["unknown section [pipline]", "[pipeline]"]),
        ("[pipeline]\nmax_batch = 'eight'", ["[pipeline] max_batch = 'eight'", "whole number"]),
        ("[pipeline]\nmax_batch = true", ["[pipeline] max_batch = True", "whole number"]),
        ("[pipeline]\nmax_batch = 2.5", ["max_batch = 2.5", "whole number"]),
        ("[pipeline]\ndecision_line = 1.5", ["decision_line = 1.5", "0.0 < x < 1.0"]),
        ("[pipeline]\ndecision_line = 0", ["decision_line = 0", "0.0 < x < 1.0"]),
        ("[pipeline]\ndirection = 'up'", ["direction = 'up'", "'left_to_right'"]),
        ("[sources]\nuris = 'a.mp4'", ["uris = 'a.mp4'", "list of strings"]),
        ("[sources]\nuris = []", ["uris = [] is empty"]),
        ("[sources]\npace = 'slow'", ["pace = 'slow'", "'realtime', 'fast'"]),
        ("[decide]\nmin_confidence = nan", ["min_confidence = nan", "0.0 <= x <= 1.0"]),
        ("[decide]\nclass_to_bin = { red = -2 }", ["class_to_bin", "red = -2"]),
        ("[belt]\nejector_distance_mm = [1, 'x']", ["ejector_distance_mm", "list of numbers"]),
        ("[belt]\nejector_distance_mm = [100.0]", ["ejector_distance_mm", "speed_mm_s"]),
        ("[logging]\nlevel = 'LOUD'", ["level = 'LOUD'", "'DEBUG'"]),
        ("model = 'm.onnx'", ["model = 'm.onnx' is not a section"]),
        (
            "[sources]\nreconnect_initial_s = 5.0\nreconnect_max_s = 1.0",
            ["reconnect_max_s = 1.0", "reconnect_initial_s = 5.0"],
        ),
        ("[model\npath = 1", ["not valid TOML"]),
    ],
)
def test_a_bad_value_is_one_clear_error(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: ")
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_replace_checks_values_like_the_file():
    config = Config().replace("pipeline", max_batch=16)
    assert config.pipeline.max_batch == 16
    with pytest.raises(ConfigError, match=r"command line: \[pipeline\] max_batch = 0"):
        Config().replace("pipeline", max_batch=0)


def test_config_from_dict_rejects_what_load_config_rejects():
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"http": {"port": 80}})


# ---------------------------------------------------------------- command line


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, '[sources]\nuris = ["a.mp4"]\npace = "fast"\n[logging]\nlevel = "DEBUG"')
    args = build_parser().parse_args(
        ["run", "--config", str(path), "--model", "m.onnx", "--source", "synthetic:",
         "--source", "b.mp4", "--http", "off", "--log-level", "warning"]
    )  # fmt: skip
    config = resolve_config(args)
    assert config.model.path == "m.onnx"
    assert config.sources.uris == ("synthetic:", "b.mp4")
    assert config.sources.pace == "fast"  # from the file: no --pace given
    assert config.http.listen == "off"
    assert config.logging.level == "WARNING"


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_check_config_accepts_the_example():
    result = run_cli("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert '"decision_line": 0.5' in result.stdout
    assert "ok" in result.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_bad_config_exits_2_with_one_line(tmp_path, command):
    path = write(tmp_path, "[pipeline]\ndecision_line = 2.0\n")
    args = ["check-config", str(path)] if command == "check-config" else [
        "run", "--model", "m.onnx", "--config", str(path)
    ]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "decision_line = 2.0" in lines[0] and "0.0 < x < 1.0" in lines[0]
    assert "Traceback" not in result.stderr


def test_check_config_rejects_a_bad_synthetic_option(tmp_path):
    path = write(tmp_path, '[sources]\nuris = ["synthetic:?speed=3"]\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "unknown option 'speed'" in result.stderr and "rate" in result.stderr


def test_run_without_a_model_says_how_to_give_one():
    result = run_cli("run", "--http", "off")
    assert result.returncode == 2
    assert "--model" in result.stderr and "Traceback" not in result.stderr
