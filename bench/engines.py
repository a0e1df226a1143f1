"""Cost of one window per model: FLOPs, PyTorch eager vs ONNX Runtime, against sgemm peak.

    python bench/engines.py                      # default models, batches 1 and 8
    python bench/engines.py --models fcn4 --batches 1 --repeats 5

For each full-size model (random weights: cost does not depend on them) it prints the
FLOPs of one window (2 × multiply-accumulates of every conv and matmul, counted by
torch's FlopCounterMode, so the in-graph STFT and mel matmul are included), the median
seconds per window in PyTorch eager and in ONNX Runtime (CPU, with the daemon's session
options) at each batch size, and the fraction of this machine's measured float32 matmul
rate that this amounts to.
Not a test: it takes minutes and its figures belong to the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu  # bench/machine.py
from torch.utils.flop_counter import FlopCounterMode

from tagd.card import GRAPH_NAMES
from tagd.engines.onnx import open_session
from trainer.export import export_onnx
from trainer.models import create_model

DEFAULT_MODELS = ("fcn4", "fcn5", "samplecnn", "samplecnn-se", "samplecnn-rese-ml")
GEMM_SIZE = 2048  # square sgemm used to measure the machine's matmul rate


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocator, thread pool, ORT's first-run planning
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgemm_gflops(repeats: int = 5) -> dict[str, float]:
    """Best-of float32 matmul rate, numpy (BLAS) and torch, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
    b = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
    flops = 2 * GEMM_SIZE**3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    rates = {}
    for name, run in (("numpy", lambda: a @ b), ("torch", lambda: ta @ tb)):
        run()
        best = min(_timed(run) for _ in range(repeats))
        rates[name] = flops / best / 1e9
    return rates


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def window_flops(model: torch.nn.Module) -> int:
    wave = torch.zeros(1, model.window_samples)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(wave)
    return counter.get_total_flops()


def bench_model(arch: str, batches: list[int], repeats: int, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    flops = window_flops(model)
    params = sum(p.numel() for p in model.parameters())
    path = export_onnx(model, folder / f"{arch}.onnx", check=False).path
    session = open_session(path, providers=["CPUExecutionProvider"])
    names = [GRAPH_NAMES.scores]
    rows = []
    for batch in batches:
        wave = np.random.default_rng(batch).standard_normal((batch, model.window_samples))
        wave = (0.1 * wave).astype(np.float32)
        tensor = torch.from_numpy(wave)
        with torch.no_grad():
            eager = median_seconds(lambda t=tensor: model(t), repeats) / batch
        ort = (
            median_seconds(lambda w=wave: session.run(names, {GRAPH_NAMES.waveform: w}), repeats)
            / batch
        )
        rows.append(
            dict(arch=arch, params=params, gflops=flops / 1e9, batch=batch, eager=eager, ort=ort)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"machine: {cpu()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    # other processes on a small machine skew every figure: say how busy it was
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    peak = sgemm_gflops()
    best = max(peak.values())
    print(
        f"sgemm {GEMM_SIZE}³: numpy {peak['numpy']:.1f} GFLOP/s, torch {peak['torch']:.1f} GFLOP/s"
    )
    print()
    header = "| model | params | GFLOP/window | batch | eager s/window | ORT s/window | ORT GFLOP/s | ORT % of sgemm |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for arch in args.models:
            for row in bench_model(arch, args.batches, args.repeats, Path(scratch)):
                rate = row["gflops"] / row["ort"]
                print(
                    f"| {row['arch']} | {row['params'] / 1e6:.2f} M | {row['gflops']:.2f} | "
                    f"{row['batch']} | {row['eager']:.3f} | {row['ort']:.3f} | {rate:.1f} | "
                    f"{100 * rate / best:.0f}% |",
                    flush=True,
                )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
