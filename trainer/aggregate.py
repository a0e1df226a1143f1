"""Train an aggregator (trainer.models.aggregator) on songs longer than one window.

A trained CNN checkpoint cuts each prepared clip into the windows ``tagd tag`` scores
(``tagd.windowing.clip_windows`` at the card's hop, or ``hop_seconds``), and its
``embed`` turns each window into features; the aggregator learns the clip's tags from
the sequence. Tags are the CNN's: a clip's labels are matched by name, and a tag the
prepared set does not know (or a clip leaves unknown) is masked out of the loss
(``masked_bce``) and the metrics.

- black-box (default, the thesis's first setting): the CNN is frozen, so every clip's
  embeddings are computed once and the epochs run on them alone: minutes on a CPU;
- ``finetune``: the CNN's weights train too, at ``cnn_lr`` (the thesis's fine-tuned
  setting); every step runs the CNN on every window of its songs, and the run also
  writes ``cnn.pt``, the fine-tuned CNN as a tagd checkpoint for ``tagd-train export``.

Each song in an epoch is either the whole sequence or, half the time, a random
contiguous run of its windows (at least one): the labels of a song hold for its parts in
the way a CNN's crops assume, and a live stream's aggregator sees such runs.

The run folder gets ``aggregator.pt`` (the best epoch by validation macro ROC-AUC; a plain
dict of tensors and JSON-able values, read with ``weights_only=True``), ``log.csv`` per
epoch, and ``report.md``: validation and test ROC-AUC of the aggregator beside today's
average of the CNN's window scores on the same clips.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagd.windowing import ClipTooShortError, clip_windows
from trainer.checkpoint import (
    CheckpointError,
    card_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    read_tensors_file,
    save_checkpoint,
)
from trainer.data.dataset import DataError, PreparedData, to_float
from trainer.evaluate import resolve_device, summarise, tag_metrics
from trainer.models import TaggerModel
from trainer.models.aggregator import (
    DEFAULT_HIDDEN,
    THESIS_DROPOUT,
    THESIS_LAYERS,
    Aggregator,
    AggregatorConfig,
    create_aggregator,
)
from trainer.train import masked_bce

log = logging.getLogger(__name__)

AGGREGATOR_FORMAT = "tagd-aggregator"
AGGREGATOR_VERSION = 1
AGGREGATOR_NAME = "aggregator.pt"
FINETUNED_CNN_NAME = "cnn.pt"
SPAN_PROBABILITY = 0.5  # share of songs an epoch sees as a random run of windows
METRIC_KEYS = ("roc_auc_macro", "roc_auc_weighted", "pr_auc_macro")


@dataclass
class AggregateConfig:
    checkpoint: str  # the trained CNN
    data: str  # a prepared folder at the CNN's rate
    out: str
    kind: str = "lstm"
    hidden: int = DEFAULT_HIDDEN
    layers: int = THESIS_LAYERS
    dropout: float = THESIS_DROPOUT
    epochs: int = 30
    batch_size: int = 16  # songs per step
    lr: float = 1e-3  # Adam, the aggregator's
    finetune: bool = False  # train the CNN too (else frozen: a black-box feature extractor)
    cnn_lr: float = 1e-5  # with finetune
    hop_seconds: float | None = None  # between a clip's windows; None: the card's hop
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class AggregateResult:
    run_dir: Path
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float] = field(default_factory=dict)  # empty without a test split
    average: dict[str, dict[str, float]] = field(default_factory=dict)  # split → metrics


# -- windows and embeddings -------------------------------------------------------------------
def clip_window_stack(cnn: TaggerModel, samples: np.ndarray, hop_samples: int) -> np.ndarray:
    """A clip's windows as ``tagd tag`` cuts them: (T, window_samples) float32."""
    return np.stack([w.samples for w in clip_windows(samples, cnn.window_samples, hop_samples)])


@torch.no_grad()
def embed_windows(
    cnn: TaggerModel, windows: np.ndarray, batch_size: int = 16, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(T, window_samples) → (T, embedding_size) with the CNN in eval mode."""
    cnn.eval()
    pieces = [
        cnn.embed(torch.from_numpy(np.ascontiguousarray(windows[at : at + batch_size])).to(device))
        .float()
        .cpu()
        .numpy()
        for at in range(0, len(windows), batch_size)
    ]
    return np.concatenate(pieces)


def embed_clips(
    cnn: TaggerModel,
    data: PreparedData,
    indices: list[int],
    hop_samples: int,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[np.ndarray]:
    """Every clip's window embeddings, (T_i, D) each, in ``indices`` order."""
    from tqdm import tqdm

    out = []
    for i in tqdm(indices, desc="embed", unit="clip", disable=not progress):
        out.append(embed_windows(cnn, _windows(cnn, data, i, hop_samples), device=device))
    return out


def _windows(cnn: TaggerModel, data: PreparedData, i: int, hop_samples: int) -> np.ndarray:
    try:
        return clip_window_stack(cnn, to_float(data.audio(i)), hop_samples)
    except ClipTooShortError as exc:
        raise DataError(
            f"clip {data.clips[i].clip_id} of {data.root} is too short for {cnn.arch}: "
            f"{exc.length / cnn.sample_rate:.2f} s; prepare with --model {cnn.arch}"
        ) from None


def pad_sequences(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Songs of T_i windows → (B, max T, D) zero-padded, and the lengths (B,)."""
    lengths = torch.tensor([len(s) for s in sequences])
    batch = torch.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]))
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.as_tensor(sequence)
    return batch, lengths


def random_span(length: int, rng: np.random.Generator) -> slice:
    """The whole song, or (SPAN_PROBABILITY of the time) a random run of its windows."""
    if length <= 1 or rng.random() >= SPAN_PROBABILITY:
        return slice(0, length)
    size = int(rng.integers(1, length + 1))
    start = int(rng.integers(0, length - size + 1))
    return slice(start, start + size)


# -- scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def aggregate_scores(
    aggregator: Aggregator, sequences: list[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Song scores (N, n_tags) from each song's whole sequence of embeddings."""
    aggregator.eval()
    out = []
    for at in range(0, len(sequences), batch_size):
        batch, lengths = pad_sequences(sequences[at : at + batch_size])
        out.append(aggregator(batch, lengths).numpy())
    return np.concatenate(out) if out else np.zeros((0, aggregator.n_tags))


@torch.no_grad()
def average_scores(cnn: TaggerModel, sequences: list[np.ndarray]) -> np.ndarray:
    """Today's song score: the mean of the CNN's window scores, from the same embeddings."""
    cnn.eval()
    head = cnn.head
    return np.stack(
        [torch.sigmoid(head(torch.as_tensor(s))).mean(dim=0).numpy() for s in sequences]
    )


def metrics(labels: np.ndarray, scores: np.ndarray, tags: list[str]) -> dict[str, float]:
    summary = summarise(tag_metrics(labels, scores, tags))
    return {key: round(float(summary[key]), 4) for key in METRIC_KEYS}


# -- training ------------------------------------------------------------------------------------
def train_aggregator(
    config: AggregateConfig, embedded: dict[str, list[np.ndarray]] | None = None
) -> AggregateResult:
    """Train, keep the best epoch by validation macro ROC-AUC, write the run folder.

    ``embedded``: a frozen CNN's embeddings of the split's clips (``embed_clips`` at this
    hop, in ``data.indices(split)`` order), computed once for several runs (bench/).
    """
    if embedded and config.finetune:
        raise ValueError("precomputed embeddings are for a frozen CNN, not --finetune")
    embedded = embedded or {}
    started = time.monotonic()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)

    # -- the CNN and the data
    checkpoint = load_checkpoint(config.checkpoint)
    cnn = model_from_checkpoint(checkpoint).to(device)
    card = card_from_checkpoint(checkpoint)
    data = PreparedData(config.data)
    if data.sample_rate != cnn.sample_rate:
        raise DataError(
            f"{data.root} is prepared at {data.sample_rate} Hz but {cnn.arch} reads "
            f"{cnn.sample_rate} Hz; prepare it with --model {cnn.arch}"
        )
    tags = list(checkpoint["tags"])
    if not set(tags) & set(data.tags):
        raise DataError(f"{data.root} shares no tag with {config.checkpoint}")
    hop = _hop_samples(config, card.hop_samples, cnn.sample_rate)
    train_idx, valid_idx, test_idx = (data.indices(s) for s in ("train", "valid", "test"))
    if not train_idx or not valid_idx:
        raise DataError(f"{data.root} needs train and valid clips to train an aggregator")
    labels = {
        name: data.label_matrix(idx, tags)
        for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", test_idx))
    }
    windows_per_clip = [
        len(range(0, max(1, data.clips[i].length - cnn.window_samples + 1), hop)) for i in train_idx
    ]
    log.info(
        "%d train, %d valid, %d test songs; %.1f windows a song on average (hop %.2f s)",
        len(train_idx),
        len(valid_idx),
        len(test_idx),
        float(np.mean(windows_per_clip)),
        hop / cnn.sample_rate,
    )

    aggregator = create_aggregator(
        AggregatorConfig(
            embedding_size=cnn.embedding_size,
            n_tags=len(tags),
            kind=config.kind,
            hidden=config.hidden,
            layers=config.layers,
            dropout=config.dropout,
        )
    ).to(device)
    groups = [{"params": list(aggregator.parameters()), "lr": config.lr}]
    if config.finetune:
        groups.append({"params": list(cnn.parameters()), "lr": config.cnn_lr})
    else:
        cnn.requires_grad_(False)
    optimizer = torch.optim.Adam(groups)

    # Frozen: embed every clip once. Fine-tuned: embed valid/test per epoch, train per step.
    def embed_split(split: str, idx: list[int]) -> list[np.ndarray]:
        if split in embedded:
            return embedded[split]
        return embed_clips(cnn, data, idx, hop, device=device, progress=config.progress)

    frozen_train = None if config.finetune else embed_split("train", train_idx)
    valid_sequences = embed_split("valid", valid_idx)

    # -- epochs
    log_path = run_dir / "log.csv"
    log_path.unlink(missing_ok=True)
    best = {"epoch": 0, "roc_auc_macro": -1.0, "state": None, "cnn_state": None}
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.monotonic()
        aggregator.train()
        if config.finetune:
            _train_mode_without_batchnorm(cnn)
        order = rng.permutation(len(train_idx))
        losses = []
        for at in range(0, len(order), config.batch_size):
            rows = order[at : at + config.batch_size]
            sequences = [
                _train_sequence(cnn, data, train_idx[r], hop, frozen_train, r, rng, device)
                for r in rows
            ]
            lengths = torch.tensor([len(s) for s in sequences])
            batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # (B, T, D)
            logits = aggregator.forward_logits(batch, lengths)  # (B, n_tags)
            loss = masked_bce(logits, torch.from_numpy(labels["train"][rows]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if config.finetune:
            valid_sequences = embed_split("valid", valid_idx)
        valid = metrics(labels["valid"], aggregate_scores(aggregator.cpu(), valid_sequences), tags)
        aggregator.to(device)
        row = {
            "epoch": epoch,
            "train_loss": round(float(np.mean(losses)), 5),
            **{f"valid_{key}": value for key, value in valid.items()},
            "seconds": round(time.monotonic() - epoch_started, 2),
        }
        _append_log(log_path, row)
        log.info("epoch %d: %s", epoch, row)
        if valid["roc_auc_macro"] > best["roc_auc_macro"]:
            best.update(
                epoch=epoch,
                roc_auc_macro=valid["roc_auc_macro"],
                state=copy.deepcopy(aggregator.state_dict()),
                cnn_state=copy.deepcopy(cnn.state_dict()) if config.finetune else None,
            )

    # -- the best epoch: scores beside today's average, the files
    aggregator.load_state_dict(best["state"])
    aggregator.cpu()
    if best["cnn_state"] is not None:
        cnn.load_state_dict(best["cnn_state"])
    cnn.cpu()
    device = torch.device("cpu")
    result = AggregateResult(run_dir=run_dir, best_epoch=best["epoch"], valid={})
    for split, idx in (("valid", valid_idx), ("test", test_idx)):
        if not idx:
            continue
        sequences = embed_split(split, idx)
        ours = metrics(labels[split], aggregate_scores(aggregator, sequences), tags)
        setattr(result, split, ours)
        result.average[split] = metrics(labels[split], average_scores(cnn, sequences), tags)

    payload = aggregator_payload(aggregator, checkpoint, card.name, hop, config, result)
    save_checkpoint(run_dir / AGGREGATOR_NAME, payload)
    if config.finetune:
        tuned = dict(checkpoint)
        tuned["state_dict"] = {k: v.detach().cpu() for k, v in cnn.state_dict().items()}
        save_checkpoint(run_dir / FINETUNED_CNN_NAME, tuned)
    (run_dir / "report.md").write_text(_report(config, result, time.monotonic() - started))
    return result


def _hop_samples(config: AggregateConfig, card_hop: int, sample_rate: int) -> int:
    if config.hop_seconds is None:
        return card_hop
    if config.hop_seconds <= 0:
        raise ValueError(f"hop must be positive, got {config.hop_seconds} s")
    return max(1, round(config.hop_seconds * sample_rate))


def _train_sequence(cnn, data, clip, hop, frozen, row, rng, device) -> torch.Tensor:
    """One training song's embeddings (T', D), cut to a random run of windows at times."""
    if frozen is not None:
        sequence = frozen[row]
        return torch.from_numpy(sequence[random_span(len(sequence), rng)]).to(device)
    windows = _windows(cnn, data, clip, hop)
    windows = windows[random_span(len(windows), rng)]
    return cnn.embed(torch.from_numpy(np.ascontiguousarray(windows)).to(device))  # (T', D)


def _train_mode_without_batchnorm(cnn: TaggerModel) -> None:
    """Fine-tuning on a few songs: dropout on, BatchNorm statistics kept as trained."""
    cnn.train()
    for module in cnn.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def aggregator_payload(
    aggregator: Aggregator,
    cnn_checkpoint: dict[str, Any],
    cnn_name: str,
    hop_samples: int,
    config: AggregateConfig,
    result: AggregateResult,
) -> dict[str, Any]:
    """What ``aggregator.pt`` holds: enough to rebuild the aggregator and name its CNN."""
    return {
        "format": AGGREGATOR_FORMAT,
        "version": AGGREGATOR_VERSION,
        "config": aggregator.hparams,
        "tags": list(cnn_checkpoint["tags"]),
        "state_dict": {k: v.detach().cpu() for k, v in aggregator.state_dict().items()},
        "cnn": {
            "name": cnn_name,
            "checkpoint": str(Path(config.checkpoint).resolve()),
            "arch": cnn_checkpoint["arch"],
            "embedding_size": aggregator.config.embedding_size,
            "finetuned": config.finetune,
        },
        "hop_samples": hop_samples,
        "training": json.loads(json.dumps(dataclasses.asdict(config))),
        "scores": {
            "best_epoch": result.best_epoch,
            "valid": result.valid,
            "test": result.test,
            "average": result.average,
        },
    }


def load_aggregator(path: str | Path) -> tuple[Aggregator, dict[str, Any]]:
    """An ``aggregator.pt`` back as a module in eval mode, and the file's dict."""
    path = Path(path)
    payload = read_tensors_file(path, "aggregator file")
    if not isinstance(payload, dict) or payload.get("format") != AGGREGATOR_FORMAT:
        raise CheckpointError(
            f"{path}: not a {AGGREGATOR_FORMAT} file; `tagd-train aggregate` writes one"
        )
    if payload.get("version") != AGGREGATOR_VERSION:
        raise CheckpointError(
            f"{path}: {AGGREGATOR_FORMAT} version {payload.get('version')}, this tagd reads "
            f"{AGGREGATOR_VERSION}"
        )
    try:
        aggregator = create_aggregator(AggregatorConfig(**payload["config"]))
        aggregator.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not rebuild its aggregator: {exc}") from exc
    return aggregator.eval(), payload


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def _report(config: AggregateConfig, result: AggregateResult, seconds: float) -> str:
    setting = "fine-tuned" if config.finetune else "frozen (black-box)"
    lines = [
        f"# Aggregator `{config.kind}` over {Path(config.checkpoint).name}",
        "",
        f"CNN {setting}; data {config.data}; hidden {config.hidden}, layers {config.layers}, "
        f"dropout {config.dropout}; {config.epochs} epochs, best {result.best_epoch}; "
        f"{seconds:.0f} s.",
        "",
        "| split | song score | macro ROC-AUC | weighted ROC-AUC | macro PR-AUC |",
        "|---|---|---|---|---|",
    ]
    for split in ("valid", "test"):
        ours = getattr(result, split)
        if not ours:
            continue
        for name, scores in (
            (f"aggregator ({config.kind})", ours),
            ("average of windows", result.average[split]),
        ):
            lines.append(
                f"| {split} | {name} | "
                + " | ".join(f"{scores[key]:.4f}" for key in METRIC_KEYS)
                + " |"
            )
    return "\n".join(lines) + "\n"


def write_untrained_aggregator(
    path: str | Path,
    cnn: TaggerModel,
    tags: list[str],
    hop_samples: int,
    *,
    kind: str = "lstm",
    hidden: int = DEFAULT_HIDDEN,
    seed: int = 0,
) -> Path:
    """An ``aggregator.pt`` of random weights over ``cnn``'s embeddings, as `tagd-train
    aggregate` writes a trained one: what costs and exactness are measured with
    (bench/aggregate_cost.py, tests), never a model to tag with."""
    torch.manual_seed(seed)
    config = AggregatorConfig(cnn.embedding_size, len(tags), kind=kind, hidden=hidden)
    aggregator = create_aggregator(config).eval()
    untrained = AggregateConfig(checkpoint="(untrained)", data="", out=str(Path(path).parent))
    payload = aggregator_payload(
        aggregator,
        {"tags": tags, "arch": cnn.arch},
        "untrained",
        hop_samples,
        untrained,
        AggregateResult(run_dir=Path(path).parent, best_epoch=0, valid={}),
    )
    save_checkpoint(path, payload)
    return Path(path)
