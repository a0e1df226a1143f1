"""Aggregators over window embeddings: streaming equals one pass, training, fine-tuning, CLI."""

from __future__ import annotations

import collections
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from support import load_bench
from trainer_support import N_TAGS, TINY, TINY_RATE, one_torch_thread, synthetic_prepared

from trainer.aggregate import (
    AggregateConfig,
    average_scores,
    clip_window_stack,
    embed_clips,
    load_aggregator,
    pad_sequences,
    train_aggregator,
)
from trainer.checkpoint import (
    CheckpointError,
    card_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
)
from trainer.cli import main as cli
from trainer.data.dataset import DataError, PreparedData, to_float
from trainer.data.mtt import load_mtt
from trainer.data.prepare import prepare
from trainer.evaluate import predict_clips
from trainer.models import create_model
from trainer.models.aggregator import AggregatorConfig, create_aggregator
from trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")
assert one_torch_thread  # imported for pytest


# -- the modules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fcn5", "samplecnn", "samplecnn-rese-ml"])
def test_embedding_is_what_the_head_reads(name):
    torch.manual_seed(0)
    hparams = {"width": 0.0625} if name.startswith("fcn") else TINY
    model = create_model(name, n_tags=5, **hparams).eval()
    wave = torch.randn(2, model.window_samples) * 0.1
    embedding = model.embed(wave)
    assert embedding.shape == (2, model.embedding_size)
    torch.testing.assert_close(model.head(embedding), model.forward_logits(wave))


@pytest.mark.parametrize("kind", ["lstm", "mean"])
def test_stepping_in_chunks_with_restarts_equals_one_pass(kind):
    """The openWakeWord test for the aggregator: one window at a time, the state carried
    between calls and restarted for a new song, gives the sequence model's output."""
    torch.manual_seed(0)
    aggregator = create_aggregator(
        AggregatorConfig(embedding_size=12, n_tags=4, kind=kind, hidden=8)
    ).eval()
    songs = [torch.randn(n, 12) * 3 for n in (7, 3, 1)]
    with torch.no_grad():
        batch, lengths = pad_sequences([s.numpy() for s in songs])
        whole = aggregator.forward_logits(batch, lengths)  # padded batch, one pass
        for row, song in enumerate(songs):
            state = aggregator.initial_state(1)  # a new song: restart
            prefixes = []
            for window in song:
                logits, *state = aggregator.step(window[None], *state)
                prefixes.append(logits[0])
            torch.testing.assert_close(prefixes[-1], whole[row], atol=1e-5, rtol=1e-5)
            # every step is the song-so-far prediction
            for t in (1, len(song) // 2 + 1):
                alone = aggregator.forward_logits(song[None, :t], torch.tensor([t]))[0]
                torch.testing.assert_close(prefixes[t - 1], alone, atol=1e-5, rtol=1e-5)
    assert len(state) == len(aggregator.state_names) == len(aggregator.state_shapes())
    assert [tuple(s.shape[1:]) for s in state] == list(aggregator.state_shapes())


def test_aggregator_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lstm, mean"):
        AggregatorConfig(embedding_size=4, n_tags=2, kind="gru")
    with pytest.raises(ValueError, match="dropout"):
        AggregatorConfig(embedding_size=4, n_tags=2, dropout=1.0)


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    # 4 s clips: four 0.89 s windows of the tiny SampleCNN, a song of several windows
    return synthetic_prepared(tmp_path_factory.mktemp("songs"), 120)


@pytest.fixture(scope="module")
def cnn_checkpoint(prepared, tmp_path_factory):
    config = TrainConfig(
        data=str(prepared.root),
        out=str(tmp_path_factory.mktemp("cnn")),
        model="samplecnn",
        hparams=TINY,
        optimizer="adam",
        lr=3e-3,
        epochs=8,
        crops_per_clip=2,
        progress=False,
    )
    return train(config).best_path


def aggregate_config(checkpoint, data, out, **overrides) -> AggregateConfig:
    values = dict(
        checkpoint=str(checkpoint),
        data=str(data),
        out=str(out),
        hidden=16,
        epochs=12,
        batch_size=8,
        lr=3e-3,
        progress=False,
    )
    return AggregateConfig(**{**values, **overrides})


@pytest.mark.parametrize("kind", ["lstm", "mean"])
def test_frozen_cnn_aggregator_learns_the_song_tags(kind, prepared, cnn_checkpoint, tmp_path):
    result = train_aggregator(aggregate_config(cnn_checkpoint, prepared.root, tmp_path, kind=kind))
    print(f"{kind}: test {result.test}, average {result.average['test']}")
    assert result.test["roc_auc_macro"] >= 0.75  # chance is 0.5; the average gets ~0.87
    assert 1 <= result.best_epoch <= 12
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    report = (tmp_path / "report.md").read_text()
    assert "average of windows" in report and f"aggregator ({kind})" in report

    aggregator, payload = load_aggregator(tmp_path / "aggregator.pt")
    assert payload["tags"] == load_checkpoint(cnn_checkpoint)["tags"]
    assert payload["cnn"]["finetuned"] is False
    assert payload["scores"]["test"] == result.test
    assert aggregator.config.kind == kind and not aggregator.training


def test_average_from_embeddings_is_todays_clip_score(prepared, cnn_checkpoint):
    """The baseline the report prints is exactly what `tagd-train evaluate` scores."""
    cnn = model_from_checkpoint(load_checkpoint(cnn_checkpoint))
    clips = prepared.indices("test")[:6]
    sequences = embed_clips(cnn, prepared, clips, cnn.default_hop_samples)
    assert all(len(s) > 1 for s in sequences)  # songs of several windows
    np.testing.assert_allclose(
        average_scores(cnn, sequences), predict_clips(cnn, prepared, clips), atol=1e-5
    )


def test_tags_the_set_lacks_are_masked(cnn_checkpoint, tmp_path):
    """A set with fewer tags than the CNN: those columns are unknown, the loss finite."""
    root = tmp_path / "fewer"
    from trainer.data import synthetic

    annotations = synthetic.write_mtt(root / "mtt", 60, seed=3, seconds=4.0)
    prepare(
        load_mtt(annotations, n_tags=N_TAGS - 2),
        root / "prepared",
        TINY_RATE,
        workers=1,
        progress=False,
    )
    data = PreparedData(root / "prepared")
    cnn_tags = load_checkpoint(cnn_checkpoint)["tags"]
    assert len(set(cnn_tags) - set(data.tags)) == 2
    result = train_aggregator(
        aggregate_config(cnn_checkpoint, data.root, tmp_path / "run", epochs=2)
    )
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert np.isfinite(result.valid["roc_auc_macro"])
    _, payload = load_aggregator(tmp_path / "run" / "aggregator.pt")
    assert payload["tags"] == cnn_tags


def test_finetune_writes_the_tuned_cnn(prepared, cnn_checkpoint, tmp_path):
    train_aggregator(
        aggregate_config(
            cnn_checkpoint, prepared.root, tmp_path, epochs=1, finetune=True, cnn_lr=1e-3
        )
    )
    before = load_checkpoint(cnn_checkpoint)["state_dict"]
    tuned = load_checkpoint(tmp_path / "cnn.pt")
    model_from_checkpoint(tuned)  # rebuilds
    changed = [
        k
        for k, v in tuned["state_dict"].items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert changed and not any("running_" in k for k in changed)  # BatchNorm kept
    _, payload = load_aggregator(tmp_path / "aggregator.pt")
    assert payload["cnn"]["finetuned"] is True


def test_cli_trains_and_reports(prepared, cnn_checkpoint, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "aggregate",
            str(cnn_checkpoint),
            str(prepared.root),
            "--out",
            str(out),
            "--kind",
            "mean",
            "--epochs",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "average of windows" in result.output and "test: aggregator" in result.output
    assert (out / "aggregator.pt").is_file()


def test_cli_wrong_rate_and_bad_file_are_one_line_errors(cnn_checkpoint, tmp_path):
    wrong = tmp_path / "wrong"
    from trainer.data import synthetic

    annotations = synthetic.write_mtt(wrong / "mtt", 12, seed=4, seconds=2.0)
    prepare(
        load_mtt(annotations, n_tags=N_TAGS), wrong / "prepared", 12_000, workers=1, progress=False
    )
    result = CliRunner().invoke(
        cli, ["aggregate", str(cnn_checkpoint), str(wrong / "prepared"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1 and "prepare it with --model samplecnn" in result.output
    with pytest.raises(CheckpointError, match="tagd-aggregator"):
        load_aggregator(cnn_checkpoint)
    with pytest.raises(DataError):
        train_aggregator(aggregate_config(cnn_checkpoint, tmp_path / "nowhere", tmp_path))


# -- export --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lstm_run(prepared, cnn_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lstm-run")
    train_aggregator(aggregate_config(cnn_checkpoint, prepared.root, out, epochs=2))
    return out / "aggregator.pt"


def test_export_writes_the_graphs_and_the_card_section(cnn_checkpoint, lstm_run, tmp_path):
    from tagd.card import GRAPH_NAMES, ModelCard, read_card
    from tagd.engines.onnx import open_session

    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(
        cli, ["export", str(cnn_checkpoint), "--out", str(out), "--aggregator", str(lstm_run)]
    )
    assert result.exit_code == 0, result.output
    assert "aggregator lstm: tiny.embed.onnx, tiny.aggregator.onnx; parity" in result.output
    card = read_card(out)
    section = card.aggregator
    assert (section.kind, section.embedding_layer) == ("lstm", "head.input")
    assert section.state_names == ["h0", "h1", "c0", "c1"]
    assert [t.shape for t in section.state] == [(16,)] * 4
    assert section.max_abs_diff is not None and section.max_abs_diff <= 1e-4
    assert section.scores["test"] and section.scores["average"]["test"]
    assert ModelCard.from_json(card.to_json()).to_json() == card.to_json()  # round trip

    # The graphs chain as the card says: a batch of two songs, one window a call.
    cnn = model_from_checkpoint(load_checkpoint(cnn_checkpoint)).eval()
    aggregator, _ = load_aggregator(lstm_run)
    embed = open_session(tmp_path / section.embedding_graph, threads=1)
    step = open_session(tmp_path / section.graph, threads=1)
    songs = np.random.default_rng(0).standard_normal((2, 3, cnn.window_samples)).astype("float32")
    state = section.initial_state(2)
    for t in range(3):
        _, embedding = embed.run(
            [GRAPH_NAMES.scores, GRAPH_NAMES.embedding], {GRAPH_NAMES.waveform: songs[:, t] * 0.1}
        )
        scores, *state = step.run(
            section.outputs, dict(zip(section.inputs, [embedding, *state], strict=True))
        )
    with torch.no_grad():
        sequences = cnn.embed(torch.from_numpy(songs.reshape(6, -1) * 0.1)).reshape(2, 3, -1)
        expected = aggregator(sequences, torch.tensor([3, 3])).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_a_card_without_aggregator_writes_back_as_it_was(cnn_checkpoint, tmp_path):
    from tagd.card import ModelCard

    text = json.dumps(load_checkpoint(cnn_checkpoint)["card"], indent=2)
    assert "aggregator" not in text
    assert ModelCard.from_json(text).to_json() == text


def test_export_refuses_an_aggregator_of_another_cnn(lstm_run, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "export",
            "--model",
            "fcn5",
            "--hparam",
            "width=0.0625",
            "--n-tags",
            str(N_TAGS),
            "--out",
            str(tmp_path / "f.onnx"),
            "--aggregator",
            str(lstm_run),
        ],
    )
    assert result.exit_code == 1 and "aggregates samplecnn embeddings" in result.output


# -- tagd tag --aggregate and per-stream chains ----------------------------------------------------
@pytest.fixture(scope="module")
def exported(cnn_checkpoint, lstm_run, tmp_path_factory):
    from trainer.export import export_onnx

    saved = load_checkpoint(cnn_checkpoint)
    out = tmp_path_factory.mktemp("exported") / "tiny.onnx"
    export_onnx(
        model_from_checkpoint(saved),
        out,
        card=card_from_checkpoint(saved),
        aggregator=lstm_run,
    )
    return out


def test_tag_aggregate_gives_the_song_scores_of_the_aggregator(
    exported, cnn_checkpoint, lstm_run, prepared, tmp_path
):
    import soundfile

    from tagd.cli import main as tagd_cli

    clip = prepared.indices("test")[0]
    samples = to_float(prepared.audio(clip))
    song = tmp_path / "song.wav"
    soundfile.write(song, samples, TINY_RATE, subtype="FLOAT")
    result = CliRunner().invoke(
        tagd_cli, ["tag", "--engine", str(exported), "--aggregate", "--json", str(song)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)

    cnn = model_from_checkpoint(load_checkpoint(cnn_checkpoint)).eval()
    aggregator, payload = load_aggregator(lstm_run)
    windows = clip_window_stack(cnn, samples, payload["hop_samples"])
    assert record["windows"] == len(windows) > 1 and record["aggregator"] == "lstm"
    with torch.no_grad():
        embeddings = cnn.embed(torch.from_numpy(windows))
        song_scores = aggregator(embeddings[None], torch.tensor([len(windows)]))[0].numpy()
        average = cnn(torch.from_numpy(windows)).mean(dim=0).numpy()
    tags = load_checkpoint(cnn_checkpoint)["tags"]
    got = np.array([record["scores"][t] for t in tags])
    np.testing.assert_allclose(got, song_scores, atol=1e-4)
    np.testing.assert_allclose([record["average"][t] for t in tags], average, atol=1e-4)

    human = CliRunner().invoke(
        tagd_cli, ["tag", "--engine", str(exported), "--aggregate", str(song)]
    )
    assert human.exit_code == 0 and "aggregator lstm" in human.output


def test_tag_aggregate_without_an_aggregator_is_a_one_line_error(cnn_checkpoint, tmp_path):
    import soundfile

    from tagd.cli import main as tagd_cli
    from trainer.export import export_onnx

    saved = load_checkpoint(cnn_checkpoint)
    plain = tmp_path / "plain.onnx"
    export_onnx(model_from_checkpoint(saved), plain, card=card_from_checkpoint(saved), check=False)
    song = tmp_path / "song.wav"
    soundfile.write(song, np.zeros(TINY_RATE * 2, dtype=np.float32), TINY_RATE)
    result = CliRunner().invoke(tagd_cli, ["tag", "--engine", str(plain), "--aggregate", str(song)])
    assert result.exit_code == 1 and "--aggregator" in result.output
    result = CliRunner().invoke(
        tagd_cli, ["tag", "--engine", str(plain), "--aggregate", "--timeline", str(song)]
    )
    assert result.exit_code == 2


def test_chains_restart_on_a_break_and_equal_one_pass(exported):
    """Windows of two streams interleaved, one with a gap and one with a new epoch: each
    stream's song scores equal one pass over the windows since its last break."""
    from tagd.aggregate import AggregatorGraphs, SongChains
    from tagd.card import read_card

    card = read_card(exported)
    graphs = AggregatorGraphs(exported, card, threads=1)
    hop = graphs.hop_samples
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 8, card.aggregator.embedding_size)).astype("float32")

    def one_pass(rows: np.ndarray) -> np.ndarray:
        state = card.aggregator.initial_state(1)
        for row in rows:
            scores, state = graphs.step(row[None], state)
        return scores[0]

    chains = SongChains(graphs, hop)
    # stream a: windows 0..3, a gap (window 4 lost), 5..7; stream b: 0..7 with an epoch
    # change (a restarted source) before window 6
    got = {}
    for t in range(8):
        if t != 4:
            got["a", t] = chains.advance("a", 0, t * hop, embeddings[0, t])
        got["b", t] = chains.advance("b", 0 if t < 6 else 1, t * hop, embeddings[1, t])
    np.testing.assert_allclose(got["a", 3][0], one_pass(embeddings[0, :4]), atol=1e-6)
    np.testing.assert_allclose(got["a", 7][0], one_pass(embeddings[0, 5:8]), atol=1e-6)
    np.testing.assert_allclose(got["b", 5][0], one_pass(embeddings[1, :6]), atol=1e-6)
    np.testing.assert_allclose(got["b", 7][0], one_pass(embeddings[1, 6:8]), atol=1e-6)
    assert (got["a", 7][1], got["b", 7][1], chains.restarts) == (3, 2, 2)
    chains.forget("a")
    assert chains.advance("a", 0, 8 * hop, embeddings[0, 7])[1] == 1


def test_over_full_windows_one_cnn_scores_and_embeds_each_window(exported, monkeypatch):
    """aggregate = true over full windows: the embedding graph's scores are the model's,
    so the model's own graph does not run; the windows count as full updates and the
    songs are one pass's."""
    from tagd.aggregate import AggregatingScorer, AggregatorGraphs
    from tagd.card import read_card
    from tagd.engines import load_engine
    from tagd.scoring import FullWindows, WindowAt

    card = read_card(exported)
    engine, reference = load_engine(exported), load_engine(exported)
    model_runs = []
    run = engine.run
    monkeypatch.setattr(engine, "run", lambda batch: model_runs.append(len(batch)) or run(batch))
    counted = collections.Counter()
    full = FullWindows([engine], card.hop_samples, lambda mode, n: counted.update({mode: n}))
    graphs = AggregatorGraphs(exported, card, threads=1)
    scorer = AggregatingScorer(full, graphs)
    scorer.warmup((1, 2))
    hop = graphs.hop_samples
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal(card.window_samples + 3 * hop)).astype("float32")
    windows = np.stack([audio[k * hop : k * hop + card.window_samples] for k in range(4)])
    keys = [WindowAt("s", 0, k * hop) for k in range(4)]
    scores = np.concatenate([scorer.run(keys[:2], windows[:2]), scorer.run(keys[2:], windows[2:])])

    np.testing.assert_allclose(scores, reference.run(windows), atol=1e-5)
    assert model_runs == [] and counted == {"full": 4}
    state = card.aggregator.initial_state(1)
    for window in windows:
        _, embedding = graphs.embed(window[None])
        expected, state = graphs.step(embedding, state)
    song = scorer.song(keys[-1])
    assert song["windows"] == 4 and "embedding graph's scores" in scorer.describe()
    np.testing.assert_allclose([song["scores"][t] for t in card.tags], expected[0], atol=2e-6)


# -- tagd serve with aggregate = true --------------------------------------------------------------
def test_serve_publishes_each_streams_song_whatever_the_message_size(exported):
    from audio_fixtures import make_music
    from support import (
        Listener,
        make_config,
        reference_windows,
        s16le,
        send_chunked,
        serving,
        socket_port,
    )

    from tagd.aggregate import AggregatorGraphs
    from tagd.card import read_card
    from tagd.stream import StreamGeometry

    card = read_card(exported)
    rate = card.sample_rate
    stereo = np.stack([make_music(6.0, rate, seed=5), make_music(6.0, rate, seed=6)], axis=1)
    payload = s16le(stereo)
    sizes = {"c4608": 4608, "c1684": 1684, "c65536": 65536}
    with socket_port() as port:
        config = make_config(
            exported, [f"zmq+pull://127.0.0.1:{port}"], batching={"max_pending_per_stream": 1000}
        )
    config.hop_seconds = None  # the card's: the hop the aggregator was trained at
    config.aggregate = True
    with serving(config) as server:
        listener = Listener(server, "tags.")
        send_chunked(
            f"tcp://127.0.0.1:{port}", {name: (payload, size) for name, size in sizes.items()}, rate
        )
        listener.collect(until_quiet=1.0)
        listener.close()

    # one pass over the windows the stream makes of the whole payload
    geometry = StreamGeometry(rate, card.window_samples, card.aggregator.hop_samples)
    windows = reference_windows(payload, rate, 2, geometry)
    graphs = AggregatorGraphs(exported, card, threads=1)
    state = card.aggregator.initial_state(1)
    for window in windows:
        _, embedding = graphs.embed(window.samples[None])
        expected, state = graphs.step(embedding, state)
    assert len(windows) >= 5
    for name in sizes:
        messages = sorted(listener.on(f"tags.{name}"), key=lambda m: m["seq"])
        assert [m["song"]["windows"] for m in messages] == list(range(1, len(windows) + 1))
        assert {m["song"]["aggregator"] for m in messages} == {"lstm"}
        last = messages[-1]["song"]["scores"]
        np.testing.assert_allclose([last[t] for t in card.tags], expected[0], atol=2e-6)


def test_serve_refuses_aggregate_at_another_hop(exported):
    from support import make_config, socket_port

    from tagd.server import Server, StartupError

    with socket_port() as port:
        config = make_config(exported, [f"zmq+pull://127.0.0.1:{port}"])
    config.aggregate = True  # make_config's hop 0.25 s: not the aggregator's
    with pytest.raises(StartupError, match="trained on windows 0.893 s apart"):
        Server(config).start()


def test_check_config_says_why_aggregate_cannot_run(exported, cnn_checkpoint, tmp_path):
    from support import make_config

    from tagd.server import StartupError, check_startup
    from trainer.export import export_onnx

    config = make_config(exported, [])
    config.aggregate = True
    with pytest.raises(StartupError, match="set hop_seconds to 0.893"):
        check_startup(config)
    config.hop_seconds = None
    assert check_startup(config).aggregator is not None
    saved = load_checkpoint(cnn_checkpoint)
    plain = tmp_path / "plain.onnx"
    export_onnx(model_from_checkpoint(saved), plain, card=card_from_checkpoint(saved), check=False)
    config.engine = plain
    with pytest.raises(StartupError, match="card has no aggregator"):
        check_startup(config)


def test_a_malformed_aggregator_section_is_a_card_error(exported):
    from tagd.card import CardError, ModelCard, read_card

    data = read_card(exported).to_dict()
    for broken, message in (
        ({**data["aggregator"], "state": "h0"}, "aggregator.state is a list"),
        ({**data["aggregator"], "colour": 1}, "unknown aggregator keys: colour"),
        ({k: v for k, v in data["aggregator"].items() if k != "graph"}, "aggregator lacks: graph"),
    ):
        with pytest.raises(CardError, match=message):
            ModelCard.from_dict({**data, "aggregator": broken})


def test_bench_two_part_songs_join_clips_and_their_labels(prepared, tmp_path):
    """bench/aggregate.py --two-part: each song is two clips of one split back to back;
    a tag is present where either part has it, unknown where neither has it and one
    does not know it."""
    bench = load_bench("aggregate")

    songs = PreparedData(bench.two_part_songs(prepared.root, tmp_path / "two", seed=0))
    assert len(songs.clips) == len(prepared.clips) and songs.tags == prepared.tags
    by_id = {clip.clip_id: i for i, clip in enumerate(prepared.clips)}
    for i, song in enumerate(songs.clips):
        first, second = (by_id[part] for part in song.clip_id.split("+"))
        assert first != second
        assert song.split == prepared.clips[first].split == prepared.clips[second].split
        joined = np.concatenate([prepared.audio(first), prepared.audio(second)])
        np.testing.assert_array_equal(songs.audio(i), joined)
        parts = np.stack([prepared.labels(first), prepared.labels(second)])
        expected = np.where(
            (parts == 1).any(axis=0), 1.0, np.where(np.isnan(parts).any(axis=0), np.nan, 0.0)
        )
        np.testing.assert_array_equal(songs.labels(i), expected)
