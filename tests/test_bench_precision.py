"""bench/precision.py's rule: int8 is kept only at ≥ 1.4× float32's updates per second
and a macro ROC-AUC within 0.005, per graph and thread count."""

from __future__ import annotations

import pytest
from support import load_bench


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime.quantization")
    return load_bench("precision")


def speed(full_int8: float, step_int8: float) -> dict:
    """Seconds per update: float32 takes 1 s everywhere."""
    medians = {
        "full": {"onnxruntime float32": 1.0, "onnxruntime int8": full_int8},
        "step": {"onnxruntime float32": 1.0, "onnxruntime int8": step_int8},
    }
    return {"1 thread": medians, "default threads": medians}


def test_int8_is_kept_where_it_is_fast_enough_and_as_accurate(bench):
    close = {"float32": 0.8184, "int8": 0.8171}
    found = {
        (g, t): (round(r, 2), kept) for g, t, r, kept in bench.verdicts(speed(0.5, 0.8), close)
    }
    assert found[("full", "1 thread")] == (2.0, True)
    assert found[("step", "default threads")] == (1.25, False)  # under 1.4×


def test_nothing_is_kept_past_the_accuracy_rule_or_without_it(bench):
    fast = speed(0.25, 0.25)
    worse = {"float32": 0.8184, "int8": 0.8120}  # 0.0064 below
    assert not any(kept for *_, kept in bench.verdicts(fast, worse))
    assert not any(kept for *_, kept in bench.verdicts(fast, None))
    assert all(kept for *_, kept in bench.verdicts(fast, {"float32": 0.9, "int8": 0.904}))
