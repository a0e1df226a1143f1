"""The `tagd` command line: tag files now, serve streams, listen to what is published."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from tagd import __version__
from tagd.logs import LOG_FORMATS, LOG_LEVELS, held_logs, setup_logging

log = logging.getLogger("tagd")


class LazyGroup(click.Group):
    """A group whose commands named in ``lazy`` ("name" → "module:attribute") are imported
    only when run or listed in help: `tagd tag` never loads ZeroMQ or the server."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy={"listen": "tagd.listen:listen"})
@click.version_option(__version__, prog_name="tagd")
def main() -> None:
    """tagd: streaming, real-time music auto-tagging for broadcast."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--engine",
    "engine_path",
    required=True,
    help="Model file: .onnx (ONNX Runtime), .plan/.engine (TensorRT), .pt (torch); or "
    "triton://HOST:PORT[,HOST:PORT…]/MODEL (Triton Inference Server, docs/triton.md).",
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
    "--full-windows",
    is_flag=True,
    help="Compute every window in full, not from the last one (same scores, slower).",
)
@click.option(
    "--aggregate",
    is_flag=True,
    help="Song tags from the model's aggregator (its card's aggregator section; "
    "docs/training.md) beside the average of the windows.",
)
@click.option(
    "--timeline",
    is_flag=True,
    help="Write each file's segments (start, end, tag, mean, peak; docs/timeline.md), "
    "not its average.",
)
@click.option(
    "--format",
    "timeline_format",
    type=click.Choice(["csv", "jsonl", "audacity", "vtt", "srt"]),
    default="csv",
    show_default=True,
    help="With --timeline: CSV, JSON Lines, Audacity labels, WebVTT or SRT.",
)
@click.option(
    "--tags",
    "only_tags",
    metavar="TAG,TAG",
    help="With --timeline: only these tags' segments [all].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="With --timeline: a file (one input), or a folder for one file per input "
    "[standard output].",
)
@click.option(
    "--on-after",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="With --timeline: as tagd serve's [tagger] on_after.",
)
@click.option(
    "--off-margin",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=0.1,
    show_default=True,
    help="With --timeline: as tagd serve's [tagger] off_margin.",
)
@click.option(
    "--edges",
    type=click.Choice(["level", "threshold"]),
    default="level",
    show_default=True,
    help="With --timeline: place a segment's edges where its score crossed halfway "
    "between its peak and its surroundings (as tagd serve), or at the threshold "
    "crossing (docs/timeline.md).",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def tag(
    files,
    engine_path,
    hop,
    top,
    as_json,
    batch,
    full_windows,
    aggregate,
    timeline,
    timeline_format,
    only_tags,
    out,
    on_after,
    off_margin,
    edges,
    log_level,
) -> None:
    """Tag audio FILES (wav, flac, mp3, ogg, …; a folder: the audio files in it) and print
    their top tags, or with --timeline their segments.

    Each file is cut into windows exactly as `tagd serve` cuts a stream, and the scores
    are averaged over the windows; a file shorter than one window but at least a quarter
    of one is zero-padded to a window. Tags over the model's thresholds are marked `*`
    (less those the card excludes while another is on: instrumental while speech is).

    --timeline follows each file as `tagd serve` follows a stream (the same thresholds
    and hysteresis) and writes a segment for each stretch a tag was on, its edges placed
    between windows (docs/timeline.md); hours-long files are decoded a block at a time.

    --aggregate scores each file with the learned aggregator exported beside the model
    (`tagd-train export --aggregator`): its windows, at the hop it was trained at, one
    step each; the song's scores are printed beside the average of the windows.
    """
    if aggregate and (timeline or full_windows or batch):
        raise click.UsageError("--aggregate goes without --timeline, --full-windows and --batch")
    if not timeline and (only_tags or out):
        raise click.UsageError("--tags and --out go with --timeline")
    if timeline and as_json:
        raise click.UsageError("--timeline writes JSON Lines with --format jsonl, not --json")
    from tagd.audio import AudioError
    from tagd.card import CardError
    from tagd.engines import EngineError, load_engine
    from tagd.incremental import choose_scorer
    from tagd.scoring import resolve_hop
    from tagd.tagfile import DEFAULT_BATCH, audio_files, tag_file

    setup_logging(log_level)
    try:
        files = list(audio_files(list(files)))
    except AudioError as exc:
        raise click.ClickException(str(exc)) from None
    batch = batch or DEFAULT_BATCH
    try:
        # not warmed up: a command pays its first window once, and a warm-up would grow the
        # full model's activation arena even when the incremental graphs do the work
        engine = load_engine(engine_path, warmup=False)
    except (EngineError, CardError) as exc:
        raise click.ClickException(str(exc)) from None
    click.get_current_context().call_on_close(engine.close)  # a remote engine's ENDs out
    card = engine.card
    if aggregate:
        _tag_aggregated(files, engine, hop, top, as_json)
        return
    hop_samples = resolve_hop(card, hop)
    try:
        scorer = choose_scorer([engine], hop_samples, incremental=not full_windows)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    if timeline:
        from tagd.tagger import Tagger
        from tagd.timeline import Segmenter

        only = [t.strip() for t in only_tags.split(",") if t.strip()] if only_tags else None
        try:
            segmenter = Segmenter(card.tags, card.sample_rate, only=only, edges=edges)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tags") from None
        tagger = Tagger(card, on_after=on_after, off_margin=off_margin)
        _write_timelines(files, out, timeline_format, engine, tagger, segmenter, scorer, batch)
        return
    failed = 0
    show_progress = len(files) > 1 and sys.stderr.isatty()
    with click.progressbar(
        files, label="tagging", file=sys.stderr, hidden=not show_progress
    ) as progress:
        for path in progress:
            try:
                result = tag_file(engine, path, hop_samples, batch, scorer)
            except (AudioError, EngineError) as exc:  # a remote engine's servers may go
                reason = str(exc) if isinstance(exc, AudioError) else f"{path}: {exc}"
                failed += 1
                if as_json:
                    click.echo(json.dumps({"file": str(path), "error": reason}))
                click.echo(f"error: {reason}", err=True)
                continue
            ranked = result.ranked(card.tags)
            is_on = dict(zip(card.tags, card.over(result.scores), strict=True))
            over = [t for t, _ in ranked if is_on[t]]
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
                mark = "*" if is_on[name] else " "
                click.echo(f"  {mark} {score:.3f}  {name}")
    if failed:
        click.echo(f"{failed} of {len(files)} files could not be tagged", err=True)
        sys.exit(1)


def _tag_aggregated(files, engine, hop, top, as_json) -> None:
    """`tagd tag --aggregate`: each file's song scores by the aggregator beside its average."""
    import numpy as np

    from tagd.aggregate import AggregatorGraphs, aggregate_file
    from tagd.audio import AudioError
    from tagd.engines import EngineError

    card = engine.card
    try:
        graphs = AggregatorGraphs(engine.path, card)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    trained_hop = graphs.hop_samples
    if hop is not None and card.hop_from_seconds(hop) != trained_hop:
        raise click.UsageError(
            f"the aggregator was trained on windows {trained_hop / card.sample_rate:.3f} s "
            "apart; --aggregate uses that hop, leave --hop out"
        )
    kind = graphs.section.kind
    failed = 0
    for path in files:
        try:
            song = aggregate_file(graphs, path)
        except AudioError as exc:
            failed += 1
            if as_json:
                click.echo(json.dumps({"file": str(path), "error": str(exc)}))
            click.echo(f"error: {exc}", err=True)
            continue
        order = np.argsort(-song.scores, kind="stable")
        is_on = card.over(song.scores)
        if as_json:
            record = {
                "file": str(path),
                "model": card.name,
                "aggregator": kind,
                "duration_s": round(song.duration_s, 3),
                "windows": song.windows,
                "scores": {card.tags[i]: round(float(song.scores[i]), 6) for i in order},
                "average": {card.tags[i]: round(float(song.average[i]), 6) for i in order},
                "tags": [card.tags[i] for i in order if is_on[i]],
            }
            click.echo(json.dumps(record))
            continue
        click.echo(
            f"{path}  ({song.duration_s:.1f} s, {song.windows} windows, {card.name}, "
            f"aggregator {kind}; average of windows beside)"
        )
        for i in order[:top]:
            mark = "*" if is_on[i] else " "
            click.echo(f"  {mark} {song.scores[i]:.3f}  {song.average[i]:.3f}  {card.tags[i]}")
    if failed:
        click.echo(f"{failed} of {len(files)} files could not be tagged", err=True)
        sys.exit(1)


def _write_timelines(files, out, fmt_name, engine, tagger, segmenter, scorer, batch) -> None:
    """`tagd tag --timeline`: each file's segments to its output, a progress bar per file
    on a terminal; a file that fails is reported and leaves no output; exit 1 if any did."""
    from tagd.audio import AudioError, audio_duration
    from tagd.engines import EngineError
    from tagd.tagfile import TimelineOutputError, open_outputs, timeline_file
    from tagd.timeline import timeline_format

    fmt = timeline_format(fmt_name)
    hop_samples = scorer.hop_samples
    try:
        outputs = open_outputs(files, out, fmt)
    except TimelineOutputError as exc:
        raise click.UsageError(str(exc)) from None
    failed = 0
    for path in files:
        duration = audio_duration(path) if sys.stderr.isatty() else None
        with click.progressbar(
            length=max(1, round(duration or 1)),
            label=path.name,
            file=sys.stderr,
            hidden=duration is None,
            show_pos=True,
        ) as bar:

            def advance(seconds: float, bar=bar) -> None:
                bar.update(min(round(seconds), bar.length) - bar.pos)

            try:
                result = timeline_file(
                    engine, path, tagger, segmenter, hop_samples, batch, scorer, advance
                )
            except (AudioError, EngineError) as exc:  # a remote engine's servers may go
                reason = str(exc) if isinstance(exc, AudioError) else f"{path}: {exc}"
                failed += 1
                click.echo(f"error: {reason}", err=True)
                continue
        outputs.write(path, result.segments)
    if failed:
        click.echo(f"{failed} of {len(files)} files could not be tagged", err=True)
        sys.exit(1)


@main.group()
def keys() -> None:
    """CURVE keys for `tagd serve`'s [security] section (docs/operations.md)."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--name",
    default="server",
    show_default=True,
    help="Key pair name: NAME.key (public) and NAME.key_secret.",
)
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


@main.command()
@click.option(
    "--engine", help="Model file: .onnx (ONNX Runtime), .plan/.engine (TensorRT), .pt (torch)."
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="URL",
    help="An input stream, repeatable: zmq+raw://, zmq+sub://, zmq+pull://, soundcard://, file://. "
    "Replaces the config file's inputs.",
)
@click.option("--publish", metavar="ENDPOINT", help="ZeroMQ PUB endpoint [tcp://127.0.0.1:5560].")
@click.option(
    "--metrics", metavar="HOST:PORT", help="/metrics and /healthz, or 'off' [127.0.0.1:9108]."
)
@click.option(
    "--hop", "hop_seconds", type=float, help="Seconds between windows [the model card's]."
)
@click.option(
    "--full-windows",
    "incremental",
    flag_value=False,
    default=None,
    help="Compute every window in full, not from the stream's last one (docs/serve.md).",
)
@click.option("--max-batch", type=int, help="Windows per engine call [0: 1 on CPU, else 8].")
@click.option("--max-wait-ms", type=float, help="Longest wait for a batch to fill [10].")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), help="Logs on stderr as text or JSON."
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS))
@click.option(
    "--asrun", metavar="PATH", help="Keep an as-run log of tag segments in this SQLite file."
)
def serve(config_path: Path | None, check_config: bool, **flags) -> None:
    """Tag live streams and publish tags.<stream> and events.<stream> on ZeroMQ.

    Exit status: 0 after SIGTERM/SIGINT, 2 when the configuration is invalid or start-up
    fails (a model that does not load, a port in use), with the reason on one line.
    """
    from tagd.config import ConfigError, ServeConfig, apply_overrides, load_config
    from tagd.engines import backend_of
    from tagd.scoring import resolve_hop
    from tagd.server import (
        EXIT_STARTUP_FAILED,
        Server,
        StartupError,
        check_startup,
        input_warnings,
        release_freed_memory,
    )

    try:
        config = load_config(config_path, validate=False) if config_path else ServeConfig()
        config = apply_overrides(config, **flags).validate()
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"tagd serve: config: {problem}", err=True)
        sys.exit(EXIT_STARTUP_FAILED)
    if check_config:
        try:
            card = check_startup(config)
        except StartupError as exc:
            click.echo(f"tagd serve: {exc}", err=True)
            sys.exit(EXIT_STARTUP_FAILED)
        for warning in input_warnings(config, card):
            click.echo(f"tagd serve: warning: {warning}", err=True)
        names = ", ".join(spec.name for spec in config.inputs)
        hop = resolve_hop(card, config.hop_seconds)
        incremental = (
            config.incremental
            and backend_of(config.engine).has_incremental_graphs
            and card.incremental_graph(hop) is not None
        )
        click.echo(
            f"config OK: engine {config.engine} ({card.name}, {card.architecture}, "
            f"{card.n_tags} tags, {card.sample_rate} Hz, window {card.window_seconds:.2f} s, "
            f"{card.precision}, hop {hop / card.sample_rate:.3f} s, "
            f"{'incremental' if incremental else 'full windows'}), "
            f"{len(config.inputs)} input(s): {names}"
        )
        return

    setup_logging(config.log.level, config.log.format)
    release_freed_memory()
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server = Server(config)
    with held_logs() as held:  # the reason for a failed start comes first on stderr
        try:
            server.start()
        except StartupError as exc:
            click.echo(f"tagd serve: {exc}", err=True)
            held.flush()
            sys.exit(EXIT_STARTUP_FAILED)
    while not stop_requested.wait(0.2):
        pass
    server.stop()
    with contextlib.suppress(Exception):
        sys.stderr.flush()


@main.command("log")
@click.argument("stream")
@click.option("--from", "since", metavar="TIME", help="ISO 8601 (UTC unless it says): from when.")
@click.option("--to", "until", metavar="TIME", help="ISO 8601 (UTC unless it says): until when.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl", "audacity", "vtt", "srt"]),
    default="csv",
    show_default=True,
    help="csv, jsonl: ISO 8601 UTC times; audacity, vtt, srt: seconds from --from.",
)
@click.option("--db", type=click.Path(path_type=Path), help="The as-run SQLite file.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="tagd serve's TOML config: its [asrun] path.",
)
def log_command(stream, since, until, fmt, db, config_path) -> None:
    """Print what was on air: the tag segments of STREAM in `tagd serve`'s as-run log.

    Segments that overlap --from..--to are printed cut at those bounds, in order of
    start; the file is opened read-only, so this works while the daemon writes.
    """
    from tagd.asrun import AsRunError, read_records, write_log

    if (db is None) == (config_path is None):
        raise click.UsageError("give the as-run file with --db PATH or --config tagd.toml")
    if db is None:
        from tagd.config import ConfigError, load_config

        try:
            db = load_config(config_path, validate=False).asrun.path
        except ConfigError as exc:
            raise click.ClickException("; ".join(exc.problems)) from None
        if not db:
            raise click.ClickException(f"{config_path} sets no [asrun] path")
    start = _utc_seconds(since, "--from")
    end = _utc_seconds(until, "--to")
    if start is not None and end is not None and end <= start:
        raise click.BadParameter("must be after --from", param_hint="--to")
    try:
        records = read_records(db, stream, start, end)
    except AsRunError as exc:
        raise click.ClickException(str(exc)) from None
    origin = start if start is not None else (records[0].start if records else 0.0)
    write_log(records, sys.stdout, fmt, origin)


def _utc_seconds(text: str | None, option: str) -> float | None:
    """Unix seconds of an ISO 8601 time; one without a zone is UTC."""
    if text is None:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 time (2026-12-06T14:00, 2026-12-06T14:00:00+01:00)",
            param_hint=option,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


if __name__ == "__main__":
    main()
