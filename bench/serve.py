"""Benchmark `tagd serve`: N live streams against the bare engine and a naive loop.

    .venv/bin/python bench/serve.py                    # fcn4 and samplecnn, ~17 minutes
    .venv/bin/python bench/serve.py --models fcn4 --seconds 15

For each model (full size, untrained, exported here with trainer.export) it measures,
in one run on this machine:

1. bare engine: one window's inference time (batch 1, median of back-to-back runs) and
   the best windows/s over batch sizes 1..8, on windows cut from the same audio the
   streams carry, for the engine as the daemon loads it and with ONNX Runtime's default
   spinning, in alternating rounds; the faster of the two is the reference. The best
   is measured again after the saturation run; the throughput reference is the mean of
   the two (the machine is shared: its speed drifts), the ratio to the better is printed
   too. After the half-load run, one window at a time paced at that load (what one
   window's inference costs when windows do not run back to back);
2. naive loop: one thread that reads the same streams and runs each window as soon as
   it is complete (batch 1, ingest waits for inference, nothing dropped);
3. `tagd serve` in a subprocess, fed over the multi-stream protocol by streams paced in
   real time (44.1 kHz stereo s16le in messages of 1152 frames, 26 ms, what ffmpeg's
   zmq output sends per packet; each stream at its own random phase of the hop and of
   the message cycle; the first window is pre-rolled; each run is measured once every
   stream's phase is placed, after 12 s or more, see ``warmup_s``):
   - saturation: offered twice the bare engine's rate → windows published per second;
   - half load: half the saturation throughput → end-to-end latency p50/p99; next to
     it, what an ideal daemon would reach on the same windows (one engine, FIFO, each
     window at the bare engine's paced median, no cost of its own: a lower bound), and
     the same load again with the streams at the model's rate in mono, so the daemon
     has nothing to resample;
   - both again with `[batching] instances = 2` (two engines of half the cores each,
     against the bare pair running side by side and the best bare figure of all);
   - the largest N streams at the card's hop with no drops and p99 under one hop,
     trying 0.9, 0.8 ... 0.5 of the saturation throughput;
   - RSS with 50 idle-but-connected streams.

End-to-end latency is the daemon's own `latency_ms.total` (arrival of the message that
carried the window's last sample to publication), split into ingest (soxr holding the
sample back until its block is full), queue, inference and the rest. Next to it, "from
outside": from the producer's send of that message to the subscriber's receipt, which
adds ZeroMQ on both sides. CPU is user+system time
over wall time (1.0 = one core), of the daemon and of this process (producer and
subscriber). Figures go to stdout as a report and, with --json, as one JSON object.

bench/harness.py holds the producer, the daemon and the baselines; this file chooses the
runs (``bench_model``, ``two_instances``) and prints the report from the figures they
return (``report``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import (
    IDLE_STREAMS,
    MESSAGE_FRAMES,
    bare_engine,
    batch_seconds,
    cut_windows,
    export_full_size,
    ideal_fifo,
    idle_rss,
    naive_loop,
    paced_window,
    run_daemon,
    side_by_side,
)

from tagd.engines import load_engine
from tagd.stream import StreamGeometry

DAEMON_ENGINE = "as the daemon runs it (spinning while running)"
SPINNING_ENGINE = "ONNX Runtime's default (spinning after runs too)"
LARGEST_N_SHARES = (0.9, 0.8, 0.7, 0.6, 0.5)  # of the saturation throughput, tried in turn
SATURATION_STREAMS = 4


def progress(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {text}", flush=True)


# -- the runs -----------------------------------------------------------------------------------


def bench_model(arch: str, folder: Path, seconds: float, message_frames: int) -> dict:
    """Every run for one model; the figures, as ``report`` prints them."""
    model = export_full_size(arch, folder)
    engines = {
        DAEMON_ENGINE: load_engine(model),
        SPINNING_ENGINE: load_engine(model, spinning="always"),
    }
    engine = engines[DAEMON_ENGINE]
    card = engine.card
    window_s, card_hop_s = card.window_seconds, card.hop_seconds
    geometry = StreamGeometry(card.sample_rate, card.window_samples, card.hop_samples)
    progress(f"{arch}: the bare engine")
    windows = cut_windows(geometry, 8)
    bare = bare_engine(engines, windows)
    one_window_ms = bare["window_inference_ms"]

    # saturation: a few streams, a short hop, twice what the engine can take
    streams = SATURATION_STREAMS
    sat_hop = streams / (2 * bare["windows_per_s"])
    progress(f"{arch}: the daemon at saturation")
    saturation = run_daemon(
        model, window_s, streams, sat_hop, seconds, message_frames=message_frames
    )
    # the machine is shared: measure the bare engine again; the reference is the mean
    best_batch = windows[: bare["best_batch"]]
    engine_again = engines[bare["best_engine"]]
    again = bare["best_batch"] / float(np.median(batch_seconds(engine_again, best_batch, 4.0)))
    bare["windows_per_s_after"] = again
    engines.pop(SPINNING_ENGINE).close()
    reference = (bare["windows_per_s"] + again) / 2

    half_hop = streams / (0.5 * saturation.published_per_s)
    progress(f"{arch}: the daemon at half load")
    half = run_daemon(
        model, window_s, streams, half_hop, seconds * 1.5, message_frames=message_frames
    )
    paced = paced_window(engines, windows, half.offered_per_s)
    ideal = ideal_fifo(half, paced["p50_ms"])
    # the same load, but the streams arrive at the model's rate in mono: no resampling
    progress(f"{arch}: half load at the model's rate")
    unresampled = run_daemon(
        model,
        window_s,
        streams,
        half_hop,
        seconds * 1.5,
        message_frames=message_frames,
        rate=card.sample_rate,
        channels=1,
    )
    ideal_unresampled = ideal_fifo(unresampled, paced["p50_ms"])

    progress(f"{arch}: the naive loop")
    naive_sat = naive_loop(engine, window_s, streams, sat_hop, seconds, message_frames)
    naive_half = naive_loop(engine, window_s, streams, half_hop, seconds, message_frames)
    engine.close()
    del engine

    progress(f"{arch}: two instances")
    instances = two_instances(
        model,
        window_s,
        windows,
        streams,
        sat_hop,
        seconds,
        message_frames,
        reference,
        one_window_ms,
    )

    # the largest N at the card's hop: no drops, every stream served, p99 under one hop
    capacity = int(saturation.published_per_s * card_hop_s)
    sustained, tried = None, []
    for n in sorted({max(1, int(capacity * share)) for share in LARGEST_N_SHARES}, reverse=True):
        progress(f"{arch}: {n} streams at the card's hop")
        result = run_daemon(
            model, window_s, n, card_hop_s, seconds * 1.5, message_frames=message_frames
        )
        ok = (
            result.dropped == 0
            and result.published_per_s >= 0.95 * result.offered_per_s
            and result.p99_ms is not None
            and result.p99_ms < card_hop_s * 1000
        )
        tried.append(result.summary() | {"sustained": ok})
        if ok:
            sustained = n
            break
    return {
        "model": arch,
        "window_s": window_s,
        "card_hop_s": card_hop_s,
        "bare": bare,
        "saturation": saturation.summary(),
        "throughput_reference": reference,
        "throughput_vs_bare": saturation.published_per_s / reference,
        "half_load": half.summary(),
        "p99_vs_window_inference": half.p99_ms / one_window_ms,
        "ready_p99_vs_window_inference": half.ready_p99_ms / one_window_ms,
        "ideal_half_load": ideal,
        "ideal_p99_vs_window_inference": ideal["p99_ms"] / one_window_ms,
        "unresampled_half_load": unresampled.summary(),
        "unresampled_p99_vs_window_inference": unresampled.p99_ms / one_window_ms,
        "ideal_unresampled": ideal_unresampled,
        "paced_window": paced,
        "p99_vs_paced_window": half.p99_ms / paced["p50_ms"],
        "naive_saturation": naive_sat,
        "naive_half_load": naive_half,
        "two_instances": instances,
        "max_streams": sustained,
        "max_streams_runs": tried,
    }


def two_instances(
    model: Path,
    window_s: float,
    windows: np.ndarray,
    streams: int,
    sat_hop: float,
    seconds: float,
    message_frames: int,
    reference: float,
    window_ms: float,
) -> dict:
    """`[batching] instances = 2`: two engines of half the cores each, side by side.

    The bare figure is both instances running windows back to back at once; the
    throughput target is held against the better of that and the one-instance
    reference, so a configuration is never measured against a slower engine than
    this machine has.
    """
    threads = max(1, (os.cpu_count() or 2) // 2)
    pair = [load_engine(model, intra_op_threads=threads) for _ in range(2)]
    bare = side_by_side(pair, windows[:1], 8.0)
    for engine in pair:
        engine.close()
    toml = "[batching]\ninstances = 2\n"
    saturation = run_daemon(
        model, window_s, streams, sat_hop, seconds, toml=toml, message_frames=message_frames
    )
    best = max(reference, bare["windows_per_s"])
    half_hop = streams / (0.5 * saturation.published_per_s)
    half = run_daemon(
        model, window_s, streams, half_hop, seconds * 1.5, toml=toml, message_frames=message_frames
    )
    return {
        "threads_each": threads,
        "bare": bare,
        "best_bare_per_s": best,
        "saturation": saturation.summary(),
        "throughput_vs_best_bare": saturation.published_per_s / best,
        "half_load": half.summary(),
        "p99_vs_window_inference": half.p99_ms / window_ms,
        "p99_vs_instance_window": half.p99_ms / bare["window_ms"],
    }


# -- the report ------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report_model(m: dict) -> None:
    bare, sat, half = m["bare"], m["saturation"], m["half_load"]
    one = bare["window_inference_ms"]
    print(f"\n== {m['model']}: window {m['window_s']:.2f} s, card hop {m['card_hop_s']:.2f} s")
    print(
        f"bare engine, one window: p50 {one:.1f} ms, p99 {bare['window_inference_p99_ms']:.1f} ms "
        f"({bare['window_inference_engine']})"
    )
    for name, sizes in bare["per_engine"].items():
        rates = ", ".join(f"{v['windows_per_s']:.1f} at batch {k}" for k, v in sizes.items())
        print(
            f"bare engine, {name}: {sizes[1]['median_s'] * 1000:.1f} ms per window; windows/s {rates}"
        )
    better = max(bare["windows_per_s"], bare["windows_per_s_after"])
    print(
        f"daemon at saturation: {sat['published_per_s']:.2f} windows/s "
        f"({m['throughput_vs_bare']:.2f} x bare: {bare['windows_per_s']:.1f} before, "
        f"{bare['windows_per_s_after']:.1f} after; {sat['published_per_s'] / better:.2f} x the better; "
        f"{bare['best_engine']}, batch {bare['best_batch']}), dropped {sat['dropped']:.0f}, "
        f"p99 {sat['p99_ms']:.0f} ms, daemon {sat['cpu_cores']:.2f} cores, bench {sat['bench_cores']:.2f} cores"
    )
    paced = m["paced_window"]
    print(
        f"bare engine, one window every {1000 / half['offered_per_s']:.0f} ms (half load, nothing "
        f"queued): p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms"
    )
    print(
        f"daemon at half load ({half['offered_per_s']:.2f} windows/s): p50 {half['p50_ms']:.0f} ms, "
        f"p99 {half['p99_ms']:.0f} ms ({m['p99_vs_window_inference']:.2f} x one window back to back, "
        f"{m['p99_vs_paced_window']:.2f} x one window at this load); in the daemon: ingest (resampler hold) "
        f"p50/p99 {half['ingest_p50_ms']:.0f}/{half['ingest_p99_ms']:.0f} ms, window ready to published "
        f"p50/p99 {half['ready_p50_ms']:.0f}/{half['ready_p99_ms']:.0f} ms "
        f"({m['ready_p99_vs_window_inference']:.2f} x one window), inference p50/p99 "
        f"{half['inference_p50_ms']:.0f}/{half['inference_p99_ms']:.0f} ms, queue p50/p99 "
        f"{half['queue_p50_ms']:.1f}/{half['queue_p99_ms']:.0f} ms, {half['queued_share']:.0%} of windows "
        f"waited > 1 ms, tagging and publishing p99 {half['overhead_p99_ms']:.1f} ms; dropped "
        f"{half['dropped']:.0f}; from the producer's send to the subscriber p50 {half['outside_p50_ms']:.0f} ms "
        f"p99 {half['outside_p99_ms']:.0f} ms; daemon {half['cpu_cores']:.2f} cores, bench {half['bench_cores']:.2f} cores"
    )
    ideal = m["ideal_half_load"]
    print(
        f"an ideal daemon on the same windows (one engine, each window {ideal['window_ms']:.1f} ms, "
        f"nothing else): p50 {ideal['p50_ms']:.0f} ms p99 {ideal['p99_ms']:.0f} ms "
        f"({m['ideal_p99_vs_window_inference']:.2f} x one window); window ready to published "
        f"p99 {ideal['ready_p99_ms']:.0f} ms ({ideal['ready_p99_ms'] / one:.2f} x), "
        f"{ideal['waited_share']:.0%} of windows waited"
    )
    flat, flat_ideal = m["unresampled_half_load"], m["ideal_unresampled"]
    print(
        f"daemon at half load, streams at the model's rate, mono (nothing to resample): "
        f"p50 {flat['p50_ms']:.0f} ms p99 {flat['p99_ms']:.0f} ms "
        f"({m['unresampled_p99_vs_window_inference']:.2f} x one window; ingest p99 "
        f"{flat['ingest_p99_ms']:.1f} ms, {flat['queued_share']:.0%} of windows waited > 1 ms); "
        f"the ideal daemon on these windows p99 {flat_ideal['p99_ms']:.0f} ms "
        f"({flat_ideal['p99_ms'] / one:.2f} x)"
    )
    naive_sat, naive_half = m["naive_saturation"], m["naive_half_load"]
    print(
        f"naive loop: {naive_sat['windows_per_s']:.2f} windows/s at saturation (p99 "
        f"{naive_sat['p99_ms']:.0f} ms, growing); half load p50 {naive_half['p50_ms']:.0f} ms "
        f"p99 {naive_half['p99_ms']:.0f} ms"
    )
    two = m["two_instances"]
    two_sat, two_half = two["saturation"], two["half_load"]
    print(
        f"two instances of {two['threads_each']} thread(s): bare {two['bare']['windows_per_s']:.1f} "
        f"windows/s side by side ({two['bare']['window_ms']:.1f} ms a window); daemon at saturation "
        f"{two_sat['published_per_s']:.2f} windows/s = {two['throughput_vs_best_bare']:.2f} x the best "
        f"bare ({two['best_bare_per_s']:.1f}), dropped {two_sat['dropped']:.0f}; half load "
        f"({two_half['offered_per_s']:.2f} windows/s) p50 {two_half['p50_ms']:.0f} ms p99 "
        f"{two_half['p99_ms']:.0f} ms ({two['p99_vs_window_inference']:.2f} x the fastest one window, "
        f"{two['p99_vs_instance_window']:.2f} x one window on one instance; ingest p99 "
        f"{two_half['ingest_p99_ms']:.0f} ms, window ready to published p50/p99 "
        f"{two_half['ready_p50_ms']:.0f}/{two_half['ready_p99_ms']:.0f} ms)"
    )
    for run in m["max_streams_runs"]:
        print(
            f"{run['streams']} streams at hop {run['hop_s']:.2f} s: "
            f"{'sustained' if run['sustained'] else 'NOT sustained'}: {run['published_per_s']:.2f} of "
            f"{run['offered_per_s']:.2f} windows/s published, p50 {run['p50_ms']:.0f} ms p99 "
            f"{run['p99_ms']:.0f} ms, dropped {run['dropped']:.0f}, CPU {run['cpu_cores']:.2f} cores, "
            f"RSS {run['rss_mb']:.0f} MB, inference p50 {run['inference_p50_ms']:.0f} ms"
        )


def report(results: dict) -> None:
    """Everything measured, then the issue's targets, from the figures alone."""
    for model in results["models"]:
        report_model(model)
    idle = results["idle"]
    print(
        f"\n{idle['streams']} idle-but-connected streams ({results['models'][0]['model']}): RSS "
        f"{idle['rss_mb']:.0f} MB (peak {idle['peak_rss_mb']:.0f} MB, before them "
        f"{idle['rss_before_mb']:.0f} MB)"
    )
    print("\nthe issue's targets, this run:")
    for model in results["models"]:
        throughput, p99 = model["throughput_vs_bare"], model["p99_vs_window_inference"]
        flat = model["unresampled_p99_vs_window_inference"]
        flat_ideal = model["ideal_unresampled"]["p99_ms"] / model["bare"]["window_inference_ms"]
        print(
            f"  {model['model']}: throughput at saturation {throughput:.2f} x bare "
            f"({met(throughput >= 0.9)}, target >= 0.9); half-load p99 {p99:.2f} x one window "
            f"({met(p99 <= 1.5)}, target <= 1.5; {model['p99_vs_paced_window']:.2f} x paced; from the "
            f"window ready, without the resampler's hold: {model['ready_p99_vs_window_inference']:.2f} x)"
        )
        print(
            f"  {model['model']}: half-load p99 of an ideal daemon on the same windows "
            f"{model['ideal_p99_vs_window_inference']:.2f} x one window; with streams at the "
            f"model's rate (no resampling) {flat:.2f} x ({met(flat <= 1.5)}), ideal {flat_ideal:.2f} x"
        )
        two = model["two_instances"]
        print(
            f"  {model['model']} with two instances: throughput at saturation "
            f"{two['throughput_vs_best_bare']:.2f} x the best bare ({met(two['throughput_vs_best_bare'] >= 0.9)}); "
            f"half-load p99 {two['p99_vs_window_inference']:.2f} x the fastest one window "
            f"({met(two['p99_vs_window_inference'] <= 1.5)}; {two['p99_vs_instance_window']:.2f} x one "
            f"window on one instance)"
        )
        print(f"  {model['model']}: the largest N at the card's hop: {model['max_streams']}")
    rss = idle["rss_mb"]
    print(
        f"  RSS with {IDLE_STREAMS} idle streams: {rss:.0f} MB ({met(rss < 500)}, target < 500 MB)"
    )
    print(
        f"\nbench took {results['bench_seconds']:.0f} s; load average now {results['load_average_end']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="fcn4,samplecnn")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per daemon run")
    parser.add_argument(
        "--message-frames",
        type=int,
        default=MESSAGE_FRAMES,
        help="frames per producer message (1152: ffmpeg's; 4410: 100 ms)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs; ONNX Runtime on CPU; load average {os.getloadavg()[0]:.2f} "
        f"(other processes share these CPUs: compare figures of one run only)",
        flush=True,
    )
    began = time.perf_counter()
    results = {"cpus": os.cpu_count(), "message_frames": args.message_frames, "models": []}
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.models.split(","):
            results["models"].append(
                bench_model(arch, Path(folder), args.seconds, args.message_frames)
            )
        first = Path(folder) / f"{args.models.split(',')[0]}.onnx"
        card = load_engine(first, warmup=False).card
        progress("idle streams")
        results["idle"] = idle_rss(first, card.window_seconds, card.hop_seconds)
    results["bench_seconds"] = time.perf_counter() - began
    results["load_average_end"] = os.getloadavg()[0]
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
