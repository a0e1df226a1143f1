"""Song-level tags from many windows: does a learned aggregator beat today's average?

On held-out clips of several windows each, from one trained CNN checkpoint (frozen: the
thesis's black-box setting), the song scores of:

- ``lstm``: the thesis's two-layer LSTM over the window embeddings (trainer.aggregate);
- ``mean``: a dense layer on the mean of the same embeddings (bag of frames);
- ``average``: today's `tagd tag` / `tagd-train evaluate` score, the mean of the CNN's
  window scores;
- ``lstm fine-tuned`` (with ``--finetune-epochs N``): the LSTM with the CNN trained too,
  at ``--cnn-lr`` (the thesis's fine-tuned setting; slow: every step runs the CNN);
- ``mfcc``: the thesis's MFCC bag of frames: 20 MFCCs per frame, their mean and standard
  deviation over the song, one logistic regression per tag (no CNN at all);

by macro and weighted ROC-AUC (trainer.evaluate) on the prepared set's test split and on
every ``--heldout`` prepared set (test split; e.g. the held-out soundfont). The
aggregators train on the set's train split and keep their best epoch on its valid split.
A clip must be longer than one window for aggregation to mean anything: SampleCNN's
2.7 s windows give ten a 29.1 s clip; an FCN (29.12 s windows) needs longer songs.

``--two-part`` makes songs whose parts differ out of any prepared set: each clip
followed by another clip of its split (a random pairing, fixed by ``--seed``), a tag
present where either part has it, unknown where neither has it and one leaves it
unknown. A rendered piece keeps its tags from start to end; a two-part song does not,
which is where the thesis expects a learned aggregator to help.

    python bench/aggregate.py --checkpoint bench-quality/runs/samplecnn/best.pt \\
        --data bench-quality/broadcast/prepared-22050 \\
        --heldout bench-quality/soundfont-timgm6mb/prepared-22050

Not part of the test run (minutes on two cores). Figures are for this machine and this
run; docs/training.md has the table and the command.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import torch
from machine import cpu  # bench/machine.py
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from trainer.aggregate import (
    AggregateConfig,
    aggregate_scores,
    average_scores,
    embed_clips,
    load_aggregator,
    metrics,
    train_aggregator,
)
from trainer.checkpoint import card_from_checkpoint, load_checkpoint, model_from_checkpoint
from trainer.data.dataset import (
    INDEX_NAME,
    PREPARED_FORMAT,
    PREPARED_VERSION,
    PreparedData,
    to_float,
)

N_MFCC = 20


def two_part_songs(root: Path, out: Path, seed: int) -> Path:
    """A prepared set of two-part songs made of ``root``'s clips (see the docstring)."""
    data = PreparedData(root)
    rng = np.random.default_rng(seed)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    pieces, clips, offset = [], [], 0
    for split in ("train", "valid", "test"):
        idx = data.indices(split)
        partners = rng.permutation(idx)
        for first, second in zip(idx, partners, strict=True):
            if first == second:
                second = idx[(idx.index(first) + 1) % len(idx)]
            audio = np.concatenate([data.audio(first), data.audio(second)])
            rows = np.stack([data.labels(first), data.labels(second)])  # 1, 0 or NaN
            present = np.nansum(rows, axis=0) > 0
            unknown = ~present & np.isnan(rows).any(axis=0)
            clips.append(
                {
                    "id": f"{data.clips[first].clip_id}+{data.clips[second].clip_id}",
                    "split": split,
                    "tags": np.flatnonzero(present).tolist(),
                    "unknown": np.flatnonzero(unknown).tolist(),
                    "shard": "shard-00000.npy",
                    "offset": offset,
                    "length": len(audio),
                }
            )
            pieces.append(audio)
            offset += len(audio)
    np.save(out / "shards" / "shard-00000.npy", np.concatenate(pieces), allow_pickle=False)
    index = {
        "format": PREPARED_FORMAT,
        "version": PREPARED_VERSION,
        "source": f"two-part songs of {data.source or root}",
        "sample_rate": data.sample_rate,
        "tags": data.tags,
        "clips": clips,
    }
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


def mfcc_bag(data: PreparedData, indices: list[int]) -> np.ndarray:
    """Per clip: the mean and standard deviation of each MFCC over its frames."""
    rows = []
    for i in indices:
        mfcc = librosa.feature.mfcc(y=to_float(data.audio(i)), sr=data.sample_rate, n_mfcc=N_MFCC)
        rows.append(np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]))
    return np.stack(rows)


def mfcc_scores(train_x, train_y, test_x) -> np.ndarray:
    """One logistic regression per tag on its known training labels; 0.5 where none."""
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    scores = np.full((len(test_x), train_y.shape[1]), 0.5)
    for tag in range(train_y.shape[1]):
        known = ~np.isnan(train_y[:, tag])
        y = train_y[known, tag]
        if len(np.unique(y)) < 2:
            continue
        model = LogisticRegression(max_iter=2000, C=0.1).fit(train_x[known], y)
        scores[:, tag] = model.predict_proba(test_x)[:, 1]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained CNN (.pt)")
    parser.add_argument("--data", type=Path, required=True, help="prepared: train/valid/test")
    parser.add_argument("--heldout", type=Path, nargs="*", default=[], help="more test sets")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared CPU)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="0: no fine-tuned row")
    parser.add_argument("--cnn-lr", type=float, default=1e-4, help="with --finetune-epochs")
    parser.add_argument("--two-part", action="store_true", help="songs of two clips each")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    if args.two_part:
        made = Path(tempfile.mkdtemp(prefix="two-part-"))
        atexit.register(shutil.rmtree, made, ignore_errors=True)
        args.data = two_part_songs(args.data, made / args.data.name, args.seed)
        args.heldout = [
            two_part_songs(root, made / root.parent.name / root.name, args.seed)
            for root in args.heldout
        ]

    checkpoint = load_checkpoint(args.checkpoint)
    cnn = model_from_checkpoint(checkpoint).eval()
    tags = list(checkpoint["tags"])
    hop = card_from_checkpoint(checkpoint).hop_samples
    data = PreparedData(args.data)
    splits = {s: data.indices(s) for s in ("train", "valid", "test")}
    print(
        f"CPU: {cpu()}; {cnn.arch} ({args.checkpoint}), embedding {cnn.embedding_size}, "
        f"windows {cnn.window_samples / cnn.sample_rate:.2f} s at hop {hop / cnn.sample_rate:.2f} s",
        flush=True,
    )
    embedded = {s: embed_clips(cnn, data, idx, hop) for s, idx in splits.items()}
    lengths = [len(s) for s in embedded["test"]]
    print(
        f"{data.root}: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} clips; "
        f"test songs of {min(lengths)}-{max(lengths)} windows; embedded in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )

    test_sets = {"test": (data, splits["test"], embedded["test"])}
    for root in args.heldout:
        other = PreparedData(root)
        idx = other.indices("test")
        test_sets[f"{root.parent.name}/{root.name}"] = (
            other,
            idx,
            embed_clips(cnn, other, idx, hop),
        )

    scores: dict[str, dict[str, np.ndarray]] = {name: {} for name in test_sets}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("lstm", "mean"):
            t0 = time.monotonic()
            config = AggregateConfig(
                checkpoint=str(args.checkpoint),
                data=str(args.data),
                out=f"{tmp}/{kind}",
                kind=kind,
                hidden=args.hidden,
                epochs=args.epochs,
                seed=args.seed,
                progress=False,
            )
            result = train_aggregator(config, embedded)
            aggregator, _ = load_aggregator(f"{tmp}/{kind}/aggregator.pt")
            for name, (_, _, sequences) in test_sets.items():
                scores[name][kind] = aggregate_scores(aggregator, sequences)
            print(
                f"{kind}: best epoch {result.best_epoch} of {args.epochs}, "
                f"{time.monotonic() - t0:.0f} s",
                flush=True,
            )
        if args.finetune_epochs:
            t0 = time.monotonic()
            config = AggregateConfig(
                checkpoint=str(args.checkpoint),
                data=str(args.data),
                out=f"{tmp}/tuned",
                hidden=args.hidden,
                epochs=args.finetune_epochs,
                finetune=True,
                cnn_lr=args.cnn_lr,
                seed=args.seed,
                progress=False,
            )
            result = train_aggregator(config)
            tuned = model_from_checkpoint(load_checkpoint(f"{tmp}/tuned/cnn.pt")).eval()
            aggregator, _ = load_aggregator(f"{tmp}/tuned/aggregator.pt")
            for name, (other, idx, _) in test_sets.items():
                sequences = embed_clips(tuned, other, idx, hop)
                scores[name]["lstm fine-tuned"] = aggregate_scores(aggregator, sequences)
            print(
                f"lstm fine-tuned: best epoch {result.best_epoch} of {args.finetune_epochs}, "
                f"{time.monotonic() - t0:.0f} s",
                flush=True,
            )
    for name, (_, _, sequences) in test_sets.items():
        scores[name]["average"] = average_scores(cnn, sequences)

    t0 = time.monotonic()
    train_x = mfcc_bag(data, splits["train"])
    train_y = data.label_matrix(splits["train"], tags)
    for name, (other, idx, _) in test_sets.items():
        scores[name]["mfcc"] = mfcc_scores(train_x, train_y, mfcc_bag(other, idx))
    print(f"mfcc: {time.monotonic() - t0:.0f} s", flush=True)

    print("\n| test set | song score | macro ROC-AUC | weighted ROC-AUC |")
    print("|---|---|---|---|")
    for name, (other, idx, _) in test_sets.items():
        labels = other.label_matrix(idx, tags)
        for method, song_scores in scores[name].items():
            m = metrics(labels, song_scores, tags)
            print(f"| {name} | {method} | {m['roc_auc_macro']:.4f} | {m['roc_auc_weighted']:.4f} |")
    print(f"\n{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
