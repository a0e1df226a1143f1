"""`tagd serve` configuration: one validated schema for the TOML file and the flags.

The schema is a tree of dataclasses. ``load_config`` reads TOML with tomllib, rejects
unknown keys with their path (``batching.max_wiat``), coerces nothing silently, and
collects every bad value with its reason before raising one ``ConfigError``. Command-line
flags are applied on top with ``apply_overrides``; ``--check-config`` stops after
``validate``.

Inputs are URLs (``zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1``)
whose query parameters are the fields of ``InputConfig``; in TOML the same fields may be
given as keys of an ``[[inputs]]`` table instead (not both).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tagd.audio import PCM_FORMATS
from tagd.engines.onnx import OnnxRuntimeConfig
from tagd.logs import LOG_FORMATS, LOG_LEVELS

# Stream names become topic suffixes (tags.<stream>) and metric label values: keep them
# short, printable and free of the '.' that separates topic levels.
STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

MAX_CHANNELS = 64
RATE_RANGE = (1000, 768_000)  # Hz a producer may declare
MAX_INSTANCES = 64  # engine instances


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class InputConfig:
    """One input. Fields not given in the table may come from the URL's query."""

    url: str
    stream: str | None = None  # stream name (single-stream inputs); file: default its stem
    format: str | None = (
        None  # zmq+raw: PCM sample format; soundcard: sample type asked of PortAudio
    )
    rate: int | None = None  # zmq+raw, soundcard: sample rate in Hz
    channels: int | None = None  # zmq+raw, soundcard: interleaved channels
    streams: list[str] = field(default_factory=list)  # zmq+sub/pull: allow-list; empty: any
    realtime: bool = True  # file: pace at real time (else as fast as possible)
    loop: bool = False  # file: start over at the end
    chunk_ms: float = 20.0  # file: audio per chunk pushed
    blocksize: int = 0  # soundcard: frames per callback; 0 lets PortAudio choose
    # zmq+sub/pull: None (default) or true: CURVE when [security] is set; false: plain.
    # zmq+raw: must be false when [security] is set (ffmpeg's zmq output has no CURVE).
    curve: bool | None = None

    # -- derived from the URL, answered by the source class of its scheme ----------
    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def url_parts(self):
        return urlsplit(self.url)

    def source_class(self) -> type | None:
        """The tagd.sources class that reads this scheme; None for an unknown scheme."""
        # Imported here: the sources import this module for their settings.
        from tagd.sources import source_classes

        return source_classes().get(self.scheme)

    @property
    def address(self) -> str:
        """What the scheme connects to: a zmq endpoint, a device, or a file path."""
        source = self.source_class()
        return source.address_of(self) if source else self.url_parts.netloc

    @property
    def device(self) -> str | int:
        """Soundcard device: an index when the URL names a number, else a name."""
        return int(self.address) if self.address.isdigit() else self.address

    @property
    def is_multi_stream(self) -> bool:
        source = self.source_class()
        return bool(source and source.multi_stream)

    @property
    def name(self) -> str:
        """A short label for logs and metrics: the stream, or the address it listens on."""
        return self.stream or urlsplit(self.url).netloc or self.url

    def problems(self, path: str, security: SecurityConfig | None = None) -> list[str]:
        from tagd.sources import source_classes

        classes = source_classes()
        scheme = self.scheme
        source = classes.get(scheme)
        if source is None:
            return [
                f"{path}.url: unknown scheme {scheme!r} in {self.url!r}; use one of {', '.join(classes)}"
            ]
        found = source.check(self, path, security)
        single = not source.multi_stream
        if single and self.stream is None and source.needs_stream_name:
            found.append(f"{path}.stream: {scheme} inputs need a stream name (?stream=NAME)")
        if self.stream is not None and not single:
            found.append(
                f"{path}.stream: {scheme} carries stream names in each message; "
                f"use streams=a,b to allow only some"
            )
        for name in ([self.stream] if self.stream else []) + self.streams:
            if not STREAM_NAME.match(name):
                found.append(
                    f"{path}.stream: {name!r} is not a valid stream name "
                    f"(letters, digits, '_' and '-', at most 64, no '.')"
                )
        if self.streams and "streams" not in source.options:
            several = " and ".join(s for s, c in classes.items() if "streams" in c.options)
            found.append(f"{path}.streams: only {several} carry several streams")

        for key in ("format", "rate", "channels"):
            value = getattr(self, key)
            if key in source.required and value is None:
                found.append(f"{path}.{key}: {scheme} needs {key}= ({source.required[key]})")
            elif key not in source.options and value is not None:
                found.append(f"{path}.{key}: not used by {scheme} (it is carried by the source)")
        if (
            self.format is not None
            and "format" in source.options
            and self.format not in PCM_FORMATS
        ):
            found.append(f"{path}.format: {self.format!r} is not one of {', '.join(PCM_FORMATS)}")
        if self.rate is not None and not RATE_RANGE[0] <= self.rate <= RATE_RANGE[1]:
            found.append(f"{path}.rate: {self.rate} Hz is outside {RATE_RANGE[0]}..{RATE_RANGE[1]}")
        if self.channels is not None and not 1 <= self.channels <= MAX_CHANNELS:
            found.append(f"{path}.channels: {self.channels} is outside 1..{MAX_CHANNELS}")
        if not self.chunk_ms > 0:
            found.append(f"{path}.chunk_ms: must be positive, got {self.chunk_ms}")
        if self.blocksize < 0:
            found.append(f"{path}.blocksize: must be 0 or positive, got {self.blocksize}")
        if self.curve is not None and not source.secured:
            found.append(f"{path}.curve: not used by {scheme} (only ZeroMQ inputs)")
        return found

    def uses_curve(self, security: SecurityConfig) -> bool:
        """Whether this input's socket is a CURVE server (multi-stream inputs, by default)."""
        return security.enabled and self.is_multi_stream and self.curve is not False

    def stream_name(self) -> str:
        """The name of a single-stream input's stream (a file's stem when not given)."""
        if self.stream:
            return self.stream
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.address).stem)[:64]
        return stem or "file"


@dataclass
class PublishConfig:
    address: str = "tcp://127.0.0.1:5560"  # ZeroMQ endpoint the PUB binds
    sndhwm: int = 1000  # messages queued per subscriber before it starts missing some
    linger_ms: int = 200  # how long stop() lets queued messages leave

    def problems(self, path: str) -> list[str]:
        found = []
        if not re.match(r"^(tcp|ipc|inproc)://.+", self.address):
            found.append(
                f"{path}.address: expected tcp://HOST:PORT (or ipc://), got {self.address!r}"
            )
        if self.sndhwm < 1:
            found.append(f"{path}.sndhwm: must be at least 1, got {self.sndhwm}")
        if self.linger_ms < 0:
            found.append(f"{path}.linger_ms: must be 0 or positive, got {self.linger_ms}")
        return found


@dataclass
class MetricsConfig:
    address: str = "127.0.0.1:9108"  # HOST:PORT of /metrics and /healthz; "off" disables

    @property
    def enabled(self) -> bool:
        return self.address != "off"

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def problems(self, path: str) -> list[str]:
        if not self.enabled:
            return []
        try:
            host, port = self.host_port()
        except ValueError:
            return [f"{path}.address: expected HOST:PORT or 'off', got {self.address!r}"]
        if not host or not 0 <= port <= 65535:
            return [f"{path}.address: expected HOST:PORT or 'off', got {self.address!r}"]
        return []


@dataclass
class BatchingConfig:
    # Windows per engine call, capped by the engine's own limit. 0: automatic, 1 on CPU
    # (where bigger batches cost memory and gain nothing: docs/serve.md), else 8.
    max_batch: int = 0
    max_wait_ms: float = 10.0  # how long the oldest window waits for a batch to fill
    max_pending_per_stream: int = 2  # older windows of a stream beyond this are dropped
    max_queue_age_s: float = 0.0  # drop windows that waited longer; 0: no age limit
    spread_phases: bool = True  # move live streams' hop grids apart once (tagd/stream.py)
    # Engine instances, each with its own worker taking batches from the one queue
    # (Triton's instance groups): on a CPU with more cores than one window's inference
    # uses well, more windows at once; each instance loads the model again.
    instances: int = 1

    def problems(self, path: str) -> list[str]:
        found = []
        if not 1 <= self.instances <= MAX_INSTANCES:
            found.append(f"{path}.instances: must lie in 1..{MAX_INSTANCES}, got {self.instances}")
        if self.max_batch < 0:
            found.append(f"{path}.max_batch: must be 0 (automatic) or more, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            found.append(f"{path}.max_wait_ms: must lie in 0..10000, got {self.max_wait_ms}")
        if self.max_pending_per_stream < 1:
            found.append(
                f"{path}.max_pending_per_stream: must be at least 1, got {self.max_pending_per_stream}"
            )
        if self.max_queue_age_s < 0:
            found.append(
                f"{path}.max_queue_age_s: must be 0 or positive, got {self.max_queue_age_s}"
            )
        return found


@dataclass
class TaggerConfig:
    on_after: int = 2  # consecutive predictions over threshold before a tag turns on
    off_margin: float = 0.1  # a tag turns off under its threshold minus this

    def problems(self, path: str) -> list[str]:
        found = []
        if self.on_after < 1:
            found.append(f"{path}.on_after: must be at least 1, got {self.on_after}")
        if not 0 <= self.off_margin < 1:
            found.append(f"{path}.off_margin: must lie in [0, 1), got {self.off_margin}")
        return found


@dataclass
class LimitsConfig:
    max_streams: int = 64  # streams at once; new ones beyond are refused and counted
    max_message_bytes: int = 4 * 1024 * 1024  # ZMQ_MAXMSGSIZE on every input socket
    idle_after_s: float = 5.0  # a stream without data this long is idle (not fed zeros)
    evict_after_s: float = 600.0  # forget idle multi-stream streams after this; 0: never
    # A seq jump that lost more audio than this (estimated from the message's duration)
    # restarts the stream's window instead of splicing audio from either side of the gap.
    max_spliced_gap_s: float = 2.0
    unhealthy_after_failed_batches: int = 3  # engine failures in a row that make /healthz 503

    def problems(self, path: str) -> list[str]:
        found = []
        if self.max_streams < 1:
            found.append(f"{path}.max_streams: must be at least 1, got {self.max_streams}")
        if self.max_message_bytes < 1024:
            found.append(
                f"{path}.max_message_bytes: must be at least 1024, got {self.max_message_bytes}"
            )
        if not self.idle_after_s > 0:
            found.append(f"{path}.idle_after_s: must be positive, got {self.idle_after_s}")
        if self.evict_after_s < 0:
            found.append(f"{path}.evict_after_s: must be 0 or positive, got {self.evict_after_s}")
        elif 0 < self.evict_after_s < self.idle_after_s:
            found.append(f"{path}.evict_after_s: must not be shorter than idle_after_s")
        if self.max_spliced_gap_s < 0:
            found.append(
                f"{path}.max_spliced_gap_s: must be 0 or positive, got {self.max_spliced_gap_s}"
            )
        if self.unhealthy_after_failed_batches < 1:
            found.append(
                f"{path}.unhealthy_after_failed_batches: must be at least 1, "
                f"got {self.unhealthy_after_failed_batches}"
            )
        return found


@dataclass
class SecurityConfig:
    # tagd's CURVE key pair: the NAME.key_secret file `tagd keys generate` writes.
    curve_server_secret: str = ""
    # A directory of the public keys (*.key) of the producers and subscribers allowed in.
    curve_allowed_clients: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.curve_server_secret or self.curve_allowed_clients)

    def problems(self, path: str) -> list[str]:
        if not self.enabled:
            return []
        if not (self.curve_server_secret and self.curve_allowed_clients):
            return [
                f"{path}: CURVE needs both curve_server_secret and curve_allowed_clients "
                f"(`tagd keys generate` makes the keys)"
            ]
        found = []
        if not Path(self.curve_server_secret).is_file():
            found.append(f"{path}.curve_server_secret: no such file: {self.curve_server_secret}")
        if not Path(self.curve_allowed_clients).is_dir():
            found.append(
                f"{path}.curve_allowed_clients: no such directory: {self.curve_allowed_clients}"
            )
        return found


@dataclass
class LogConfig:
    format: str = "text"
    level: str = "info"

    def problems(self, path: str) -> list[str]:
        found = []
        if self.format not in LOG_FORMATS:
            found.append(f"{path}.format: {self.format!r} is not one of {', '.join(LOG_FORMATS)}")
        if self.level not in LOG_LEVELS:
            found.append(f"{path}.level: {self.level!r} is not one of {', '.join(LOG_LEVELS)}")
        return found


@dataclass
class ServeConfig:
    engine: str = ""  # model file; relative paths in a file are relative to that file
    inputs: list[InputConfig] = field(default_factory=list)
    hop_seconds: float | None = None  # None: the model card's hop
    # Score each window from the stream's last one where the model has incremental graphs
    # for the hop (tagd/incremental.py); false (--full-windows): every window in full.
    incremental: bool = True
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def problems(self) -> list[str]:
        found = []
        if not self.engine:
            found.append("engine: no model file given (--engine or engine = ...)")
        if not self.inputs:
            found.append("inputs: no input given (--input URL, repeatable, or [[inputs]])")
        if self.hop_seconds is not None and not self.hop_seconds > 0:
            found.append(f"hop_seconds: must be positive, got {self.hop_seconds}")
        names: dict[str, int] = {}
        for index, spec in enumerate(self.inputs):
            found += spec.problems(f"inputs[{index}]", self.security)
            if spec.source_class() is not None and not spec.is_multi_stream:
                name = spec.stream_name()
                if name in names:
                    found.append(
                        f"inputs[{index}].stream: {name!r} is already the name of inputs[{names[name]}]"
                    )
                names.setdefault(name, index)
        for key in (
            "publish",
            "metrics",
            "batching",
            "onnxruntime",
            "tagger",
            "limits",
            "security",
            "log",
        ):
            found += getattr(self, key).problems(key)
        return found

    def validate(self) -> ServeConfig:
        found = self.problems()
        if found:
            raise ConfigError(found)
        return self


# -- building dataclasses from TOML and URLs ----------------------------------------


def load_config(path: str | Path, *, validate: bool = True) -> ServeConfig:
    """Read a TOML config file; validate it unless flags are still to be applied."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    if "inputs" in data and isinstance(data["inputs"], list):
        data["inputs"] = [
            {"url": item} if isinstance(item, str) else item for item in data["inputs"]
        ]
    config = build(ServeConfig, _engine_table(data), "")
    if config.engine and not Path(config.engine).is_absolute():
        config.engine = str(path.parent / config.engine)
    for key in ("curve_server_secret", "curve_allowed_clients"):
        value = getattr(config.security, key)
        if value and not Path(value).is_absolute():
            setattr(config.security, key, str(path.parent / value))
    return config.validate() if validate else config


ENGINE_TABLE_KEYS = {"path": "engine", "incremental": "incremental"}


def _engine_table(data: dict) -> dict:
    """``[engine]`` with ``path`` and ``incremental`` as the top-level keys they stand for."""
    table = data.get("engine")
    if not isinstance(table, dict):
        return data
    data = dict(data)
    del data["engine"]
    problems = [
        f"engine.{key}: unknown key (known: {', '.join(ENGINE_TABLE_KEYS)})"
        for key in sorted(set(table) - set(ENGINE_TABLE_KEYS))
    ]
    for key, top_level in ENGINE_TABLE_KEYS.items():
        if key not in table:
            continue
        if top_level in data:
            problems.append(f"engine.{key}: also given as the top-level key {top_level!r}")
        data[top_level] = table[key]
    if problems:
        raise ConfigError(problems)
    return data


def parse_input(url: str, path: str = "--input") -> InputConfig:
    """An InputConfig from a URL alone (what ``--input`` gives)."""
    return build(InputConfig, {"url": url}, path)


def apply_overrides(config: ServeConfig, **flags: Any) -> ServeConfig:
    """Command-line flags over the file: any flag not None replaces the file's value.

    ``inputs`` (a list of URLs) replaces the file's inputs as a whole.
    """
    problems = []
    if flags.get("inputs"):
        config.inputs = []
        for index, url in enumerate(flags["inputs"]):
            try:
                config.inputs.append(parse_input(url, f"--input[{index}]"))
            except ConfigError as exc:
                problems += exc.problems
    simple = {
        "engine": (config, "engine"),
        "hop_seconds": (config, "hop_seconds"),
        "incremental": (config, "incremental"),
        "publish": (config.publish, "address"),
        "metrics": (config.metrics, "address"),
        "max_batch": (config.batching, "max_batch"),
        "max_wait_ms": (config.batching, "max_wait_ms"),
        "log_format": (config.log, "format"),
        "log_level": (config.log, "level"),
    }
    for flag, (target, attribute) in simple.items():
        if flags.get(flag) is not None:
            setattr(target, attribute, flags[flag])
    unknown = set(flags) - set(simple) - {"inputs"}
    if unknown:
        raise TypeError(f"apply_overrides got unknown flags: {sorted(unknown)}")
    if problems:
        raise ConfigError(problems)
    return config


T = typing.TypeVar("T")


def build(cls: type[T], data: Any, path: str) -> T:
    """Instantiate dataclass ``cls`` from TOML data, checking keys and value types."""
    problems: list[str] = []
    result = _build(cls, data, path, problems)
    if problems:
        raise ConfigError(problems)
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a table, got {_describe(data)}")
        return None
    known_problems = len(problems)
    data = dict(data)
    if cls is InputConfig:
        data = _merge_url_query(data, path, problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - set(fields)):
        problems.append(f"{_join(path, key)}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                problems.append(f"{_join(path, name)}: required")
            continue
        values[name] = _convert(hints[name], data[name], _join(path, name), problems)
    if len(problems) > known_problems:
        return None  # the caller raises; values checks run once the types are right
    return cls(**values)


def _merge_url_query(data: dict, path: str, problems: list[str]) -> dict:
    """Move an input URL's query parameters into the table, as strings to convert."""
    url = data.get("url")
    if not isinstance(url, str):
        return data
    parts = urlsplit(url)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in data:
            problems.append(f"{path}.{key}: given both in the URL and as a key; keep one")
            continue
        data[key] = _QueryString(value)
    data["url"] = parts._replace(query="").geturl()
    return data


class _QueryString(str):
    """A value that came from a URL query: converted to the field's type, not checked as is."""


def _convert(hint: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path, problems)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin is list:
        (inner,) = args
        if isinstance(value, _QueryString):
            value = [item for item in value.split(",") if item]
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return []
        return [_convert(inner, item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if isinstance(value, _QueryString):
        return _from_query(hint, value, path, problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (str, int, float, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        problems.append(f"{path}: expected {_type_name(hint)}, got {_describe(value)}")
        return None
    if hint is float and not math.isfinite(value):
        problems.append(f"{path}: must be a finite number, got {value}")
        return None
    return value


def _from_query(hint: Any, text: str, path: str, problems: list[str]) -> Any:
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            return number
        return hint(str(text))
    except ValueError:
        problems.append(f"{path}: expected {_type_name(hint)}, got {str(text)!r}")
        return None


def _type_name(hint: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, str(hint)
    )


def _describe(value: Any) -> str:
    kind = {dict: "table", list: "list", bool: "boolean"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"
