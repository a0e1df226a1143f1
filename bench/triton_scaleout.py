"""tagd's own incremental engine against the same model on Triton Inference Server, and failover.

    .venv/bin/python bench/triton_scaleout.py                       # full-size FCN-4, ~3 minutes
    .venv/bin/python bench/triton_scaleout.py --streams 8 --hops 4  # quicker
    .venv/bin/python bench/triton_scaleout.py --model fcn4.onnx     # an exported model (graphs at its hop)

In one run on this machine, the same streams (music-like audio, one window a hop each):

1. **Throughput.** Every stream primed, then ``--hops`` hops of every stream scored the
   way `tagd serve` scores them: the local ``IncrementalRunner`` (ONNX Runtime, the
   daemon's session options) a window at a time, as the daemon's CPU default
   (max_batch 1); Triton (the nvidia-pytriton wheel's tritonserver, the repository's
   python-backend sequence model, on the same cores) in batches of ``--batch`` windows
   whose requests go at once, as the daemon's default for triton:// (8). The two run in
   alternation, hop by hop, so a busy machine's drift hits both. *Streams held* is the
   hop divided by the seconds a window takes in the steady state: how many streams the
   engine keeps up with on this machine, tagd's own work not counted.
2. **Latency and wire.** Then ``--hops`` more hops a window at a time on both: the
   seconds a continuing window takes alone (p50, p99) and the latency Triton adds (its
   p50/p99 less the local ones: gRPC, the sequence batcher, the python backend); and the
   bytes a stream sent a hop in part 1 (``tagd_triton_sent_bytes_total``) against a
   whole window's.
3. **Exactness.** The largest score difference of each engine from ONNX Runtime's full
   windows over the run.
4. **Failover.** Two servers, the streams spread over them; after ``--hops`` hops one is
   killed (SIGKILL) and the next hop is scored: the seconds from the kill to every
   stream's scores being back (its streams moved and started again on the other), in
   hops, and the largest difference from full windows.

Prints the CPU. Not a test: its figures belong to the machine it ran on and how busy it
was; only the ratios of one run compare.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from machine import cpu  # bench/machine.py
from prometheus_client import CollectorRegistry

from tagd.card import GRAPH_NAMES, read_card
from tagd.engines import load_engine
from tagd.engines.onnx import open_session
from tagd.incremental import choose_scorer
from tagd.metrics import Metrics
from tagd.scoring import WindowAt
from trainer.export import export_onnx, probe_audio
from trainer.triton_local import LocalTriton
from trainer.triton_repo import write_repository

TRITON_BATCH = 8  # tagd serve's max_batch for triton:// (ACCELERATOR_MAX_BATCH)


def exported_model(folder: Path) -> Path:
    import torch

    from trainer.models import create_model

    torch.manual_seed(0)
    path = folder / "fcn4.onnx"
    print("exporting full-size FCN-4 (random weights) with its incremental graphs …", flush=True)
    export_onnx(create_model("fcn4", 50), path, name="fcn4")
    return path


def stream_audio(streams: int, samples: int, rate: int) -> np.ndarray:
    return probe_audio(streams, samples, rate, seed=7)


def hop_windows(audio: np.ndarray, k: int, window: int, hop: int) -> np.ndarray:
    return np.ascontiguousarray(audio[:, k * hop : k * hop + window])


def score_hop(scorer, names, windows, k, hop, batch) -> tuple[np.ndarray, list[float]]:
    """One hop of every stream in calls of ``batch`` windows: scores and seconds a window."""
    scores, seconds = [], []
    for first in range(0, len(names), batch):
        rows = slice(first, first + batch)
        keys = [WindowAt(name, 0, k * hop) for name in names[rows]]
        started = time.perf_counter()
        scores.append(scorer.run(keys, windows[rows]))
        took = time.perf_counter() - started
        seconds += [took] * len(keys)  # each window of the call waited the whole call
    return np.concatenate(scores), seconds


def full_windows(model: Path, audio: np.ndarray, hops: int, window: int, hop: int) -> np.ndarray:
    """ONNX Runtime's whole-window scores [hop, stream, tag], a window a run (a batch of
    full-size windows holds gigabytes of activations)."""
    session = open_session(model, providers=["CPUExecutionProvider"])
    return np.stack(
        [
            np.concatenate(
                [
                    session.run([GRAPH_NAMES.scores], {GRAPH_NAMES.waveform: row[None]})[0]
                    for row in hop_windows(audio, k, window, hop)
                ]
            )
            for k in range(hops)
        ]
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def throughput(model: Path, repository: Path, args) -> dict:
    card = read_card(model)
    hop, window = card.hop_samples, card.window_samples
    names = [f"s{i}" for i in range(args.streams)]
    audio = stream_audio(args.streams, window + (2 * args.hops + 1) * hop, card.sample_rate)
    with LocalTriton(repository, [f"{card.name}_seq"]) as server:
        metrics = Metrics(CollectorRegistry())
        remote = choose_scorer(
            [load_engine(f"triton://{server.grpc_url}/{card.name}", warmup=False)],
            hop,
            metrics=metrics,
        )
        local = choose_scorer([load_engine(model, warmup=False)], hop)
        for scorer in (local, remote):
            scorer.warmup()
        alone = {"local": [], "triton": []}  # seconds of a window scored alone
        scores = {"local": [], "triton": []}
        wall = {"local": 0.0, "triton": 0.0}
        sent_before = 0.0
        # hop 0 primes every stream (not counted); hops 1..H in the daemon's batches for
        # throughput; hops H+1..2H a window at a time on both, for latency
        for k in range(2 * args.hops + 1):
            windows = hop_windows(audio, k, window, hop)
            if k == 1:
                sent_before = _sent(metrics, server.grpc_url)
            for name, scorer, batch in (("local", local, 1), ("triton", remote, args.batch)):
                started = time.perf_counter()
                got, seconds = score_hop(
                    scorer, names, windows, k, hop, 1 if k > args.hops else batch
                )
                if 1 <= k <= args.hops:
                    wall[name] += time.perf_counter() - started
                elif k > args.hops:
                    alone[name] += seconds
                scores[name].append(got)
            if k == args.hops:
                sent = _sent(metrics, server.grpc_url) - sent_before
        requests, executions = triton_counts(server, f"{card.name}_seq")
    expected = full_windows(model, audio, 2 * args.hops + 1, window, hop)
    steps = args.streams * args.hops
    result = {"hop_s": hop / card.sample_rate, "window_bytes": window * 4}
    for name in ("local", "triton"):
        result[name] = {
            "window_s": wall[name] / steps,
            "streams_held": (hop / card.sample_rate) / (wall[name] / steps),
            "p50_s": percentile(alone[name], 50),
            "p99_s": percentile(alone[name], 99),
            "max_abs_diff": float(np.max(np.abs(np.stack(scores[name]) - expected))),
        }
    result["bytes_per_hop_stream"] = sent / steps
    result["triton_mean_batch"] = requests / executions if executions else 0.0
    return result


def triton_counts(server: LocalTriton, model: str) -> tuple[float, float]:
    """Triton's own count of the model's requests and of its executions (batches)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for name in ("nv_inference_request_success", "nv_inference_exec_count"):
        pattern = rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
        found[name] = sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))
    return found["nv_inference_request_success"], found["nv_inference_exec_count"]


def _sent(metrics: Metrics, server: str) -> float:
    return metrics.registry.get_sample_value("tagd_triton_sent_bytes_total", {"server": server})


def failover(model: Path, repository: Path, args) -> dict:
    card = read_card(model)
    hop, window = card.hop_samples, card.window_samples
    names = [f"s{i}" for i in range(args.streams)]
    audio = stream_audio(args.streams, window + (args.hops + 1) * hop, card.sample_rate)
    models = [f"{card.name}_seq"]
    with LocalTriton(repository, models) as first, LocalTriton(repository, models) as second:
        url = f"triton://{first.grpc_url},{second.grpc_url}/{card.name}"
        scorer = choose_scorer([load_engine(url, warmup=False)], hop)
        scorer.warmup()
        got = []
        for k in range(args.hops):
            got.append(score_hop(scorer, names, hop_windows(audio, k, window, hop), k, hop, 8)[0])
        moved = sum(scorer._chains[n].server.address == first.grpc_url for n in names)
        killed = time.perf_counter()
        first.kill()
        k = args.hops
        got.append(score_hop(scorer, names, hop_windows(audio, k, window, hop), k, hop, 8)[0])
        back = time.perf_counter() - killed
    expected = full_windows(model, audio, args.hops + 1, window, hop)
    return {
        "moved": moved,
        "streams": args.streams,
        "seconds": back,
        "hops": back / (hop / card.sample_rate),
        "max_abs_diff": float(np.max(np.abs(np.stack(got) - expected))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: FCN-4, exported)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--hops", type=int, default=6)
    parser.add_argument("--batch", type=int, default=TRITON_BATCH)
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or exported_model(folder)
        repository = folder / "repository"
        write_repository(model, repository, gpu=False)
        card = read_card(model)
        print(
            f"{card.name}: window {card.window_samples} samples, hop {card.hop_samples} "
            f"({card.hop_seconds:.3f} s); {args.streams} streams × {args.hops} hops after "
            f"their first; Triton batch {args.batch}",
            flush=True,
        )
        measured = throughput(model, repository, args)
        for name in ("local", "triton"):
            m = measured[name]
            print(
                f"{name:>6}: {m['window_s'] * 1e3:7.1f} ms a window in the steady state → "
                f"{m['streams_held']:6.1f} streams held; a window alone p50 "
                f"{m['p50_s'] * 1e3:.1f} ms, p99 {m['p99_s'] * 1e3:.1f} ms; max |Δ| from full "
                f"windows {m['max_abs_diff']:.1e}"
            )
        local, remote = measured["local"], measured["triton"]
        print(
            f"Triton / local streams held: {remote['streams_held'] / local['streams_held']:.2f} "
            f"(target ≥ 0.6 on shared cores); added latency a window p50 "
            f"{(remote['p50_s'] - local['p50_s']) * 1e3:+.1f} ms, p99 "
            f"{(remote['p99_s'] - local['p99_s']) * 1e3:+.1f} ms"
        )
        print(
            f"Triton's sequence batcher ran {measured['triton_mean_batch']:.2f} requests "
            f"(windows of different streams) a model execution on average"
        )
        wire = measured["bytes_per_hop_stream"]
        print(
            f"wire: {wire / 1e3:.1f} kB a hop a stream incremental, {measured['window_bytes'] / 1e3:.1f} "
            f"kB a whole window ({wire / measured['window_bytes']:.3f} of it; target ≤ 0.2)"
        )
        moved = failover(model, repository, args)
        print(
            f"failover: {moved['moved']} of {moved['streams']} streams on the killed server; "
            f"every stream tagged again {moved['seconds']:.2f} s after the kill "
            f"({moved['hops']:.2f} hops; target ≤ 2); max |Δ| from full windows "
            f"{moved['max_abs_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
