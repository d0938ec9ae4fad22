"""The daemon's configuration: a TOML file, checked in full before anything starts.

Every key has a default, so an empty file (or none) is a valid configuration.
Each section is a frozen dataclass; each field carries its allowed values in
its metadata, so the check, the error message and ``check-config``'s output
all come from one place. A bad file is ONE :class:`~service.errors.ConfigError`
naming the key, the value received and what is allowed, e.g.::

    config beltsort.toml: [pipeline] decision_line = 1.5 is out of range; allowed: 0 < x < 1

Relative paths in ``[model] path`` are taken relative to the config file's folder.
``deploy/beltsort.example.toml`` lists every key with its default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ConfigError

# Said in --help wherever a value comes from the config file.
DEFAULTS_NOTE = "every key has a default; deploy/beltsort.example.toml lists them"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PACES = ("realtime", "fast")
DIRECTIONS = ("left_to_right", "right_to_left")


# ---------------------------------------------------------------- field rules


def _setting(
    default: Any,
    kind: str,
    *,
    low=None,
    high=None,
    low_open=False,
    high_open=False,
    choices=None,
    doc: str = "",
):
    """A dataclass field with its validation rule in the metadata.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``str``, ``list[str]``,
    ``list[float]``, ``dict[str,int]``.
    """
    rule = {
        "kind": kind,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
        "doc": doc,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=rule)
    return field(default=default, metadata=rule)


def _describe_range(rule: dict) -> str:
    low, high = rule["low"], rule["high"]
    if low is not None and high is not None:
        left = "<" if rule["low_open"] else "<="
        right = "<" if rule["high_open"] else "<="
        return f"{low} {left} x {right} {high}"
    if low is not None:
        return f"x {'>' if rule['low_open'] else '>='} {low}"
    return f"x {'<' if rule['high_open'] else '<='} {high}"


def _in_range(value: float, rule: dict) -> bool:
    low, high = rule["low"], rule["high"]
    if isinstance(value, float) and math.isnan(value):
        return False
    if low is not None and (value <= low if rule["low_open"] else value < low):
        return False
    return not (high is not None and (value >= high if rule["high_open"] else value > high))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(where: str, value: Any, rule: dict) -> Any:
    """Return ``value`` converted to the field's type, or raise one ConfigError."""
    kind = rule["kind"]

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where} = {value!r} {what}")

    if kind == "bool":
        if not isinstance(value, bool):
            return _raise(bad("is not a boolean; allowed: true or false"))
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return _raise(bad(f"is not a whole number; allowed: {_describe_range(rule)}"))
    elif kind == "float":
        if not _is_number(value):
            return _raise(bad(f"is not a number; allowed: {_describe_range(rule)}"))
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            allowed = ", ".join(map(repr, rule["choices"])) if rule["choices"] else "a string"
            return _raise(bad(f"is not a string; allowed: {allowed}"))
    elif kind == "list[str]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return _raise(bad('is not a list of strings; allowed e.g. ["a", "b"]'))
        return tuple(value)
    elif kind == "list[float]":
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            return _raise(bad("is not a list of numbers; allowed e.g. [120.0, 180.0]"))
        value = tuple(float(v) for v in value)
        for v in value:
            if not _in_range(v, rule):
                return _raise(bad(f"has {v!r} out of range; allowed: {_describe_range(rule)}"))
        return value
    elif kind == "dict[str,int]":
        if not isinstance(value, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()
        ):
            return _raise(bad("is not a table of whole numbers; allowed e.g. { red = 0 }"))
        for name, v in value.items():
            if not _in_range(v, rule):
                return _raise(
                    bad(f"has {name} = {v} out of range; allowed: {_describe_range(rule)}")
                )
        return dict(value)
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unknown setting kind {kind!r}")

    if rule["choices"] is not None and value not in rule["choices"]:
        allowed = ", ".join(map(repr, rule["choices"]))
        return _raise(bad(f"is not allowed; allowed: {allowed}"))
    if (rule["low"] is not None or rule["high"] is not None) and not _in_range(value, rule):
        return _raise(bad(f"is out of range; allowed: {_describe_range(rule)}"))
    return value


def _raise(exc: Exception):
    raise exc


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    path: str = _setting("", "str", doc="ONNX model file (--model overrides)")
    providers: tuple[str, ...] = _setting(
        (), "list[str]", doc="onnxruntime execution providers in order; [] = CUDA if present, CPU"
    )
    intra_op_threads: int = _setting(
        1, "int", low=0, high=256, doc="onnxruntime intra-op threads; 0 = onnxruntime's default"
    )


@dataclass(frozen=True)
class SourcesSection:
    uris: tuple[str, ...] = _setting(
        ("synthetic:",),
        "list[str]",
        doc="video file, camera (0, /dev/video0), rtsp://, http(s)://, synthetic:?opts",
    )
    pace: str = _setting(
        "realtime",
        "str",
        choices=PACES,
        doc="files and synthetic: realtime = at their frame rate, fast = no pacing, no drops",
    )
    open_timeout_ms: int = _setting(5000, "int", low=100, high=600_000, doc="stream open timeout")
    read_timeout_ms: int = _setting(5000, "int", low=100, high=600_000, doc="stream read timeout")
    reconnect_initial_s: float = _setting(
        0.5, "float", low=0.01, high=600.0, doc="first reconnect delay; doubles per failure"
    )
    reconnect_max_s: float = _setting(
        10.0, "float", low=0.01, high=3600.0, doc="reconnect delay cap"
    )
    stall_timeout_s: float = _setting(
        5.0, "float", low=0.1, high=3600.0, doc="a live source with no frame this long is down"
    )
    queue_size: int = _setting(
        2, "int", low=1, high=1000, doc="frames waiting per source; when full the oldest drops"
    )
    max_frame_age_ms: float = _setting(
        250.0, "float", low=1.0, high=60_000.0, doc="older frames are dropped, not located"
    )


@dataclass(frozen=True)
class PipelineSection:
    max_batch: int = _setting(8, "int", low=1, high=1024, doc="crops per inference run")
    max_wait_ms: float = _setting(
        4.0, "float", low=0.0, high=1000.0, doc="how long a batch waits to fill"
    )
    batch_queue: int = _setting(
        256, "int", low=1, high=1_000_000, doc="crops waiting for inference (all sources)"
    )
    max_inflight_views: int = _setting(
        64,
        "int",
        low=1,
        high=1_000_000,
        doc="realtime: frames are dropped at the source while more crops than this are in flight",
    )
    max_views: int = _setting(
        8, "int", low=1, high=1000, doc="crops classified per object, at most"
    )
    view_stride: int = _setting(
        3, "int", low=1, high=1000, doc="frames between two crops of one object"
    )
    decision_line: float = _setting(
        0.5,
        "float",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        doc="decision line x as a fraction of the frame width",
    )
    direction: str = _setting("left_to_right", "str", choices=DIRECTIONS, doc="belt direction")
    max_missed: int = _setting(
        2, "int", low=0, high=1000, doc="frames a track may go unseen before it ends"
    )
    shutdown_timeout_s: float = _setting(
        5.0, "float", low=0.1, high=600.0, doc="bound on a clean stop (SIGTERM, end of files)"
    )


@dataclass(frozen=True)
class DecideSection:
    min_confidence: float = _setting(
        0.6, "float", low=0.0, high=1.0, doc="below this the object goes to the reject bin"
    )
    min_margin: float = _setting(
        0.2, "float", low=0.0, high=1.0, doc="top-1 minus top-2 probability must reach this"
    )
    reject_bin: int = _setting(
        -1, "int", low=-1, high=100_000, doc="bin for unsure objects; -1 = number of classes"
    )
    # _setting returns a dataclasses.field with a default_factory for the dict
    class_to_bin: dict[str, int] = _setting(  # noqa: RUF009
        {}, "dict[str,int]", low=0, high=100_000, doc="class name -> bin; default: class index"
    )
    view_wait_ms: float = _setting(
        150.0, "float", low=0.0, high=60_000.0, doc="how long a crossed object waits for views"
    )


@dataclass(frozen=True)
class BeltSection:
    speed_mm_s: float = _setting(0.0, "float", low=0.0, high=100_000.0, doc="0 = not set")
    px_per_mm: float = _setting(0.0, "float", low=0.0, high=10_000.0, doc="0 = not set")
    ejector_distance_mm: tuple[float, ...] = _setting(
        (), "list[float]", low=0.0, high=1_000_000.0, doc="per bin: decision line to ejector"
    )
    actuator_lead_ms: float = _setting(
        0.0, "float", low=0.0, high=60_000.0, doc="fire this much before arrival"
    )

    @property
    def configured(self) -> bool:
        return self.speed_mm_s > 0 and self.px_per_mm > 0 and bool(self.ejector_distance_mm)


@dataclass(frozen=True)
class PublishSection:
    endpoint: str = _setting("tcp://127.0.0.1:5557", "str", doc="ZeroMQ PUB bind endpoint")
    heartbeat_s: float = _setting(1.0, "float", low=0.01, high=3600.0, doc="heartbeat period")
    hwm: int = _setting(10_000, "int", low=1, high=10_000_000, doc="ZeroMQ send high-water mark")
    queue_size: int = _setting(
        10_000, "int", low=1, high=10_000_000, doc="messages waiting to be sent"
    )


@dataclass(frozen=True)
class HttpSection:
    listen: str = _setting(
        "127.0.0.1:9108", "str", doc='HOST:PORT for /metrics /healthz /readyz; "" = off'
    )
    health_stale_s: float = _setting(
        5.0, "float", low=0.1, high=3600.0, doc="/healthz fails after this long without progress"
    )


@dataclass(frozen=True)
class LoggingSection:
    level: str = _setting("INFO", "str", choices=LOG_LEVELS, doc="log level")


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` is the all-defaults one."""

    model: ModelSection = field(default_factory=ModelSection)
    sources: SourcesSection = field(default_factory=SourcesSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    decide: DecideSection = field(default_factory=DecideSection)
    belt: BeltSection = field(default_factory=BeltSection)
    publish: PublishSection = field(default_factory=PublishSection)
    http: HttpSection = field(default_factory=HttpSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with keys of one section changed, checked like the file's values."""
        current = getattr(self, section)
        checked = _build_section(
            section, type(current), {**_section_dict(current), **changes}, origin="command line"
        )
        return dataclasses.replace(self, **{section: checked})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}


# section name -> dataclass (field.type is a string under `from __future__ import annotations`)
SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "sources": SourcesSection,
    "pipeline": PipelineSection,
    "decide": DecideSection,
    "belt": BeltSection,
    "publish": PublishSection,
    "http": HttpSection,
    "logging": LoggingSection,
}


def _section_dict(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _build_section(name: str, cls: type, values: dict[str, Any], *, origin: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(f"{origin}: unknown key [{name}] {key}; allowed keys: {allowed}")
        checked[key] = _check_value(f"{origin}: [{name}] {key}", value, fields[key].metadata)
    return cls(**checked)


def _check_cross_fields(config: Config, origin: str) -> None:
    """Rules that involve more than one key."""
    src = config.sources
    if src.reconnect_max_s < src.reconnect_initial_s:
        raise ConfigError(
            f"{origin}: [sources] reconnect_max_s = {src.reconnect_max_s} is below "
            f"reconnect_initial_s = {src.reconnect_initial_s}; allowed: max >= initial"
        )
    belt = config.belt
    given = [k for k in ("speed_mm_s", "px_per_mm") if getattr(belt, k) > 0]
    if belt.ejector_distance_mm and len(given) < 2:
        raise ConfigError(
            f"{origin}: [belt] ejector_distance_mm is set but speed_mm_s and px_per_mm are not "
            "both > 0; set all three (or none) to compute eject times"
        )
    if not src.uris:
        raise ConfigError(
            f"{origin}: [sources] uris = [] is empty; allowed: at least one source, "
            'e.g. ["synthetic:"]'
        )


def config_from_dict(
    data: dict[str, Any], *, origin: str = "config", base_dir: Path | None = None
) -> Config:
    """Check a parsed TOML document and build a :class:`Config` from it."""
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            allowed = ", ".join(f"[{s}]" for s in SECTIONS)
            raise ConfigError(f"{origin}: unknown section [{name}]; allowed sections: {allowed}")
        if not isinstance(values, dict):
            raise ConfigError(
                f"{origin}: {name} = {values!r} is not a section; write it as a [{name}] table"
            )
        sections[name] = _build_section(name, SECTIONS[name], values, origin=origin)
    config = Config(**sections)
    model_path = config.model.path
    if model_path and base_dir is not None and not Path(model_path).is_absolute():
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, path=str(base_dir / model_path))
        )
    _check_cross_fields(config, origin)
    return config


def load_config(path: str | Path | None) -> Config:
    """Read and check a TOML config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    origin = f"config {path}"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{origin}: file does not exist; give an existing TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{origin}: cannot read it as UTF-8 text: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    return config_from_dict(data, origin=origin, base_dir=path.parent)


def validate(config: Config, origin: str = "config") -> Config:
    """Run the cross-key rules again, e.g. after command-line overrides."""
    _check_cross_fields(config, origin)
    return config


def describe_fields() -> dict[str, list[tuple[str, Any, str]]]:
    """(key, default, doc) per section: what ``deploy/beltsort.example.toml`` lists."""
    out = {}
    for name, cls in SECTIONS.items():
        out[name] = [
            (f.name, getattr(cls(), f.name), f.metadata["doc"]) for f in dataclasses.fields(cls)
        ]
    return out
