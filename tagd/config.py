"""`tagd serve` configuration: one validated schema for the TOML file and the flags.

The schema is a tree of pydantic models, one per TOML table (``tagd.schema.Table``).
``load_config`` reads TOML with tomllib and validates it strictly: unknown keys are
refused with the known ones, a value must already have its key's type (``rate = "44100"``
is refused, not coerced), and every problem is collected, each with its key path and the
bad value (``inputs[2].rate: must lie in 1000..768000, got 12``), into one ``ConfigError``.
Command-line flags are applied on top with ``apply_overrides``; ``validate`` checks the
whole tree again, with what depends on several keys (an input's scheme, stream names),
and ``--check-config`` stops after it.

Inputs are URLs (``zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1``)
whose query parameters are the fields of ``InputConfig``, each a string converted to its
field's type; in TOML the same fields may be given as keys of an ``[[inputs]]`` table
instead (not both).

The key reference in docs/serve.md is ``reference_markdown()``, rendered from the
models' fields; ``python -m tagd.config --reference docs/serve.md`` rewrites it there.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from tagd import schema
from tagd.audio import PCM_FORMATS
from tagd.engines.onnx import OnnxRuntimeConfig
from tagd.logs import LOG_FORMATS, LOG_LEVELS
from tagd.schema import (
    ConfigError,
    Table,
    describe,
    from_text,
    invalid,
    toml_value,
    validated,
    write_reference,
)

# Stream names become topic suffixes (tags.<stream>) and metric label values: keep them
# short, printable and free of the '.' that separates topic levels.
STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

MAX_CHANNELS = 64
RATE_RANGE = (1000, 768_000)  # Hz a producer may declare
MAX_INSTANCES = 64  # engine instances


def _source_classes() -> dict[str, type]:
    from tagd.sources import source_classes  # imported here: the sources import this module

    return source_classes()


def _stream_name(name: str) -> str:
    if not STREAM_NAME.match(name):
        raise invalid(
            f"{name!r} is not a valid stream name (letters, digits, '_' and '-', at most 64, "
            f"no '.')"
        )
    return name


def _beside_the_file(value: str, info: ValidationInfo) -> str:
    """A relative path in a config file is relative to that file's folder."""
    folder = (info.context or {}).get("config_folder")
    if "://" in value:  # an engine URL (triton://HOST:PORT/MODEL), not a path
        return value
    if value and folder is not None and not Path(value).is_absolute():
        return str(folder / value)
    return value


StreamName = Annotated[str, AfterValidator(_stream_name)]
FilePath = Annotated[str, AfterValidator(_beside_the_file)]


# -- the tables ------------------------------------------------------------------------


class _QueryString(str):
    """A value from an input URL's query: converted to its field's type, then validated."""


# Stands for a key of an input given both in its URL's query and in its table.
_GIVEN_TWICE = object()


class InputConfig(Table):
    """One input: a URL in `inputs = [...]`, or an `[[inputs]]` table with `url` and the
    other keys, each of which may be given in the URL's query instead
    (`?rate=44100&stream=radio1`; `streams=a,b`), not both."""

    url: str = Field(
        description="zmq+raw://HOST:PORT, zmq+sub://HOST:PORT, zmq+pull://HOST:PORT, "
        "soundcard://DEVICE (a name or an index), file://PATH."
    )
    stream: StreamName | None = Field(
        None,
        description="Stream name of a single-stream input (required but for file, where it "
        "is the file's stem); letters, digits, `_` and `-`.",
    )
    format: Literal[tuple(PCM_FORMATS)] | None = Field(
        None,
        description="zmq+raw (required): the PCM sample format ffmpeg sends; soundcard: the "
        "sample type asked of PortAudio.",
    )
    rate: int | None = Field(
        None,
        ge=RATE_RANGE[0],
        le=RATE_RANGE[1],
        description="zmq+raw (required), soundcard: sample rate in Hz.",
    )
    channels: int | None = Field(
        None, ge=1, le=MAX_CHANNELS, description="zmq+raw (required), soundcard: channels."
    )
    streams: list[StreamName] = Field(
        default_factory=list,
        description="zmq+sub, zmq+pull: the stream names taken; empty: any.",
    )
    realtime: bool = Field(True, description="file: pace at real time, else as fast as it reads.")
    loop: bool = Field(False, description="file: start over at the end.")
    chunk_ms: float = Field(20.0, gt=0, description="file: audio per chunk pushed, in ms.")
    blocksize: int = Field(
        0, ge=0, description="soundcard: frames per callback; 0 lets PortAudio choose."
    )
    curve: bool | None = Field(
        None,
        description="zmq+sub, zmq+pull: unset or true, CURVE when `[security]` is set; false, "
        "plain. zmq+raw: false when `[security]` is set (ffmpeg's zmq output has no CURVE).",
    )

    @model_validator(mode="before")
    @classmethod
    def _query_into_keys(cls, data: Any) -> Any:
        """A URL alone as a table; the URL's query parameters as keys, the URL without it."""
        if isinstance(data, str):
            data = {"url": data}
        if isinstance(data, InputConfig):
            return data
        if not isinstance(data, dict):
            raise invalid(f"expected a URL or a table, got {describe(data)}")
        url = data.get("url")
        if not isinstance(url, str):
            return data
        data = dict(data)
        parts = urlsplit(url)
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            data[key] = _GIVEN_TWICE if key in data else _QueryString(value)
        data["url"] = parts._replace(query="").geturl()
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _from_query(cls, value: Any, info: ValidationInfo) -> Any:
        if value is _GIVEN_TWICE:
            raise invalid("given both in the URL and as a key; keep one")
        if isinstance(value, _QueryString):
            return from_text(cls.model_fields[info.field_name].annotation, value)
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        classes = _source_classes()
        scheme = urlsplit(url).scheme
        if scheme not in classes:
            raise invalid(f"unknown scheme {scheme!r} in {url!r}; use one of {', '.join(classes)}")
        return url

    # -- derived from the URL, answered by the source class of its scheme ----------
    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def url_parts(self):
        return urlsplit(self.url)

    def source_class(self) -> type | None:
        """The tagd.sources class that reads this scheme; None for an unknown scheme."""
        return _source_classes().get(self.scheme)

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
        """What this input's scheme refuses of its keys, each valid on its own."""
        classes = _source_classes()
        source = classes.get(self.scheme)
        if source is None:
            return []  # the url's own validation says so
        scheme = self.scheme
        found = source.check(self, path, security)
        single = not source.multi_stream
        if single and self.stream is None and source.needs_stream_name:
            found.append(f"{path}.stream: {scheme} inputs need a stream name (?stream=NAME)")
        if self.stream is not None and not single:
            found.append(
                f"{path}.stream: {scheme} carries stream names in each message; "
                f"use streams=a,b to allow only some"
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


class PublishConfig(Table):
    """The ZeroMQ PUB socket `tags.<stream>` and `events.<stream>` leave on."""

    address: str = Field(
        "tcp://127.0.0.1:5560", description="Endpoint the PUB binds: tcp://HOST:PORT or ipc://."
    )
    sndhwm: int = Field(
        1000, ge=1, description="Messages queued per subscriber before it starts missing some."
    )
    linger_ms: int = Field(200, ge=0, description="How long stop() lets queued messages leave.")

    @field_validator("address")
    @classmethod
    def _endpoint(cls, address: str) -> str:
        if not re.match(r"^(tcp|ipc|inproc)://.+", address):
            raise invalid(f"expected tcp://HOST:PORT (or ipc://), got {address!r}")
        return address


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsConfig(Table):
    """Prometheus `/metrics` and the `/healthz` check, on HTTP."""

    address: str = Field("127.0.0.1:9108", description='HOST:PORT to serve them on; "off": none.')

    @property
    def enabled(self) -> bool:
        return self.address != "off"

    def host_port(self) -> tuple[str, int]:
        return _host_port(self.address)

    @field_validator("address")
    @classmethod
    def _host_port_or_off(cls, address: str) -> str:
        if address == "off":
            return address
        try:
            host, port = _host_port(address)
        except ValueError:
            host, port = "", -1
        if not host or not 0 <= port <= 65535:
            raise invalid(f"expected HOST:PORT or 'off', got {address!r}")
        return address


class BatchingConfig(Table):
    """Windows of all streams wait in one queue; engine workers take them in batches."""

    max_batch: int = Field(
        0,
        ge=0,
        json_schema_extra={"allowed": "0 (automatic) or more"},
        description="Windows per engine call, capped by the engine's own limit. 0: automatic, "
        "1 on CPU (where bigger batches cost memory and gain nothing), else 8.",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, le=10_000, description="How long the oldest window waits for a batch to fill."
    )
    max_pending_per_stream: int = Field(
        2, ge=1, description="A stream's older windows beyond this many are dropped."
    )
    max_queue_age_s: float = Field(
        0.0, ge=0, description="Drop windows that waited longer than this; 0: no age limit."
    )
    spread_phases: bool = Field(
        True, description="Move live streams' hop grids apart once, so their windows spread."
    )
    instances: int = Field(
        1,
        ge=1,
        le=MAX_INSTANCES,
        description="Engine instances, each with a worker taking batches from the one queue: "
        "on a CPU with more cores than one window's inference uses well, more windows at "
        "once; ONNX Runtime's share one copy of the model (each runs on its share of the "
        "cores), other engines' each load it again.",
    )


class TaggerConfig(Table):
    """Scores to tags turning on and off."""

    on_after: int = Field(
        2, ge=1, description="Consecutive predictions over threshold before a tag turns on."
    )
    off_margin: float = Field(
        0.1, ge=0, lt=1, description="A tag turns off under its threshold minus this."
    )


class LimitsConfig(Table):
    """What the daemon holds at most, and when it gives up on a stream."""

    max_streams: int = Field(
        64, ge=1, description="Streams at once; new ones beyond are refused and counted."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="ZMQ_MAXMSGSIZE of every input socket."
    )
    idle_after_s: float = Field(
        5.0, gt=0, description="A stream without data this long is idle (not fed zeros)."
    )
    evict_after_s: float = Field(
        600.0,
        ge=0,
        description="Forget idle streams of multi-stream inputs after this, not shorter than "
        "idle_after_s; 0: never.",
    )
    max_spliced_gap_s: float = Field(
        2.0,
        ge=0,
        description="A seq jump that lost more audio than this restarts the stream's window "
        "instead of splicing the audio either side of the gap.",
    )
    unhealthy_after_failed_batches: int = Field(
        3, ge=1, description="Engine failures in a row that turn /healthz to 503."
    )

    @field_validator("evict_after_s")
    @classmethod
    def _not_before_idle(cls, evict_after_s: float, info: ValidationInfo) -> float:
        idle_after_s = info.data.get("idle_after_s")
        if idle_after_s is not None and 0 < evict_after_s < idle_after_s:
            raise invalid("must not be shorter than idle_after_s")
        return evict_after_s


def _is_file(path: str) -> str:
    if path and not Path(path).is_file():
        raise invalid(f"no such file: {path}")
    return path


def _is_dir(path: str) -> str:
    if path and not Path(path).is_dir():
        raise invalid(f"no such directory: {path}")
    return path


class SecurityConfig(Table):
    """CURVE for the multi-stream inputs and the publisher (docs/operations.md); both keys
    or neither."""

    curve_server_secret: Annotated[FilePath, AfterValidator(_is_file)] = Field(
        "", description="tagd's key pair: the NAME.key_secret file `tagd keys generate` writes."
    )
    curve_allowed_clients: Annotated[FilePath, AfterValidator(_is_dir)] = Field(
        "",
        description="A folder of the public keys (*.key) of the producers and subscribers let in.",
    )

    @model_validator(mode="before")
    @classmethod
    def _both_or_neither(cls, data: Any) -> Any:
        if isinstance(data, dict) and sum(bool(data.get(k)) for k in cls.model_fields) == 1:
            raise invalid(
                "CURVE needs both curve_server_secret and curve_allowed_clients "
                "(`tagd keys generate` makes the keys)"
            )
        return data

    @property
    def enabled(self) -> bool:
        return bool(self.curve_server_secret or self.curve_allowed_clients)


class LogConfig(Table):
    """Logs, on stderr."""

    format: Literal[LOG_FORMATS] = Field("text", description="One line of text or JSON a record.")
    level: Literal[LOG_LEVELS] = Field("info", description="The least severe level written.")


class AsRunConfig(Table):
    """The as-run log: every tag segment that ends, in an SQLite file that `tagd log`
    reads (docs/deploy.md, "The as-run log")."""

    path: FilePath = Field(
        "",
        description='SQLite file (created with its folder; restarts append to it); "": no '
        "as-run log. Relative to the config file. Also --asrun PATH.",
    )
    retention_days: float = Field(
        90.0, ge=0, description="Segments that ended longer ago are deleted (hourly); 0: never."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.path)


# [engine] spelt the top-level keys engine and incremental a second way, as path and
# incremental; a file still using it is refused with what to write instead (0.1 only).
ENGINE_TABLE_KEYS = {"path": "engine", "incremental": "incremental"}


class ServeConfig(Table):
    """Keys before the first table."""

    engine: FilePath = Field(
        "",
        description="Model file: .onnx (ONNX Runtime), .plan or .engine (TensorRT), .pt "
        "(PyTorch, for debugging); relative to the config file. Or Triton Inference Server: "
        "`triton://HOST:PORT[,HOST:PORT…]/MODEL` (docs/triton.md). Required, here or as --engine.",
    )
    inputs: list[InputConfig] = Field(
        default_factory=list,
        description="URLs, or `[[inputs]]` tables (below). Required, here or as --input.",
    )
    hop_seconds: float | None = Field(
        None, gt=0, description="Seconds between a stream's windows; unset: the model card's."
    )
    incremental: bool = Field(
        True,
        description="Score each window from the stream's last one where the model has "
        "incremental graphs for the hop; false (--full-windows): every window in full.",
    )
    aggregate: bool = Field(
        False,
        description="Also step the model's song aggregator (its card's aggregator section) "
        "each hop, at the hop it was trained at, and publish the stream's song-so-far scores "
        "in each tags message's song field. It costs one aggregator step per hop over full "
        "windows and over incremental graphs exported with the aggregator (they give the "
        "embedding); with incremental graphs exported without it, a whole window's "
        "inference more per hop (docs/training.md).",
    )
    publish: PublishConfig = Field(default_factory=PublishConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    onnxruntime: OnnxRuntimeConfig = Field(default_factory=OnnxRuntimeConfig)
    tagger: TaggerConfig = Field(default_factory=TaggerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    asrun: AsRunConfig = Field(default_factory=AsRunConfig)

    @field_validator("engine", mode="before")
    @classmethod
    def _no_engine_table(cls, engine: Any) -> Any:
        if not isinstance(engine, dict):
            return engine
        instead = ", ".join(
            f"{ENGINE_TABLE_KEYS[key]} = {toml_value(value)}"
            for key, value in engine.items()
            if key in ENGINE_TABLE_KEYS
        )
        raise invalid(
            "the [engine] table is no longer read; write these top-level keys before the "
            f"first table instead: {instead or 'engine = ..., incremental = ...'}"
        )

    def problems(self) -> list[str]:
        """What depends on several keys, or on the flags too: inputs' schemes, names."""
        found = []
        if not self.engine:
            found.append("engine: no model file given (--engine or engine = ...)")
        if not self.inputs:
            found.append("inputs: no input given (--input URL, repeatable, or [[inputs]])")
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
        return found

    def validate(self) -> ServeConfig:
        """Every key again (flags and code may have set some since), then ``problems``."""
        validated(ServeConfig, self.model_dump(), "")
        found = self.problems()
        if found:
            raise ConfigError(found)
        return self


# -- reading TOML, URLs and flags ------------------------------------------------------


def load_config(path: str | Path, *, validate: bool = True) -> ServeConfig:
    """Read a TOML config file; check what depends on the flags too unless they are to come."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    config = validated(ServeConfig, data, "", {"config_folder": path.parent})
    return config.validate() if validate else config


def parse_input(url: str, path: str = "--input") -> InputConfig:
    """An InputConfig from a URL alone (what ``--input`` gives)."""
    return validated(InputConfig, url, path)


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
        "asrun": (config.asrun, "path"),
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


# -- the words of a problem ------------------------------------------------------------

# -- the reference in docs/serve.md ----------------------------------------------------


def reference_markdown() -> str:
    """The reference of every key, as docs/serve.md holds it (``tagd.schema``)."""
    return schema.reference_markdown(ServeConfig)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--reference"] or len(sys.argv) > 3:
        sys.exit(
            "usage: python -m tagd.config --reference [MARKDOWN]: print the key reference, "
            "or write it between the config-reference markers of MARKDOWN (docs/serve.md)"
        )
    if len(sys.argv) == 3:
        write_reference(Path(sys.argv[2]), reference_markdown())
    else:
        print(reference_markdown(), end="")
