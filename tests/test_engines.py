"""Engines on real exported models: ONNX Runtime and torch agree, cards are enforced."""

import numpy as np
import onnx
import pytest

from tagd.card import CARD_METADATA_KEY, CardError, ModelCard
from tagd.engines import EngineError, load_engine


@pytest.mark.parametrize("arch", ["fcn4", "samplecnn"])
def test_onnx_engine_scores_a_batch(export_model, music, arch):
    engine = load_engine(export_model(arch))
    card = engine.card
    assert engine.backend == "onnxruntime"
    assert card.architecture == arch
    batch = np.stack([music(card.window_seconds, card.sample_rate, seed=s) for s in (1, 2, 3)])
    scores = engine.run(batch)
    assert scores.shape == (3, card.n_tags)
    assert scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    # different audio, different scores; the same audio, the same scores
    assert np.abs(scores[0] - scores[1]).max() > 0, "scores ignore the audio"
    np.testing.assert_array_equal(engine.run(batch[:1])[0], engine.run(batch[:1])[0])


@pytest.mark.parametrize(
    "options, threads, arena, spin, stop_spinning",
    [
        ({}, 0, True, "1", "1"),  # spin during a run only
        ({"intra_op_threads": 1}, 1, True, "1", "1"),
        ({"spinning": "never"}, 0, True, "0", "0"),
        ({"spinning": "always"}, 0, True, "1", "0"),  # ONNX Runtime's own default
        ({"memory_arena": False}, 0, False, "1", "1"),
    ],
    ids=["default", "one-thread", "never-spin", "always-spin", "no-arena"],
)
def test_onnx_session_options_change_how_it_runs_not_what_it_scores(
    export_model, music, options, threads, arena, spin, stop_spinning
):
    path = export_model("samplecnn")
    reference = load_engine(path, spinning="always")
    tuned = load_engine(path, **options)
    applied = tuned._session.get_session_options()
    assert applied.intra_op_num_threads == threads
    assert applied.enable_cpu_mem_arena == arena
    assert applied.get_session_config_entry("session.intra_op.allow_spinning") == spin
    assert applied.get_session_config_entry("session.force_spinning_stop") == stop_spinning
    card = reference.card
    batch = np.stack([music(card.window_seconds, card.sample_rate, seed=s) for s in (1, 2)])
    np.testing.assert_allclose(tuned.run(batch), reference.run(batch), rtol=0, atol=1e-6)


def test_incremental_graphs_open_with_the_engines_session_options(export_model):
    path = export_model("fcn4")  # with its graphs at the card's hop
    engine = load_engine(path, intra_op_threads=1, spinning="never", memory_arena=False)
    incremental = engine.incremental(engine.card.hop_samples)
    for session in (incremental._prime, incremental._step):
        applied = session.get_session_options()
        assert applied.intra_op_num_threads == 1
        assert not applied.enable_cpu_mem_arena
        assert applied.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert session.get_providers() == engine.providers


def test_unknown_spinning_mode_is_refused(export_model):
    with pytest.raises(EngineError, match="spinning='sometimes': use one of while_running"):
        load_engine(export_model("samplecnn"), spinning="sometimes")


def test_serve_config_passes_onnxruntime_options_to_the_engine(export_model, tmp_path):
    from tagd.config import load_config
    from tagd.server import Server

    config = tmp_path / "tagd.toml"
    config.write_text(
        f'engine = "{export_model("samplecnn")}"\n'
        'inputs = ["zmq+pull://127.0.0.1:0"]\n'
        '[metrics]\naddress = "off"\n'
        '[onnxruntime]\nthreads = 1\nspinning = "never"\nmemory_arena = false\n'
    )
    server = Server(load_config(config))
    server._load_engine()
    session_options = server.engine._session.get_session_options()
    assert session_options.intra_op_num_threads == 1
    assert not session_options.enable_cpu_mem_arena
    assert session_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    server.engine.close()
    server._context.term()


def test_wrong_window_length_is_refused(export_model):
    engine = load_engine(export_model("samplecnn"))
    with pytest.raises(EngineError, match=r"expected a batch \[n, 59049\]"):
        engine.run(np.zeros((1, 1000), dtype=np.float32))


def test_a_card_that_disagrees_with_the_graph_is_refused(export_model, tmp_path):
    model = onnx.load(str(export_model("samplecnn")))
    entry = next(p for p in model.metadata_props if p.key == CARD_METADATA_KEY)
    card = ModelCard.from_json(entry.value)
    card.tags = card.tags + ["extra"]
    card.thresholds = card.thresholds + [0.5]
    entry.value = card.to_json()
    path = tmp_path / "lying.onnx"
    onnx.save(model, str(path))
    with pytest.raises(CardError, match=r"outputs 8 scores but the card names 9 tags"):
        load_engine(path)


def test_a_model_without_a_card_is_refused(export_model, tmp_path):
    model = onnx.load(str(export_model("samplecnn")))
    del model.metadata_props[:]
    path = tmp_path / "anonymous.onnx"
    onnx.save(model, str(path))
    with pytest.raises(CardError, match="carries no model card"):
        load_engine(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(
        EngineError, match="unknown model type '.tflite'; known: .engine, .onnx, .plan, .pt"
    ):
        load_engine(tmp_path / "model.tflite")
    with pytest.raises(EngineError, match="not found"):
        load_engine(tmp_path / "nope.onnx")


def test_garbage_onnx_file_is_an_engine_error(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(EngineError, match="ONNX Runtime cannot load it"):
        load_engine(path)


def save_checkpoint_of(model, card, path) -> None:
    """What `tagd-train train` writes, for ``model`` with ``card``."""
    from trainer.checkpoint import save_checkpoint

    save_checkpoint(
        path,
        {
            "card": card.to_dict(),
            "arch": model.arch,
            "hparams": model.hparams,
            "n_tags": model.n_tags,
            "tags": card.tags,
            "state_dict": model.state_dict(),
        },
    )


def test_torch_engine_refuses_what_the_trainer_would_refuse(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # a .pt, but not ours
    with pytest.raises(EngineError, match=r"other.pt: not a tagd checkpoint \(written by"):
        load_engine(tmp_path / "other.pt")
    torch.save({"format": "tagd-checkpoint", "version": 99}, tmp_path / "newer.pt")
    with pytest.raises(EngineError, match="checkpoint version 99 is newer than this tagd"):
        load_engine(tmp_path / "newer.pt")


def test_torch_checkpoint_engine_matches_onnx(tmp_path, music):
    torch = pytest.importorskip("torch")
    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(3)
    model = create_model("samplecnn", 5, width=0.25).eval()
    result = export_onnx(model, tmp_path / "m.onnx", tags=list("abcde"))
    save_checkpoint_of(model, result.card, tmp_path / "m.pt")
    batch = np.stack([music(59049 / 22050, 22050, seed=s) for s in (4, 5)])
    torch_scores = load_engine(tmp_path / "m.pt").run(batch)
    onnx_scores = load_engine(tmp_path / "m.onnx").run(batch)
    np.testing.assert_allclose(torch_scores, onnx_scores, atol=1e-4)


def test_onnxruntime_options_are_ignored_with_a_warning_by_other_engines(tmp_path, caplog):
    pytest.importorskip("torch")
    from tagd.config import load_config
    from tagd.server import Server
    from trainer.export import export_onnx
    from trainer.models import create_model

    model = create_model("samplecnn", 3, width=0.25).eval()
    card = export_onnx(model, tmp_path / "m.onnx", tags=list("abc")).card
    save_checkpoint_of(model, card, tmp_path / "m.pt")
    config = tmp_path / "tagd.toml"
    config.write_text(
        f'engine = "{tmp_path / "m.pt"}"\ninputs = ["zmq+pull://127.0.0.1:0"]\n'
        '[metrics]\naddress = "off"\n[onnxruntime]\nspinning = "never"\n'
    )
    server = Server(load_config(config))
    with caplog.at_level("WARNING", logger="tagd.server"):
        server._load_engine()
    assert server.engine.backend == "torch"
    assert "[onnxruntime] applies to .onnx models only; m.pt ignores it" in caplog.text
    server.engine.close()
    server._context.term()


def test_tensorrt_needs_its_sdk_or_says_which_extra(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        plan = tmp_path / "m.plan"
        plan.write_bytes(b"x")
        with pytest.raises(EngineError, match=r"pip install 'tagd\[tensorrt\]'"):
            load_engine(plan)
    else:
        pytest.skip("tensorrt is installed; tests/test_compile_tensorrt.py covers it")


def test_each_backend_declares_where_it_runs_and_its_default_batch(short_fcn4):
    engine = load_engine(short_fcn4)
    if engine.providers == ["CPUExecutionProvider"]:
        assert not engine.on_accelerator and engine.default_max_batch == 1
    else:
        assert engine.on_accelerator and engine.default_max_batch == 8
    engine.close()


def test_backend_options_come_from_the_section_each_backend_names():
    from tagd.engines import option_sections

    assert option_sections() == {"onnxruntime": [".onnx"]}


def test_check_config_says_a_checkpoint_runs_full_windows_though_its_card_names_graphs(tmp_path):
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner
    from support import SHORT_FCN

    from tagd.cli import main
    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(0)
    model = create_model("fcn4", 8, width=0.125, sample_rate=12000, **SHORT_FCN).eval()
    hop = 16 * 256  # 16 frames: every block of the 2 s FCN-4 reusable (as test_incremental)
    tags = [f"t{i}" for i in range(8)]
    result = export_onnx(model, tmp_path / "m.onnx", tags=tags, incremental_hops=(hop,))
    assert result.card.incremental_graph(hop) is not None
    save_checkpoint_of(model, result.card, tmp_path / "m.pt")  # the same card, graphs named

    def mode(model_file):
        args = ["serve", "--engine", str(model_file), "--hop", f"{hop / 12000}"]
        args += ["--input", "zmq+pull://127.0.0.1:5571"]
        checked = CliRunner().invoke(main, [*args, "--check-config"])
        assert checked.exit_code == 0, checked.output
        return checked.output.split("), ")[0].rsplit(", ", 1)[1]

    assert mode(tmp_path / "m.onnx") == "incremental"
    assert mode(tmp_path / "m.pt") == "full windows"  # the PyTorch engine has no graphs to run
