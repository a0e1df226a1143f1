"""TensorRT compile: fp16 graph conversion on CPU; plans built and run on a GPU.

The TensorRT tests skip without the tensorrt package or without a usable GPU; the
float16 ONNX conversion that TensorRT 11 builds from runs anywhere, in ONNX Runtime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tagd.card import read_card, sidecar_path
from trainer.compile import FP32_SCOPES, compile_engine, convert_onnx_fp16
from trainer.export import run_onnxruntime


def windows_of_music(card, music, count: int, seed: int = 0) -> np.ndarray:
    audio = music(count * card.window_samples / card.sample_rate + 0.1, card.sample_rate, seed)
    return audio[: count * card.window_samples].reshape(count, card.window_samples)


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
        assert any(node.name.startswith(FP32_SCOPES) for node in proto.graph.node)

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
        source, tmp_path / f"{arch}.plan", precision=precision, min_batch=1, opt_batch=2,
        max_batch=4, timing_cache=cache, workspace_gb=1.0,
    )  # fmt: skip
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
