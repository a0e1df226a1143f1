"""bench/incremental.py's search for the largest N of streams a mode sustains.

The benchmark's runs take a minute each, so the search must land on the threshold from
either side in a few of them; here a threshold stands in for the daemon.
"""

from __future__ import annotations

import pytest
from support import load_bench


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    return load_bench("incremental")


def search(bench, start: int, threshold: int, runs: int = 12, most: int = 1024):
    """Run the search against a daemon that holds up to ``threshold`` streams."""
    found = bench.LargestSustained(start=start, runs=runs, most=most)
    while (streams := found.next_streams()) is not None:
        found.record(streams, streams <= threshold)
    return found


# the search starts at 0.8 of the bare engine's rate: 46 here would be that rate
@pytest.mark.parametrize("start", [20, 37, 38, 46, 80, 300])
def test_search_brackets_the_threshold_from_either_side(bench, start):
    found = search(bench, start, threshold=37)
    assert found.best == 37
    assert found.failed is not None and found.failed - found.best <= 2
    assert len(found.tried) <= 10


def test_search_within_its_runs_reports_what_it_found(bench):
    found = search(bench, 20, threshold=37, runs=3)
    assert [run["streams"] for run in found.tried] == [20, 25, 32]
    assert (found.best, found.failed) == (32, None)


def test_search_where_nothing_holds_ends_at_zero(bench):
    found = search(bench, 10, threshold=0)
    assert found.best == 0
    assert found.tried[-1]["streams"] == 1


def test_search_stops_at_the_stream_limit(bench):
    found = search(bench, 50, threshold=10_000, most=64)
    assert found.best == 64
    assert found.failed is None


def served_figures(bench, step_s: float = 0.05) -> dict:
    threads = {"threads": 1, "full_s": 0.2, "step_s": step_s, "speedup": 0.2 / step_s}
    return {
        "macs_ratio": 0.19,
        "hop_s": 3.4,
        "ort": {bench.PER_CORE: threads, "default threads": threads},
    }


def serve_figures(bench, incremental: int, int8: int | None) -> dict:
    def mode(streams):
        return {"start": 1, "max_streams": streams, "failed_at": None, "runs": []}

    modes = {bench.FULL: mode(20), bench.INCREMENTAL: mode(incremental)}
    if int8 is not None:
        modes[bench.INT8] = mode(int8)
    return {"instances": 1, "modes": modes, "idle": {bench.INCREMENTAL: {"rss_mb": 400.0}}}


@pytest.mark.parametrize(
    ("int8", "value", "met"),
    [
        (None, "60 (float32) / 3.0 = 20.0 x", True),
        (150, "150 (int8) / 3.0 = 50.0 x", True),
        (40, "60 (float32) / 3.0 = 20.0 x", True),
    ],
)
def test_the_research_target_takes_the_best_precision_served(bench, int8, value, met):
    found = bench.targets(served_figures(bench), serve_figures(bench, 60, int8), {"streams": 3.0})
    research = next(t for t in found if "research" in t["what"])
    assert (research["value"], research["met"]) == (value, met)
    # the bound is float32's, whatever int8 held
    bound = next(t for t in found if "bound" in t["what"])
    assert bound["value"].startswith("60 / ")


def test_the_research_target_is_missed_below_twenty_times(bench):
    found = bench.targets(served_figures(bench), serve_figures(bench, 30, None), {"streams": 3.0})
    research = next(t for t in found if "research" in t["what"])
    assert (research["value"], research["met"]) == ("30 (float32) / 3.0 = 10.0 x", False)


def test_the_cost_at_the_edge_is_the_held_run_at_the_largest_n(bench):
    runs = [
        {"streams": 100, "sustained": True, "cpu_cores": 1.0, "published_per_s": 40.0},
        {"streams": 130, "sustained": False, "cpu_cores": 1.9, "published_per_s": 45.0},
        {"streams": 115, "sustained": True, "cpu_cores": 1.5, "published_per_s": 50.0},
    ]
    edge = bench.cost_at_edge(runs, 115, bare_s=0.025)
    assert edge["streams"] == 115 and edge["cpu_ms_per_update"] == pytest.approx(30.0)
    assert edge["ratio"] == pytest.approx(1.2) and edge["bench_cores"] is None
    assert bench.cost_at_edge(runs[1:2], 0, bare_s=0.025) is None  # nothing held


def test_the_bound_follows_the_daemons_layout(bench, monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    figures = served_figures(bench, step_s=0.05)
    figures["ort"]["default threads"] = {"full_s": 0.12, "step_s": 0.03}
    # one instance at the default threads; one 1-thread instance is one core's
    assert bench.bare_bound(figures, 1) == pytest.approx(3.4 / 0.03)
    assert bench.bare_bound(figures, 1, threads=1) == pytest.approx(3.4 / 0.05)
    # 1-thread instances, as many as there are cores
    assert bench.bare_bound(figures, 2) == pytest.approx(2 * 3.4 / 0.05)
    assert bench.bare_bound(figures, 4) == pytest.approx(2 * 3.4 / 0.05)
    serve = serve_figures(bench, 60, None) | {"threads": 1}
    bound = next(t for t in bench.targets(figures, serve) if "bound" in t["what"])
    assert "1 instance(s) of 1 thread(s)" in bound["what"]
    assert bound["value"] == "60 / 68 = 0.88" and bound["met"]


def test_without_the_full_window_search_its_ratio_is_not_measured(bench):
    serve = serve_figures(bench, 60, None)
    del serve["modes"][bench.FULL]
    found = bench.targets(served_figures(bench), serve)
    ratio = next(t for t in found if "incremental / full" in t["what"] and "streams" in t["what"])
    assert (ratio["value"], ratio["met"]) == ("not measured (--skip-full)", None)
