"""What `aggregate = true` costs `tagd serve` a window update, on ONNX Runtime's CPU provider.

FCN-4 at full size with random weights (as bench/incremental.py builds it) and an
untrained LSTM aggregator of the default size over its embeddings (random weights cost
what trained ones do), exported together with `tagd-train export --aggregator`. One
stream's consecutive windows, one hop apart, through each scorer `tagd serve` can run:

- ``full``: full windows, no aggregator;
- ``full + aggregate, both CNNs``: the model's graph and then the embedding graph on the
  same window, as `aggregate = true` ran before the embedding graph's scores were used;
- ``full + aggregate``: tagd.aggregate's ``AggregatingScorer`` over full windows (the
  embedding graph gives the scores and the embedding: one CNN);
- ``incremental``: the step graph (tagd.incremental's ``IncrementalRunner``);
- ``incremental + embedding graph``: the step graph, then the embedding graph on the
  whole window, as `aggregate = true` runs with incremental graphs that have no
  ``embedding`` output (a model exported before they had one);
- ``incremental + aggregate``: ``AggregatingScorer`` over the incremental runner, whose
  step graph gives the embedding too: a step and an LSTM step.

Each figure is the median over ``--repeats`` updates, taking turns; the aggregator's LSTM
step is in every ``aggregate`` row. The scores and song scores of the rows are checked
against each other (printed). Figures compare within one run only: the CPU is printed,
and other processes may share it.

    .venv/bin/python bench/aggregate_cost.py --repeats 15
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu  # bench/machine.py

from tagd.aggregate import AggregatingScorer, AggregatorGraphs, SongChains
from tagd.card import read_card
from tagd.engines import load_engine
from tagd.incremental import IncrementalRunner
from tagd.scoring import FullWindows, WindowAt
from trainer.aggregate import write_untrained_aggregator
from trainer.export import export_onnx, probe_audio
from trainer.models import create_model

MODEL = "fcn4"


def export(folder: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(MODEL).eval()
    hop = model.default_hop_samples
    tags = [f"tag{i}" for i in range(model.config.n_tags)]
    aggregator = write_untrained_aggregator(folder / "aggregator.pt", model, tags, hop)
    return export_onnx(model, folder / f"{MODEL}.onnx", tags=tags, aggregator=aggregator).path


class Stream:
    """One stream's windows, one hop apart: ``next`` gives the next one's key and samples."""

    def __init__(self, audio: np.ndarray, window: int, hop: int, name: str):
        self.audio, self.window, self.hop, self.name = audio, window, hop, name
        self.start = 0

    def next(self) -> tuple[list[WindowAt], np.ndarray]:
        start, self.start = self.start, self.start + self.hop
        return [WindowAt(self.name, 0, start)], self.audio[None, start : start + self.window]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="updates timed per row")
    args = parser.parse_args()
    print(
        f"CPU: {cpu()}, {os.cpu_count()} CPUs seen; load average "
        f"{os.getloadavg()[0]:.2f} (shared with other work: compare rows of one run only)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        path = export(Path(folder))
        print(f"exported {MODEL} with an lstm aggregator in {time.perf_counter() - began:.0f} s")
        card = read_card(path)
        hop = card.aggregator.hop_samples
        samples = card.window_samples + args.repeats * hop
        audio = probe_audio(1, samples, card.sample_rate, seed=1)[0]

        full_engine = load_engine(path)
        step_engine = load_engine(path)
        graphs = AggregatorGraphs(path, card)
        full = FullWindows([full_engine], hop)
        incremental = IncrementalRunner([step_engine.incremental(hop)])
        chains = SongChains(graphs, hop)

        def both_cnns(inner):
            def run(keys, batch):
                scores = inner.run(keys, batch)
                _, embeddings = graphs.embed(batch)
                key = keys[0]
                return scores, chains.advance(key.stream, key.epoch, key.start, embeddings[0])[0]

            return run

        def aggregating(inner):
            scorer = AggregatingScorer(inner, graphs)

            def run(keys, batch):
                scores = scorer.run(keys, batch)
                song = scorer.song(keys[0])["scores"]  # rounded as published
                return scores, np.array([song[tag] for tag in card.tags])

            return run

        rows: dict[str, Callable] = {
            "full": lambda keys, batch: (full.run(keys, batch), None),
            "full + aggregate, both CNNs": both_cnns(full),
            "full + aggregate": aggregating(full),
            "incremental": lambda keys, batch: (incremental.run(keys, batch), None),
            "incremental + embedding graph": both_cnns(incremental),
            "incremental + aggregate": aggregating(incremental),
        }
        streams = {name: Stream(audio, card.window_samples, hop, name) for name in rows}
        times: dict[str, list[float]] = {name: [] for name in rows}
        results: dict[str, list] = {name: [] for name in rows}
        for turn in range(args.repeats + 1):  # the first: ONNX Runtime plans and warms up
            for name, run in rows.items():
                keys, batch = streams[name].next()
                start = time.perf_counter()
                got = run(keys, batch)
                if turn:
                    times[name].append(time.perf_counter() - start)
                results[name].append(got)

    print(
        f"\n{MODEL}, hop {hop / card.sample_rate:.3f} s, one stream, median of "
        f"{args.repeats} updates (ms):"
    )
    base = np.median(times["full"])
    for name, found in times.items():
        median = float(np.median(found))
        print(f"  {name:32} {1e3 * median:8.1f}   {median / base:5.2f} x full")
    print("\nlargest difference of each row's scores from full windows', and of its song")
    print("scores from both CNNs' (published songs are rounded to their decimals):")
    reference = results["full + aggregate, both CNNs"]
    for name, got in results.items():
        scores = max(
            float(np.max(np.abs(g[0] - f[0]))) for g, f in zip(got, results["full"], strict=True)
        )
        line = f"  {name:32} scores {scores:.1e}"
        if got[0][1] is not None:
            song = max(
                float(np.max(np.abs(g[1] - r[1]))) for g, r in zip(got, reference, strict=True)
            )
            line += f", songs {song:.1e}"
        print(line)


if __name__ == "__main__":
    main()
