"""tagd-train quantize: an int8 QDQ model and its incremental graphs, calibrated on prepared
data, that the daemon loads, serves as int8 and scores close to float32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from support import SHORT_FCN, make_config, metric_sample, scrape, serving, socket_port

from tagd.card import INT8, read_card
from tagd.engines import load_engine
from tagd.engines.onnx import open_session
from trainer.data.dataset import DataError, PreparedData

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from trainer.cli import main  # noqa: E402
from trainer.data import synthetic  # noqa: E402
from trainer.data.mtt import load_mtt  # noqa: E402
from trainer.data.prepare import prepare  # noqa: E402
from trainer.export import export_onnx, probe_audio  # noqa: E402
from trainer.models import create_model  # noqa: E402
from trainer.quantize import (  # noqa: E402
    CHAIN_TOLERANCE,
    FLOAT_TOLERANCE,
    QuantizeError,
    float_nodes,
    quantize_model,
)

RATE = 12_000
HOP = 16 * 256  # every block of the 2 s FCN-4 reusable


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("fcn4", 6, width=0.125, **SHORT_FCN)
    path = tmp_path_factory.mktemp("float") / "short.onnx"
    export_onnx(model, path, incremental_hops=(HOP,))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    annotations = synthetic.write_mtt(root / "mtt", 40, seed=3, seconds=3.0)
    prepare(load_mtt(annotations, n_tags=6), root / "prepared", RATE, workers=1, progress=False)
    return PreparedData(root / "prepared")


@pytest.fixture(scope="module")
def int8_model(float_model, prepared):
    return quantize_model(float_model, prepared, windows=6, progress=False)


def test_the_int8_model_keeps_the_front_end_float_and_scores_near_float32(float_model, int8_model):
    assert int8_model.path == float_model.with_name("short.int8.onnx")
    proto = onnx.load(str(int8_model.path))
    ops = [node.op_type for node in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the STFT's and the first layer's convolutions take float weights; every later one
    # takes its weights through a DequantizeLinear of int8
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    float_convs = [n for n in convs if n.input[1] not in dequantized]
    assert len(float_convs) == 2 and len(convs) == 5  # STFT, 4 blocks
    first_pool = next(n for n in proto.graph.node if n.op_type == "MaxPool")
    assert first_pool.input[0] not in dequantized  # the first block's pool is float too
    assert float_nodes(onnx.load(str(float_model)))  # found by structure in the float graph

    card = read_card(int8_model.path)
    assert card.precision == INT8 and read_card(float_model).precision == "float32"
    assert card.export["quantization"]["calibration"]["windows"] == 6
    # windows neither calibration nor the parity check saw
    audio = probe_audio(4, card.window_samples, RATE, seed=7)
    expected, actual = (
        open_session(p, threads=1).run(["scores"], {"waveform": audio})[0]
        for p in (float_model, int8_model.path)
    )
    assert 0 < np.abs(actual - expected).max() <= FLOAT_TOLERANCE
    assert 0 < int8_model.max_abs_diff <= FLOAT_TOLERANCE


def test_the_int8_chain_follows_int8_full_windows_in_the_engine(int8_model):
    engine = load_engine(int8_model.path, intra_op_threads=1)
    assert "int8" in engine.describe()
    graph = engine.card.incremental_graph(HOP)
    assert graph.step == "short.int8.4096.step.onnx" and graph.max_abs_diff <= CHAIN_TOLERANCE
    graphs = engine.incremental(HOP)
    assert graphs is not None
    size = engine.card.window_samples
    audio = probe_audio(2, size + 6 * HOP, RATE, seed=9)
    states: list[np.ndarray] = []
    worst = 0.0
    for k in range(7):
        window = np.ascontiguousarray(audio[:, k * HOP : k * HOP + size])
        scores, states = graphs.prime(window) if k == 0 else graphs.step(window, states)
        worst = max(worst, float(np.abs(scores - engine.run(window)).max()))
    assert worst <= CHAIN_TOLERANCE


def test_serve_reports_the_precision(int8_model, float_model):
    for path, precision in ((int8_model.path, "int8"), (float_model, "float32")):
        with socket_port() as port:
            config = make_config(path, [f"zmq+pull://127.0.0.1:{port}"])
        with serving(config) as server:
            _, metrics = scrape(server)
        assert metric_sample(metrics, "tagd_engine_info", precision=precision) == 1


def test_the_command_writes_where_asked_and_refuses_what_it_cannot_use(
    float_model, int8_model, prepared, tmp_path
):
    out = tmp_path / "mine.onnx"
    args = ["quantize", str(float_model), "--data", str(prepared.root), "--windows", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: int8" in result.output
    assert (tmp_path / "mine.4096.step.onnx").is_file()
    assert read_card(out).incremental_graph(HOP).prime == "mine.4096.prime.onnx"

    again = CliRunner().invoke(
        main, ["quantize", str(int8_model.path), "--data", str(prepared.root)]
    )
    assert again.exit_code == 1 and "int8 already" in again.output
    with pytest.raises(QuantizeError, match="int8 already"):
        quantize_model(int8_model.path, prepared)
    with pytest.raises(QuantizeError, match="would overwrite the float32 model"):
        quantize_model(float_model, prepared, float_model)
    assert read_card(float_model).precision == "float32"


def test_a_model_past_the_tolerance_is_refused_and_removed(
    float_model, prepared, tmp_path, monkeypatch
):
    import trainer.quantize

    monkeypatch.setattr(trainer.quantize, "FLOAT_TOLERANCE", 1e-9)
    with pytest.raises(QuantizeError, match="int8 scores differ from float32"):
        quantize_model(float_model, prepared, tmp_path / "x.onnx", windows=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_symmetric_activations_have_int8_zero_points_of_zero(float_model, prepared, tmp_path):
    result = quantize_model(
        float_model, prepared, tmp_path / "sym.onnx", windows=2, symmetric=True, progress=False
    )
    proto = onnx.load(str(result.path))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [constants[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert result.card.export["quantization"]["activations"] == "int8 symmetric"
    assert result.max_abs_diff <= FLOAT_TOLERANCE


def test_data_at_another_rate_is_refused_before_any_work(float_model, tmp_path):
    annotations = synthetic.write_mtt(tmp_path / "mtt", 4, seed=1, seconds=2.0)
    prepare(load_mtt(annotations, n_tags=6), tmp_path / "p", 16_000, workers=1, progress=False)
    with pytest.raises(DataError, match="16000 Hz"):
        quantize_model(float_model, PreparedData(tmp_path / "p"), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
