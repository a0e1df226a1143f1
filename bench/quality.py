"""What the default recipes learn: accuracy on rendered music, beside a minimal reference.

Makes (or reuses) a rendered dataset (``tagd-train synthetic --kind rendered``: General
MIDI pieces through FluidSynth, espeak-ng speech), prepares it at each model's rate,
trains each model with nothing but ``--model`` and ``--hparam width=…`` given (the
default recipe), and prints test macro ROC-AUC / PR-AUC, minutes and examples per
second. Beside them, in the same run on the same clips:

- ``reference``: the minimal loop a practitioner would write first (the same FCN with
  dropout only before its output layer, Adam 1e-3, batch 16, fixed epochs, no schedule,
  no validation), so a default recipe that learns less than that shows at once;
- ``log-mel + logistic``: per-band mean and deviation of the log-mel, one logistic
  regression per tag: what a model gets without learning any time-frequency pattern.

    python bench/quality.py                        # 400 clips, 25 epochs, fcn5 + samplecnn
    python bench/quality.py --clips 120 --epochs 2 --models fcn5   # a quick look

Not part of the test run (about an hour on two cores at the defaults). Figures are
for this machine and this run; docs/training.md has the table and the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.data.dataset import PreparedData, crop, random_starts
from trainer.data.mtt import ANNOTATIONS_NAME, load_mtt
from trainer.data.prepare import prepare
from trainer.data.rendered import write_rendered
from trainer.evaluate import evaluate_model, predict_clips, summarise, tag_metrics
from trainer.models import create_model
from trainer.train import TrainConfig, train

INSTRUMENTS = ("piano", "bells", "organ", "guitar", "bass", "strings", "brass", "woodwind", "synth")  # fmt: skip


def rendered_set(root: Path, clips: int, seed: int) -> Path:
    annotations = root / ANNOTATIONS_NAME
    if annotations.is_file():
        print(f"reusing {annotations}")
        return annotations
    return write_rendered(root, clips, seed, jobs=os.cpu_count() or 1, progress=True)


def prepared(root: Path, annotations: Path, sample_rate: int) -> PreparedData:
    out = root / f"prepared-{sample_rate}"
    prepare(load_mtt(annotations, n_tags=None), out, sample_rate, progress=False)
    return PreparedData(out)


def row(name: str, summary: dict, per_tag, seconds: float, examples_per_s: float | None,
        examples: int | None = None) -> dict:  # fmt: skip
    instruments = [r.roc_auc for r in per_tag if r.tag in INSTRUMENTS and not np.isnan(r.roc_auc)]
    return {
        "model": name,
        "roc_auc": summary["roc_auc_macro"],
        "pr_auc": summary["pr_auc_macro"],
        "instruments": float(np.mean(instruments)) if instruments else float("nan"),
        "minutes": seconds / 60,
        "examples_per_s": examples_per_s,
        "examples": examples,  # training examples seen, all epochs
    }


def default_recipe(model_name: str, width: float, data: PreparedData, out: Path, epochs: int) -> dict:  # fmt: skip
    started = time.monotonic()
    result = train(
        TrainConfig(
            data=str(data.root), out=str(out / model_name), model=model_name,
            hparams={"width": width}, epochs=epochs, progress=False, tensorboard=False,
        )
    )  # fmt: skip
    seconds = time.monotonic() - started
    model = model_from_checkpoint(load_checkpoint(result.best_path))
    evaluation = evaluate_model(model, data)
    speed = float(np.mean([h["examples_per_second"] for h in result.history]))
    examples = result.examples_per_epoch * result.epochs_run
    return row(f"{model_name} (default recipe)", evaluation.summary, evaluation.per_tag, seconds, speed, examples)  # fmt: skip


def reference(width: float, data: PreparedData, epochs: int, seed: int = 0) -> dict:
    """The minimal loop: no schedule, no validation, the last weights."""
    torch.manual_seed(seed)
    model = create_model("fcn5", data.n_tags, width=width, dropout=0.0, head_dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train_idx = data.indices("train")
    lengths = np.array([data.clips[i].length for i in train_idx])
    rng = np.random.default_rng(seed)
    started, seen = time.monotonic(), 0
    model.train()
    for _ in range(epochs):
        starts = random_starts(lengths, model.window_samples, rng)
        order = rng.permutation(len(train_idx))
        for first in range(0, len(order) - 15, 16):
            batch = order[first : first + 16]
            waves = torch.from_numpy(np.stack([crop(data.audio(train_idx[k]), int(starts[k]), model.window_samples) for k in batch]))  # fmt: skip
            targets = torch.from_numpy(np.stack([data.labels(train_idx[k]) for k in batch]))
            loss = loss_fn(model.forward_logits(waves), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(batch)
    seconds = time.monotonic() - started
    test_idx = data.indices("test")
    scores = predict_clips(model, data, test_idx)
    per_tag = tag_metrics(data.label_matrix(test_idx), scores, data.tags)
    return row("reference: minimal loop, fcn5", summarise(per_tag), per_tag, seconds, seen / seconds, seen)  # fmt: skip


def logistic_reference(data: PreparedData) -> dict:
    """Bag of frames: per-band log-mel mean and deviation, a logistic regression per tag."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from trainer.models.frontend import LogMel, LogMelConfig

    started = time.monotonic()
    frontend = LogMel(LogMelConfig(data.sample_rate, 512, 256, 96))

    def features(indices: list[int]) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for i in indices:
                mel = frontend(torch.from_numpy(crop(data.audio(i), 0, data.clips[i].length))[None])[0]  # fmt: skip
                rows.append(torch.cat([mel.mean(dim=1), mel.std(dim=1)]).numpy())
        return np.stack(rows)

    train_idx, test_idx = data.indices("train"), data.indices("test")
    scaler = StandardScaler().fit(features(train_idx))
    x_train, x_test = scaler.transform(features(train_idx)), scaler.transform(features(test_idx))
    y_train = data.label_matrix(train_idx)
    scores = np.zeros((len(test_idx), data.n_tags))
    for t in range(data.n_tags):
        if 0 < y_train[:, t].sum() < len(y_train):
            fit = LogisticRegression(C=0.1, max_iter=2000).fit(x_train, y_train[:, t])
            scores[:, t] = fit.predict_proba(x_test)[:, 1]
    per_tag = tag_metrics(data.label_matrix(test_idx), scores, data.tags)
    return row("reference: log-mel stats + logistic", summarise(per_tag), per_tag, time.monotonic() - started, None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench-quality"), help="dataset and run folder")  # fmt: skip
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--models", nargs="+", default=["fcn5", "samplecnn"])
    parser.add_argument("--no-reference", action="store_true", help="skip the minimal loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")  # fmt: skip
    annotations = rendered_set(args.data, args.clips, args.seed)
    by_rate: dict[int, PreparedData] = {}
    results = []
    for name in args.models:
        rate = create_model(name).sample_rate
        if rate not in by_rate:
            by_rate[rate] = prepared(args.data, annotations, rate)
        data = by_rate[rate]
        print(f"training {name} width {args.width}, {args.epochs} epochs, default recipe ...", flush=True)  # fmt: skip
        results.append(default_recipe(name, args.width, data, args.data / "runs", args.epochs))
    fcn_data = by_rate.get(12_000) or prepared(args.data, annotations, 12_000)
    if not args.no_reference:
        print("training the minimal reference loop ...", flush=True)
        results.append(reference(args.width, fcn_data, args.epochs))
    results.append(logistic_reference(fcn_data))

    clips = {s: len(fcn_data.indices(s)) for s in ("train", "valid", "test")}
    print(f"\n{args.data}: {sum(clips.values())} rendered clips ({clips['train']} / {clips['valid']} / {clips['test']}), "  # fmt: skip
          f"width {args.width}, {args.epochs} epochs; load average at end {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| model | test ROC-AUC | test PR-AUC | instrument tags ROC-AUC | minutes | examples/s | examples seen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{r['examples_per_s']:.1f}" if r["examples_per_s"] else "–"
        seen = f"{r['examples']:,}" if r["examples"] else "–"
        print(f"| {r['model']} | {r['roc_auc']:.3f} | {r['pr_auc']:.3f} | {r['instruments']:.3f} | {r['minutes']:.1f} | {speed} | {seen} |")  # fmt: skip


if __name__ == "__main__":
    main()
