"""docs/deploy.md: every command in it is run here, checked by a tool, or run by CI.

``COVERAGE`` says, for each command of the guide's ``bash`` blocks, which test exercises
it; a command no entry matches fails the first test, so the guide cannot grow a step
nothing checks. The commands that only lay files out (``sudo install``, ``sudo sed``, the
config and Prometheus checks) are run as written, into a scratch root instead of ``/``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support import DEPLOY, DOCKERFILES, REPO, TAGD, dockerfile_instructions

from tagd.card import read_card

GUIDE = REPO / "docs" / "deploy.md"
ROOTED = re.compile(r"(?<= )/(etc|var)/")  # absolute paths the guide installs into
SCRATCH_ROOT = "tests/test_deploy_docs.py::test_the_guides_install_steps_lay_out_a_valid_host"
COVERAGE: list[tuple[str, str]] = [
    (r"scripts/install\.sh", ".ci/run"),
    (
        r"\.venv/bin/tagd-train triton-repo \S+ \S+",
        "tests/test_triton.py::test_triton_repo_command_needs_graphs_for_the_hop",
    ),
    (
        r"sudo apt-get install -y --no-install-recommends ffmpeg libportaudio2 python3-venv",
        "tests/test_deploy_docs.py::test_the_guides_apt_packages_are_the_ones_ci_installs",
    ),
    (
        r"sudo apt-get install -y prometheus",
        "tests/test_deploy_docs.py::test_the_guides_apt_packages_are_the_ones_ci_installs",
    ),
    (
        r"sudo python3 -m venv /opt/tagd|sudo /opt/tagd/bin/pip install \.",
        "tests/test_deploy_docs.py::test_the_daemon_installs_from_source_without_torch",
    ),
    (
        r"\.venv/bin/tagd-train export .*",
        "tests/test_deploy_docs.py::test_the_guides_model_export_gives_a_model_tagd_reads",
    ),
    (
        r"\.venv/bin/tagd-train compile .*",
        "tests/test_compile_tensorrt.py::test_plan_runs_in_tagd_and_matches_onnxruntime",
    ),
    (r"sudo install .*|sudo sed .*", SCRATCH_ROOT),
    (r"sudo /opt/tagd/bin/tagd serve --config /etc/tagd/tagd\.toml --check-config", SCRATCH_ROOT),
    (r"promtool check config /etc/prometheus/prometheus\.yml", SCRATCH_ROOT),
    (
        r"sudo systemctl (daemon-reload|enable --now tagd|restart tagd)|systemctl status tagd",
        "tests/test_deploy.py::test_systemd_unit_passes_systemd_analyze_verify",
    ),
    (
        r"sudo systemctl restart prometheus",
        "tests/test_prometheus.py::test_prometheus_scrapes_tagds_latency_histogram",
    ),
    (
        r"sudo systemctl restart grafana-server",
        "tests/test_deploy.py::test_grafana_provisioning_points_at_the_dashboard_and_prometheus",
    ),
    (
        r"curl -s 127\.0\.0\.1:9108/healthz",
        "tests/test_deploy.py::test_docker_healthcheck_command_tells_ready_from_down",
    ),
    (
        r"curl -s 'http://127\.0\.0\.1:9090/api/v1/query\?query=tagd_end_to_end_latency_seconds_count'",
        "tests/test_prometheus.py::test_prometheus_scrapes_tagds_latency_histogram",
    ),
    (
        r"(STATION_URL=\S+ )?docker compose -f deploy/compose\.yaml .*",
        "tests/test_deploy.py::test_compose_mounts_existing_files_and_publishes_on_loopback_only",
    ),
    (
        r"examples/feed-file\.sh \S+",
        "tests/test_deploy.py::test_feed_file_streams_a_file_in_real_time_and_tagd_tags_it",
    ),
    (r"examples/feed-url\.sh \S+", "tests/test_deploy.py::test_feed_url_relays_an_icecast_stream"),
    (r"examples/feed-alsa\.sh \S+", "tests/test_deploy.py::test_feed_alsa_captures_a_device"),
    (
        r"\.venv/bin/tagd listen tcp://\S+",
        "tests/test_serve_process.py::test_sigterm_stops_a_busy_daemon_with_exit_0_within_2_s",
    ),
    (
        r"\.venv/bin/python examples/subscriber\.py .*",
        "tests/test_clients.py::test_subscriber_prints_the_tags_and_events_of_its_stream_only",
    ),
    (
        r"\.venv/bin/python examples/webhook_bridge\.py .*",
        "tests/test_clients.py::test_webhook_bridge_posts_each_event_as_json_and_survives_a_failing_webhook",
    ),
    (
        r"\.venv/bin/python examples/liquidsoap_bridge\.py .*",
        "tests/test_liquidsoap.py::test_bridge_inserts_tags_that_survive_a_liquidsoap_restart",
    ),
    (
        r"sudo /opt/tagd/bin/tagd log .*",
        "tests/test_asrun.py::test_tagd_log_prints_csv_and_json_lines_in_utc",
    ),
    (
        r"sudo sqlite3 \S+ \".backup \S+\"",
        "tests/test_asrun.py::test_a_backup_while_the_log_is_written_has_what_was_committed",
    ),
    (
        r"\.venv/bin/python examples/asrun_collector\.py( (?!--)\S+)+",
        "tests/test_asrun.py::test_the_collector_example_keeps_the_daemons_segments_in_one_database",
    ),
    (
        r"tagd keys generate \S+ --name \S+",
        "tests/test_serve_security.py::test_keys_generate_writes_a_private_secret_and_never_overwrites",
    ),
    (
        r"\.venv/bin/python examples/asrun_collector\.py \S+ \S+ --server-key \S+ --key \S+",
        "tests/test_asrun.py::test_the_collector_reaches_a_daemon_with_curve_with_its_own_key_only",
    ),
]


def guide_commands() -> list[str]:
    """The guide's shell commands, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def commands_for(test_id: str) -> list[str]:
    patterns = [pattern for pattern, where in COVERAGE if where == test_id]
    return [c for c in guide_commands() if any(re.fullmatch(p, c) for p in patterns)]


def test_every_command_in_the_guide_is_exercised():
    commands = guide_commands()
    assert len(commands) > 20, "the guide lost its commands?"
    unchecked = [c for c in commands if not any(re.fullmatch(p, c) for p, _ in COVERAGE)]
    assert not unchecked, f"commands in docs/deploy.md that no test exercises: {unchecked}"
    for _, where in COVERAGE:
        path, _, test = where.partition("::")
        assert (REPO / path).is_file(), where
        if test:
            assert f"def {test}(" in (REPO / path).read_text(), f"{where} is gone"


def test_the_guides_install_steps_lay_out_a_valid_host(tmp_path, export_model):
    root = tmp_path / "root"
    (root / "etc" / "prometheus").mkdir(parents=True)  # Debian's prometheus package makes it
    steps = commands_for(SCRATCH_ROOT)
    assert len(steps) >= 10
    for command in steps:
        here = command.removeprefix("sudo ").replace("/opt/tagd/bin/tagd", str(TAGD))
        here = here.replace("deploy/models/fcn4.onnx", str(export_model("fcn4")))
        here = ROOTED.sub(f"{root}/\\1/", here)
        result = subprocess.run(shlex.split(here), cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        if command.endswith("/etc/tagd/tagd.toml") and "install" in command:
            # The config names the model at /var/lib/tagd: in the scratch root, there.
            config = root / "etc/tagd/tagd.toml"
            config.write_text(
                config.read_text().replace('"/var/lib/tagd/', f'"{root}/var/lib/tagd/')
            )

    assert (root / "etc/systemd/system/tagd.service").read_text() == (
        DEPLOY / "systemd/tagd.service"
    ).read_text()
    assert (root / "etc/systemd/system/tagd.service.d/soundcard.conf").is_file()
    assert read_card(root / "var/lib/tagd/models/fcn4.onnx").architecture == "fcn4"
    datasource = (root / "etc/grafana/provisioning/datasources/tagd.yml").read_text()
    assert "url: http://127.0.0.1:9090" in datasource  # the sed pointed it at the host
    assert (root / "var/lib/grafana/dashboards/tagd/tagd.json").is_file()


def test_the_guides_apt_packages_are_the_ones_ci_installs():
    script = (REPO / "scripts" / "install.sh").read_text()
    ci_packages = set(re.search(r"APT_PACKAGES=\((.*?)\)", script, re.S)[1].split())
    for command in commands_for(
        "tests/test_deploy_docs.py::test_the_guides_apt_packages_are_the_ones_ci_installs"
    ):
        packages = {word for word in command.split()[4:] if not word.startswith("-")}
        # python3-venv: CI's Python is whatever runs install.sh, which makes the venv.
        assert packages - {"python3-venv"} <= ci_packages, command


@pytest.mark.slow
def test_the_guides_model_export_gives_a_model_tagd_reads(tmp_path):
    (command,) = commands_for(
        "tests/test_deploy_docs.py::test_the_guides_model_export_gives_a_model_tagd_reads"
    )
    out = tmp_path / "fcn4.onnx"
    args = shlex.split(command.replace("deploy/models/fcn4.onnx", str(out)))
    tagd_train = Path(sys.executable).parent / Path(args[0]).name
    result = subprocess.run([str(tagd_train), *args[1:]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    card = read_card(out)
    assert card.architecture == "fcn4" and card.n_tags > 0


def test_the_daemon_installs_from_source_without_torch(tmp_path, export_model):
    """What the Dockerfile copies builds a wheel that needs no torch and runs `tagd serve`."""
    source = tmp_path / "src"
    source.mkdir()
    for keyword, args in dockerfile_instructions(DOCKERFILES[0]):
        if keyword == "COPY" and not args.startswith("deploy/"):
            *paths, _ = args.split()
            for path in paths:
                copy = subprocess.run(["cp", "-r", str(REPO / path), str(source)], check=False)
                assert copy.returncode == 0, path
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("tagd-*.whl")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(tmp_path / "site"),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr

    metadata = next((tmp_path / "site").glob("tagd-*.dist-info")) / "METADATA"
    requires = [
        line for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist:")
    ]
    daemon = [line for line in requires if "extra ==" not in line]
    assert daemon and not any("torch" in line for line in daemon), daemon
    # --check-config reads the model's card: put one where the container's config says.
    config = tmp_path / "tagd.toml"
    config.write_text(
        (DEPLOY / "docker" / "tagd.toml")
        .read_text()
        .replace('"/var/lib/tagd/models/fcn4.onnx"', f'"{export_model("fcn4")}"')
        .replace('"/var/lib/tagd/asrun/asrun.db"', f'"{tmp_path / "asrun" / "asrun.db"}"')
    )
    check = subprocess.run(
        [
            str(tmp_path / "site" / "bin" / "tagd"),
            "serve",
            "--config",
            str(config),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
    )
    assert check.returncode == 0, check.stderr
