"""What the tests and the benchmarks share: ports, waits, tagd as a process and in
this process, subscribers, producers and the deploy files' helpers.

Tests import it as ``support`` (tests/ is on pytest's path); bench scripts put tests/
on ``sys.path`` first. It imports pytest only where a helper skips a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from tagd.card import ModelCard
from tagd.config import ServeConfig, apply_overrides
from tagd.metrics import Metrics
from tagd.server import Server
from tagd.stream import Arrival, ReadyWindow, Stream, StreamGeometry

REPO = Path(__file__).resolve().parent.parent


DEPLOY = REPO / "deploy"


TAGD = Path(sys.executable).parent / "tagd"  # the console script, as systemd runs it


# An FCN-4 with a 2 s window (94 mel frames), so that a few seconds of audio give tags.
SHORT_FCN = {"n_frames": 94, "pools": ((2, 2), (2, 2), (3, 2), (4, 2))}


DAEMON_HOP_S = "0.5"  # the hop of daemons started as processes (deploy, feeds)


def fcn4_card(tags: list[str]) -> ModelCard:
    """The card of a full-size FCN-4 with these tags, for clients that never load a model."""
    return ModelCard(
        name="fcn4-mtt",
        architecture="fcn4",
        sample_rate=12000,
        window_samples=349_440,
        hop_samples=12000,
        tags=list(tags),
    )


def load_bench(name: str):
    """bench/NAME.py as a module. bench/ is on sys.path only while it loads (its imports of
    harness, engines, machine …); while there its file names are top-level modules, so none
    may be a package's name (a bench/triton.py made torch, which probes for OpenAI's
    triton, fail in every later test)."""
    import importlib.util

    folder = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", f"{folder}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool(name: str, install: str) -> str:
    """The path of a command-line tool (the venv's bin too), or skip saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(TAGD.parent))
    if not found:
        import pytest

        pytest.skip(f"{name} is absent: {install}")
    return found


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key of ``replacements``, failing if one is absent (the file changed)."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} no longer in the file: update this test"
        text = text.replace(old, new)
    return text


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_for(
    condition: Callable[[], Any], what: str = "", timeout: float = 20.0, interval: float = 0.02
) -> Any:
    """Poll ``condition()`` until it returns something true, and return that; fail with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s in vain for {what or condition}")
        time.sleep(interval)
    return result


# -- tagd serve as a process ---------------------------------------------------------------

TAGD_MODULE = (sys.executable, "-m", "tagd.cli")  # from the working tree
READY_LINE = re.compile(r"tagd serve ready: .* publishing on (tcp://\S+?);")
READY_TIMEOUT_S = 30.0


class TagdProcess:
    """``tagd serve ARGS`` in a subprocess; ``stop()`` sends SIGTERM.

    Its stderr lines are kept in ``lines`` (and written to ``log_path`` when given), its
    stdout apart in ``stdout``. Ready means /healthz answers 200 when ``metrics_port`` is
    given, else the "ready" log line, which also gives ``publish_address``.
    """

    def __init__(
        self,
        args: list[str],
        metrics_port: int | None = None,
        log_path: Path | None = None,
        *,
        command: tuple[str, ...] = TAGD_MODULE,
        env: dict[str, str] | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.metrics_url = f"http://127.0.0.1:{metrics_port}" if metrics_port else None
        self.log_path = log_path
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.publish_address = ""
        self._ready_line = threading.Event()
        self.process = subprocess.Popen(
            [*wrapper, *command, "serve", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        log = self.log_path.open("w") if self.log_path else None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if log:
                log.write(line)
                log.flush()
            match = READY_LINE.search(line)
            if match:
                self.publish_address = match.group(1)
                self._ready_line.set()
        if log:
            log.close()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.stdout.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def _is_ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"tagd serve exited with {self.process.returncode}:\n{self.log()}")
        if self.metrics_url is None:
            return self._ready_line.is_set()
        try:
            return http_get(self.metrics_url + "/healthz")[0] == 200
        except OSError:
            return False  # not listening yet

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        try:
            wait_for(self._is_ready, "tagd serve to be ready", timeout, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics, 0 when it has no series yet."""
        return metric_sample(http_get(self.metrics_url + "/metrics")[1].decode(), name, **labels)

    def metric_sum(self, name: str) -> float:
        """The sum of a sample over all its label values."""
        return metric_sum(http_get(self.metrics_url + "/metrics")[1].decode(), name)

    def wait_for_metric(self, name: str, above: float, timeout: float = 15.0, **labels) -> float:
        try:
            return wait_for(
                lambda: (v := self.metric(name, **labels)) > above and v,
                f"{name}{labels} > {above}",
                timeout,
                interval=0.1,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def cpu_seconds(self) -> float:
        """User and system time the daemon has used."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory (``VmHWM``: its peak) in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def terminate_and_time(self) -> tuple[int, float]:
        """SIGTERM; the exit status and how long the exit took."""
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)
        return code, time.perf_counter() - started

    def stop(self) -> int:
        code = terminate(self.process)
        for reader in self._readers:
            reader.join(timeout=5)
        return code


def metric_sample(text: str, name: str, **labels: str) -> float:
    """A sample's value in a /metrics text, 0 when it has no series yet."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def metric_sum(text: str, name: str) -> float:
    """The sum of a sample over all its label values in a /metrics text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


# -- tagd serve in this process ----------------------------------------------------------------

HOP_S = 0.25  # the hop of in-process daemons (make_config)


def make_config(engine: Path, inputs: list[str], **sections) -> ServeConfig:
    config = apply_overrides(
        ServeConfig(),
        engine=str(engine),
        inputs=inputs,
        publish="tcp://127.0.0.1:*",
        metrics="127.0.0.1:0",
    )
    config.hop_seconds = HOP_S
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


@contextlib.contextmanager
def serving(config: ServeConfig):
    server = Server(config, Metrics())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_subscribed(publisher, *prefixes: str, timeout: float = 10.0) -> None:
    """Wait until ``publisher`` (a ``tagd.publish.Publisher`` whose subscriptions nothing
    else reads) has received a subscription to each of ``prefixes``. Its XPUB reports a
    prefix once, however many subscribers share it: give each subscriber its own."""
    pending = {prefix.encode() for prefix in prefixes}

    def all_subscribed() -> bool:
        pending.difference_update(publisher.read_subscriptions())
        return not pending

    wait_for(all_subscribed, f"subscriptions to {sorted(pending)}", timeout)


def connect_and_wait(socket: zmq.Socket, address: str, timeout: float = 10.0) -> None:
    """Connect ``socket`` and wait for its handshake with the peer at ``address``.

    A SUB sends its subscriptions right after the handshake, so from then on they are one
    loopback hop from the publisher, long before the first window a test's audio makes.
    """
    monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        socket.connect(address)
        if not monitor.poll(int(timeout * 1000)):
            raise AssertionError(f"no handshake with {address} within {timeout:.0f} s")
        monitor.recv_multipart()
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)


class Listener:
    """A subscriber to the daemon's topics, connected before any audio is sent."""

    def __init__(self, server: Server, *prefixes: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        for prefix in prefixes or ("tags.", "events."):
            self.socket.setsockopt_string(zmq.SUBSCRIBE, prefix)
        connect_and_wait(self.socket, server.publish_address)
        self.messages: list[tuple[str, dict]] = []

    def collect(
        self, until_quiet: float = 1.0, limit: float = 20.0, count: int | None = None
    ) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and (count is None or len(self.messages) < count):
            if not self.socket.poll(int(until_quiet * 1000)):
                break
            topic, body = self.socket.recv_multipart()
            self.messages.append((topic.decode(), json.loads(body)))

    def on(self, topic: str) -> list[dict]:
        return [message for name, message in self.messages if name == topic]

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def scrape(server: Server, path: str = "/metrics") -> tuple[int, str]:
    host, port = server.metrics_address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def s16le(audio: np.ndarray) -> bytes:
    return (audio * 32767).astype("<i2").tobytes()


def reference_windows(
    payload: bytes, rate: int, channels: int, geometry: StreamGeometry
) -> list[ReadyWindow]:
    """The windows a stream makes of this s16le audio received in one piece."""
    windows: list[ReadyWindow] = []
    Stream("ref", geometry, windows.append, Metrics()).push_pcm(
        payload, "s16le", rate, channels, Arrival(0, 0)
    )
    return windows


def send_chunked(endpoint: str, streams: dict[str, tuple[bytes, int]], rate: int) -> None:
    """Send each stream's s16le stereo payload over zmq+pull in messages of ``chunk`` bytes."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(endpoint)
    for name, (payload, chunk) in streams.items():
        for seq, offset in enumerate(range(0, len(payload), chunk)):
            header = {"format": "s16le", "rate": rate, "channels": 2, "seq": seq}
            push.send_multipart(
                [name.encode(), json.dumps(header).encode(), payload[offset : offset + chunk]]
            )
    push.close(linger=5000)
    context.term()


@contextlib.contextmanager
def socket_port():
    """A free port on 127.0.0.1, for a ``with`` block (what many tests read best)."""
    yield free_port()


# -- deploy/ ---------------------------------------------------------------------------------

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.tensorrt"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return instructions


EXAMPLES = REPO / "examples"


FEED_TIMEOUT_S = 30.0  # a hang guard: a relay may take seconds to start, then AudioRate its own


def run_feed(script: str, *args: str, stop_when=None, env=None) -> None:
    """Run a feed script to its end, or until ``stop_when()`` for one that would not end."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            ["bash", str(EXAMPLES / script), *args],
            stdout=subprocess.DEVNULL,
            stderr=errors,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + FEED_TIMEOUT_S
        while process.poll() is None:
            if (stop_when and stop_when()) or time.monotonic() > deadline:
                process.terminate()  # the script exec'd ffmpeg: this stops ffmpeg
                try:
                    process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:  # ffmpeg waiting to reconnect may not notice
                    process.kill()
                    process.wait()
                assert time.monotonic() <= deadline, f"{script}: not done after {FEED_TIMEOUT_S} s"
                return
            time.sleep(0.05)
        errors.seek(0)
        assert process.returncode == 0 and not stop_when, (
            f"{script}: exit {process.returncode}: {errors.read()[-2000:]}"
        )


ICECAST_CONFIG = """<icecast>
  <location>tagd tests</location>
  <admin>nobody@localhost</admin>
  <hostname>127.0.0.1</hostname>
  <limits>
    <clients>10</clients> <sources>2</sources> <source-timeout>10</source-timeout>
    <burst-on-connect>0</burst-on-connect>
  </limits>
  <authentication>
    <source-password>{password}</source-password>
    <admin-user>admin</admin-user> <admin-password>{password}</admin-password>
  </authentication>
  <listen-socket> <port>{port}</port> <bind-address>127.0.0.1</bind-address> </listen-socket>
  <paths>
    <basedir>/usr/share/icecast2</basedir> <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
    <logdir>{folder}</logdir> <pidfile>{folder}/icecast.pid</pidfile>
  </paths>
  <logging> <errorlog>error.log</errorlog> <accesslog>access.log</accesslog> <loglevel>3</loglevel> </logging>
  <security> <chroot>0</chroot> {changeowner} </security>
</icecast>
"""


# Icecast refuses to run as root; as root (CI containers), it drops to this user.
ICECAST_CHANGEOWNER = "<changeowner><user>nobody</user><group>nogroup</group></changeowner>"


ICECAST_TIMEOUT_S = 15.0


class Icecast:
    """Debian's icecast2 on loopback, from its own config, in a folder of its own under
    /tmp (pytest's tmp_path is closed to the user Icecast runs as). ``play()`` starts a
    source on mount /live.mp3: ffmpeg playing an mp3 in real time, over and over."""

    password = "tagd-test-source"

    def __init__(self, binary: str) -> None:
        self.folder = folder = Path(tempfile.mkdtemp(prefix="tagd-icecast-"))
        folder.chmod(0o777)  # its logs and pid, written by the unprivileged user
        self.port = free_port()
        (folder / "icecast.xml").write_text(
            ICECAST_CONFIG.format(
                password=self.password,
                port=self.port,
                folder=folder,
                changeowner=ICECAST_CHANGEOWNER if os.geteuid() == 0 else "",
            )
        )
        self.url = f"http://127.0.0.1:{self.port}/live.mp3"
        self.server = subprocess.Popen(
            [binary, "-c", str(folder / "icecast.xml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.sources: list[subprocess.Popen] = []
        self._wait(lambda: self._status()[0] == 200, "icecast2 to listen")

    def play(self, mp3: Path) -> None:
        self.sources.append(
            subprocess.Popen(
                [
                    "ffmpeg",
                    "-nostdin",
                    "-v",
                    "error",
                    "-re",
                    "-stream_loop",
                    "-1",
                    "-i",
                    str(mp3),
                    "-c:a",
                    "copy",
                    "-content_type",
                    "audio/mpeg",
                    "-f",
                    "mp3",
                    f"icecast://source:{self.password}@127.0.0.1:{self.port}/live.mp3",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.wait_on_air()

    def wait_on_air(self) -> None:
        self._wait(lambda: b"/live.mp3" in self._status()[1], "a source on /live.mp3")

    def _status(self) -> tuple[int, bytes]:
        try:
            return http_get(f"http://127.0.0.1:{self.port}/status-json.xsl")
        except OSError:
            return 0, b""

    def _wait(self, condition, what: str) -> None:
        deadline = time.monotonic() + ICECAST_TIMEOUT_S
        while not condition():
            if self.server.poll() is not None or time.monotonic() > deadline:
                errors = self.folder / "error.log"
                log = errors.read_text()[-3000:] if errors.exists() else ""
                raise AssertionError(f"waited in vain for {what}:\n{log}")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in (*self.sources, self.server):
            terminate(process, timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


class AudioRate:
    """A ``stop_when`` for run_feed: true once audio has flowed for ``settle_s`` plus
    ``seconds`` of wall time after its first 0.5 s; ``rate`` is then audio seconds per wall
    second over the last ``seconds`` of it, so that a catch-up burst as audio starts (a
    Liquidsoap clock late after a slow start sends seconds at once) falls before it.
    ``gaps`` is the stream's gaps when the audio began (the first audio after idle is one).
    """

    def __init__(
        self, tagd: TagdProcess, stream: str, seconds: float, settle_s: float = 2.0
    ) -> None:
        self.tagd, self.stream, self.seconds, self.settle_s = tagd, stream, seconds, settle_s
        self.before = self._received()
        self.samples: list[tuple[float, float]] = []  # (wall, audio) once audio flows
        self.rate: float | None = None
        self.gaps: float | None = None

    def _received(self) -> float:
        return self.tagd.metric("tagd_audio_received_seconds_total", stream=self.stream)

    def __call__(self) -> bool:
        now, audio = time.monotonic(), self._received() - self.before
        if not self.samples:
            if audio > 0.5:
                self.samples.append((now, audio))
                self.gaps = self.tagd.metric("tagd_stream_gaps_total", stream=self.stream)
            return False
        self.samples.append((now, audio))
        if now - self.samples[0][0] < self.settle_s + self.seconds:
            return False
        then, audio_then = next(s for s in reversed(self.samples) if s[0] <= now - self.seconds)
        self.rate = (audio - audio_then) / (now - then)
        return True


# -- clients -----------------------------------------------------------------------------------

CLIENT_TIMEOUT_S = 10.0


class FakeTagd:
    """tagd's own Publisher on loopback, without the rest of the daemon: what a client
    of tagd subscribes to, publishing the messages a test gives it."""

    def __init__(self) -> None:
        from tagd.publish import Publisher

        self.context = zmq.Context()
        self.publisher = Publisher(self.context, "tcp://127.0.0.1:*", Metrics(), linger_ms=0)
        self.endpoint = self.publisher.address

    def wait_subscribed(self, *prefixes: str) -> None:
        """Wait until a subscriber has subscribed to each of ``prefixes``."""
        wait_subscribed(self.publisher, *prefixes, timeout=CLIENT_TIMEOUT_S)

    def send(self, name: str, message: dict) -> None:
        self.publisher.send(name, message)

    def close(self) -> None:
        self.publisher.close()
        self.context.term()


class Example:
    """``python examples/NAME.py ARGS`` with its output read line by line."""

    def __init__(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # Ctrl-C as a terminal sends it: a suite started in the background (`cmd &`
            # from a script) ignores SIGINT, the child would inherit that, and Python then
            # raises no KeyboardInterrupt.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.stdout: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout.put)),
            threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr.append)),
        ]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(pipe, sink) -> None:
        for line in pipe:
            sink(line.rstrip("\n"))

    def lines(self, count: int) -> list[str]:
        try:
            return [self.stdout.get(timeout=CLIENT_TIMEOUT_S) for _ in range(count)]
        except queue.Empty:
            raise AssertionError(
                f"{self.process.args[1]} printed too little; stderr: {self.stderr}"
            ) from None

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit status once all it printed is read
        (the pumps may still hold its last lines when it has exited)."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=CLIENT_TIMEOUT_S)
        for pump in self._pumps:
            pump.join(timeout=CLIENT_TIMEOUT_S)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
