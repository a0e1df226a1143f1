"""deploy/prometheus: promtool on the configs and alerts, and a real Prometheus scraping tagd.

The scrape test runs Debian's ``prometheus`` on loopback with the shipped prometheus.yml
and alerts.yml (only the target port and the intervals changed), against ``tagd serve``
tagging a file, and reads the latency histogram back through the HTTP API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile
from support import (
    DAEMON_HOP_S,
    DEPLOY,
    SHORT_FCN,
    TagdProcess,
    free_port,
    http_get,
    substitute,
    tool,
)

PROMETHEUS_DIR = DEPLOY / "prometheus"
SCRAPE_TIMEOUT_S = 30.0
ALERTS = (
    "TagdDown",
    "TagdLatencyOverBudget",
    "TagdWindowsDropped",
    "TagdStreamIdle",
    "TagdInputMisdeclared",
    "TagdStreamInterrupted",
)


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool", "apt-get install prometheus")


def run(*command: str | Path) -> None:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_prometheus_configs_pass_promtool(promtool, config):
    run(promtool, "check", "config", PROMETHEUS_DIR / config)


def test_alert_rules_pass_promtool_and_each_fires_on_its_fault(promtool):
    run(promtool, "check", "rules", PROMETHEUS_DIR / "alerts.yml")
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    for alert in ALERTS:  # each alert is tested firing, not only silent
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in tests, alert
    run(promtool, "test", "rules", PROMETHEUS_DIR / "alerts_test.yml")


class Prometheus:
    """Debian's prometheus on loopback with a temporary storage path."""

    def __init__(self, server: str, config: Path, folder: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = folder / "prometheus.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    server,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> dict | None:
        """The ``data`` of a /api/v1 answer, or None while Prometheus is not up."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            status, body = http_get(f"{self.url}/api/v1/{path}{query}")
        except OSError:
            return None
        return json.loads(body)["data"] if status == 200 else None

    def wait_for(self, what: str, found) -> object:
        """Poll ``found()`` until it returns something truthy; return that."""
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while not (result := found()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus: no {what}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def scraped_tagd(tmp_path, export_model, music) -> Iterator[tuple[Prometheus, TagdProcess]]:
    prometheus_server = tool("prometheus", "apt-get install prometheus")
    soundfile.write(tmp_path / "station.wav", music(4.0, 44_100), 44_100, subtype="PCM_16")
    metrics = free_port()
    url = f"file://{tmp_path / 'station.wav'}?stream=radio1&loop=true"  # real time, one window per hop
    tagd = TagdProcess(
        [
            "--engine",
            str(export_model("fcn4", **SHORT_FCN)),
            "--input",
            url,
            "--hop",
            DAEMON_HOP_S,
            "--publish",
            f"tcp://127.0.0.1:{free_port()}",
            "--metrics",
            f"127.0.0.1:{metrics}",
        ],
        metrics,
        tmp_path / "tagd.log",
    )
    config = substitute(
        (PROMETHEUS_DIR / "prometheus.yml").read_text(),
        {
            "127.0.0.1:9108": f"127.0.0.1:{metrics}",
            "scrape_interval: 15s": "scrape_interval: 1s",
            "evaluation_interval: 15s": "evaluation_interval: 1s",
        },
    )
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    prometheus = Prometheus(prometheus_server, tmp_path / "prometheus.yml", tmp_path)
    try:
        tagd.wait_ready()
        yield prometheus, tagd
    finally:
        prometheus.stop()
        tagd.stop()


def instant(prometheus: Prometheus, query: str) -> float | None:
    data = prometheus.api("query", query=query)
    if not data or not data["result"]:
        return None
    return float(data["result"][0]["value"][1])


def test_prometheus_scrapes_tagds_latency_histogram(scraped_tagd):
    prometheus, tagd = scraped_tagd
    count = prometheus.wait_for(
        "latency observations",
        lambda: instant(prometheus, "tagd_end_to_end_latency_seconds_count") or None,
    )
    assert count > 0
    assert instant(prometheus, 'up{job="tagd"}') == 1.0
    p99 = instant(prometheus, "histogram_quantile(0.99, tagd_end_to_end_latency_seconds_bucket)")
    assert 0 < p99 < 1.0  # a tiny model on CPU is far inside the alert's budget

    # The shipped alert rules evaluate cleanly against the live series, and none fires.
    def evaluated_rules() -> list[dict] | None:
        data = prometheus.api("rules") or {"groups": []}
        rules = [rule for group in data["groups"] for rule in group["rules"]]
        never = "0001-01-01T00:00:00Z"  # Go's zero time: not evaluated yet
        return rules if rules and all(rule["lastEvaluation"] != never for rule in rules) else None

    rules = prometheus.wait_for("evaluated rules", evaluated_rules)
    assert sorted(rule["name"] for rule in rules) == sorted(ALERTS)
    assert all(rule["health"] == "ok" for rule in rules), rules
    assert all(rule["state"] == "inactive" for rule in rules), rules
