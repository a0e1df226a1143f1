"""Incremental inference is exact: a window scored from the last one's state scores as in full.

The torch modules are checked for every FCN preset over 50 consecutive hops of music-like
audio; the exported graphs on ONNX Runtime through the runner the daemon uses, with
dropped windows, restarts, any chunking and streams batched together; `tagd tag` and
`tagd serve` against themselves with full windows.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import soundfile
from audio_fixtures import make_music
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import (
    SHORT_FCN,
    Listener,
    make_config,
    metric_sample,
    s16le,
    scrape,
    send_chunked,
    serving,
    socket_port,
)

from tagd.card import read_card
from tagd.config import ConfigError, load_config
from tagd.engines import EngineError, load_engine
from tagd.incremental import IncrementalRunner, choose_scorer, reuse_summary
from tagd.scoring import FULL, INCREMENTAL, WindowAt, resolve_hop
from tagd.server import input_warnings
from tagd.tagfile import tag_file
from tagd.windowing import Windower

torch = pytest.importorskip("torch")

from trainer.export import export_onnx  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.models.fcn import aligned_hop_samples  # noqa: E402
from trainer.models.incremental import model_plan, plan_incremental  # noqa: E402

TOLERANCE = 1e-4  # max abs difference of sigmoid scores, as the export parity check
HOPS = 50
HEAD_GAIN = 30.0
RATE = 12_000
FCN_PRESETS = ("fcn3", "fcn4", "fcn5", "fcn6", "fcn7")
SHORT_HOP = 16 * 256  # 16 frames: every block of the 2 s FCN-4 (SHORT_FCN) reusable


def trained_looking(model):
    """Move BatchNorm statistics off the identity, as training would, so that an edge
    column computed wrong shows in the scores instead of hiding in a ReLU's zero."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    model.input_bn.running_mean.fill_(-35.0)  # log-mel dB of music: about -35 ± 20
    model.input_bn.running_var.fill_(400.0)
    with torch.no_grad():  # an untrained head barely moves the scores: make them move
        model.head.weight.mul_(HEAD_GAIN)
    return model.eval()


def windows_of(audio: np.ndarray, window: int, hop: int) -> torch.Tensor:
    count = 1 + (len(audio) - window) // hop
    return torch.from_numpy(np.stack([audio[k * hop : k * hop + window] for k in range(count)]))


def full_scores(model, windows: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(windows[i : i + 8]) for i in range(0, len(windows), 8)]).numpy()


def stepped_scores(model, hop: int, windows: torch.Tensor) -> np.ndarray:
    graphs = model.incremental_graphs(hop)
    prime, step = graphs.prime, graphs.step
    with torch.no_grad():
        scores, *states = prime(windows[:1])
        out = [scores]
        for k in range(1, len(windows)):
            scores, *states = step(windows[k : k + 1], *states)
            out.append(scores)
    return torch.cat(out).numpy()


# -- the torch modules ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", FCN_PRESETS)
def test_every_preset_steps_exactly_over_fifty_hops(arch):
    torch.manual_seed(0)
    model = trained_looking(create_model(arch, 6, width=0.125))
    hop = model.default_hop_samples
    audio = make_music((model.window_samples + HOPS * hop) / RATE, RATE, seed=3)
    windows = windows_of(audio, model.window_samples, hop)
    assert len(windows) == HOPS + 1
    difference = np.abs(stepped_scores(model, hop, windows) - full_scores(model, windows))
    assert difference.max() <= TOLERANCE
    # the scores move from window to window far more than the tolerance
    assert np.ptp(full_scores(model, windows), axis=0).max() > 50 * TOLERANCE


def test_full_size_fcn4_is_exact_within_a_fifth_of_the_work_and_4_mb_of_state():
    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 50))
    hop = model.default_hop_samples
    plan = model_plan(model, hop)
    assert hop == 40_960  # 160 frames, 3.413 s: the deepest stride below the last pool
    assert plan.top == 3 and plan.step_macs <= plan.full_macs / 5
    widths = [block.conv.out_channels for block in model.blocks]
    without = plan_incremental(model.config, widths, hop, partial=(), keep_above=False)
    assert plan.step_macs <= 0.76 * without.step_macs  # 2.00 G → 1.51 G a hop
    assert plan.state_bytes <= 4 * 1024 * 1024
    audio = make_music((model.window_samples + 6 * hop) / RATE, RATE, seed=4)
    windows = windows_of(audio, model.window_samples, hop)
    difference = np.abs(stepped_scores(model, hop, windows) - full_scores(model, windows))
    assert difference.max() <= TOLERANCE


def test_kept_tails_and_positions_above_the_top_are_exact_and_cheaper():
    """A stored level's edge column convolves only the positions the padding reaches and
    takes the rest of its pool from the tail kept one hop earlier; the block above the
    top convolves only its edge and new positions. The same scores as full windows and
    as the plan without either, for fewer MACs and a little more state."""
    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 6, width=0.125))
    hop = model.default_hop_samples
    widths = [block.conv.out_channels for block in model.blocks]
    with_tails = model_plan(model, hop)
    without = plan_incremental(model.config, widths, hop, partial=(), keep_above=False)
    assert with_tails.partial == (2, 3) and with_tails.edge_positions == {2: 2, 3: 2}
    # block 4 reads block 3's 8 columns: positions 2-6 of stream audio alone, 2-5 reused
    assert with_tails.kept_above == (2, 7) and with_tails.above_fresh() == [(0, 2), (6, 8)]
    assert list(with_tails.landing_columns(2)) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert list(with_tails.landing_columns(3)) == list(range(1, 8))
    assert with_tails.step_macs < 0.9 * without.step_macs  # full size: 0.76 (below)
    assert without.state_bytes < with_tails.state_bytes < 1.25 * without.state_bytes
    # below the edge, the levels need fewer columns: block 1 three at its edge, not six
    assert with_tails.compute[1][0] == (0, 3) and without.compute[1][0] == (0, 6)
    audio = make_music((model.window_samples + 12 * hop) / RATE, RATE, seed=6)
    windows = windows_of(audio, model.window_samples, hop)
    stepped = stepped_scores(model, hop, windows)
    assert np.abs(stepped - full_scores(model, windows)).max() <= TOLERANCE
    graphs = incremental_graphs_of(model, without)
    with torch.no_grad():
        scores, *states = graphs[0](windows[:1])
        old = [scores]
        for k in range(1, len(windows)):
            scores, *states = graphs[1](windows[k : k + 1], *states)
            old.append(scores)
    assert np.abs(stepped - torch.cat(old).numpy()).max() <= TOLERANCE


def incremental_graphs_of(model, plan):
    from trainer.models.incremental import FCNPrime, FCNStep

    return FCNPrime(model, plan).eval(), FCNStep(model, plan).eval()


@pytest.mark.parametrize(
    ("hop_frames", "deepest_reused"),
    [(1, 0), (4, 1), (7, 0), (20, 2), (80, 2), (160, 3), (320, 3)],
)
def test_a_hop_off_the_deepest_stride_reuses_the_layers_it_can(hop_frames, deepest_reused):
    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 6, width=0.125))
    hop = hop_frames * 256
    plan = model_plan(model, hop)
    assert plan.top == deepest_reused
    audio = make_music((model.window_samples + 6 * hop) / RATE, RATE, seed=5)
    windows = windows_of(audio, model.window_samples, hop)
    difference = np.abs(stepped_scores(model, hop, windows) - full_scores(model, windows))
    assert difference.max() <= TOLERANCE


def test_a_hop_off_the_frame_grid_reuses_nothing():
    model = create_model("fcn4", 6, width=0.125)
    assert model_plan(model, 36_000) is None  # 3 s: 140.6 frames
    assert model.incremental_graphs(36_000) is None


def test_default_hops_are_the_aligned_hops_nearest_three_seconds():
    hops = {arch: aligned_hop_samples(create_model(arch).config) for arch in FCN_PRESETS}
    assert hops == {"fcn3": 40_960, "fcn4": 40_960, "fcn5": 32_768, "fcn6": 32_768, "fcn7": 32_768}


# -- the exported graphs, through the runner ------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A narrow FCN-4 exported with its graphs at the default hop and at 1/8 of it."""
    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 6, width=0.125))
    path = tmp_path_factory.mktemp("incremental") / "fcn4.onnx"
    export_onnx(model, path, tags=[f"t{i}" for i in range(6)], incremental_hops=(5_120,))
    return path


@pytest.fixture(scope="module")
def engine(exported):
    return load_engine(exported)


def test_export_writes_the_graphs_beside_the_model_and_the_card_names_them(exported):
    card = read_card(exported)
    assert card.hop_samples == 40_960
    assert card.incremental.time_strides == (256, 1024, 5120, 40960, 327680)
    assert card.incremental.hops == [5_120, 40_960]
    for hop in card.incremental.hops:
        graph = card.incremental_graph(hop)
        assert (exported.parent / graph.prime).is_file()
        assert (exported.parent / graph.step).is_file()
        assert graph.max_abs_diff <= TOLERANCE
    assert card.incremental_graph(40_960).state_names == [
        "block2",
        "block3",
        "block2_tail",
        "block3_tail",
        "block4_positions",
    ]
    # at 1/8 of the hop block 2 shifts one column: its tails would cost more than they save
    assert card.incremental_graph(5_120).state_names == ["block2"]
    # block 2 keeps its 67 global columns and the tails of the 8 that reach its edge
    assert card.incremental_graph(40_960).state_shapes[0] == (48, 12, 67)
    assert card.incremental_graph(40_960).state_shapes[2] == (48, 12, 8)
    assert card.incremental_graph(40_960).state_shapes[4] == (256, 1, 5)  # block 4's 2-6


def test_a_graph_the_card_names_but_missing_is_a_clear_error(exported, tmp_path):
    for name in ("fcn4.onnx", "fcn4.5120.prime.onnx"):  # the 5,120 hop's step graph is lost
        shutil.copy(exported.parent / name, tmp_path / name)
    engine = load_engine(tmp_path / "fcn4.onnx")
    assert engine.incremental(20_480) is None  # no graphs for this hop: full windows
    with pytest.raises(EngineError, match=r"step graph fcn4\.5120\.step\.onnx .*not beside it"):
        engine.incremental(5_120)


def counter(counts: dict[str, int]):
    """An ``on_updates`` that adds each graph's windows into ``counts``."""

    def count(mode: str, windows: int) -> None:
        counts[mode] += windows

    return count


def full_window_scores(engine, windows: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([engine.run(w[None, :]) for w in windows])


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.integers(500, 60_000), min_size=1, max_size=8),
    dropped=st.sets(st.integers(1, 13), max_size=4),
    restart_after=st.one_of(st.none(), st.integers(2, 10)),
)
def test_any_chunking_drops_and_restarts_give_the_full_windows_scores(
    engine, chunks, dropped, restart_after
):
    """A stream's windows, cut from audio pushed in any chunks, some dropped on the way
    (queue full, engine error) and the stream restarted once: every window scored is
    scored as in full, and only the windows that do not continue the last are primed."""
    card = engine.card
    hop = card.hop_samples
    counts = {"incremental": 0, "full": 0}
    runner = IncrementalRunner([engine.incremental(hop)], on_updates=counter(counts))
    audio = make_music((card.window_samples + 14 * hop) / RATE, RATE, seed=6)
    windower = Windower(card.window_samples, hop)
    windows, at, sizes = [], 0, itertools.cycle(chunks)
    while at < len(audio):
        size = next(sizes)
        windows += windower.push(audio[at : at + size])
        at += size
    assert len(windows) == 15
    keys, kept = [], []
    epoch = 0
    for index, window in enumerate(windows):
        if restart_after is not None and index == restart_after:
            epoch += 1  # what a Stream's restart does: a new epoch, same hop grid
        if index in dropped:
            continue
        keys.append(WindowAt("radio1", epoch, window.start))
        kept.append(window.samples)
    got = np.concatenate(
        [runner.run([key], sample[None, :]) for key, sample in zip(keys, kept, strict=True)]
    )
    assert np.abs(got - full_window_scores(engine, kept)).max() <= TOLERANCE
    starts = [k.start for k in keys]
    epochs = [k.epoch for k in keys]
    continued = sum(
        1
        for i in range(1, len(keys))
        if starts[i] == starts[i - 1] + hop and epochs[i] == epochs[i - 1]
    )
    assert counts == {"incremental": continued, "full": len(keys) - continued}


def test_streams_batched_together_each_keep_their_own_chain(engine):
    card = engine.card
    hop = card.hop_samples
    runner = IncrementalRunner([engine.incremental(hop)])
    audio = {
        name: make_music((card.window_samples + 4 * hop) / RATE, RATE, seed=seed)
        for name, seed in (("a", 1), ("b", 2))
    }
    window = {name: windows_of(a, card.window_samples, hop).numpy() for name, a in audio.items()}
    # a starts alone; then a's second window and b's first share a batch (a step, a prime)
    first = runner.run([WindowAt("a", 0, 0)], window["a"][:1])
    assert np.abs(first - engine.run(window["a"][:1])).max() <= TOLERANCE
    for k in range(1, 4):
        keys = [WindowAt("a", 0, k * hop), WindowAt("b", 0, (k - 1) * hop)]
        batch = np.stack([window["a"][k], window["b"][k - 1]])
        assert np.abs(runner.run(keys, batch) - engine.run(batch)).max() <= TOLERANCE
    assert runner.streams_held == 2
    runner.forget("a")
    assert runner.streams_held == 1


def test_instances_sharing_one_engine_step_their_streams_side_by_side_exactly(exported):
    # `[batching] instances = 2` on ONNX Runtime: one engine (concurrent_runs), its graphs
    # loaded once, two workers running them at the same time, each stream's chain exact
    engine = load_engine(exported, intra_op_threads=1)
    assert engine.concurrent_runs
    card = engine.card
    hop = card.hop_samples
    runner = choose_scorer([engine, engine], hop)
    assert isinstance(runner, IncrementalRunner) and runner.engines[0] is runner.engines[1]
    hops = 6
    window = {
        name: windows_of(
            make_music((card.window_samples + hops * hop) / RATE, RATE, seed=seed),
            card.window_samples,
            hop,
        ).numpy()
        for name, seed in (("a", 3), ("b", 4))
    }
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}

    def worker(instance: int, name: str) -> None:
        for k in range(hops + 1):
            key = WindowAt(name, 0, k * hop)
            got[name].append(runner.run([key], window[name][k : k + 1], instance)[0])

    threads = [threading.Thread(target=worker, args=pair) for pair in ((0, "a"), (1, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name in window:
        assert len(got[name]) == hops + 1
        want = full_window_scores(engine, list(window[name][: hops + 1]))
        assert np.abs(np.stack(got[name]) - want).max() <= TOLERANCE


def test_a_batch_catching_up_on_one_stream_steps_its_later_windows(engine):
    """A batcher behind on a stream hands over its consecutive windows in one batch: the
    first is primed (the stream's first), the rest step from it, and all are exact."""
    card = engine.card
    hop = card.hop_samples
    counts = {"incremental": 0, "full": 0}
    runner = IncrementalRunner([engine.incremental(hop)], on_updates=counter(counts))
    audio = make_music((card.window_samples + 4 * hop) / RATE, RATE, seed=3)
    window = windows_of(audio, card.window_samples, hop).numpy()
    keys = [WindowAt("a", 0, k * hop) for k in range(3)] + [WindowAt("b", 0, 0)]
    batch = np.concatenate([window[:3], window[:1]])
    assert not runner.continues(keys[0])
    got = runner.run(keys, batch)
    assert np.abs(got - engine.run(batch)).max() <= TOLERANCE
    assert counts == {"incremental": 2, "full": 2}
    assert runner.continues(WindowAt("a", 0, 3 * hop))
    assert not runner.continues(WindowAt("a", 0, 4 * hop))  # a gap: primed
    assert not runner.continues(WindowAt("a", 1, 3 * hop))  # a restart: primed


# -- one scorer for both modes ------------------------------------------------------------------
def test_the_mode_is_chosen_from_the_config_and_the_graphs_for_the_hop(engine, caplog):
    hop = engine.card.hop_samples
    incremental = choose_scorer([engine], hop)
    assert incremental.mode == INCREMENTAL and incremental.carries_state
    # a stream's state: its float32 tensors, as the start-up line says
    state_bytes = sum(4 * int(np.prod(shape)) for shape in incremental.engine.state_shapes)
    assert incremental.state_bytes == state_bytes > 0
    assert f"{state_bytes / 1e6:.2f} MB of state a stream" in incremental.describe()
    caplog.set_level("INFO", logger="tagd.incremental")
    turned_off = choose_scorer([engine], hop, incremental=False)
    assert "incremental inference off" in caplog.text
    no_graphs = choose_scorer([engine], 20_480)
    assert "export with `tagd-train export --incremental-hop 1.70667`" in caplog.text
    for scorer in (turned_off, no_graphs):
        assert (scorer.mode, scorer.state_bytes, scorer.describe()) == (FULL, 0, "full windows")
        assert not scorer.carries_state
    assert no_graphs.hop_samples == 20_480


@pytest.mark.parametrize("incremental", [True, False])
def test_either_scorer_gives_a_streams_full_window_scores_and_counts_them(engine, incremental):
    """The same calls, in either mode: a stream's windows in order with one dropped, and a
    second stream's first window batched with one of them."""
    card = engine.card
    hop = card.hop_samples
    counts = {INCREMENTAL: 0, FULL: 0}
    scorer = choose_scorer([engine], hop, incremental, on_updates=counter(counts))
    scorer.warmup((1, 2))
    audio = make_music((card.window_samples + 4 * hop) / RATE, RATE, seed=8)
    window = windows_of(audio, card.window_samples, hop).numpy()
    calls = [  # (keys, rows of window); window 2 of "a" is dropped
        ([WindowAt("a", 0, 0)], [0]),
        ([WindowAt("a", 0, hop), WindowAt("b", 0, 0)], [1, 0]),
        ([WindowAt("a", 0, 3 * hop)], [3]),
        ([WindowAt("a", 0, 4 * hop), WindowAt("b", 0, hop)], [4, 1]),
    ]
    for keys, rows in calls:
        got = scorer.run(keys, window[rows])
        assert np.abs(got - full_window_scores(engine, list(window[rows]))).max() <= TOLERANCE
    assert scorer.continues(WindowAt("b", 0, 2 * hop)) == incremental
    scorer.forget("b")
    assert not scorer.continues(WindowAt("b", 0, 2 * hop))
    # stepped: a's second and fifth windows, b's second
    assert counts == ({INCREMENTAL: 3, FULL: 3} if incremental else {INCREMENTAL: 0, FULL: 6})


def test_the_start_up_summary_says_what_a_hop_reuses(exported):
    card = read_card(exported)
    assert "conv blocks 1–3" in reuse_summary(card, 40_960)
    assert "conv blocks 1–2" in reuse_summary(card, 5_120)
    assert "not a multiple of the 256-sample frame hop" in reuse_summary(card, 36_000)


def test_a_hop_in_seconds_near_a_whole_number_of_frames_is_that_number(exported):
    card = read_card(exported)
    assert card.hop_from_seconds(3.413) == 40_960  # rounds to 40,956 samples
    assert card.hop_from_seconds(0.427) == 5_120
    assert card.hop_from_seconds(3.0) == 36_000  # 140.6 frames: left as it is


def test_the_hop_is_resolved_once_for_tag_serve_and_the_config_check(exported):
    card = read_card(exported)
    assert resolve_hop(card, None) == card.hop_samples
    assert resolve_hop(card, 3.413) == 40_960
    config = make_config(exported, ["zmq+pull://127.0.0.1:5999"])
    config.hop_seconds = card.window_seconds + 1
    (warning,) = input_warnings(config, card)
    assert warning.startswith(f"the hop ({card.window_seconds + 1:.2f} s) is longer than")
    config.hop_seconds = card.window_seconds
    assert input_warnings(config, card) == []


# -- tagd tag -----------------------------------------------------------------------------------
def test_tag_gives_the_full_windows_scores_over_a_long_file(exported, engine, tmp_path):
    audio = make_music(75.0, 44_100, seed=9)
    song = tmp_path / "song.wav"
    soundfile.write(song, audio, 44_100)
    counts = {"incremental": 0, "full": 0}
    runner = IncrementalRunner(
        [engine.incremental(engine.card.hop_samples)], on_updates=counter(counts)
    )
    incremental = tag_file(engine, song, scorer=runner)
    full = tag_file(engine, song)
    assert incremental.windows == full.windows == 14  # (75 - 29.12) / 3.413 + 1
    assert counts == {"incremental": 13, "full": 1}
    assert np.abs(incremental.scores - full.scores).max() <= TOLERANCE
    # --batch: full windows four to a call; the incremental scorer still steps each one
    in_fours = tag_file(engine, song, batch_size=4)
    assert np.abs(in_fours.scores - full.scores).max() <= 1e-6
    assert tag_file(engine, song, batch_size=4, scorer=runner).scores.tolist() == (
        incremental.scores.tolist()
    )
    assert counts == {"incremental": 26, "full": 2}

    def cli(*extra):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tagd.cli",
                "tag",
                str(song),
                "--engine",
                str(exported),
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["scores"]

    by_default, in_full = cli(), cli("--full-windows")
    assert max(abs(by_default[t] - in_full[t]) for t in in_full) <= TOLERANCE


# -- tagd serve ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_fcn(tmp_path_factory):
    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 6, width=0.125, **SHORT_FCN))
    path = tmp_path_factory.mktemp("short") / "short.onnx"
    export_onnx(model, path, incremental_hops=(SHORT_HOP,))
    return path


def serve_messages(engine_path, payload: bytes, **settings) -> tuple[dict[str, list], str]:
    """Streams a and b of ``payload`` in messages of two sizes through `tagd serve` at
    SHORT_HOP with ``settings`` (config keys): each stream's tags messages in order, and
    the metrics page."""
    with socket_port() as port:
        config = make_config(
            engine_path, [f"zmq+pull://127.0.0.1:{port}"], batching={"max_pending_per_stream": 1000}
        )
    config.hop_seconds = SHORT_HOP / RATE
    for key, value in settings.items():
        setattr(config, key, value)
    with serving(config) as server:
        listener = Listener(server, "tags.")
        send_chunked(f"tcp://127.0.0.1:{port}", {"a": (payload, 4000), "b": (payload, 1684)}, RATE)
        listener.collect(until_quiet=1.0)
        listener.close()
        _, metrics = scrape(server)
    in_order = {name: sorted(listener.on(f"tags.{name}"), key=lambda m: m["seq"]) for name in "ab"}
    return in_order, metrics


def serve_scores(engine_path, incremental: bool, payload: bytes) -> tuple[dict, str]:
    messages, metrics = serve_messages(engine_path, payload, incremental=incremental)
    scores = {(name, m["seq"]): m["scores"] for name, got in messages.items() for m in got}
    return scores, metrics


def test_serve_publishes_the_full_windows_scores_and_says_it_is_incremental(short_fcn):
    audio = make_music(6.0, RATE, seed=11)
    payload = s16le(np.stack([audio, audio], axis=1))
    incremental, metrics = serve_scores(short_fcn, True, payload)
    full, full_metrics = serve_scores(short_fcn, False, payload)
    assert len(incremental) >= 2 * 11  # (6 - 1.98) / 0.341 + 1 windows a stream
    assert incremental.keys() == full.keys()
    for key, scores in full.items():
        assert max(abs(scores[t] - incremental[key][t]) for t in scores) <= TOLERANCE + 1e-6, key
    assert metric_sample(metrics, "tagd_engine_info", inference="incremental") == 1
    updates = metric_sample(metrics, "tagd_window_updates_total", mode="incremental")
    assert updates == len(incremental) - 2  # each stream's first window is primed
    assert metric_sample(full_metrics, "tagd_engine_info", inference="full") == 1


def test_incremental_false_turns_it_off_and_the_engine_table_says_what_to_write(tmp_path):
    config = tmp_path / "tagd.toml"
    config.write_text(
        'engine = "fcn4.onnx"\nincremental = false\ninputs = ["zmq+pull://127.0.0.1:5999"]\n'
    )
    loaded = load_config(config)
    assert loaded.engine == str(tmp_path / "fcn4.onnx") and loaded.incremental is False
    config.write_text(
        'inputs = ["zmq+pull://127.0.0.1:5999"]\n'
        '[engine]\npath = "fcn4.onnx"\nincremental = false\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == [
        "engine: the [engine] table is no longer read; write these top-level keys before the "
        'first table instead: engine = "fcn4.onnx", incremental = false'
    ]


# -- aggregate = true: the step graph gives the song aggregator its embedding ---------------------
@pytest.fixture(scope="module")
def aggregated_fcn(tmp_path_factory):
    from trainer.aggregate import write_untrained_aggregator

    torch.manual_seed(0)
    model = trained_looking(create_model("fcn4", 6, width=0.125, **SHORT_FCN))
    folder = tmp_path_factory.mktemp("aggregated")
    tags = [f"t{i}" for i in range(6)]
    aggregator = write_untrained_aggregator(
        folder / "aggregator.pt", model, tags, SHORT_HOP, hidden=16
    )
    path = folder / "short.onnx"
    export_onnx(model, path, tags=tags, incremental_hops=(SHORT_HOP,), aggregator=aggregator)
    return path


def test_graphs_exported_with_an_aggregator_give_the_embedding_and_old_cards_stay(
    aggregated_fcn, short_fcn
):
    import onnx

    from tagd.card import CARD_METADATA_KEY, GRAPH_NAMES, CardError, ModelCard

    card = read_card(aggregated_fcn)
    graph = card.incremental.graph(SHORT_HOP)
    assert graph.embedding and graph.outputs[-1] == GRAPH_NAMES.embedding
    assert graph.max_abs_diff is not None and graph.max_abs_diff <= TOLERANCE
    assert ModelCard.from_json(card.to_json()).to_json() == card.to_json()
    # a card from before the embedding output: no key, loads, writes back byte for byte
    text = next(
        p.value for p in onnx.load(str(short_fcn)).metadata_props if p.key == CARD_METADATA_KEY
    )
    assert '"embedding"' not in text and not read_card(short_fcn).incremental.graphs[0].embedding
    assert ModelCard.from_json(text).to_json() == text
    broken = card.to_dict()
    broken["incremental"]["graphs"][0]["embedding"] = "yes"
    with pytest.raises(CardError, match=r"incremental.graphs\[0\].embedding is true or false"):
        ModelCard.from_dict(broken)
    without = {k: v for k, v in card.to_dict().items() if k != "aggregator"}
    with pytest.raises(CardError, match="give an embedding but the card has no aggregator"):
        ModelCard.from_dict(without)


def one_pass_songs(path, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full windows through the embedding graph, their songs through the aggregator in
    one pass: each window's scores and song-so-far scores."""
    from tagd.aggregate import AggregatorGraphs

    card = read_card(path)
    graphs = AggregatorGraphs(path, card, threads=1)
    state = card.aggregator.initial_state(1)
    scores, songs = [], []
    for window in windows:
        window_scores, embedding = graphs.embed(window[None])
        song, state = graphs.step(embedding, state)
        scores.append(window_scores[0])
        songs.append(song[0])
    return np.array(scores), np.array(songs)


def test_aggregating_steps_take_the_embedding_from_the_step_and_restart_as_one_pass(
    aggregated_fcn, monkeypatch
):
    """Windows of two streams interleaved, one with a gap, one restarted: each window's
    scores and song scores equal full windows and one aggregator pass since the break,
    and the embedding graph (a whole window's CNN) never runs."""
    from tagd.aggregate import AggregatorGraphs, aggregating

    card = read_card(aggregated_fcn)
    counts = {INCREMENTAL: 0, FULL: 0}
    runner = choose_scorer(
        [load_engine(aggregated_fcn, intra_op_threads=1)], SHORT_HOP, on_updates=counter(counts)
    )
    assert isinstance(runner, IncrementalRunner) and runner.embeds
    scorer = aggregating(runner, aggregated_fcn, card)
    scorer.warmup((1, 2))
    monkeypatch.setattr(AggregatorGraphs, "embed", lambda *_: pytest.fail("embedding graph ran"))

    audio = make_music(5.0, RATE, seed=4)
    windows = windows_of(audio, card.window_samples, SHORT_HOP).numpy()
    n = len(windows)
    keys_a = [WindowAt("a", 0, k * SHORT_HOP) for k in range(n) if k != 4]  # window 4 lost
    keys_b = [WindowAt("b", 0 if k < 6 else 1, k * SHORT_HOP) for k in range(n)]  # restarted
    got: dict[tuple[str, int], tuple[np.ndarray, dict]] = {}
    order = [key for pair in zip(keys_a, keys_b, strict=False) for key in pair]
    order += keys_b[len(keys_a) :]
    for i in range(0, len(order), 2):  # batches of two: a's window beside b's
        keys = order[i : i + 2]
        batch = np.stack([windows[key.start // SHORT_HOP] for key in keys])
        for key, scores in zip(keys, scorer.run(keys, batch), strict=True):
            got[key.stream, key.start // SHORT_HOP] = scores, scorer.song(key)
    monkeypatch.undo()

    def check(stream: str, first: int, last: int) -> None:
        scores, songs = one_pass_songs(aggregated_fcn, windows[first : last + 1])
        for k in range(first, last + 1):
            window_scores, song = got[stream, k]
            assert song["windows"] == k - first + 1
            np.testing.assert_allclose(window_scores, scores[k - first], atol=TOLERANCE)
            published = [song["scores"][t] for t in card.tags]
            np.testing.assert_allclose(published, songs[k - first], atol=TOLERANCE)

    check("a", 0, 3)
    check("a", 5, n - 1)
    check("b", 0, 5)
    check("b", 6, n - 1)
    assert counts == {INCREMENTAL: 2 * n - 1 - 4, FULL: 4}  # 4 primes: 2 starts, 2 breaks


def test_graphs_exported_without_the_embedding_still_aggregate_with_the_embedding_graph(
    aggregated_fcn, tmp_path, caplog
):
    """An export from before the embedding output (incremental graphs without it, the
    aggregator's graphs beside): the embedding graph runs beside each step, the scores
    and songs are the same, and the start-up log says to export again."""
    import shutil

    import onnx

    from tagd.aggregate import aggregating
    from tagd.card import CARD_METADATA_KEY
    from trainer.export import export_incremental

    for found in aggregated_fcn.parent.glob("short*.onnx"):
        shutil.copy(found, tmp_path / found.name)
    path = tmp_path / aggregated_fcn.name
    torch.manual_seed(0)  # the model aggregated_fcn exported
    model = trained_looking(create_model("fcn4", 6, width=0.125, **SHORT_FCN))
    card = read_card(path)
    card.incremental = export_incremental(model, path, [SHORT_HOP])
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == CARD_METADATA_KEY).value = card.to_json()
    onnx.save(proto, str(path))
    assert not read_card(path).incremental.graph(SHORT_HOP).embedding

    runner = choose_scorer([load_engine(path, intra_op_threads=1)], SHORT_HOP)
    with caplog.at_level("INFO", logger="tagd.aggregate"):
        scorer = aggregating(runner, path, card)
    assert "export the model again" in caplog.text
    assert "and the embedding graph" in scorer.describe()
    audio = make_music(4.0, RATE, seed=8)
    windows = windows_of(audio, card.window_samples, SHORT_HOP).numpy()
    keys = [WindowAt("s", 0, k * SHORT_HOP) for k in range(len(windows))]
    got = [
        (scorer.run([key], window[None])[0], scorer.song(key))
        for key, window in zip(keys, windows, strict=True)
    ]
    scores, songs = one_pass_songs(aggregated_fcn, windows)
    for k, (window_scores, song) in enumerate(got):
        np.testing.assert_allclose(window_scores, scores[k], atol=TOLERANCE)
        published = [song["scores"][t] for t in card.tags]
        np.testing.assert_allclose(published, songs[k], atol=TOLERANCE)


def test_serve_with_aggregate_steps_songs_exactly_whatever_the_message_size(aggregated_fcn):
    from support import reference_windows

    from tagd.stream import StreamGeometry

    card = read_card(aggregated_fcn)
    audio = make_music(6.0, RATE, seed=12)
    payload = s16le(np.stack([audio, audio], axis=1))
    streams, metrics = serve_messages(aggregated_fcn, payload, aggregate=True)
    geometry = StreamGeometry(RATE, card.window_samples, SHORT_HOP)
    windows = np.stack([w.samples for w in reference_windows(payload, RATE, 2, geometry)])
    scores, songs = one_pass_songs(aggregated_fcn, windows)
    for messages in streams.values():
        assert [m["song"]["windows"] for m in messages] == list(range(1, len(windows) + 1))
        for k, message in enumerate(messages):
            published = [message["scores"][t] for t in card.tags]
            np.testing.assert_allclose(published, scores[k], atol=TOLERANCE + 1e-6)
            song = [message["song"]["scores"][t] for t in card.tags]
            np.testing.assert_allclose(song, songs[k], atol=TOLERANCE + 1e-6)
    updates = metric_sample(metrics, "tagd_window_updates_total", mode="incremental")
    assert updates == 2 * len(windows) - 2
