"""TensorRT compile: fp16 graph conversion and plan cards on CPU; plans built and run on a GPU.

The TensorRT tests skip without the tensorrt package or without a usable GPU; the
float16 ONNX conversion that TensorRT 11 builds from runs anywhere, in ONNX Runtime, for
the main graph and for the incremental prime and step graphs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tagd.card import read_card, sidecar_path
from tagd.engines import EngineError
from trainer.compile import (
    CompileError,
    compile_engine,
    convert_onnx_fp16,
    in_fp32_scope,
    incremental_builds,
    plan_card,
)
from trainer.export import run_onnxruntime

FP16_TOLERANCE = 2e-2  # max abs difference of sigmoid scores, float16 graph vs float32


def windows_of_music(card, music, count: int, seed: int = 0) -> np.ndarray:
    audio = music(count * card.window_samples / card.sample_rate + 0.1, card.sample_rate, seed)
    return audio[: count * card.window_samples].reshape(count, card.window_samples)


def windows_a_hop_apart(card, music, hops: int, batch: int = 2) -> list[np.ndarray]:
    """``hops + 1`` batches ``[batch, window]`` of music, each one hop after the last."""
    length = card.window_samples + hops * card.hop_samples
    streams = np.stack(
        [music(length / card.sample_rate + 0.1, card.sample_rate, seed) for seed in range(batch)]
    )
    starts = [k * card.hop_samples for k in range(hops + 1)]
    return [np.ascontiguousarray(streams[:, at : at + card.window_samples]) for at in starts]


def float16_round_trips(proto: onnx.ModelProto) -> list[str]:
    """Casts to float32 of a tensor just cast to float16: precision lost between two
    float32 nodes."""
    to_half = {
        n.output[0]
        for n in proto.graph.node
        if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
    }
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "Cast"
        and n.attribute[0].i == onnx.TensorProto.FLOAT
        and n.input[0] in to_half
    ]


def incremental_scores(prime_path, step_path, windows: list[np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's scores of windows a hop apart: the first primed, the others stepped."""
    import onnxruntime as ort

    prime, step = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for p in (prime_path, step_path)
    )
    state_inputs = [i.name for i in step.get_inputs()][1:]
    scores, *states = prime.run(None, {"waveform": windows[0]})
    chain = [scores]
    for window in windows[1:]:
        for state in states:
            assert state.dtype == np.float32
        scores, *states = step.run(
            None, {"waveform": window, **dict(zip(state_inputs, states, strict=True))}
        )
        chain.append(scores)
    return chain


# -- float16 ONNX graph, no TensorRT needed ------------------------------------------------


@pytest.mark.parametrize("arch", ["fcn4", "samplecnn-rese-ml"])
def test_fp16_graph_keeps_float32_io_and_front_end(arch, export_model, music, tmp_path):
    source = export_model(arch)
    half = convert_onnx_fp16(source, tmp_path / "half.onnx")
    proto = onnx.load(str(half))
    for value in (*proto.graph.input, *proto.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.name: init.data_type for init in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes.values()
    if arch.startswith("fcn"):
        # the power spectrum would overflow float16: its kernels stay float32
        assert dtypes["frontend.dft"] == onnx.TensorProto.FLOAT
        assert dtypes["frontend.mel"] == onnx.TensorProto.FLOAT
        assert any(in_fp32_scope(node.name) for node in proto.graph.node)
        assert float16_round_trips(proto) == []  # the DFT's output is not rounded

    card = read_card(half)
    assert card == read_card(source)  # the card travels unchanged
    batch = windows_of_music(card, music, 2)
    full, reduced = run_onnxruntime(source, batch), run_onnxruntime(half, batch)
    assert reduced.dtype == np.float32 and reduced.shape == full.shape
    np.testing.assert_allclose(reduced, full, atol=2e-2)


def test_fp16_graph_survives_a_full_scale_dc_window(export_model, tmp_path):
    # 256² = 65,536 in the DC bin: above float16's maximum of 65,504
    source = export_model("fcn4")
    half = convert_onnx_fp16(source, tmp_path / "half.onnx")
    dc = np.ones((1, read_card(source).window_samples), dtype=np.float32)
    assert np.isfinite(run_onnxruntime(half, dc)).all()


def test_fp32_scopes_cover_each_call_of_the_front_end():
    assert in_fp32_scope("/frontend/Conv") and in_fp32_scope("/frontend_1/Conv")
    assert in_fp32_scope("/input_bn_2/BatchNormalization")
    assert not in_fp32_scope("/blocks.0/conv/Conv") and not in_fp32_scope("/head/Gemm")


def test_fp16_step_graph_follows_the_float32_one_over_hops(export_model, music, tmp_path):
    source = export_model("fcn4")
    card = read_card(source)
    (prime, _), (step, _) = incremental_builds(card, source, tmp_path / "fcn4.plan")
    halves = [convert_onnx_fp16(graph, tmp_path / f"half.{graph.name}") for graph in (prime, step)]
    for half in halves:
        proto = onnx.load(str(half))
        for value in (*proto.graph.input, *proto.graph.output):  # the states too
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        # the waveform reaches the front end, sliced and padded, in float32
        to_half = [
            n
            for n in proto.graph.node
            if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16
        ]
        assert not [n for n in to_half if n.input[0] == "waveform"]
        assert float16_round_trips(proto) == []
    windows = windows_a_hop_apart(card, music, hops=2)
    full, reduced = incremental_scores(prime, step, windows), incremental_scores(*halves, windows)
    for exact, half in zip(full, reduced, strict=True):
        assert half.dtype == np.float32
        np.testing.assert_allclose(half, exact, atol=FP16_TOLERANCE)


def test_fp16_step_graph_survives_a_full_scale_dc_window(export_model, tmp_path):
    # the step graph computes the frames at both edges: each call of the front end is
    # float32, or the DC bin's 65,536 overflows
    source = export_model("fcn4")
    card = read_card(source)
    (prime, _), (step, _) = incremental_builds(card, source, tmp_path / "fcn4.plan")
    halves = [convert_onnx_fp16(graph, tmp_path / f"half.{graph.name}") for graph in (prime, step)]
    dc = [np.ones((1, card.window_samples), dtype=np.float32)] * 2
    for scores in incremental_scores(*halves, dc):
        assert np.isfinite(scores).all()


def test_the_plan_card_names_the_incremental_plans(export_model, tmp_path):
    card = read_card(export_model("fcn4"))
    hop = card.hop_samples
    profile = {"input": "waveform", "min_batch": 1, "opt_batch": 2, "max_batch": 4}
    planned = plan_card(card, "fp16", profile, "10.3", False, tmp_path / "deploy" / "fcn4.plan")
    (graph,) = planned.incremental.graphs
    assert (graph.prime, graph.step) == (f"fcn4.{hop}.prime.plan", f"fcn4.{hop}.step.plan")
    assert graph.state == card.incremental.graphs[0].state
    assert card.incremental.graphs[0].step.endswith(".step.onnx")  # the ONNX card unchanged
    assert planned.export["tensorrt"]["profile"] == profile


def test_only_fcns_get_incremental_plans(export_model, tmp_path):
    source = export_model("fcn4")
    builds = incremental_builds(read_card(source), source, tmp_path / "fcn4.plan")
    assert [(s.parent, t.parent) for s, t in builds] == [(source.parent, tmp_path)] * 2
    assert all(s.is_file() for s, _ in builds)
    sample = export_model("samplecnn")
    assert incremental_builds(read_card(sample), sample, tmp_path / "s.plan") == []


# -- TensorRT, on a GPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    trt = pytest.importorskip("tensorrt")
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # TensorRT raises plain errors without a CUDA device
        pytest.skip(f"TensorRT cannot start a builder (no GPU?): {exc}")
    if builder is None:
        pytest.skip("TensorRT cannot start a builder (no GPU?)")
    return trt


@pytest.mark.parametrize(
    "arch,precision,tolerance",
    [
        ("fcn4", "fp32", 1e-4),
        ("samplecnn", "fp32", 1e-4),
        ("fcn4", "fp16", 3e-2),
        ("samplecnn", "fp16", 3e-2),
    ],
)
def test_plan_runs_in_tagd_and_matches_onnxruntime(
    trt, arch, precision, tolerance, export_model, music, tmp_path
):
    from tagd.engines import load_engine

    source = export_model(arch)
    cache = tmp_path / "timing.cache"
    plan = compile_engine(
        source,
        tmp_path / f"{arch}.plan",
        precision=precision,
        min_batch=1,
        opt_batch=2,
        max_batch=4,
        timing_cache=cache,
        workspace_gb=1.0,
    )
    assert plan.stat().st_size > 0 and cache.stat().st_size > 0

    side = json.loads(sidecar_path(plan).read_text())
    built = side["export"]["tensorrt"]
    assert built["precision"] == precision and built["version"] == trt.__version__
    assert built["profile"] == {"input": "waveform", "min_batch": 1, "opt_batch": 2, "max_batch": 4}

    card = read_card(source)
    engine = load_engine(plan)
    try:
        assert engine.max_batch == 4 and engine.card.tags == card.tags
        for size in (1, 3):
            batch = windows_of_music(card, music, size, seed=size)
            np.testing.assert_allclose(
                engine.run(batch), run_onnxruntime(source, batch), atol=tolerance
            )
    finally:
        engine.close()


def test_timing_cache_is_reused(trt, export_model, tmp_path):
    source = export_model("samplecnn")
    cache = tmp_path / "timing.cache"
    compile_engine(source, tmp_path / "a.plan", max_batch=2, opt_batch=2, timing_cache=cache)
    first = cache.read_bytes()
    compile_engine(source, tmp_path / "b.plan", max_batch=2, opt_batch=2, timing_cache=cache)
    assert len(cache.read_bytes()) >= len(first) > 0


def test_bad_profile_is_refused_before_building(trt, export_model, tmp_path):
    with pytest.raises(ValueError, match="min_batch"):
        compile_engine(export_model("samplecnn"), tmp_path / "x.plan", min_batch=4, opt_batch=2)


def test_missing_tensorrt_says_what_to_install(export_model, tmp_path, monkeypatch):
    import sys

    from trainer.compile import CompileError

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import now fails, as uninstalled
    with pytest.raises(CompileError, match=r"pip install 'tagd\[tensorrt\]'"):
        compile_engine(export_model("samplecnn"), tmp_path / "x.plan")


@pytest.fixture(scope="module")
def fcn4_plans(trt, export_model, tmp_path_factory):
    """precision → the main plan of a tiny FCN-4, with its incremental plans beside it."""
    folder = tmp_path_factory.mktemp("plans")
    built = {}

    def plans(precision: str):
        if precision not in built:
            built[precision] = compile_engine(
                export_model("fcn4"),
                folder / precision / "fcn4.plan",
                precision=precision,
                min_batch=1,
                opt_batch=2,
                max_batch=4,
                workspace_gb=1.0,
            )
        return built[precision]

    return plans


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 3e-2)])
def test_incremental_plans_give_the_full_windows_scores(
    fcn4_plans, precision, tolerance, export_model, music
):
    from tagd.engines import load_engine

    plan = fcn4_plans(precision)
    card = read_card(plan)
    hop = card.hop_samples
    for role in ("prime", "step"):
        assert (plan.parent / f"fcn4.{hop}.{role}.plan").stat().st_size > 0
    assert card.incremental_graph(hop).step == f"fcn4.{hop}.step.plan"

    engine = load_engine(plan)
    try:
        incremental = engine.incremental(hop)
        windows = windows_a_hop_apart(card, music, hops=3)
        scores, states = incremental.prime(windows[0])
        chain = [scores]
        for window in windows[1:]:
            assert [s.shape[1:] for s in states] == incremental.state_shapes
            scores, states = incremental.step(window, states)
            chain.append(scores)
        source = export_model("fcn4")
        for window, got in zip(windows, chain, strict=True):
            np.testing.assert_allclose(got, run_onnxruntime(source, window), atol=tolerance)
            np.testing.assert_allclose(got, engine.run(window), atol=tolerance)
        with pytest.raises(EngineError, match="exceeds"):
            incremental.prime(np.zeros((5, card.window_samples), dtype=np.float32))
    finally:
        engine.close()


def test_a_missing_step_plan_is_named(fcn4_plans, tmp_path):
    import shutil

    from tagd.engines import load_engine

    plan = fcn4_plans("fp32")
    hop = read_card(plan).hop_samples
    for name in (plan.name, sidecar_path(plan).name, f"fcn4.{hop}.prime.plan"):
        shutil.copy(plan.parent / name, tmp_path / name)
    engine = load_engine(tmp_path / plan.name)
    try:
        with pytest.raises(EngineError, match=rf"fcn4\.{hop}\.step\.plan.*not beside it"):
            engine.incremental(hop)
        assert engine.incremental(hop + 1) is None  # no graphs for that hop: full windows
    finally:
        engine.close()


def test_a_missing_incremental_graph_is_refused_before_building(trt, export_model, tmp_path):
    import shutil

    source = export_model("fcn4")
    shutil.copy(source, tmp_path / source.name)  # without its prime and step graphs
    with pytest.raises(CompileError, match="prime.onnx, which is not beside it"):
        compile_engine(tmp_path / source.name, tmp_path / "fcn4.plan")
