"""float32 against int8 (and bfloat16 where a runtime offers it): updates per second and
macro ROC-AUC, measured in one run with the CPU named.

    .venv/bin/python bench/precision.py \\
        --checkpoint /work/bench-quality/runs/fcn5/best.pt \\
        --data /work/bench-quality/broadcast/prepared-12000

In one run on this machine:

1. speed: FCN-4 at full size with random weights after ``torch.manual_seed(0)`` (the cost
   does not depend on them), exported as `tagd-train export` does, quantized as
   `tagd-train quantize` does (calibrated on ``SPEED_CALIBRATION_WINDOWS`` windows of
   ``--data``'s train split; at FCN-4's rate, 12 kHz), loaded as the daemon loads them
   (tagd.engines); median seconds of one update at batch 1, full window and step graph
   at the card's hop, at 1 intra-op thread and at ONNX Runtime's default, float32 and
   int8 timed in alternation so that a shared machine's drift hits both alike. With
   ``openvino`` importable (``pip install openvino``: measured only, tagd does not use it)
   the same graphs on OpenVINO's CPU plugin, INFERENCE_PRECISION_HINT f32 and bf16, in
   the same alternation; ONNX Runtime has no bfloat16 convolution kernels on x86.
2. accuracy: the trained ``--checkpoint`` exported and quantized the same way (calibrated
   on ``--calibration-windows`` windows of its own training data, ``--data``), both scored on the test split of ``--test``
   (``--data`` by default: the rendered held-out clips; repeatable, the first decides the
   rule), each clip the mean of its windows at the card's hop (as ``tagd-train
   evaluate``): macro ROC-AUC, float32 and int8, and how far a clip's scores moved.
3. the issue's rule: a precision is kept where it gives ≥ ``SPEEDUP_RULE`` × float32's
   updates per second and a macro ROC-AUC within ``AUC_RULE`` of float32's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from incremental import THREADS, alternating_medians, progress  # bench/incremental.py
from machine import cpu  # bench/machine.py

from tagd.engines import load_engine
from tagd.windowing import clip_windows
from trainer.checkpoint import card_from_checkpoint, load_checkpoint, model_from_checkpoint
from trainer.data.dataset import PreparedData, to_float
from trainer.evaluate import summarise, tag_metrics
from trainer.export import export_onnx, probe_audio
from trainer.models import create_model
from trainer.quantize import DEFAULT_WINDOWS, quantize_model

SPEEDUP_RULE = 1.4
AUC_RULE = 0.005
SPEED_CALIBRATION_WINDOWS = 16  # random weights: the ranges change no cost


# -- 1. speed ------------------------------------------------------------------------------------
def openvino_runs(path: Path, feeds: dict[str, np.ndarray], threads: int) -> dict[str, Callable]:
    """OpenVINO CPU f32 and bf16 runs of ``path`` on ``feeds``; none without openvino."""
    try:
        import openvino
    except ImportError:
        return {}
    core = openvino.Core()
    runs = {}
    for hint in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        request = core.compile_model(str(path), "CPU", config).create_infer_request()
        runs[f"openvino {hint}"] = lambda r=request: r.infer(feeds)
    return runs


def bench_speed(data: PreparedData, folder: Path, windows: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = create_model("fcn4").eval()
    hop = model.default_hop_samples
    float_path = export_onnx(model, folder / "fcn4.onnx", check=False).path
    progress(f"FCN-4 exported; quantizing on {windows} windows of {data.root}")
    int8 = quantize_model(float_path, data, windows=windows, progress=False)
    wave = probe_audio(1, model.window_samples, model.sample_rate)
    figures: dict = {"model": "fcn4", "hop_samples": hop, "int8_max_abs_diff": int8.max_abs_diff}
    for label, threads in THREADS.items():
        engines = {
            "float32": load_engine(float_path, intra_op_threads=threads),
            "int8": load_engine(int8.path, intra_op_threads=threads),
        }
        graphs = {name: engine.incremental(hop) for name, engine in engines.items()}
        states = {name: g.prime(wave)[1] for name, g in graphs.items()}
        full = {f"onnxruntime {n}": (lambda e=e: e.run(wave)) for n, e in engines.items()}
        step = {
            f"onnxruntime {n}": (lambda g=g, s=states[n]: g.step(wave, s))
            for n, g in graphs.items()
        }
        step_inputs = engines["float32"].card.incremental_graph(hop).step_inputs
        step_feeds = dict(zip(step_inputs, [wave, *states["float32"]], strict=True))
        full.update(openvino_runs(float_path, {"waveform": wave}, threads))
        step.update(openvino_runs(graphs_path(float_path, hop), step_feeds, threads))
        progress(f"timing {', '.join(full)} at {label}")
        figures[label] = {
            "full": alternating_medians(full, repeats),
            "step": alternating_medians(step, repeats),
        }
        for engine in engines.values():
            engine.close()
    return figures


def graphs_path(path: Path, hop: int) -> Path:
    return path.with_name(f"{path.stem}.{hop}.step{path.suffix}")


def report_speed(speed: dict) -> None:
    print(f"\nspeed: FCN-4 full size, random weights, hop {speed['hop_samples']} samples")
    print(f"  int8 scores within {speed['int8_max_abs_diff']:.3g} of float32 (random weights)")
    print(
        f"  {'':18} {'graph':6} {'runtime precision':24} {'ms/update':>10} {'updates/s':>10} {'× f32':>6}"
    )
    for label in THREADS:
        for graph in ("full", "step"):
            medians = speed[label][graph]
            base = medians["onnxruntime float32"]
            for name, seconds in medians.items():
                print(
                    f"  {label:18} {graph:6} {name:24} {1e3 * seconds:10.1f} "
                    f"{1 / seconds:10.2f} {base / seconds:6.2f}"
                )


# -- 2. accuracy ---------------------------------------------------------------------------------
def clip_scores(engine, data: PreparedData, indices: list[int], hop: int) -> np.ndarray:
    """Each clip's mean score over its windows at ``hop`` (as tagd-train evaluate)."""
    rows = []
    for i in indices:
        windows = [
            w.samples
            for w in clip_windows(to_float(data.audio(i)), engine.card.window_samples, hop)
        ]
        rows.append(engine.run(np.stack(windows)).mean(axis=0))
    return np.stack(rows)


def bench_accuracy(
    checkpoint: Path, data: PreparedData, tests: list[PreparedData], folder: Path, windows: int
) -> list[dict]:
    """float32 against int8 on the test split of each of ``tests``, quantized once."""
    saved = load_checkpoint(checkpoint)
    model, card = model_from_checkpoint(saved), card_from_checkpoint(saved)
    float_path = export_onnx(model, folder / "trained.onnx", card=card).path
    progress(f"{card.architecture} from {checkpoint} exported; quantizing on {windows} windows")
    int8 = quantize_model(float_path, data, windows=windows, progress=False)
    chain = max((g.max_abs_diff or 0.0) for g in int8.card.incremental.graphs)
    engines = {
        name: load_engine(path) for name, path in (("float32", float_path), ("int8", int8.path))
    }
    results = []
    for test in tests:
        indices = test.indices("test")
        labels = test.label_matrix(indices, card.tags)
        found = {"model": card.architecture, "checkpoint": str(checkpoint), "test": str(test.root)}
        scores = {}
        for name, engine in engines.items():
            progress(f"scoring {len(indices)} test clips of {test.root} with {name}")
            scores[name] = clip_scores(engine, test, indices, card.hop_samples)
            found[name] = summarise(tag_metrics(labels, scores[name], card.tags))["roc_auc_macro"]
        difference = np.abs(scores["int8"] - scores["float32"]).max(axis=1)  # per clip
        found.update(
            clips=len(indices),
            max_clip_score_diff=float(difference.max()),
            p90_clip_score_diff=float(np.percentile(difference, 90)),
            int8_chain_max_abs_diff=chain,
        )
        results.append(found)
    for engine in engines.values():
        engine.close()
    return results


def report_accuracy(accuracy: dict) -> None:
    print(
        f"\naccuracy: {accuracy['model']} ({accuracy['checkpoint']}), test split of "
        f"{accuracy['test']}, {accuracy['clips']} clips"
    )
    print(
        f"  macro ROC-AUC float32 {accuracy['float32']:.4f}, int8 {accuracy['int8']:.4f} "
        f"(Δ {accuracy['int8'] - accuracy['float32']:+.4f}); a clip's largest score "
        f"difference: {accuracy['p90_clip_score_diff']:.3g} at the 90th percentile, "
        f"{accuracy['max_clip_score_diff']:.3g} at most; int8 chain within "
        f"{accuracy['int8_chain_max_abs_diff']:.3g} of int8 full windows"
    )


def verdicts(speed: dict, accuracy: dict | None) -> list[tuple[str, str, float, bool]]:
    """(graph, threads, int8's speed-up, kept) by the rule, for each graph and thread
    count; nothing is kept without an accuracy measured."""
    auc_ok = accuracy is not None and abs(accuracy["int8"] - accuracy["float32"]) <= AUC_RULE
    found = []
    for graph in ("full", "step"):
        for label in THREADS:
            medians = speed[label][graph]
            ratio = medians["onnxruntime float32"] / medians["onnxruntime int8"]
            found.append((graph, label, ratio, auc_ok and ratio >= SPEEDUP_RULE))
    return found


def report_rule(speed: dict, accuracy: dict | None) -> None:
    print(
        f"\nrule: keep a precision at ≥ {SPEEDUP_RULE}× float32 updates/s and macro ROC-AUC "
        f"within {AUC_RULE}"
    )
    if accuracy is None:
        auc = "not measured (no --checkpoint)"
    else:
        change = accuracy["int8"] - accuracy["float32"]
        auc = f"{change:+.4f} ({'ok' if abs(change) <= AUC_RULE else 'not ok'})"
    for graph, label, ratio, kept in verdicts(speed, accuracy):
        verdict = "kept" if kept else "not kept"
        print(f"  int8 {graph:4} {label:16} {ratio:5.2f}×, ROC-AUC {auc}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="prepared set at 12 kHz: calibration (train split)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="a trained FCN checkpoint (.pt) for the accuracy part"
    )
    parser.add_argument(
        "--test",
        type=Path,
        action="append",
        help="prepared set whose test split is scored (repeatable; default: --data); the "
        "first decides the rule",
    )
    parser.add_argument("--calibration-windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"CPU: {cpu()}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")
    torch.set_num_threads(1)
    data = PreparedData(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        speed = bench_speed(data, Path(scratch), SPEED_CALIBRATION_WINDOWS, args.repeats)
        report_speed(speed)
        accuracy = []
        if args.checkpoint:
            tests = [PreparedData(path) for path in args.test or [args.data]]
            accuracy = bench_accuracy(
                args.checkpoint, data, tests, Path(scratch), args.calibration_windows
            )
            for found in accuracy:
                report_accuracy(found)
    report_rule(speed, accuracy[0] if accuracy else None)
    if args.json:
        args.json.write_text(
            json.dumps({"cpu": cpu(), "speed": speed, "accuracy": accuracy}, indent=2)
        )


if __name__ == "__main__":
    main()
