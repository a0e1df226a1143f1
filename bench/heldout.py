"""Trained models on the held-out real recordings, package by package.

bench/quality.py gives one figure for all the real recordings of the ``heldout`` packages
(trainer/data/recordings.py); this scores checkpoints on the same set, made by the same
code (``recordings_set``, prepared at each model's rate, every clip a test clip), at each
card's thresholds, and shows where the figure comes from: per package, the clips with
``speech`` and ``instrumental`` on as tagd publishes them, then the music clips that fire
``speech`` and the speech clips that do not, with the recordings they were cut from.

    python bench/heldout.py bench-quality/runs/fcn5/best.pt --data bench-quality

Not part of the test run (a few minutes a checkpoint on two cores, once the packages are
fetched: about 1.2 GB with ``apt-get download``). docs/training.md has the figures.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from quality import SPEECH, on_recordings, prepared, recordings_set

from trainer.checkpoint import card_from_checkpoint, load_checkpoint, model_from_checkpoint
from trainer.data.tags import exclusions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="best.pt files")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("bench-quality"),
        help="bench/quality.py's folder: the set is DATA/recordings-heldout [bench-quality]",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}"
    )

    manifest = recordings_set(args.data / "recordings-heldout")
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    kinds = {
        row["package"]: "speech" if row["tags"] == SPEECH else "music" for row in rows.values()
    }
    for checkpoint in args.checkpoints:
        stored = load_checkpoint(checkpoint)
        model, tags, card = (
            model_from_checkpoint(stored),
            stored["tags"],
            card_from_checkpoint(stored),
        )
        # a card written before `excludes` gets them as `tagd-train evaluate` adds them
        card.excludes = card.excludes or exclusions(card.tags)
        real = prepared(manifest, model.sample_rate, split="test")
        figures, per_clip = on_recordings(model, tags, card, real)
        n_speech, n_music = figures["real_clips"]
        print(
            f"\n{checkpoint}: {n_speech} speech and {n_music} music clips; speech ROC-AUC "
            f"{figures['speech_auc']:.3f}; speech on {figures['speech_on_speech']:.0%} of the "
            f"speech, {figures['speech_on_music']:.0%} of the music (threshold "
            f"{card.thresholds[tags.index(SPEECH)]:.3f}); instrumental ROC-AUC "
            f"{figures['instrumental_auc']:.3f}, on {figures['instrumental_on_speech']:.0%} "
            f"({figures['instrumental_alone_on_speech']:.0%} by its own threshold) of the "
            f"speech, {figures['instrumental_on_music']:.0%} of the music\n"
        )
        clips, speech_on, instrumental_on = Counter(), Counter(), Counter()
        for clip, (_, _, speech, instrumental) in per_clip.items():
            package = rows[clip]["package"]
            clips[package] += 1
            speech_on[package] += speech
            instrumental_on[package] += instrumental
        print("| package | kind | clips | speech on | instrumental on |")
        print("|---|---|---|---|---|")
        for package in clips:
            print(
                f"| {package} | {kinds[package]} | {clips[package]} | {speech_on[package]} | "
                f"{instrumental_on[package]} |"
            )
        wrong = [
            (clip, scores)
            for clip, scores in per_clip.items()
            if scores[2] != (rows[clip]["tags"] == SPEECH)
        ]
        print("\nclips where speech is wrong (speech score, the recordings):")
        for clip, scores in sorted(wrong, key=lambda item: -item[1][0]):
            print(f"  {kinds[rows[clip]['package']]} {clip} {scores[0]:.3f} {rows[clip]['source']}")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
