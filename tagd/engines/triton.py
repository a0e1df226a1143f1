"""Inference on Triton Inference Server: ``engine = "triton://HOST:PORT[,HOST:PORT…]/MODEL"``.

tagd stays the streaming front end (ingest, windows, tagger, topics, metrics) and sends
each window to one of the URL's servers over gRPC (``tritonclient``, the ``tagd[triton]``
extra). The models are the repository `tagd-train triton-repo` writes
(trainer/triton_repo.py; docs/triton.md): ``MODEL`` is either the whole-window model or
``MODEL_seq``, the incremental one behind the sequence batcher; the URL may name either,
and both are used where the server has both. The card comes from the server (the
model's config parameter ``tagd.card``).

``TritonScorer`` is the remote twin of tagd.incremental's ``IncrementalRunner``
(a tagd.scoring.Scorer):

- **One server a stream.** A consistent-hash ring over the servers that answer gives
  each stream its server, so adding or losing one moves only its own streams. A
  stream's windows go there in order, one in flight (the batcher's rule).
- **A sequence a stream.** Each stream has a random 63-bit sequence id (CORRID), so
  front ends sharing a server never collide. A window that continues the stream's last
  one on the same server is sent without START and carries only the hop's new samples
  (the model keeps the window's tail: trainer/triton_model.py); any other (a first
  window, a break in the chain, a move to another server) is sent whole with START.
  ``forget`` sends END.
- **Failover.** A request that gets no answer (connection refused, ``timeout`` seconds)
  marks its server down: that batch's windows go at once, with START, to the servers
  left, and so do the stream's next windows; a thread of its own probes a down server
  every ``retry`` seconds (never a window's call) and it takes its streams back when
  it answers. A server that refuses
  a continuing window (it lost the sequence: restarted, idle timeout) gets it again
  with START. Scores are the full windows' either way. Without any server answering, a
  batch fails (``tagd_engine_errors_total``) and the next is tried again.

URL options (a query): ``timeout`` (seconds a request may take, default 5) and
``retry`` (seconds before a down server is probed, default 5).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from tagd.card import GRAPH_NAMES, CardError, ModelCard
from tagd.engines.base import ACCELERATOR_MAX_BATCH, Engine, EngineError
from tagd.incremental import rounds
from tagd.scoring import FULL, INCREMENTAL, UpdateCounter, WindowKey

if TYPE_CHECKING:
    from tagd.metrics import Metrics

log = logging.getLogger(__name__)

SCHEME = "triton"
CARD_PARAMETER = "tagd.card"  # trainer.triton_repo writes the card there
SEQUENCE_SUFFIX = "_seq"
STATE_SUFFIX = "_state"  # the incremental model on Triton's implicit state
SEQUENCE_INPUT = "audio"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRY_S = 5.0
PROBE_TIMEOUT_S = 1.0
END_WAIT_S = 0.5  # how long close() waits for the ENDs still out: a live server answers in ms
RING_POINTS = 64  # points per server on the hash ring: streams spread within a few %
MAX_MESSAGE_BYTES = 2**31 - 1
# gRPC reconnects to a server that went away after 1 s, then backs off up to this long:
# a server that comes back is seen within about one `retry`.
RECONNECT_BACKOFF_MS = 2000

# why a sequence started: tagd_triton_sequence_starts_total{reason}
START_FIRST, START_BREAK, START_MOVED, START_LOST = "first", "break", "moved", "lost"
FAIL_UNREACHABLE, FAIL_REFUSED = "unreachable", "refused"
# gRPC codes meaning "no answer": the server is down or hung, not the request wrong
UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


def is_triton_url(engine: str | Path) -> bool:
    return str(engine).startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class TritonURL:
    servers: tuple[str, ...]  # HOST:PORT each
    model: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_s: float = DEFAULT_RETRY_S

    @classmethod
    def parse(cls, url: str) -> TritonURL:
        """EngineError naming what is wrong with ``url``."""
        parts = urlsplit(str(url))
        example = "triton://HOST:PORT[,HOST:PORT…]/MODEL"
        if parts.scheme != SCHEME or not parts.netloc or parts.path.strip("/") == "":
            raise EngineError(f"{url!r} is not a Triton URL: write {example}")
        servers = tuple(s.strip() for s in parts.netloc.split(",") if s.strip())
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise EngineError(f"{url}: {server!r} is not HOST:PORT (gRPC, 8001 by default)")
        if len(set(servers)) != len(servers):
            raise EngineError(f"{url}: a server is named twice")
        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = sorted(set(options) - {"timeout", "retry"})
        if unknown:
            raise EngineError(f"{url}: unknown options {', '.join(unknown)}; known: retry, timeout")
        try:
            timeout = float(options.get("timeout", DEFAULT_TIMEOUT_S))
            retry = float(options.get("retry", DEFAULT_RETRY_S))
        except ValueError:
            raise EngineError(f"{url}: timeout and retry are seconds") from None
        if timeout <= 0 or retry <= 0:
            raise EngineError(f"{url}: timeout and retry must be positive")
        return cls(servers, parts.path.strip("/"), timeout, retry)


def _client_module():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        from tagd.engines import missing_sdk

        raise missing_sdk("tritonclient", "tagd[triton]") from None
    return grpcclient


def _unreachable(error: Exception) -> bool:
    status = getattr(error, "status", lambda: None)() or ""
    return any(code in str(status) for code in UNREACHABLE_CODES) or status == ""


class _Server:
    """One server of the URL: its client, whether it answers, its metrics' labels."""

    def __init__(self, address: str, grpcclient) -> None:
        self.address = address
        self.client = grpcclient.InferenceServerClient(
            address,
            channel_args=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 1000),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ],
        )
        self.up = True  # False: skipped, and probed every `retry` seconds off the data path

    def probe(self) -> bool:
        try:
            return bool(self.client.is_server_ready(client_timeout=PROBE_TIMEOUT_S))
        except Exception:  # tritonclient raises its own exception for any transport error
            return False


@dataclass
class _Models:
    """What the servers have of the URL's model: the card, and which models to call."""

    card: ModelCard
    full: str | None  # whole windows, `waveform` → `scores`
    sequence: str | None  # incremental, `audio` (+ controls) → `scores`
    sequence_hop: int | None  # the hop the sequence model steps by
    # the server keeps the state (sequence_batching.state): an END must carry a window
    implicit_state: bool = False


def _find_models(servers: list[_Server], model: str) -> _Models:
    """The model's card and variants from the first server that answers; EngineError."""
    named_one = model.endswith((SEQUENCE_SUFFIX, STATE_SUFFIX))
    names = [model] if named_one else [model, model + SEQUENCE_SUFFIX]
    problems = []
    for server in servers:
        configs = {}
        for name in names:
            try:
                configs[name] = server.client.get_model_config(
                    name, as_json=True, client_timeout=PROBE_TIMEOUT_S * 5
                )["config"]
            except Exception as exc:  # tritonclient's InferenceServerException, any transport
                problems.append(f"{server.address} {name}: {' '.join(str(exc).split())}")
                if _unreachable(exc):
                    break
        if configs:
            return _models_of(configs)
    raise EngineError(f"no Triton server serves {model}: {'; '.join(problems)}")


def _models_of(configs: dict[str, dict[str, Any]]) -> _Models:
    full = sequence = hop = None
    card = None
    implicit = False
    for name, config in configs.items():
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if CARD_PARAMETER not in parameters:
            raise CardError(
                f"Triton model {name} has no {CARD_PARAMETER} parameter: write its "
                f"repository with `tagd-train triton-repo`"
            )
        card = ModelCard.from_json(parameters[CARD_PARAMETER], source=f"Triton model {name}")
        if "sequence_batching" in config:
            sequence, hop = name, int(parameters["hop_samples"])
            implicit = bool(config["sequence_batching"].get("state"))
        else:
            full = name
    return _Models(card, full, sequence, hop, implicit)


@dataclass
class _Chain:
    """A stream's sequence: where it lives and which window continues it."""

    server: _Server
    epoch: int
    next_start: int


@dataclass
class _Request:
    row: int
    server: _Server
    start: bool
    reason: str = ""  # why it starts a sequence
    tries: set[str] = field(default_factory=set)  # servers that failed it


class TritonEngine(Engine):
    """The servers of a ``triton://`` URL; ``own_scorer`` gives the scorer `tagd serve`
    uses. ``run`` scores whole windows (``tagd tag``, warm-up)."""

    backend = "triton"
    has_incremental_graphs = True

    @property
    def default_max_batch(self) -> int:
        """Windows per call when [batching] max_batch is 0: a batch's requests go at once
        and the servers batch them with other streams' (an accelerator's batch)."""
        return ACCELERATOR_MAX_BATCH

    def __init__(self, url: TritonURL, servers: list[_Server], models: _Models):
        super().__init__(Path(url.model), models.card)
        self.url = url
        self.servers = servers
        self.models = models
        self._scorer: TritonScorer | None = None

    @classmethod
    def load(cls, url: str | Path, **options) -> TritonEngine:
        parsed = TritonURL.parse(str(url))
        grpcclient = _client_module()
        servers = [_Server(address, grpcclient) for address in parsed.servers]
        models = _find_models(servers, parsed.model)
        engine = cls(parsed, servers, models)
        log.info("loaded %s", engine.describe())
        return engine

    @classmethod
    def read_card(cls, path: str | Path) -> ModelCard:
        """The card from the servers (`--check-config`); CardError when none answers."""
        try:
            return cls.load(path).card
        except EngineError as exc:
            raise CardError(str(exc)) from None

    def describe(self) -> str:
        served = ", ".join(m for m in (self.models.full, self.models.sequence) if m)
        return (
            f"{self.card.name} ({self.card.architecture}) on Triton {served} at "
            f"{', '.join(self.url.servers)}"
        )

    def own_scorer(
        self,
        hop_samples: int,
        incremental: bool = True,
        on_updates: UpdateCounter | None = None,
        metrics: Metrics | None = None,
    ) -> TritonScorer:
        """The scorer of every instance (they share the streams' sequences)."""
        if self._scorer is None:
            self._scorer = TritonScorer(self, hop_samples, incremental, on_updates, metrics)
        return self._scorer

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check_batch(batch)
        scorer = self.own_scorer(self.card.hop_samples, incremental=False)
        keys = [_OneShot(f"tagd-oneshot-{secrets.token_hex(6)}") for _ in range(len(batch))]
        return scorer.run(keys, batch)

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
        for server in self.servers:
            server.client.close()


@dataclass(frozen=True)
class _OneShot:
    stream: str
    epoch: int = 0
    start: int = 0


class TritonScorer:
    """A tagd.scoring.RemoteScorer on Triton servers (the module's docstring has the
    rules): ``round_trips()`` gives each row's gRPC round trip, for ``latency_ms.remote``."""

    carries_state = True  # continues() can be true: a batcher runs those first
    state_bytes = 0  # kept here a stream: its sequence id and server; the state is remote

    def __init__(
        self,
        engine: TritonEngine,
        hop_samples: int,
        incremental: bool,
        on_updates: UpdateCounter | None,
        metrics: Metrics | None,
    ):
        self.engine = engine
        self.card = engine.card
        self.hop_samples = hop_samples
        models = engine.models
        self.mode = (
            INCREMENTAL
            if incremental and models.sequence and models.sequence_hop == hop_samples
            else FULL
        )
        self._why_full = self._full_reason(incremental)
        self.max_consecutive = 1 if self.mode == INCREMENTAL else None
        self._on_updates = on_updates
        self._metrics = metrics
        self._servers = engine.servers
        self._ring = sorted(
            (_hash(f"{server.address}#{point}"), index)
            for index, server in enumerate(self._servers)
            for point in range(RING_POINTS)
        )
        self._ring_keys = [point for point, _ in self._ring]
        self._chains: dict[str, _Chain] = {}
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()  # starting the prober
        self._last_run = threading.local()  # round_trips of each inference worker's last run
        self._ends_out = 0  # ENDs sent and not yet answered; close() waits for them
        self._ends_answered = threading.Condition()
        self._prober: threading.Thread | None = None
        self._stopping = threading.Event()
        for server in self._servers:
            self._set_up(server, True)

    def _full_reason(self, incremental: bool) -> str:
        models = self.engine.models
        if self.mode == INCREMENTAL:
            return ""
        if not incremental:
            return "incremental inference off"
        if not models.sequence:
            return f"the servers have no {self.engine.url.model}{SEQUENCE_SUFFIX} model"
        return (
            f"{models.sequence} steps by {models.sequence_hop} samples, not this hop "
            f"({self.hop_samples}); write the repository with `tagd-train triton-repo --hop "
            f"{self.hop_samples / self.card.sample_rate:g}`"
        )

    def describe(self) -> str:
        servers = ", ".join(self.engine.url.servers)
        if self.mode == INCREMENTAL:
            return (
                f"incremental inference on Triton ({self.engine.models.sequence} at {servers}; "
                f"{self.hop_samples * 4 / 1e3:.0f} kB a hop a stream on the wire, "
                f"{self.card.window_samples * 4 / 1e3:.0f} kB to start)"
            )
        return f"full windows on Triton at {servers} ({self._why_full})"

    # -- the Scorer protocol ------------------------------------------------------------
    def continues(self, key: WindowKey) -> bool:
        if self.mode != INCREMENTAL:
            return False
        chain = self._chains.get(key.stream)
        return (
            chain is not None
            and chain.epoch == key.epoch
            and chain.next_start == key.start
            and chain.server is self._owner(key.stream)
        )

    def forget(self, stream: str) -> None:
        """END the stream's sequence, without waiting for the answer."""
        chain = self._chains.pop(stream, None)
        sequence = self._ids.pop(stream, None)
        if chain is None or sequence is None or not chain.server.up:
            return
        self._send_end(chain.server, sequence)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """One window of silence through each server: EngineError if none answers; a
        server that does not is marked down (its streams go to the others)."""
        silence = np.zeros((1, self.card.window_samples), dtype=np.float32)
        answered = []
        for server in self._servers:
            try:
                self._infer(server, silence[0], _new_id(), start=True, end=True)
                answered.append(server.address)
            except Exception as exc:  # tritonclient's exception, or gRPC's
                log.warning("Triton server %s does not answer (%s)", server.address, exc)
                self._set_down(server)
        if not answered:
            raise EngineError(
                f"no Triton server answers at {', '.join(self.engine.url.servers)}; start "
                f"one (docs/triton.md) or fix the URL"
            )

    def run(self, keys: Sequence[WindowKey], batch: np.ndarray, instance: int = 0) -> np.ndarray:
        scores = np.empty((len(keys), self.card.n_tags), dtype=np.float32)
        round_trips = np.zeros(len(keys))
        for rows in rounds(keys) if self.mode == INCREMENTAL else [list(range(len(keys)))]:
            requests = [self._plan(keys[row], row) for row in rows]
            scored = {INCREMENTAL: 0, FULL: 0}  # how each row was scored in the end
            while requests:
                requests = self._send(keys, batch, requests, scores, scored, round_trips)
            if self._on_updates is not None:
                for mode, count in scored.items():
                    self._on_updates(mode, count)
        self._last_run.round_trips = round_trips
        return scores

    def round_trips(self) -> np.ndarray:
        """Seconds from sending each row of this thread's last ``run`` to its answer: the
        request that scored it (a row sent again after a failure: its last request)."""
        return getattr(self._last_run, "round_trips", np.zeros(0))

    # -- requests -----------------------------------------------------------------------
    def _plan(self, key: WindowKey, row: int) -> _Request:
        server = self._owner(key.stream)
        if server is None:
            raise EngineError(
                f"no Triton server answers ({', '.join(self.engine.url.servers)}); each is "
                f"asked again every {self.engine.url.retry_s:g} s"
            )
        if self.continues(key):
            return _Request(row, server, start=False)
        chain = self._chains.get(key.stream)
        reason = (
            START_FIRST
            if chain is None
            else START_MOVED
            if chain.server is not server
            else START_BREAK
        )
        return _Request(row, server, start=True, reason=reason)

    def _send(
        self, keys, batch, requests: list[_Request], scores, scored, round_trips
    ) -> list[_Request]:
        """Send the requests at once, take what comes back (counting each row's mode in
        ``scored``, its round trip in ``round_trips``); the requests to send again."""
        answers: queue.SimpleQueue = queue.SimpleQueue()
        for request in requests:
            key = keys[request.row]
            if self.mode != INCREMENTAL:
                sequence, end = _new_id(), True
            else:
                sequence, end = self._ids.setdefault(key.stream, _new_id()), False
            audio = batch[request.row] if request.start else batch[request.row, -self.hop_samples :]
            if request.start and self.mode == INCREMENTAL and self._metrics is not None:
                self._metrics.triton_starts.labels(request.server.address, request.reason).inc()
            self._infer_async(request, audio, sequence, end, answers)
        again = []
        for _ in requests:
            request, result, error, round_trip = answers.get()
            key = keys[request.row]
            if error is None:
                scores[request.row] = result.as_numpy(GRAPH_NAMES.scores)[0]
                round_trips[request.row] = round_trip
                scored[FULL if request.start else INCREMENTAL] += 1
                if self.mode == INCREMENTAL:
                    self._chains[key.stream] = _Chain(
                        request.server, key.epoch, key.start + self.hop_samples
                    )
                continue
            self._chains.pop(key.stream, None)
            request.tries.add(request.server.address)
            if _unreachable(error):
                self._count_failure(request.server, FAIL_UNREACHABLE)
                self._set_down(request.server)
                server = self._owner(key.stream, avoid=request.tries)
                if server is None:
                    raise EngineError(
                        f"no Triton server answers ({', '.join(sorted(request.tries))}): "
                        f"{' '.join(str(error).split())}"
                    )
                again.append(_Request(request.row, server, True, START_MOVED, request.tries))
            else:
                self._count_failure(request.server, FAIL_REFUSED)
                if request.start:  # a whole window with START refused: not the server's fault
                    raise EngineError(
                        f"Triton {request.server.address} refused a window: "
                        f"{' '.join(str(error).split())}"
                    )
                again.append(_Request(request.row, request.server, True, START_LOST, request.tries))
        return again

    def _infer_async(self, request: _Request, audio, sequence: int, end: bool, answers) -> None:
        server, sent = request.server, time.perf_counter()
        name, inputs = self._inputs(audio)

        def done(result, error) -> None:
            round_trip = time.perf_counter() - sent
            if error is None and self._metrics is not None:
                self._metrics.triton_round_trip.labels(server.address).observe(round_trip)
            answers.put((request, result, error, round_trip))

        self._count_sent(server, audio)
        try:
            server.client.async_infer(
                name,
                inputs,
                done,
                sequence_id=sequence if name == self.engine.models.sequence else 0,
                sequence_start=request.start and name == self.engine.models.sequence,
                sequence_end=end and name == self.engine.models.sequence,
                client_timeout=self.engine.url.timeout_s,
            )
        except Exception as exc:  # a closed channel raises here rather than in the callback
            answers.put((request, None, exc, 0.0))

    def _infer(self, server: _Server, window: np.ndarray, sequence: int, start: bool, end: bool):
        """One whole window, waited for (warm-up)."""
        name, inputs = self._inputs(window)
        is_sequence = name == self.engine.models.sequence
        self._count_sent(server, window)
        return server.client.infer(
            name,
            inputs,
            sequence_id=sequence if is_sequence else 0,
            sequence_start=start and is_sequence,
            sequence_end=end and is_sequence,
            client_timeout=self.engine.url.timeout_s,
        )

    def _inputs(self, audio: np.ndarray) -> tuple[str, list]:
        """The model a row goes to and its input: the whole-window model where the
        servers have it and the row is a whole window scored alone, else the sequence one."""
        grpcclient = _client_module()
        models = self.engine.models
        if models.full and (self.mode == FULL or models.sequence is None):
            name, input_name = models.full, GRAPH_NAMES.waveform
        else:
            name, input_name = models.sequence, SEQUENCE_INPUT
        data = np.ascontiguousarray(audio, dtype=np.float32)[None, :]
        tensor = grpcclient.InferInput(input_name, list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        return name, [tensor]

    def _send_end(self, server: _Server, sequence: int) -> None:
        # START and END together: it ends the sequence whether or not the server still
        # holds it (continuing one it has timed out is refused)
        # (the python model takes an empty one; an implicit-state graph needs a window)
        grpcclient = _client_module()
        samples = self.card.window_samples if self.engine.models.implicit_state else 0
        audio = np.zeros((1, samples), dtype=np.float32)
        ending = grpcclient.InferInput(SEQUENCE_INPUT, list(audio.shape), "FP32")
        ending.set_data_from_numpy(audio)
        self._count_sent(server, audio)
        with self._ends_answered:
            self._ends_out += 1
        try:
            server.client.async_infer(
                self.engine.models.sequence,
                [ending],
                lambda result, error: self._end_answered(),
                sequence_id=sequence,
                sequence_start=True,
                sequence_end=True,
                client_timeout=self.engine.url.timeout_s,
            )
        except Exception as exc:  # the server's idle timeout frees it anyway
            log.debug("END to %s failed: %s", server.address, exc)
            self._end_answered()

    def _end_answered(self) -> None:
        with self._ends_answered:
            self._ends_out -= 1
            self._ends_answered.notify_all()

    # -- servers ------------------------------------------------------------------------
    def _owner(self, stream: str, avoid: set[str] = frozenset()) -> _Server | None:
        """The stream's server: the first that answers from its point on the ring."""
        start = bisect.bisect(self._ring_keys, _hash(stream))
        seen: set[int] = set()
        for offset in range(len(self._ring)):
            index = self._ring[(start + offset) % len(self._ring)][1]
            if index in seen:
                continue
            seen.add(index)
            server = self._servers[index]
            if server.address not in avoid and server.up:
                return server
            if len(seen) == len(self._servers):
                break
        return None

    def _set_down(self, server: _Server) -> None:
        with self._lock:
            was_up, server.up = server.up, False
            if self._prober is None:
                self._prober = threading.Thread(
                    target=self._probe_down_servers, name="tagd-triton-probe", daemon=True
                )
                self._prober.start()
        if was_up:
            log.warning(
                "Triton server %s does not answer: its streams go to the others; "
                "probing it every %g s",
                server.address,
                self.engine.url.retry_s,
            )
            self._set_up(server, False)

    def _probe_down_servers(self) -> None:
        """Every `retry` seconds, ask the servers that stopped answering whether they are
        ready; one that is takes its streams back. A thread of its own: a probe of a hung
        server waits PROBE_TIMEOUT_S, which no window should."""
        while not self._stopping.wait(self.engine.url.retry_s):
            for server in self._servers:
                if not server.up and server.probe():
                    self._set_up(server, True)
                    log.info(
                        "Triton server %s answers again: its streams go back to it",
                        server.address,
                    )

    def close(self, timeout: float = END_WAIT_S) -> None:
        """Stop probing, and wait up to ``timeout`` for the ENDs still out: a sequence
        ended before the channels close is freed on the server at once, not at its idle
        timeout (`tagd tag` ends each file's, then exits)."""
        self._stopping.set()
        with self._ends_answered:
            self._ends_answered.wait_for(lambda: self._ends_out == 0, timeout)

    def _set_up(self, server: _Server, up: bool) -> None:
        server.up = up
        if self._metrics is not None:
            self._metrics.triton_up.labels(server.address).set(1 if up else 0)

    # -- metrics ------------------------------------------------------------------------
    def _count_sent(self, server: _Server, audio: np.ndarray) -> None:
        if self._metrics is not None:
            self._metrics.triton_requests.labels(server.address).inc()
            self._metrics.triton_sent.labels(server.address).inc(audio.size * 4)

    def _count_failure(self, server: _Server, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.triton_failures.labels(server.address, reason).inc()

    @property
    def streams_held(self) -> int:
        return len(self._chains)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _new_id() -> int:
    return secrets.randbits(63) | 1  # 0 means "no sequence" to Triton


__all__ = ["TritonEngine", "TritonScorer", "TritonURL", "is_triton_url"]
