"""A real Triton Inference Server on this machine, from the nvidia-pytriton wheel, for the
tests and bench/triton_scaleout.py (docs/triton.md).

The wheel (``PYTRITON_WHEEL``, 55 MB) bundles ``tritonserver`` 2.51 with the ``python``
backend only, and runs without a GPU. We do not install the package (it pins numpy < 2):
``install()`` downloads the wheel with pip (``--no-deps``) and unpacks the server, its
libraries and the python backend's stub for this interpreter under ``TRITON_HOME``
(``$TAGD_TRITON_HOME``, default ``~/.cache/tagd/tritonserver``). ``LocalTriton`` starts
it on loopback with free ports and the environment the stub needs:

- ``LD_LIBRARY_PATH``: the wheel's libraries and this interpreter's LIBDIR (without the
  latter the stub loads the system's libpython under another interpreter's stdlib);
- ``PYTHONPATH``: this environment's site-packages (numpy and onnxruntime for the
  models) and the repository root.

``python -m trainer.triton_local`` installs it (scripts/install.sh runs that).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"
TRITON_HOME = Path(
    os.environ.get("TAGD_TRITON_HOME", Path.home() / ".cache" / "tagd" / "tritonserver")
)
READY_TIMEOUT_S = 60.0
SERVER_PREFIX = "pytriton/tritonserver/"
LIBS_PREFIX = "nvidia_pytriton.libs/"
REPO_ROOT = Path(__file__).resolve().parent.parent


class TritonUnavailable(RuntimeError):
    """The bundled server could not be installed or started."""


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def server_binary(home: Path = TRITON_HOME) -> Path:
    return home / "tritonserver" / "bin" / "tritonserver"


def install(home: Path = TRITON_HOME) -> Path:
    """Unpack the server from the wheel into ``home`` once; the binary's path."""
    binary = server_binary(home)
    stub = home / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"
    if binary.is_file() and stub.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        command += ["-d", download, PYTRITON_WHEEL]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(download).glob("nvidia_pytriton-*.whl"))
        if done.returncode or not wheels:
            raise TritonUnavailable(f"pip download {PYTRITON_WHEEL} failed: {done.stderr[-500:]}")
        unpacked = Path(download) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith((SERVER_PREFIX, LIBS_PREFIX))]
            wheel.extractall(unpacked, members)
        for folder in ("tritonserver", "libs"):
            shutil.rmtree(home / folder, ignore_errors=True)
        shutil.move(unpacked / SERVER_PREFIX, home / "tritonserver")
        shutil.move(unpacked / LIBS_PREFIX, home / "libs")
    stubs = home / "tritonserver" / "python_backend_stubs" / _python_tag()
    if not stubs.is_dir():
        raise TritonUnavailable(f"the wheel has no python backend stub for Python {_python_tag()}")
    shutil.copy2(stubs / "triton_python_backend_stub", stub)
    for path in (binary, stub):
        path.chmod(0o755)
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalTriton:
    """``tritonserver`` on 127.0.0.1 serving ``repository`` (only ``models`` of it when
    given: the wheel cannot load an onnxruntime-backend model); ``start()`` waits until ready.

    ``grpc_url`` is what ``triton://`` takes (``127.0.0.1:PORT``). ``kill()`` ends it
    at once (a crash), ``stop()`` politely."""

    def __init__(
        self,
        repository: Path,
        models: list[str] | None = None,
        home: Path = TRITON_HOME,
        log_path: Path | None = None,
    ):
        self.repository = Path(repository)
        self.models = models
        self.home = home
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path or self.repository.parent / f"tritonserver-{self.grpc_port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def environment(self) -> dict[str, str]:
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        site = sysconfig.get_paths()["purelib"]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self.home / "libs"), libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PYTHONPATH"] = os.pathsep.join((site, str(REPO_ROOT)))
        return env

    def start(self, timeout: float = READY_TIMEOUT_S) -> LocalTriton:
        binary = install(self.home)
        command = [
            str(binary),
            "--model-repository",
            str(self.repository),
            "--backend-directory",
            str(self.home / "tritonserver" / "backends"),
            "--http-address",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-address",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--log-verbose",
            "0",
        ]
        if self.models is not None:
            command += ["--model-control-mode", "explicit"]
            command += [f"--load-model={model}" for model in self.models]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.environment()
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonUnavailable(
                    f"tritonserver exited with {self.process.returncode}: {self.log_tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.2)
        self.kill()
        raise TritonUnavailable(f"tritonserver not ready in {timeout:.0f} s: {self.log_tail()}")

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    print(f"tritonserver installed at {install()}")
