"""``tagd-train``: prepare data, train, evaluate, fine-tune, export, quantize and compile models.

Every command prints what it wrote on stdout and logs progress on stderr; bad input ends
with a one-line error and a non-zero exit code. docs/training.md is the user's guide.
Multi-GPU: ``torchrun --nproc-per-node N -m trainer.cli train ...``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import typing
from pathlib import Path
from typing import Any

import click

from tagd.card import CardError
from trainer.data.dataset import DataError

log = logging.getLogger("trainer.cli")


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input, not a bug: reported as one line."""
    # imported here: they pull in torch, which `tagd-train -h` has no need to load
    from trainer.checkpoint import CheckpointError
    from trainer.export import ExportError

    return (DataError, CardError, CheckpointError, ExportError, ValueError, FileNotFoundError)


def friendly_errors(command):
    """Turn the errors a user can fix into one line and exit code 1, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except user_errors() as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


class CropsPerClip(click.ParamType):
    """A whole number ≥ 1, or 'cover'."""

    name = "N|cover"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "cover":
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"expected a whole number ≥ 1 or 'cover', got {value!r}", param, ctx)
        return number


def parse_hparams(values: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (0.5, [1, 2], true), else text."""
    hparams = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--hparam")
        try:
            hparams[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            hparams[key.strip()] = raw
    return hparams


def parse_lr_groups(values: tuple[str, ...]) -> dict[str, float]:
    groups = {}
    for item in values:
        prefix, sep, raw = item.partition("=")
        try:
            groups[prefix.strip()] = float(raw)
        except ValueError:
            raise click.BadParameter(
                f"expected PREFIX=LR like blocks.0=1e-5, got {item!r}", param_hint="--lr-group"
            ) from None
        if not sep or not prefix.strip():
            raise click.BadParameter(f"expected PREFIX=LR, got {item!r}", param_hint="--lr-group")
    return groups


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: bool, quiet: bool) -> None:
    """Train, evaluate and export tagd's music auto-tagging models."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


# -- data --------------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--mtt",
    type=click.Path(path_type=Path),
    help="MagnaTagATune: annotations_final.csv or its folder.",
)
@click.option(
    "--audio-dir", type=click.Path(path_type=Path), help="MTT mp3 tree, if not beside the CSV."
)
@click.option(
    "--split-file",
    type=click.Path(path_type=Path),
    help="MTT: `clip_id<TAB>split` lines instead of the folder split.",
)
@click.option(
    "--msd-audio",
    type=click.Path(path_type=Path),
    help="MSD: `track_id<TAB>path` list of your audio.",
)
@click.option("--msd-tags", type=click.Path(path_type=Path), help="MSD: `track_id<TAB>tag` list.")
@click.option(
    "--msd-split",
    "msd_splits",
    multiple=True,
    metavar="SPLIT=FILE",
    help="MSD: track-id list per split, e.g. train=train_ids.txt (repeat).",
)
@click.option(
    "--manifest", type=click.Path(path_type=Path), help="CSV manifest: path,tags[,split]."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Prepared dataset folder.",
)
@click.option("--model", "model_name", help="Prepare at this model's sample rate.")
@click.option("--sample-rate", type=int, help="Or give the rate in Hz.")
@click.option(
    "--n-tags",
    type=int,
    help="Keep the N most frequent tags. Default: 50 for MTT/MSD, all for a manifest.",
)
@click.option("--workers", type=int, help="Decoding processes (default: all cores).")
@click.option("--clips-per-shard", type=int, default=64, show_default=True)
@click.option(
    "--min-seconds",
    type=float,
    help="Shorter files are skipped. Default: with --model, the shortest clip it scores "
    "(a quarter of its window, at least 1 s); else 1 s.",
)
@click.option("--no-progress", is_flag=True)
@friendly_errors
def prepare(
    mtt,
    audio_dir,
    split_file,
    msd_audio,
    msd_tags,
    msd_splits,
    manifest,
    out_dir,
    model_name,
    sample_rate,
    n_tags,
    workers,
    clips_per_shard,
    min_seconds,
    no_progress,
):
    """Decode a dataset once into int16 shards at the model's sample rate (resumable)."""
    from trainer.data.prepare import prepare as run_prepare

    sources = [s for s in (mtt, msd_audio or msd_tags, manifest) if s]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --mtt, --msd-audio/--msd-tags, --manifest")
    if (model_name is None) == (sample_rate is None):
        raise click.UsageError("give exactly one of --model (its rate) or --sample-rate")
    if model_name is not None:
        from tagd.windowing import min_clip_samples
        from trainer.models import create_model

        model = create_model(model_name)
        sample_rate = model.sample_rate
        if min_seconds is None:
            min_seconds = max(1.0, min_clip_samples(model.window_samples) / sample_rate)
    min_seconds = 1.0 if min_seconds is None else min_seconds
    labelled = _load_labelled(
        mtt, audio_dir, split_file, msd_audio, msd_tags, msd_splits, manifest, n_tags
    )
    click.echo(labelled.summary(), err=True)
    report = run_prepare(
        labelled,
        out_dir,
        sample_rate,
        workers=workers,
        clips_per_shard=clips_per_shard,
        min_seconds=min_seconds,
        progress=not no_progress,
    )
    click.echo(report.summary())
    if report.skipped:
        click.echo(f"skipped files are listed in {out_dir / 'skipped.csv'}")


def _load_labelled(mtt, audio_dir, split_file, msd_audio, msd_tags, msd_splits, manifest, n_tags):
    if mtt:
        from trainer.data.mtt import DEFAULT_N_TAGS, load_mtt

        return load_mtt(mtt, audio_dir, n_tags or DEFAULT_N_TAGS, split_file)
    if manifest:
        from trainer.data.manifest import load_manifest

        return load_manifest(manifest, n_tags)
    if not (msd_audio and msd_tags):
        raise click.UsageError("MSD needs both --msd-audio and --msd-tags")
    from trainer.data.msd import DEFAULT_N_TAGS, load_msd

    splits = {}
    for item in msd_splits:
        split, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected SPLIT=FILE, got {item!r}", param_hint="--msd-split")
        splits[split.strip()] = path
    return load_msd(msd_audio, msd_tags, splits or None, n_tags or DEFAULT_N_TAGS)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--kind",
    type=click.Choice(["tones", "rendered"]),
    default="tones",
    show_default=True,
    help="tones: one sound per tag, seconds to make, for tests; rendered: General MIDI "
    "music through FluidSynth with espeak-ng speech, tagged by instrument family, drums, "
    "tempo, loudness, speech (needs fluidsynth, fluid-soundfont-gm, espeak-ng).",
)
@click.option(
    "--layout",
    type=click.Choice(["mtt", "manifest"]),
    help="Files and labels as MagnaTagATune's, or a CSV manifest (default: mtt for tones, "
    "manifest for rendered: real recordings' partial labels need it).",
)
@click.option("--clips", type=click.IntRange(min=1), default=200, show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="Clip length (default: 4 for tones, 29.1 for rendered, as MagnaTagATune's).",
)
@click.option("--sample-rate", type=int, default=16_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--format",
    "audio_format",
    type=click.Choice(["mp3", "wav"]),
    default="mp3",
    show_default=True,
    help="Rendered clips' file format.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Clips rendered at once; the clips are the same for any number.",
)
@click.option(
    "--soundfonts",
    default="all",
    show_default=True,
    help="Rendered: the General MIDI soundfonts drawn from per clip, comma-separated "
    "(fluidr3, musescore, timgm6mb, opl3, csound), or all that are installed.",
)
@click.option(
    "--recordings",
    default="train",
    show_default=True,
    help="Rendered: real speech and music from Debian packages, fetched with apt-get "
    "download into the cache: train (the packages the trainer learns from), none, or "
    "package names, comma-separated (`tagd-train recordings --list` shows them).",
)
@click.option(
    "--chain/--no-chain",
    default=True,
    show_default=True,
    help="Rendered: a production and transmission chain drawn per clip (EQ, room, "
    "compression, telephone/AM/FM bands, lossy codecs, noise).",
)
@click.option("--no-progress", is_flag=True)
@friendly_errors
def synthetic(
    out_dir,
    kind,
    layout,
    clips,
    seconds,
    sample_rate,
    seed,
    audio_format,
    jobs,
    soundfonts,
    recordings,
    chain,
    no_progress,
):
    """Write a labelled dataset the project makes itself: to try the pipeline, or to train on."""
    if kind == "rendered":
        from trainer.data import rendered

        sources = rendered.make_sources(soundfonts, recordings, chain, progress=not no_progress)
        click.echo(f"rendering from {sources.describe()}")
        path = rendered.write_rendered(
            out_dir,
            clips,
            seed,
            seconds or rendered.DEFAULT_SECONDS,
            sample_rate,
            layout=layout or "manifest",
            audio_format=audio_format,
            jobs=jobs,
            progress=not no_progress,
            sources=sources,
        )
        click.echo(f"wrote {clips} rendered clips: {path}")
        return
    from trainer.data import synthetic as synth

    seconds = seconds or synth.DEFAULT_SECONDS
    if layout in (None, "mtt"):
        path = synth.write_mtt(out_dir, clips, seed, seconds, sample_rate)
    else:
        path = synth.write_manifest_dataset(out_dir, clips, seed, seconds, sample_rate)
    click.echo(f"wrote {clips} synthetic clips: {path}")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "--packages",
    default="heldout",
    show_default=True,
    help="heldout (the packages no recipe trains on), train, or package names, comma-separated.",
)
@click.option("--list", "show", is_flag=True, help="Print the catalog of packages and exit.")
@click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), default=29.1, show_default=True
)
@click.option("--sample-rate", type=int, default=16_000, show_default=True)
@click.option(
    "--max-clips-per-package",
    type=click.IntRange(min=1),
    help="At most this many clips of each package, spread over it (default: all).",
)
@click.option(
    "--split",
    type=click.Choice(["train", "valid", "test", "none"]),
    default="test",
    show_default=True,
    help="The split every clip is in; none leaves it to a hash of the path.",
)
@click.option("--no-progress", is_flag=True)
@friendly_errors
def recordings(
    out_dir, packages, show, seconds, sample_rate, max_clips_per_package, split, no_progress
):
    """Real speech and music from Debian packages as a labelled set (a CSV manifest).

    Packages are fetched with `apt-get download` into the cache ($TAGD_CACHE, else
    ~/.cache/tagd) and unpacked with `dpkg-deb -x`; nothing is committed or installed.
    Speech clips are a package's prompts back to back, music clips a track's middle;
    labels are partial (speech, and instrumental where the package says).
    """
    from trainer.data import recordings as catalog

    if show:
        click.echo("| package | kind | role | instrumental | licence | what |")
        click.echo("|---|---|---|---|---|---|")
        for name, p in catalog.PACKAGES.items():
            instrumental = {True: "yes", False: "no", None: "unknown"}[p.instrumental]
            click.echo(
                f"| {name} | {p.kind} | {p.role} | {instrumental} | {p.licence} | {p.note} |"
            )
        return
    if out_dir is None:
        raise click.UsageError("give the folder to write the set to (or --list)")
    if packages in ("heldout", "train"):
        names = [name for name, p in catalog.PACKAGES.items() if p.role == packages]
    else:
        names = [name.strip() for name in packages.split(",") if name.strip()]
    manifest = catalog.write_recordings_set(
        out_dir,
        names,
        seconds=seconds,
        sample_rate=sample_rate,
        max_clips_per_package=max_clips_per_package,
        progress=not no_progress,
        split="" if split == "none" else split,
    )
    click.echo(
        f"wrote {sum(1 for _ in manifest.open()) - 1} clips of {len(names)} packages: {manifest}"
    )


# -- training ----------------------------------------------------------------------------------------
def training_options(command):
    """The options of `train` and `finetune`: one for each TrainConfig field made with
    ``option()``, named, typed and explained there (trainer/recipes.py)."""
    from trainer.recipes import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    options = [
        _config_option(spec, hints[spec.name])
        for spec in dataclasses.fields(TrainConfig)
        if "help" in spec.metadata
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _config_option(spec: dataclasses.Field, hint: Any):
    """The click option of one TrainConfig field; its value arrives as the field's type."""
    meta = spec.metadata
    flag = meta["flag"] or "--" + spec.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": meta["help"], "metavar": meta["metavar"]}
    if hint is bool:  # a flag that sets the opposite of the default
        kwargs.update(is_flag=True, flag_value=not spec.default, default=spec.default)
    elif hint == list[str]:
        kwargs.update(multiple=True, callback=lambda ctx, param, values: list(values))
    elif hint == dict[str, float]:
        kwargs.update(multiple=True, callback=lambda ctx, param, values: parse_lr_groups(values))
    elif meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    elif hint == int | str | None:
        kwargs["type"] = CropsPerClip()
    elif meta["minimum"] is not None:
        kwargs["type"] = click.IntRange(min=meta["minimum"])
    else:
        kwargs["type"] = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    elif hint is not bool:
        kwargs["default"] = None if spec.default is dataclasses.MISSING else spec.default
        kwargs["show_default"] = kwargs["default"] is not None
    return click.option(flag, spec.name, **kwargs)


def _run_training(data_dir: Path, options: dict[str, Any], **run: Any) -> None:
    """Train with the options as parsed: they are TrainConfig's fields by name."""
    from trainer.train import TrainConfig, train

    result = train(TrainConfig(data=str(data_dir), **run, **options))
    click.echo(
        f"best validation ROC-AUC {result.best_roc_auc:.4f} at epoch {result.best_epoch} of "
        f"{result.epochs_run}; best model {result.best_path}, resume state {result.last_path}"
    )


@main.command("train")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_name",
    default="fcn4",
    show_default=True,
    help="Registry name (tagd-train models).",
)
@click.option(
    "--hparam",
    "hparams",
    multiple=True,
    metavar="KEY=VALUE",
    help="Model hyper-parameter, e.g. width=0.5 (repeat).",
)
@click.option(
    "--from-checkpoint",
    "init_from",
    type=click.Path(path_type=Path),
    help="Fine-tune from this checkpoint.",
)
@training_options
@friendly_errors
def train_command(data_dir, model_name, hparams, init_from, **options):
    """Train a model on a prepared dataset; best.pt is the best by validation ROC-AUC."""
    _run_training(
        data_dir,
        options,
        model=model_name,
        hparams=parse_hparams(hparams),
        init_from=str(init_from) if init_from else None,
    )


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@training_options
@friendly_errors
def finetune(checkpoint, data_dir, **options):
    """Transfer a trained model to new tags (recipe finetune: Adam, lr 1e-4)."""
    _run_training(data_dir, options, init_from=str(checkpoint))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Run folder."
)
@click.option("--kind", type=click.Choice(["lstm", "mean"]), default="lstm", show_default=True)
@click.option(
    "--hidden",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="LSTM units per layer (the thesis's best: 1024).",
)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.3, show_default=True
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam, the aggregator's.")
@click.option("--finetune", is_flag=True, help="Train the CNN too (default: frozen).")
@click.option("--cnn-lr", type=float, default=1e-5, show_default=True, help="With --finetune.")
@click.option(
    "--hop",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds between a song's windows (default: the card's hop).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True)
@friendly_errors
def aggregate(checkpoint, data_dir, out_dir, hop, no_progress, **options):
    """Train an aggregator (LSTM or mean) over a CNN's window embeddings of whole songs."""
    from trainer.aggregate import AggregateConfig, train_aggregator

    result = train_aggregator(
        AggregateConfig(
            checkpoint=str(checkpoint),
            data=str(data_dir),
            out=str(out_dir),
            hop_seconds=hop,
            progress=not no_progress,
            **options,
        )
    )
    for split in ("valid", "test"):
        ours = getattr(result, split)
        if ours:
            base = result.average[split]
            click.echo(
                f"{split}: aggregator macro ROC-AUC {ours['roc_auc_macro']:.4f}, weighted "
                f"{ours['roc_auc_weighted']:.4f}; average of windows {base['roc_auc_macro']:.4f}, "
                f"{base['roc_auc_weighted']:.4f}"
            )
    click.echo(f"best epoch {result.best_epoch}; {result.run_dir / 'aggregator.pt'}, report.md")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--split", type=click.Choice(["test", "valid", "train"]), default="test", show_default=True
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Report folder (default: beside the checkpoint, eval-SPLIT).",
)
@click.option(
    "--roc-tag",
    "roc_tags",
    multiple=True,
    help="Tags for the ROC plot (default: best and worst few).",
)
@click.option(
    "--hop",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Seconds between a clip's windows, as `tagd tag --hop` (default: the model card's hop).",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-update", is_flag=True, help="Leave the checkpoint's card as it is.")
@click.option("--no-progress", is_flag=True)
@friendly_errors
def evaluate(
    checkpoint, data_dir, split, out_dir, roc_tags, hop, batch_size, device, no_update, no_progress
):
    """Score clips, choose thresholds on valid, write metrics, plots and report.md."""
    from trainer.evaluate import evaluate_checkpoint

    evaluation, files, _ = evaluate_checkpoint(
        checkpoint,
        data_dir,
        out_dir,
        split=split,
        update_checkpoint=not no_update,
        roc_tags=list(roc_tags) or None,
        hop_seconds=hop,
        batch_size=batch_size,
        device=device,
        progress=not no_progress,
    )
    s = evaluation.summary
    click.echo(
        f"{split}: macro ROC-AUC {s['roc_auc_macro']:.4f}, macro PR-AUC {s['pr_auc_macro']:.4f}, "
        f"weighted ROC-AUC {s['roc_auc_weighted']:.4f} on {s['clips']} clips; report {files['report']}"
    )
    if not no_update:
        click.echo(f"thresholds and scores written into {checkpoint}'s card")


# -- shipping ----------------------------------------------------------------------------------------
@main.command()
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_name", help="Export untrained weights of this model instead.")
@click.option("--n-tags", type=int, default=50, show_default=True, help="With --model.")
@click.option(
    "--tags-file", type=click.Path(path_type=Path), help="With --model: one tag name per line."
)
@click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE", help="With --model.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="With --model: initial weights."
)
@click.option(
    "--out", "out_path", required=True, type=click.Path(path_type=Path), help="ONNX file to write."
)
@click.option("--name", help="Card name (default: the checkpoint's).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the ONNX Runtime parity check.")
@click.option(
    "--incremental-hop",
    "incremental_hops",
    multiple=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="FCN: also write incremental graphs for this streaming hop (repeatable); the "
    "card's hop always gets them.",
)
@click.option(
    "--aggregator",
    "aggregator_path",
    type=click.Path(path_type=Path),
    help="An aggregator.pt of `tagd-train aggregate` on this checkpoint: its graphs go "
    "beside OUT (OUT's stem.embed.onnx and .aggregator.onnx).",
)
@friendly_errors
def export(
    checkpoint,
    model_name,
    n_tags,
    tags_file,
    hparams,
    seed,
    out_path,
    name,
    opset,
    no_check,
    incremental_hops,
    aggregator_path,
):
    """Write ONNX with the model card (tags, thresholds, scores) inside.

    For an FCN, the incremental graphs that `tagd serve` and `tagd tag` use to score each
    window from the last one go beside it: OUT's stem.<hop>.prime.onnx and .step.onnx.
    """
    import torch

    from trainer.checkpoint import card_from_checkpoint, load_checkpoint, model_from_checkpoint
    from trainer.export import card_for_model, export_onnx
    from trainer.models import create_model

    if (checkpoint is None) == (model_name is None):
        raise click.UsageError("give a CHECKPOINT or --model NAME (untrained weights)")
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint)
        model, card = model_from_checkpoint(saved), card_from_checkpoint(saved)
        if name:
            card.name = name
    else:
        tags = _read_tags(tags_file) if tags_file else None
        torch.manual_seed(seed)
        model = create_model(model_name, len(tags) if tags else n_tags, **parse_hparams(hparams))
        card = card_for_model(model, name=name, tags=tags)
    hops = tuple(round(seconds * model.sample_rate) for seconds in incremental_hops)
    result = export_onnx(
        model,
        out_path,
        card=card,
        opset=opset,
        check=not no_check,
        incremental_hops=hops,
        aggregator=aggregator_path,
    )
    parity = (
        "" if result.max_abs_diff is None else f"; ONNX Runtime parity {result.max_abs_diff:.1e}"
    )
    scored = ", ".join(sorted(result.card.scores)) or "none (untrained)"
    click.echo(
        f"wrote {result.path}: {result.card.architecture}, {result.card.n_tags} tags, scores: {scored}{parity}"
    )
    for graph in result.card.incremental.graphs:
        click.echo(
            f"  incremental at hop {graph.hop_samples / result.card.sample_rate:.3f} s: "
            f"{graph.prime}, {graph.step} ({graph.state_bytes / 1e6:.2f} MB of "
            f"state a stream, {graph.step_macs / graph.full_macs:.0%} of a window's "
            f"MACs)"
        )
    if result.card.aggregator is not None:
        section = result.card.aggregator
        parity = "" if section.max_abs_diff is None else f"; parity {section.max_abs_diff:.1e}"
        click.echo(
            f"  aggregator {section.kind}: {section.embedding_graph}, {section.graph}{parity}"
        )


@main.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Prepared dataset at the model's sample rate: calibration windows from its train "
    "split, parity windows from its valid (else test) split.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(path_type=Path),
    help="ONNX file to write (default: MODEL_PATH's stem + .int8.onnx).",
)
@click.option(
    "--windows",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Calibration windows (each clip once before any twice); the more, the fewer "
    "live windows outside the calibrated ranges.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which windows.")
@click.option(
    "--symmetric",
    is_flag=True,
    help="Symmetric int8 activations, as TensorRT takes them (ONNX Runtime on the CPU runs "
    "the default uint8 ones about twice as fast).",
)
@friendly_errors
def quantize(model_path, data_dir, out_path, windows, seed, symmetric):
    """Write an int8 (QDQ) copy of an exported float32 model and of its incremental graphs.

    The front end and the first convolution stay float; the card says precision int8 and
    how far its scores moved from float32. Serve it as any .onnx model.
    """
    from trainer.data.dataset import PreparedData
    from trainer.quantize import quantize_model

    result = quantize_model(
        model_path,
        PreparedData(data_dir),
        out_path,
        windows=windows,
        seed=seed,
        symmetric=symmetric,
    )
    click.echo(
        f"wrote {result.path}: int8, scores within {result.max_abs_diff:.3g} of float32 "
        f"(mean {result.mean_abs_diff:.2g}) on held-out windows"
    )
    for graph in result.card.incremental.graphs:
        click.echo(
            f"  incremental at hop {graph.hop_samples / result.card.sample_rate:.3f} s: "
            f"{graph.prime}, {graph.step} (chain within {graph.max_abs_diff:.3g} of int8 "
            f"full windows)"
        )


def _read_tags(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such tags file")
    tags = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not tags:
        raise DataError(f"{path}: no tag names in it")
    return tags


@main.command("triton-repo")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--name", help="Triton model name (default: the card's); the incremental one adds _seq."
)
@click.option(
    "--hop",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="The hop the incremental model steps by (default: the card's); the model needs "
    "incremental graphs for it (`export --incremental-hop`).",
)
@click.option(
    "--max-sequences",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Streams one server takes at once (the sequence batcher's candidates).",
)
@click.option(
    "--idle-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="A stream silent this long is dropped by the server (at least 4 hops).",
)
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--cpu", is_flag=True, help="The whole-window model on the CPU (KIND_CPU), not a GPU."
)
@click.option(
    "--implicit-state",
    is_flag=True,
    help="Also NAME_state: incremental on Triton's implicit state, for the onnxruntime "
    "backend (checked against full windows as it is written).",
)
@friendly_errors
def triton_repo(
    onnx_path,
    out_dir,
    name,
    hop,
    max_sequences,
    idle_seconds,
    max_batch,
    instances,
    cpu,
    implicit_state,
):
    """Write a Triton Inference Server model repository for an exported model.

    Two models: NAME (whole windows, onnxruntime backend, dynamic batching) and NAME_seq
    (incremental inference behind the sequence batcher, python backend); serve them with
    `tritonserver --model-repository OUT_DIR` and `tagd serve --engine
    triton://HOST:8001/NAME` (docs/triton.md).
    """
    from tagd.card import read_card
    from trainer.triton_repo import write_repository

    if not onnx_path.is_file():
        raise click.ClickException(f"{onnx_path}: no such ONNX file; run `tagd-train export` first")
    hop_samples = round(hop * read_card(onnx_path).sample_rate) if hop else None
    written = write_repository(
        onnx_path,
        out_dir,
        name=name,
        hop_samples=hop_samples,
        max_sequences=max_sequences,
        idle_seconds=idle_seconds,
        max_batch=max_batch,
        instances=instances,
        gpu=not cpu,
        implicit_state=implicit_state,
    )
    click.echo(
        f"wrote {written.folder}: {written.full_model} (whole windows) and "
        f"{written.sequence_model} (incremental, hop {written.hop_samples} samples)"
    )
    if written.state_model:
        click.echo(
            f"  and {written.state_model} (implicit state; max abs diff from full windows "
            f"{written.state_max_abs_diff:.1e})"
        )


@main.command("compile")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "plan_path",
    required=True,
    type=click.Path(path_type=Path),
    help="TensorRT .plan to write (card beside it as .plan.json).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp16", show_default=True)
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=8, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option(
    "--timing-cache", type=click.Path(path_type=Path), help="Reuse TensorRT timings between builds."
)
@friendly_errors
def compile_command(onnx_path, plan_path, precision, min_batch, opt_batch, max_batch, timing_cache):
    """Build a TensorRT engine from an exported ONNX model (needs tensorrt and a GPU)."""
    if not onnx_path.is_file():
        raise click.ClickException(f"{onnx_path}: no such ONNX file; run `tagd-train export` first")
    from tagd.card import sidecar_path
    from trainer.compile import compile_engine

    try:
        result = compile_engine(
            onnx_path,
            plan_path,
            precision=precision,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            timing_cache=timing_cache,
        )
    except RuntimeError as exc:  # CompileError, and CUDA failures
        raise click.ClickException(f"cannot compile {onnx_path}: {exc}") from exc
    click.echo(f"wrote {result} and its card {sidecar_path(result)}")


# -- information --------------------------------------------------------------------------------------
@main.command()
@click.option(
    "--blocks", "show_blocks", is_flag=True, help="Also list block names for --freeze/--lr-group."
)
def models(show_blocks):
    """List the models that train and export can build, and the recipe each trains with."""
    from trainer.finetune import block_names
    from trainer.models import create_model, list_models
    from trainer.models.registry import default_recipe

    for name in list_models():
        model = create_model(name)
        line = f"{name:<20} {model.sample_rate:>6} Hz  window {model.window_samples:>7} samples ({model.window_samples / model.sample_rate:.2f} s)  recipe {default_recipe(name)}"
        if show_blocks:
            line += "  blocks: " + ", ".join(block_names(model))
        click.echo(line)


if __name__ == "__main__":
    main()
