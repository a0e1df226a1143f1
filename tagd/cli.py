"""The `tagd` command line: tag files now, serve streams, listen to what is published."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from tagd import __version__

log = logging.getLogger("tagd")


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@click.group()
@click.version_option(__version__, prog_name="tagd")
def main() -> None:
    """tagd: streaming, real-time music auto-tagging for broadcast."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--engine",
    "engine_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Model file: .onnx (ONNX Runtime), .plan/.engine (TensorRT), .pt (torch).",
)
@click.option(
    "--hop",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between windows (default: the model card's hop).",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many tags to print per file.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per file (JSON Lines) with every tag's score.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Windows per engine call [default: 1; memory grows with it, docs/models.md].",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def tag(files, engine_path, hop, top, as_json, batch, log_level) -> None:
    """Tag audio FILES (wav, flac, mp3, ogg, …; a folder: the audio files in it) and print
    their top tags.

    Each file is cut into windows exactly as `tagd serve` cuts a stream, and the scores
    are averaged over the windows; a file shorter than one window but at least a quarter
    of one is zero-padded to a window. Tags over the model's thresholds are marked `*`.
    """
    from tagd.audio import AudioError
    from tagd.card import CardError
    from tagd.engines import EngineError, load_engine
    from tagd.tagfile import DEFAULT_BATCH, audio_files, tag_file

    setup_logging(log_level)
    try:
        files = list(audio_files(list(files)))
    except AudioError as exc:
        raise click.ClickException(str(exc)) from None
    batch = batch or DEFAULT_BATCH
    try:
        engine = load_engine(engine_path)
    except (EngineError, CardError) as exc:
        raise click.ClickException(str(exc)) from None
    card = engine.card
    hop_samples = round(hop * card.sample_rate) if hop else None
    thresholds = dict(zip(card.tags, card.thresholds, strict=True))
    failed = 0
    show_progress = len(files) > 1 and sys.stderr.isatty()
    with click.progressbar(files, label="tagging", file=sys.stderr,
                           hidden=not show_progress) as progress:  # fmt: skip
        for path in progress:
            try:
                result = tag_file(engine, path, hop_samples, batch)
            except AudioError as exc:
                failed += 1
                if as_json:
                    click.echo(json.dumps({"file": str(path), "error": str(exc)}))
                click.echo(f"error: {exc}", err=True)
                continue
            ranked = result.ranked(card.tags)
            over = [t for t, s in ranked if s >= thresholds[t]]
            if as_json:
                record = {
                    "file": str(path),
                    "model": card.name,
                    "duration_s": round(result.duration_s, 3),
                    "windows": result.windows,
                    "scores": {t: round(s, 6) for t, s in ranked},
                    "tags": over,
                }
                click.echo(json.dumps(record))
                continue
            click.echo(
                f"{path}  ({result.duration_s:.1f} s, {result.windows} windows, {card.name})"
            )
            for name, score in ranked[:top]:
                mark = "*" if score >= thresholds[name] else " "
                click.echo(f"  {mark} {score:.3f}  {name}")
    if failed:
        click.echo(f"{failed} of {len(files)} files could not be tagged", err=True)
        sys.exit(1)


@main.group()
def keys() -> None:
    """CURVE keys for `tagd serve`'s [security] section (docs/operations.md)."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="server", show_default=True,
              help="Key pair name: NAME.key (public) and NAME.key_secret.")  # fmt: skip
def keys_generate(directory: Path, name: str) -> None:
    """Write a CURVE key pair into DIRECTORY (created if missing).

    NAME.key_secret (mode 0600) stays with its owner: tagd's is curve_server_secret, a
    producer's or subscriber's is used by that client. NAME.key is the public half: give
    tagd's to clients, and copy clients' into the curve_allowed_clients directory.
    """
    from tagd.config import STREAM_NAME
    from tagd.sockets import SecurityError, generate_keys

    if not STREAM_NAME.match(name):
        raise click.BadParameter("letters, digits, '_' and '-' only", param_hint="--name")
    try:
        public, secret = generate_keys(directory, name)
    except (SecurityError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (keep it private)")


def _register_stream_commands() -> None:
    from tagd.listen import listen
    from tagd.server import serve

    main.add_command(serve)
    main.add_command(listen)


_register_stream_commands()


if __name__ == "__main__":
    main()
