"""Incremental FCN inference against full windows: MACs, ONNX Runtime time, streams served.

    .venv/bin/python bench/incremental.py                        # every FCN, ~15 minutes
    .venv/bin/python bench/incremental.py --skip-serve           # part 1 only, ~2 minutes
    .venv/bin/python bench/incremental.py --models fcn4 --repeats 5 --seconds 10 --runs 3
    .venv/bin/python bench/incremental.py --models fcn4 --instances 2   # two 1-thread workers
    .venv/bin/python bench/incremental.py --models fcn4 --int8 PREPARED  # and int8, served too
    .venv/bin/python bench/incremental.py --models fcn4 --threads 1 --skip-full  # inference on one core
    .venv/bin/python bench/incremental.py --models fcn4 --instances 2 --message-ms 100 --skip-full

In one run on this machine:

1. per FCN preset (full size, random weights after ``torch.manual_seed(0)``: cost does
   not depend on them) at its aligned (default) hop: the plan
   (``IncrementalPlan.describe``); the multiply-accumulates of one update, half the FLOPs
   torch's FlopCounterMode counts (as bench/engines.py), of the full model on a window
   and of the step graph on the window and the last one's state; the state a stream
   carries; ONNX Runtime's median seconds per update at batch 1, full model against step
   graph, loaded as the daemon loads them (tagd.engines) at 1 intra-op thread ("per
   core") and at ONNX Runtime's default threads, the two timed in alternation so that a
   shared machine's drift hits both alike; and, as a sanity check, the largest score
   difference of the step chain from full windows over ``SANITY_HOPS`` hops on ONNX
   Runtime (tests hold the parity; far above 1e-5 here means what was timed is broken);
   then the research baseline (``--skip-research`` leaves it out): FCN-4 as a user's
   script runs it, librosa's log-mel with the card's parameters and the torch model in
   eval mode under no_grad, one window at a time (``research_baseline``), its seconds
   per window and the streams that would hold at the card's hop;
2. `tagd serve` with FCN-4 at the card's hop, full windows (``incremental = false``,
   what ``--full-windows`` sets) and incremental, their searches run in alternation: the
   largest number of streams (bench/harness.py's producer: real-time 44.1 kHz stereo in
   ffmpeg's 26 ms messages, or ``--message-ms``) with nothing dropped, 95 % of the offered
   windows published and p99 end-to-end latency under one hop, as bench/serve.py holds
   them; then the daemon's RSS with 50 idle-but-connected streams, in each mode at one
   instance, the default (the target is the incremental one's; the other says what the
   graphs and the state add), and incremental at ``--instances`` (and ``--threads``)
   when that is more; at each mode's largest N, the daemon's CPU (all its threads) per
   published window against the bare engine's 1-thread time for it (``cost_at_edge``):
   what serving adds around the engine;
3. FCN-4's targets, each with its measured value, among them the streams held against
   the bare engine's bound (its incremental updates/s × the hop: ``bare_bound``) and
   against the research baseline, both from the same run.

A search starts at ``SEARCH_START_SHARE`` of the streams that part 1's batch-1 rate
(default threads) would serve, grows by ``SEARCH_GROWTH`` until a run fails, halves
until one holds, then bisects until the two are within ``SEARCH_RESOLUTION``, in at
most ``--runs`` runs a mode. Each run measures ``--seconds`` after the harness's warm-up
(19 s at FCN-4's hop) and a few seconds of start-up: about a minute a run at the
defaults. In incremental mode each stream's first window, and its first after its phase
is placed or a window is dropped, is a prime (a whole window, ~4 steps' cost); the
daemon runs steps first and primes in the time left, so a start-up with many streams
takes a while to have every chain running. An incremental run is measured once a hop
passes with no prime (at most ``SETTLE_S`` after the warm-up); its line says when.
Not a test: its figures belong to the machine it ran on and how busy it was.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from engines import window_flops  # bench/engines.py
from harness import (
    IDLE_STREAMS,
    MAX_STREAMS,
    MESSAGE_FRAMES,
    SOURCE_RATE,
    RunResult,
    idle_rss,
    run_daemon,
    warmup_s,
)
from machine import cpu  # bench/machine.py
from torch.utils.flop_counter import FlopCounterMode

from tagd.card import read_card
from tagd.engines import load_engine
from tagd.scoring import FULL, INCREMENTAL
from trainer.export import export_onnx, probe_audio
from trainer.models import create_model
from trainer.models.fcn import FCN_PRESETS

SERVED_MODEL = "fcn4"  # what `tagd serve` is measured with, and the targets are for
# label → intra-op threads; 0 lets ONNX Runtime take one per core
THREADS = {"1 thread": 1, "default threads": 0}
PER_CORE = "1 thread"
SANITY_HOPS = 4  # hops of the step chain compared with full windows
# The daemon's modes (tagd.scoring's names), as top-level keys of the harness's config:
# `incremental = false` is what --full-windows sets.
MODES = {FULL: "incremental = false\n", INCREMENTAL: ""}
INT8 = f"{INCREMENTAL} int8"  # the third search's mode, with --int8: the quantized model
SPEED_CALIBRATION_WINDOWS = 16  # random weights: the int8 ranges change no cost
SEARCH_START_SHARE = 0.8  # the daemon's ingest and publishing cost CPU the bare engine does not
# Up by a quarter (0.8 × 1.25: the bare engine's own rate, which a daemon at batch 1 cannot
# pass); down by halves, as a daemon can fall far short of it (ingest, resampling).
SEARCH_GROWTH = 1.25
SEARCH_SHRINK = 0.5
SEARCH_RESOLUTION = 0.05  # stop when the first failing N is within this share of the best
SETTLE_S = 180.0  # longest wait for an incremental run's start-up primes to end
DELIVERED_SHARE = 0.95  # of the offered windows published, as bench/serve.py asks

# FCN-4's targets
MACS_TARGET = 1 / 5
PER_CORE_TARGET = 3.5
STREAMS_TARGET = 3.0
IDLE_RSS_TARGET_MB = 500.0
BOUND_TARGET = 0.85  # streams held / the bare engine's bound at the same instance count
RESEARCH_TARGET = 20.0  # streams held / the research baseline's
RESEARCH_WINDOWS = 8  # windows the research baseline times (each ~0.4 s on 2 cores)


def progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)


# -- 1. one update, per model -------------------------------------------------------------------


def step_flops(
    step: torch.nn.Module, window: torch.Tensor, states: tuple[torch.Tensor, ...]
) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step(window, *states)
    return counter.get_total_flops()


def alternating_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, taking turns, after one warm-up run each."""
    for run in runs.values():
        run()  # ONNX Runtime plans its first run and fills its arena
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(found) for name, found in times.items()}


def chain_difference(engine, graphs, hops: int = SANITY_HOPS) -> float:
    """Largest score difference of prime + ``hops`` steps from the full model, on ORT."""
    card = engine.card
    size, hop = card.window_samples, graphs.hop_samples
    audio = probe_audio(1, size + hops * hop, card.sample_rate, seed=1)
    worst = 0.0
    states: list[np.ndarray] = []
    for k in range(hops + 1):
        window = np.ascontiguousarray(audio[:, k * hop : k * hop + size])
        scores, states = graphs.prime(window) if k == 0 else graphs.step(window, states)
        worst = max(worst, float(np.max(np.abs(scores - engine.run(window)))))
    return worst


def time_updates(path: Path, hop: int, repeats: int) -> tuple[dict, float]:
    """ONNX Runtime's median seconds per update of the model at ``path``, full window
    against step graph, at each of ``THREADS``; and the step chain's largest difference
    from full windows (at default threads)."""
    card = read_card(path)
    wave = probe_audio(1, card.window_samples, card.sample_rate)
    timings, difference = {}, None
    for label, threads in THREADS.items():
        engine = load_engine(path, intra_op_threads=threads)
        graphs = engine.incremental(hop)
        if graphs is None:
            raise SystemExit(
                f"{path}: no incremental graphs for hop {hop} although the plan has one"
            )
        _, ort_states = graphs.prime(wave)
        medians = alternating_medians(
            {
                "full": lambda e=engine: e.run(wave),
                "step": lambda g=graphs, s=ort_states: g.step(wave, s),
            },
            repeats,
        )
        timings[label] = {
            "threads": threads,
            "full_s": medians["full"],
            "step_s": medians["step"],
            "speedup": medians["full"] / medians["step"],
        }
        if threads == THREADS["default threads"]:
            difference = chain_difference(engine, graphs)
        engine.close()
    return timings, difference


def bench_int8(model: dict, data: Path, repeats: int) -> dict:
    """The served model quantized as `tagd-train quantize` does (calibrated on
    ``SPEED_CALIBRATION_WINDOWS`` windows of ``data``: with random weights the ranges change
    no cost), and its ONNX Runtime time per update as ``bench_model`` times float32."""
    from trainer.data.dataset import PreparedData
    from trainer.quantize import quantize_model

    prepared = PreparedData(data)
    int8 = quantize_model(
        model["path"], prepared, windows=SPEED_CALIBRATION_WINDOWS, progress=False
    )
    timings, difference = time_updates(int8.path, model["hop_samples"], repeats)
    return model | {
        "precision": "int8",
        "path": str(int8.path),
        "ort": timings,
        "chain_max_abs_diff": difference,
        "int8_max_abs_diff": int8.max_abs_diff,
    }


def bench_model(arch: str, folder: Path, repeats: int) -> dict:
    """Plan, MACs, state and ONNX Runtime time of one update of ``arch``; its ONNX file."""
    torch.manual_seed(0)
    model = create_model(arch).eval()
    hop = model.default_hop_samples
    built = model.incremental_graphs(hop)  # an FCN always reuses at its aligned hop
    prime, step = built.prime, built.step
    plan = step.plan  # the FCN's IncrementalPlan: its picture and per-level description
    window = torch.from_numpy(probe_audio(1, model.window_samples, model.sample_rate))
    with torch.no_grad():
        states = prime(window)[1:]
    full_macs = window_flops(model) / 2
    step_macs = step_flops(step, window, states) / 2
    path = export_onnx(model, folder / f"{arch}.onnx", check=False).path

    timings, difference = time_updates(path, hop, repeats)
    return {
        "model": arch,
        "path": str(path),
        "hop_samples": hop,
        "hop_s": hop / model.sample_rate,
        "window_s": model.window_samples / model.sample_rate,
        "plan": plan.describe(),
        "full_macs": full_macs,
        "step_macs": step_macs,
        "macs_ratio": step_macs / full_macs,
        "plan_full_macs": plan.full_macs,
        "plan_step_macs": plan.step_macs,
        "state_bytes": plan.state_bytes,
        "ort": timings,
        "chain_max_abs_diff": difference,
    }


def report_model(m: dict) -> None:
    print(
        f"\n{m['model']}: window {m['window_s']:.2f} s, hop {m['hop_samples']} samples "
        f"= {m['hop_s']:.3f} s"
    )
    for line in m["plan"]:
        print(f"  {line}")
    print(
        f"  MACs per update: full window {m['full_macs'] / 1e9:.2f} G, incremental "
        f"{m['step_macs'] / 1e9:.2f} G = {m['macs_ratio']:.3f} (1/{1 / m['macs_ratio']:.1f}); "
        f"the plan's own count {m['plan_full_macs'] / 1e9:.2f} G → {m['plan_step_macs'] / 1e9:.2f} G"
    )
    print(f"  state per stream: {m['state_bytes'] / 1e6:.2f} MB")
    for label, t in m["ort"].items():
        print(
            f"  ONNX Runtime, {label}: full window {1000 * t['full_s']:.1f} ms, step "
            f"{1000 * t['step_s']:.1f} ms per update = {t['speedup']:.2f} x "
            f"({1 / t['full_s']:.1f} → {1 / t['step_s']:.1f} updates/s)"
        )
    print(
        f"  step chain vs full windows over {SANITY_HOPS} hops (ONNX Runtime): max abs diff "
        f"{m['chain_max_abs_diff']:.1e}",
        flush=True,
    )


def report_int8(int8: dict, served: dict) -> None:
    print(
        f"\n{int8['model']} int8 (largest score difference from float32 "
        f"{int8['int8_max_abs_diff']:.3f}, random weights):"
    )
    for label, t in int8["ort"].items():
        base = served["ort"][label]
        print(
            f"  ONNX Runtime, {label}: full window {1000 * t['full_s']:.1f} ms "
            f"({base['full_s'] / t['full_s']:.2f} x float32), step {1000 * t['step_s']:.1f} ms "
            f"({base['step_s'] / t['step_s']:.2f} x float32)"
        )
    print(
        f"  int8 step chain vs int8 full windows over {SANITY_HOPS} hops: max abs diff "
        f"{int8['chain_max_abs_diff']:.1e}",
        flush=True,
    )


def report_models_table(models: list[dict]) -> None:
    print(
        "\n| model | hop s | GMAC full | GMAC step | step/full | state MB "
        "| 1 thread ms full/step | x | default ms full/step | x |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in models:
        one, default = m["ort"][PER_CORE], m["ort"]["default threads"]
        print(
            f"| {m['model']} | {m['hop_s']:.3f} | {m['full_macs'] / 1e9:.2f} | "
            f"{m['step_macs'] / 1e9:.2f} | {m['macs_ratio']:.3f} | {m['state_bytes'] / 1e6:.2f} | "
            f"{1000 * one['full_s']:.1f} / {1000 * one['step_s']:.1f} | {one['speedup']:.2f} | "
            f"{1000 * default['full_s']:.1f} / {1000 * default['step_s']:.1f} | "
            f"{default['speedup']:.2f} |"
        )


# -- the research baseline ----------------------------------------------------------------------


def research_baseline(windows: int) -> dict:
    """Seconds per window of FCN-4 as a researcher's script runs it: librosa's log-mel with
    the model's front-end parameters, then the torch model (eval, no_grad, torch's default
    threads) on it, one window at a time; and the streams that pace holds at the card's hop.

    The model is the full-size FCN-4 the rest of the bench times (``torch.manual_seed(0)``)
    with its own log-mel front end left out (the script feeds it librosa's); its scores
    are checked against the whole model's on the same window (the front ends agree to
    float32 rounding, far under 1e-3)."""
    import librosa

    torch.manual_seed(0)
    model = create_model(SERVED_MODEL).eval()
    mel = model.frontend.config
    sr, size, hop = model.sample_rate, model.window_samples, model.default_hop_samples
    audio = probe_audio(1, size + windows * hop, sr, seed=2)[0]

    def script_window(window: np.ndarray) -> np.ndarray:
        power = librosa.feature.melspectrogram(
            y=window,
            sr=sr,
            n_fft=mel.n_fft,
            hop_length=mel.hop_length,
            n_mels=mel.n_mels,
            fmin=mel.f_min,
            fmax=mel.f_max,
            center=True,
            pad_mode="constant",
        )  # (M, N)
        db = librosa.power_to_db(power, ref=1.0, amin=mel.amin, top_db=None)
        with torch.no_grad():
            return body(torch.from_numpy(db)[None]).numpy()  # (1, n_tags)

    body = copy.deepcopy(model)
    body.frontend = torch.nn.Identity()  # the script's log-mel goes in where the model's was
    first = audio[:size]
    with torch.no_grad():
        whole = model(torch.from_numpy(first)[None]).numpy()
    difference = float(np.max(np.abs(script_window(first) - whole)))  # and a warm-up
    seconds = []
    for k in range(windows):
        window = audio[k * hop : k * hop + size]
        start = time.perf_counter()
        script_window(window)
        seconds.append(time.perf_counter() - start)
    per_window = statistics.median(seconds)
    return {
        "model": SERVED_MODEL,
        "windows": windows,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_window": per_window,
        "hop_s": hop / sr,
        "streams": hop / sr / per_window,
        "max_abs_diff": difference,
    }


def report_research(research: dict) -> None:
    print(
        f"\nresearch baseline ({research['model']}: librosa log-mel + torch eager, one window "
        f"at a time, {research['torch_threads']} torch threads): "
        f"{1000 * research['seconds_per_window']:.0f} ms a window (median of "
        f"{research['windows']}) = {research['streams']:.1f} streams at the card's hop "
        f"({research['hop_s']:.3f} s); scores vs the whole model: max abs diff "
        f"{research['max_abs_diff']:.1e}",
        flush=True,
    )


# -- 2. `tagd serve`: the largest N streams, per mode ------------------------------------------


@dataclass
class LargestSustained:
    """The largest N of streams a mode sustains, from runs the caller makes.

    From ``start``: grow by SEARCH_GROWTH while runs hold, by SEARCH_SHRINK while they
    fail, then bisect between the best that held and the least that failed, until they are
    within SEARCH_RESOLUTION of each other or ``runs`` runs are spent.
    """

    start: int
    runs: int
    most: int = MAX_STREAMS
    best: int = 0  # the largest N that held
    failed: int | None = None  # the smallest N that did not
    tried: list[dict] = field(default_factory=list)

    def next_streams(self) -> int | None:
        """The N to run next; None when the search is done."""
        if len(self.tried) >= self.runs:
            return None
        if not self.tried:
            return min(max(1, self.start), self.most)
        if self.failed is None:
            grown = min(self.most, max(self.best + 1, math.ceil(self.best * SEARCH_GROWTH)))
            return grown if grown > self.best else None
        if self.best == 0:
            shrunk = min(self.failed - 1, math.floor(self.failed * SEARCH_SHRINK))
            return shrunk if shrunk >= 1 else None
        if self.failed - self.best <= max(1.0, SEARCH_RESOLUTION * self.best):
            return None
        return (self.best + self.failed) // 2

    def record(self, streams: int, held: bool, figures: dict | None = None) -> None:
        self.tried.append({**(figures or {}), "streams": streams, "sustained": held})
        if held:
            self.best = max(self.best, streams)
        elif self.failed is None or streams < self.failed:
            self.failed = streams


def sustained(result: RunResult) -> bool:
    """Nothing dropped, the offered windows published, p99 under one hop."""
    return (
        result.dropped == 0
        and result.published_per_s >= DELIVERED_SHARE * result.offered_per_s
        and result.p99_ms is not None
        and result.p99_ms < result.hop_s * 1000
    )


def incremental_share(result: RunResult) -> float | None:
    """Of the windows the daemon scored while measured, the share from the last one's state."""
    updates = result.notes["updates"]
    total = updates[INCREMENTAL] + updates[FULL]
    return updates[INCREMENTAL] / total if total else None


def check_mode(mode: str, result: RunResult) -> None:
    """Stop when the daemon did not run as asked: the comparison would mean nothing."""
    share = incremental_share(result)
    if share is None:
        return  # nothing scored: the run fails on its own figures
    if mode == INCREMENTAL and share == 0:
        raise SystemExit(
            "tagd serve scored every window in full with incremental inference on: "
            "its log says why (run it by hand with the same --hop)"
        )
    if mode == FULL and share > 0:
        raise SystemExit("tagd serve ran incrementally with incremental = false")


def describe_run(result: RunResult) -> str:
    """A run's figures on one line: a backlog shows as queueing of seconds, a chain broken
    by drops as a low share of windows from the state (each then costs a full window)."""

    def ms(value: float | None) -> str:
        return f"{value:.0f} ms" if value is not None else "-"

    share = incremental_share(result)
    settled = result.notes.get("settled")
    start = f"measured after {result.notes['measured_after_s']:.0f} s" + (
        "" if settled is None else " (primes done)" if settled else " (primes NOT done)"
    )
    return (
        f"{start}: {result.published_per_s:.2f} of {result.offered_per_s:.2f} windows/s published, "
        f"dropped {result.dropped:.0f}, p99 {ms(result.p99_ms)} (queued p50 "
        f"{ms(result.queue_p50_ms)}, inference p50 {ms(result.inference_p50_ms)}), "
        f"{f'{share:.0%}' if share is not None else '-'} from the state; daemon "
        f"{result.cpu_cores:.2f} cores, bench {result.bench_cores:.2f}, RSS {result.rss_mb:.0f} MB"
    )


def bench_serve(
    model: dict,
    seconds: float,
    runs: int,
    instances: int = 1,
    int8: dict | None = None,
    message_frames: int = MESSAGE_FRAMES,
    threads: int = 0,
    full: bool = True,
) -> dict:
    """Both modes' searches, a run of each in turn, then RSS with idle streams; both modes
    with ``instances`` engine instances, each with ``threads`` intra-op threads (0: its
    share of the cores). With ``int8`` (``bench_int8``'s figures), a third search serves
    that model incrementally; without ``full``, no full-window search. The producer sends
    ``message_frames`` (at 44.1 kHz) a message per stream."""
    path, hop_s, window_s = Path(model["path"]), model["hop_s"], model["window_s"]
    rates = {INCREMENTAL: layout_rate(model["ort"], "step_s", instances, threads)}
    if full:
        rates[FULL] = layout_rate(model["ort"], "full_s", instances, threads)
    paths = {FULL: path, INCREMENTAL: path}
    if int8 is not None:
        rates[INT8] = layout_rate(int8["ort"], "step_s", instances, threads)
        paths[INT8] = Path(int8["path"])
    searches = {
        mode: LargestSustained(start=math.floor(SEARCH_START_SHARE * rate * hop_s), runs=runs)
        for mode, rate in rates.items()
    }
    print(
        f"\n`tagd serve` with {model['model']} at the card's hop ({hop_s:.3f} s), {instances} "
        f"engine instance{'s' if instances > 1 else ''}"
        f"{f' of {threads} thread' + ('s' if threads > 1 else '') if threads else ''}, "
        f"{seconds:g} s measured a run after "
        f"{warmup_s(hop_s):.0f} s, {message_frames / SOURCE_RATE * 1000:.0f} ms messages:",
        flush=True,
    )
    batching = f"[batching]\ninstances = {instances}\n" if instances > 1 else ""
    if threads:
        batching += f"[onnxruntime]\nthreads = {threads}\n"
    tomls = {mode: toml + batching for mode, toml in MODES.items()}
    tomls[INT8] = tomls[INCREMENTAL]
    pending = list(searches)
    while pending:
        for mode in list(pending):
            streams = searches[mode].next_streams()
            if streams is None:
                pending.remove(mode)
                continue
            settle_s = SETTLE_S if mode != FULL else 0.0
            result = run_daemon(
                paths[mode],
                window_s,
                streams,
                hop_s,
                seconds,
                toml=tomls[mode],
                message_frames=message_frames,
                settle_s=settle_s,
            )
            check_mode(FULL if mode == FULL else INCREMENTAL, result)
            held = sustained(result)
            share = incremental_share(result)
            searches[mode].record(streams, held, result.summary() | {"incremental_share": share})
            progress(
                f"{mode}: {streams} streams: {'held' if held else 'NOT held'}: "
                f"{describe_run(result)}"
            )
    # The RSS target is for the daemon as it starts by default (one instance); more
    # instances share ONNX Runtime's graphs; what a second worker's runs add to the arena
    # is measured beside it.
    idle = {}
    for mode, toml in MODES.items():
        if mode not in searches:
            continue
        progress(f"{IDLE_STREAMS} idle streams, {mode}")
        idle[mode] = idle_rss(path, window_s, hop_s, toml=toml)
    if instances > 1 or threads:
        label = f"{INCREMENTAL}, {instances} instance{'s' if instances > 1 else ''}" + (
            f" of {threads} thread{'s' if threads > 1 else ''}" if threads else ""
        )
        progress(f"{IDLE_STREAMS} idle streams, {label}")
        idle[label] = idle_rss(path, window_s, hop_s, toml=tomls[INCREMENTAL])
    one_thread = {
        FULL: model["ort"][PER_CORE]["full_s"],
        INCREMENTAL: model["ort"][PER_CORE]["step_s"],
    }
    if int8 is not None:
        one_thread[INT8] = int8["ort"][PER_CORE]["step_s"]
    return {
        "model": model["model"],
        "hop_s": hop_s,
        "seconds": seconds,
        "instances": instances,
        "threads": threads,
        "message_frames": message_frames,
        "modes": {
            mode: {
                "start": s.start,
                "max_streams": s.best,
                "failed_at": s.failed,
                "runs": s.tried,
                "edge": cost_at_edge(s.tried, s.best, one_thread[mode]),
            }
            for mode, s in searches.items()
        },
        "idle": idle,
    }


def cost_at_edge(runs: list[dict], best: int, bare_s: float) -> dict | None:
    """What the daemon spent a published window in the run that held ``best`` streams,
    against the bare engine's 1-thread time for the same window (``bare_s``): all its
    threads (input, workers, ONNX Runtime's, ZeroMQ's, publishing) over what it published,
    so the ratio is what the daemon adds around the engine; None where nothing held."""
    held = [r for r in runs if r["streams"] == best and r["sustained"] and r["published_per_s"]]
    if not held:
        return None
    run = held[-1]
    cpu_s = run["cpu_cores"] / run["published_per_s"]
    return {
        "streams": best,
        "cpu_cores": run["cpu_cores"],
        "bench_cores": run.get("bench_cores"),
        "cpu_ms_per_update": 1000 * cpu_s,
        "bare_ms": 1000 * bare_s,
        "ratio": cpu_s / bare_s,
    }


def report_serve(serve: dict) -> None:
    print(
        f"\nlargest N streams at {serve['hop_s']:.3f} s, nothing dropped, p99 under a hop "
        f"({serve['instances']} instance{'s' if serve['instances'] > 1 else ''}):"
    )
    for mode, found in serve["modes"].items():
        above = f" ({found['failed_at']} not)" if found["failed_at"] is not None else ""
        print(
            f"  {mode}: {found['max_streams']}{above}, from {found['start']}, "
            f"{len(found['runs'])} runs"
        )
        edge = found.get("edge")
        if edge is not None:
            producer = edge["bench_cores"]
            print(
                f"    at {edge['streams']}: the daemon used {edge['cpu_cores']:.2f} cores, "
                f"{edge['cpu_ms_per_update']:.1f} ms of CPU a published window, "
                f"{edge['ratio']:.2f} x the bare engine's 1-thread {edge['bare_ms']:.1f} ms"
                + ("" if producer is None else f"; the bench's producer {producer:.2f} cores")
            )
    for mode, idle in serve["idle"].items():
        print(
            f"RSS with {idle['streams']} idle streams, {mode}: {idle['rss_mb']:.0f} MB (peak "
            f"{idle['peak_rss_mb']:.0f} MB, {idle['rss_before_mb']:.0f} MB before they came)"
        )


# -- 3. targets ---------------------------------------------------------------------------------


def target(what: str, value: str, met: bool | None) -> dict:
    """One target: what it asks, the measured value as text, met (None: not measured)."""
    return {"what": what, "value": value, "met": met}


def layout_rate(ort: dict, key: str, instances: int, threads: int = 0) -> float:
    """Updates/s of the bare engine (``ort``: part 1's times, ``key``: "full_s" or
    "step_s") laid out as the daemon runs it: one instance at ONNX Runtime's default
    threads, or ``instances`` 1-thread ones (also one with ``threads`` = 1), each a core of
    its own (as many as there are cores)."""
    if instances == 1 and threads != 1:
        return 1 / ort["default threads"][key]
    return min(instances, os.cpu_count() or 1) / ort[PER_CORE][key]


def bare_bound(model: dict, instances: int, threads: int = 0) -> float:
    """Streams the bare engine's incremental updates/s would hold at the card's hop, in
    the daemon's layout (``layout_rate``)."""
    return layout_rate(model["ort"], "step_s", instances, threads) * model["hop_s"]


def targets(model: dict | None, serve: dict | None, research: dict | None = None) -> list[dict]:
    """FCN-4's targets, from the figures alone."""
    macs = f"MACs per update, incremental / full ≤ 1/{1 / MACS_TARGET:g}"
    per_core = (
        f"updates/s per core (ONNX Runtime, {PER_CORE}), incremental / full ≥ {PER_CORE_TARGET:g} x"
    )
    streams = f"streams at the card's hop, incremental / full ≥ {STREAMS_TARGET:g} x"
    rss = (
        f"RSS with {IDLE_STREAMS} idle streams, {INCREMENTAL}, one instance (the default), "
        f"< {IDLE_RSS_TARGET_MB:.0f} MB"
    )
    found = []
    if model is None:
        absent = f"not measured ({SERVED_MODEL} not in --models)"
        found += [target(macs, absent, None), target(per_core, absent, None)]
    else:
        ratio = model["macs_ratio"]
        found.append(target(macs, f"{ratio:.3f} (1/{1 / ratio:.1f})", ratio <= MACS_TARGET))
        speedup = model["ort"][PER_CORE]["speedup"]
        found.append(target(per_core, f"{speedup:.2f} x", speedup >= PER_CORE_TARGET))
    instances = serve["instances"] if serve is not None else 1
    threads = serve.get("threads", 0) if serve is not None else 0
    layout = f"{instances} instance(s)" + (f" of {threads} thread(s)" if threads else "")
    bound = f"streams held, incremental / the bare engine's bound, {layout}, ≥ {BOUND_TARGET:g}"
    versus_research = f"streams held, incremental / the research baseline's ≥ {RESEARCH_TARGET:g} x"
    if serve is None:
        skipped = "not measured (--skip-serve)"
        if model is not None:
            bound_streams = bare_bound(model, 1)
            skipped_bound = f"{skipped}; the bound is {bound_streams:.0f} streams"
            skipped_research = skipped + (
                f"; the bound is {bound_streams / research['streams']:.1f} x the research "
                f"baseline's {research['streams']:.1f}"
                if research is not None
                else ""
            )
        else:
            skipped_bound = skipped_research = skipped
        return found + [
            target(streams, skipped, None),
            target(bound, skipped_bound, None),
            target(versus_research, skipped_research, None),
            target(rss, skipped, None),
        ]
    incremental = serve["modes"][INCREMENTAL]["max_streams"]
    full = serve["modes"][FULL]["max_streams"] if FULL in serve["modes"] else None
    if full is None:
        found.append(target(streams, "not measured (--skip-full)", None))
    elif full:
        ratio = incremental / full
        found.append(
            target(streams, f"{incremental} / {full} = {ratio:.2f} x", ratio >= STREAMS_TARGET)
        )
    else:
        found.append(
            target(streams, f"{incremental} / 0: no N held with full windows, no ratio", None)
        )
    if model is not None:
        bound_streams = bare_bound(model, instances, threads)
        share = incremental / bound_streams
        found.append(
            target(
                bound, f"{incremental} / {bound_streams:.0f} = {share:.2f}", share >= BOUND_TARGET
            )
        )
    if research is not None:
        # the best precision served: int8 keeps its accuracy (bench/precision.py's rule)
        best, precision = incremental, "float32"
        int8 = serve["modes"].get(INT8)
        if int8 is not None and int8["max_streams"] > best:
            best, precision = int8["max_streams"], "int8"
        ratio = best / research["streams"]
        found.append(
            target(
                versus_research,
                f"{best} ({precision}) / {research['streams']:.1f} = {ratio:.1f} x",
                ratio >= RESEARCH_TARGET,
            )
        )
    else:
        found.append(target(versus_research, "not measured (--skip-research)", None))
    idle_mb = serve["idle"][INCREMENTAL]["rss_mb"]
    found.append(target(rss, f"{idle_mb:.0f} MB", idle_mb < IDLE_RSS_TARGET_MB))
    return found


def report_targets(found: list[dict]) -> None:
    print(f"\ntargets ({SERVED_MODEL}):")
    for found_target in found:
        verdict = {True: "met", False: "NOT met", None: "-"}[found_target["met"]]
        print(f"  {found_target['what']}: {found_target['value']}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(FCN_PRESETS), default=list(FCN_PRESETS))
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed updates per graph and threads"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring time per daemon run")
    parser.add_argument("--runs", type=int, default=6, help="daemon runs per mode, at most")
    parser.add_argument("--skip-serve", action="store_true", help="part 1 only")
    parser.add_argument(
        "--instances", type=int, default=1, help="tagd serve's [batching] instances, in both modes"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="tagd serve's [onnxruntime] threads, per instance (0: the daemon's default, the "
        "cores shared out); the bound follows: --threads 1 at one instance is one core's",
    )
    parser.add_argument(
        "--skip-full", action="store_true", help="no full-window search (incremental only)"
    )
    parser.add_argument(
        "--skip-research", action="store_true", help="no librosa + torch eager baseline"
    )
    parser.add_argument(
        "--int8",
        type=Path,
        metavar="PREPARED",
        help=f"also time {SERVED_MODEL} quantized to int8 (calibrated on this prepared set at "
        "its rate, as `tagd-train quantize`) and serve it in a third search",
    )
    parser.add_argument(
        "--message-ms",
        type=float,
        default=MESSAGE_FRAMES / SOURCE_RATE * 1000,
        help="audio per message and stream from the bench's producer (default: 26 ms, "
        "ffmpeg's for an mp3 input; examples/producer.py sends 100)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    message_frames = max(1, round(args.message_ms / 1000 * SOURCE_RATE))
    models = list(dict.fromkeys(args.models))
    if not args.skip_serve and SERVED_MODEL not in models:
        models.append(SERVED_MODEL)  # the daemon serves it, and its search starts from it

    print(
        f"machine: {cpu()}; "
        f"ONNX Runtime on CPU; load average {os.getloadavg()[0]:.2f} (other processes share "
        f"these CPUs: compare figures of one run only)",
        flush=True,
    )
    began = time.perf_counter()
    results: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        results["models"] = []
        for arch in models:
            progress(f"{arch}: plan, MACs, ONNX Runtime")
            results["models"].append(bench_model(arch, Path(folder), args.repeats))
            report_model(results["models"][-1])
        report_models_table(results["models"])
        served = next((m for m in results["models"] if m["model"] == SERVED_MODEL), None)
        results["research"] = None
        if not args.skip_research and served is not None:
            progress(f"research baseline: librosa + torch eager, {RESEARCH_WINDOWS} windows")
            results["research"] = research_baseline(RESEARCH_WINDOWS)
            report_research(results["research"])
        results["int8"] = None
        if args.int8 is not None and served is not None:
            progress(f"{SERVED_MODEL} int8: quantizing on {args.int8}, ONNX Runtime")
            results["int8"] = bench_int8(served, args.int8, args.repeats)
            report_int8(results["int8"], served)
        results["serve"] = None
        if not args.skip_serve:
            results["serve"] = bench_serve(
                served,
                args.seconds,
                args.runs,
                args.instances,
                results["int8"],
                message_frames,
                args.threads,
                full=not args.skip_full,
            )
            report_serve(results["serve"])
    results["targets"] = targets(served, results["serve"], results["research"])
    report_targets(results["targets"])
    results["bench_seconds"] = time.perf_counter() - began
    results["load_average_end"] = os.getloadavg()[0]
    print(
        f"\nbench took {results['bench_seconds']:.0f} s; load average now "
        f"{results['load_average_end']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
