"""What the default recipes learn, and whether it holds on sound they were not made from.

Renders the training set the way ``tagd-train synthetic --kind rendered`` does by default
(General MIDI pieces through every installed soundfont but the held-out one, a production
and transmission chain per clip, real speech and music from the trainer's Debian
packages beside espeak-ng), prepares it at each model's rate, trains each model with
nothing but ``--model`` and ``--hparam width=…`` given (the default recipe), and scores it:

- in domain: the set's own test split (macro ROC-AUC, PR-AUC, the instrument tags);
- a held-out soundfont: the same test pieces played with the soundfont left out of
  training (TimGM6mb), nothing else changed: the instrument tags' mean ROC-AUC;
- real recordings from Debian packages never trained on (the ``heldout`` role in
  trainer/data/recordings.py): ROC-AUC of the ``speech`` score, speech clips against
  music clips; the share of speech clips and of music clips with ``speech`` on at the
  card's threshold; the share of speech clips with ``instrumental`` on.

Beside them, in the same run on the same clips:

- ``baseline``: the same FCN-5 recipe trained on the set as it was rendered before
  (FluidR3 only, no chain, no real recordings, the same seed's pieces), scored on the
  same held-out sets; every model is also scored on that clean set's test clips;
- ``reference``: the minimal loop a practitioner would write first (the same FCN with
  dropout only before its output layer, Adam 1e-3, batch 16, fixed epochs, no schedule,
  no validation), so a default recipe that learns less than that shows at once;
- ``log-mel + logistic``: per-band mean and deviation of the log-mel, one logistic
  regression per tag: what a model gets without learning any time-frequency pattern.

    python bench/quality.py                        # 400 clips, 25 epochs, fcn5 + samplecnn
    python bench/quality.py --clips 120 --epochs 2 --models fcn5   # a quick look
    python bench/quality.py --models fcn5 --turns 0.5 --runs runs-turns --no-baseline --no-reference
    python bench/quality.py --clips 1000 --models fcn5 --epochs 0 --no-baseline   # to the recipe's end
    python bench/quality.py --clips 2500 --models fcn5 --epochs 0 --no-baseline --no-reference  # every target, ~2 h
    python bench/quality.py --clips 1000 --models fcn5 --epochs 0 --no-baseline --resume   # after a stop

``--epochs 0`` trains each model as ``tagd-train train`` does without ``--epochs``: the
recipe's (100 at most; the ``fcn`` recipe's plateau rule ends it, SampleCNN's cosine runs
them all), and the minimal reference loop for as many epochs as the first model ran.

``--resume`` continues each model's run from the ``last.pt`` it left in ``DATA/RUNS``
(one stopped by hand or by a reboot goes on where it stopped; one that ran to its end is
scored again without training), with the options it was started with. Rendered sets are
always reused where their manifest is. A row's minutes are its epochs' time, summed over
every process that trained it.

Not part of the test run (about an hour on two cores at the defaults). Figures are
for this machine and this run; docs/training.md has the table and the command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from trainer.checkpoint import card_from_checkpoint, load_checkpoint, model_from_checkpoint
from trainer.data import recordings, rendered
from trainer.data.dataset import PreparedData, crop, random_starts
from trainer.data.manifest import load_manifest
from trainer.data.prepare import prepare
from trainer.evaluate import evaluate_model, predict_clips, summarise, tag_metrics
from trainer.models import create_model
from trainer.train import TrainConfig, masked_bce, train

INSTRUMENTS = ("piano", "bells", "organ", "guitar", "bass", "strings", "brass", "woodwind", "synth")


HELDOUT_SOUNDFONT = "timgm6mb"
REFERENCE_EPOCHS = 25  # the minimal loop's with --epochs 0 when no model trained first
SPEECH, INSTRUMENTAL = "speech", "instrumental"


def rendered_set(
    root: Path,
    clips: int,
    seed: int,
    sources: rendered.Sources,
    splits: tuple[str, ...] | None = None,
) -> Path:
    manifest = root / "manifest.csv"
    if manifest.is_file():
        print(f"reusing {manifest}")
        return manifest
    print(f"rendering {root.name}: {sources.describe()}", flush=True)
    return rendered.write_rendered(
        root,
        clips,
        seed,
        layout="manifest",
        jobs=os.cpu_count() or 1,
        progress=True,
        sources=sources,
        splits=splits,
    )


def recordings_set(root: Path) -> Path:
    """Real recordings of the packages no model here trains on, every clip a test clip;
    made again where the catalog's held-out packages are not those of the set found."""
    manifest = root / "manifest.csv"
    packages = [name for name, p in recordings.PACKAGES.items() if p.role == "heldout"]
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as handle:
            found = {row["package"] for row in csv.DictReader(handle)}
        if found == set(packages):
            print(f"reusing {manifest}")
            return manifest
        print(f"{manifest}: not the catalog's held-out packages, making it again", flush=True)
    print(f"real recordings, held out: {', '.join(packages)}", flush=True)
    return recordings.write_recordings_set(
        root, packages, max_clips_per_package=MAX_CLIPS_PER_PACKAGE, progress=True
    )


MAX_CLIPS_PER_PACKAGE = 40  # so that no one package's sound decides the figure


def prepared(manifest: Path, sample_rate: int, split: str | None = None) -> PreparedData:
    """``manifest``'s clips decoded at ``sample_rate``; ``split`` puts them all in one."""
    out = manifest.parent / f"prepared-{sample_rate}"
    labelled = load_manifest(manifest)
    if split:
        labelled.clips = [dataclasses.replace(clip, split=split) for clip in labelled.clips]
    prepare(labelled, out, sample_rate, progress=False)
    return PreparedData(out)


def held_out(
    checkpoint: Path, clean: PreparedData, soundfont: PreparedData, real: PreparedData
) -> dict:
    """The checkpoint on the clean FluidR3 set's test clips (the set as rendered before),
    the held-out soundfont's test pieces and held-out recordings, at its card's thresholds
    (chosen on its own validation split): on and off as tagd publishes them (the card's
    ``excludes`` included: ``instrumental`` is off while ``speech`` is on), and
    ``instrumental`` by its own threshold alone beside it."""
    stored = load_checkpoint(checkpoint)
    model, tags, card = model_from_checkpoint(stored), stored["tags"], card_from_checkpoint(stored)
    test = clean.indices("test")
    clean_auc = summarise(
        tag_metrics(clean.label_matrix(test, tags), predict_clips(model, clean, test), tags)
    )
    test = soundfont.indices("test")
    per_tag = tag_metrics(
        soundfont.label_matrix(test, tags), predict_clips(model, soundfont, test), tags
    )
    instruments = [r.roc_auc for r in per_tag if r.tag in INSTRUMENTS and not np.isnan(r.roc_auc)]
    return {
        "clean_roc_auc": clean_auc["roc_auc_macro"],
        "soundfont_instruments": float(np.mean(instruments)),
    } | on_recordings(model, tags, card, real)[0]


def on_recordings(model, tags: list[str], card, real: PreparedData) -> tuple[dict, dict]:
    """The model on the held-out recordings at its card's thresholds: the figures, and per
    clip (keyed by clip id) its ``speech`` and ``instrumental`` scores and whether each is on
    as tagd publishes it."""
    thresholds = dict(zip(tags, card.thresholds, strict=True))
    clips = real.indices("test")
    scores = predict_clips(model, real, clips)
    is_speech = real.label_matrix(clips, [SPEECH])[:, 0] == 1
    on = card.over(scores)
    speech_on, instrumental_on = on[:, tags.index(SPEECH)], on[:, tags.index(INSTRUMENTAL)]
    speech, instrumental = scores[:, tags.index(SPEECH)], scores[:, tags.index(INSTRUMENTAL)]
    instrumental_alone = instrumental >= thresholds[INSTRUMENTAL]
    per_clip = {
        real.clips[c].clip_id: (
            float(speech[k]),
            float(instrumental[k]),
            bool(speech_on[k]),
            bool(instrumental_on[k]),
        )
        for k, c in enumerate(clips)
    }
    figures = {
        "speech_auc": float(roc_auc_score(is_speech, speech)),
        "speech_on_speech": float(speech_on[is_speech].mean()),
        "speech_on_music": float(speech_on[~is_speech].mean()),
        "instrumental_on_speech": float(instrumental_on[is_speech].mean()),
        "instrumental_alone_on_speech": float(instrumental_alone[is_speech].mean()),
        "instrumental_on_music": float(instrumental_on[~is_speech].mean()),
        "instrumental_auc": float(roc_auc_score(~is_speech, instrumental)),
        "real_clips": (int(is_speech.sum()), int((~is_speech).sum())),
    }
    return figures, per_clip


def row(
    name: str,
    summary: dict,
    per_tag,
    seconds: float,
    examples_per_s: float | None,
    examples: int | None = None,
) -> dict:
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


def default_recipe(
    model_name: str,
    width: float,
    data: PreparedData,
    out: Path,
    epochs: int,
    turns: float | None = None,
    resume: bool = False,
) -> dict:
    """``model_name`` trained with its default recipe (``turns``: the one option given
    beside it, None for the recipe's; ``resume``: from the run's ``last.pt`` where there is
    one), scored on the set's test split."""
    result = train(
        TrainConfig(
            data=str(data.root),
            out=str(out / model_name),
            model=model_name,
            hparams={"width": width},
            epochs=epochs or None,  # 0: the recipe's
            turns=turns,
            progress=False,
            tensorboard=False,
            resume=resume,
        )
    )
    seconds = sum(epoch["seconds"] for epoch in result.history)  # a resumed run's too
    model = model_from_checkpoint(load_checkpoint(result.best_path))
    evaluation = evaluate_model(model, data)
    speed = float(np.mean([h["examples_per_second"] for h in result.history]))
    examples = result.examples_per_epoch * result.epochs_run
    result_row = row(
        f"{model_name} (default recipe)",
        evaluation.summary,
        evaluation.per_tag,
        seconds,
        speed,
        examples,
    )
    return result_row | {"checkpoint": result.best_path, "epochs": result.epochs_run}


def reference(width: float, data: PreparedData, epochs: int, seed: int = 0) -> dict:
    """The minimal loop: no schedule, no validation, the last weights."""
    torch.manual_seed(seed)
    model = create_model("fcn5", data.n_tags, width=width, dropout=0.0, head_dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = masked_bce
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
            waves = torch.from_numpy(
                np.stack(
                    [
                        crop(data.audio(train_idx[k]), int(starts[k]), model.window_samples)
                        for k in batch
                    ]
                )
            )
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
    return row(
        "reference: minimal loop, fcn5", summarise(per_tag), per_tag, seconds, seen / seconds, seen
    )


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
                mel = frontend(
                    torch.from_numpy(crop(data.audio(i), 0, data.clips[i].length))[None]
                )[0]
                rows.append(torch.cat([mel.mean(dim=1), mel.std(dim=1)]).numpy())
        return np.stack(rows)

    train_idx, test_idx = data.indices("train"), data.indices("test")
    scaler = StandardScaler().fit(features(train_idx))
    x_train, x_test = scaler.transform(features(train_idx)), scaler.transform(features(test_idx))
    y_train = data.label_matrix(train_idx)
    scores = np.zeros((len(test_idx), data.n_tags))
    for t in range(data.n_tags):
        known = ~np.isnan(y_train[:, t])  # a real recording leaves its instruments unknown
        if 0 < y_train[known, t].sum() < known.sum():
            fit = LogisticRegression(C=0.1, max_iter=2000).fit(x_train[known], y_train[known, t])
            scores[:, t] = fit.predict_proba(x_test)[:, 1]
    per_tag = tag_metrics(data.label_matrix(test_idx), scores, data.tags)
    return row(
        "reference: log-mel stats + logistic",
        summarise(per_tag),
        per_tag,
        time.monotonic() - started,
        None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path("bench-quality"), help="datasets and runs"
    )
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs",
        type=int,
        default=25,
        help="epochs each model trains [25]; 0: the recipe's own end (the plateau rule's)",
    )
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--models", nargs="+", default=["fcn5", "samplecnn"])
    parser.add_argument("--no-reference", action="store_true", help="skip the minimal loop")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each model's run from its last.pt in DATA/RUNS (scored again if it ended)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip FCN-5 on the old set")
    parser.add_argument(
        "--turns",
        type=float,
        default=None,
        help="the models' --turns (share of two-clip training windows) [the recipe's]",
    )
    parser.add_argument(
        "--runs", default="runs", help="trained models go to DATA/RUNS/<model> [runs]"
    )
    args = parser.parse_args()
    if args.epochs < 0:
        parser.error("--epochs is a number of epochs, or 0 for the recipe's own end")
    logging.basicConfig(level=logging.WARNING)

    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}"
    )
    trained = rendered.make_sources(
        ",".join(f for f in rendered.installed_soundfonts() if f != HELDOUT_SOUNDFONT),
        "train",
        chain=True,
        progress=True,
    )
    broadcast = rendered_set(args.data / "broadcast", args.clips, args.seed, trained)
    other_font = dataclasses.replace(trained, soundfonts=(HELDOUT_SOUNDFONT,))
    soundfont_manifest = rendered_set(
        args.data / f"soundfont-{HELDOUT_SOUNDFONT}",
        args.clips,
        args.seed,
        other_font,
        splits=("test",),
    )
    real_manifest = recordings_set(args.data / "recordings-heldout")
    clean_manifest = rendered_set(
        args.data / "fluidr3-only", args.clips, args.seed, rendered.Sources()
    )

    by_rate: dict[int, tuple[PreparedData, ...]] = {}

    def sets_at(rate: int) -> tuple[PreparedData, ...]:
        """The training set and the three others a model is scored on, at ``rate``."""
        if rate not in by_rate:
            by_rate[rate] = (
                prepared(broadcast, rate),
                prepared(clean_manifest, rate),
                prepared(soundfont_manifest, rate),
                prepared(real_manifest, rate, split="test"),
            )
        return by_rate[rate]

    epochs = f"{args.epochs} epochs" if args.epochs else "epochs to the recipe's end"
    results = []
    for name in args.models:
        data, *others = sets_at(create_model(name).sample_rate)
        print(
            f"training {name} width {args.width}, {epochs}, default recipe"
            f"{'' if args.turns is None else f', turns {args.turns}'} ...",
            flush=True,
        )
        result = default_recipe(
            name, args.width, data, args.data / args.runs, args.epochs, args.turns, args.resume
        )
        results.append(result | held_out(result["checkpoint"], *others))
    data, clean, *others = sets_at(12_000)
    if not args.no_baseline:
        print("training the baseline: fcn5 on the set as rendered before ...", flush=True)
        result = default_recipe(
            "fcn5",
            args.width,
            clean,
            args.data / f"{args.runs}-baseline",
            args.epochs,
            args.turns,
            args.resume,
        )
        result["model"] = (
            "baseline: fcn5 (default recipe) trained on FluidR3 only, no chain, no recordings"
        )
        results.append(result | held_out(result["checkpoint"], clean, *others))
    if not args.no_reference:
        print("training the minimal reference loop ...", flush=True)
        first_ran = next((r["epochs"] for r in results if "epochs" in r), REFERENCE_EPOCHS)
        results.append(reference(args.width, data, args.epochs or first_ran))
    results.append(logistic_reference(data))

    if not args.epochs:
        epochs += (
            " (" + ", ".join(f"{r['model']}: {r['epochs']}" for r in results if "epochs" in r) + ")"
        )
    clips = {s: len(data.indices(s)) for s in ("train", "valid", "test")}
    partial = sum(1 for clip in data.clips if clip.unknown)
    n_speech, n_music = next((r["real_clips"] for r in results if "real_clips" in r), (0, 0))
    print(
        f"\n{args.data}: {sum(clips.values())} rendered clips ({clips['train']} / {clips['valid']} / {clips['test']}; "
        f"{partial} with partial labels), width {args.width}, {epochs}; held-out soundfont "
        f"{HELDOUT_SOUNDFONT} on the {clips['test']} test pieces; {n_speech} speech and {n_music} music clips "
        f"of held-out packages; load average at end {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "test ROC-AUC, PR-AUC, instrument tags: the test split of the set the model trained on; "
        "clean FluidR3: the test clips of the set as rendered before (the baseline's own)\n"
    )
    print(
        "| model | test ROC-AUC | test PR-AUC | instrument tags | clean FluidR3 set: ROC-AUC | held-out soundfont: instrument tags | "
        "real, held out: speech ROC-AUC | speech on: speech / music | instrumental ROC-AUC | instrumental on: speech (alone) / music | minutes | examples/s | examples seen |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        speed = f"{r['examples_per_s']:.1f}" if r["examples_per_s"] else "–"
        seen = f"{r['examples']:,}" if r["examples"] else "–"
        if "speech_auc" in r:
            far = (
                f"{r['clean_roc_auc']:.3f} | {r['soundfont_instruments']:.3f} | {r['speech_auc']:.3f} | "
                f"{r['speech_on_speech']:.0%} / {r['speech_on_music']:.0%} | {r['instrumental_auc']:.3f} | "
                f"{r['instrumental_on_speech']:.0%} ({r['instrumental_alone_on_speech']:.0%}) / "
                f"{r['instrumental_on_music']:.0%}"
            )
        else:
            far = "– | – | – | – | – | –"
        print(
            f"| {r['model']} | {r['roc_auc']:.3f} | {r['pr_auc']:.3f} | {r['instruments']:.3f} | {far} | {r['minutes']:.1f} | {speed} | {seen} |"
        )
    print(
        "\ntargets: real speech ROC-AUC >= 0.98; speech on >= 90 % of speech, <= 5 % of music; "
        "instrumental on <= 10 % of speech; held-out soundfont instruments within 0.05 of in-domain; in-domain fcn5 >= 0.88"
    )


if __name__ == "__main__":
    main()
