"""Clip-level evaluation: scores, metrics, thresholds, plots and a short report.

A clip's score is the mean of the model's scores over the windows ``tagd tag`` would cut
from it (``tagd.windowing.clip_windows``: the hop grid from the first sample at the
model's default hop, a short clip zero-padded to one window), so evaluation scores what
the daemon would print for the same file. Lee et al. 2017 average the segments of a
clip; for FCN one window is a 29.1 s clip.
Metrics are computed per tag and averaged over tags:

- macro ROC-AUC and macro PR-AUC (average precision), as the papers report;
- ROC-AUC weighted by each tag's number of positive clips (Sankaran 2017, WAUC), which
  counts rare tags less when a small evaluation set makes their AUC noisy.

A label may be unknown (NaN: a real recording whose instruments nobody named); each
tag's metrics, threshold and loss take only the clips that know it. A tag with no
positive (or no negative) known clip in the evaluation set has no AUC; it is left out of
the averages and listed as such. Per-tag thresholds maximise F1 on the validation split
and go into the model card with the test scores.

A model is evaluated on any prepared set whose tags overlap its own, matched by name:
the set's tags the model lacks are listed and skipped, and the model's tags the set lacks
are unknown for every clip.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from tagd.card import ModelCard, exclusions_applied
from tagd.windowing import ClipTooShortError, clip_windows
from trainer.checkpoint import (
    card_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from trainer.data.dataset import DataError, PreparedData, to_float
from trainer.data.tags import exclusions

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_BATCH = 16
ROC_PLOT_TAGS = 6  # the ROC figure shows the best and worst few tags
SUMMARY_KEYS = ("roc_auc_macro", "pr_auc_macro", "roc_auc_weighted")


def resolve_device(name: str) -> torch.device:
    """ "auto" is the GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- scoring clips -----------------------------------------------------------------------------
@torch.no_grad()
def predict_clips(
    model: torch.nn.Module,
    data: PreparedData,
    indices: list[int],
    *,
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Clip scores ``[len(indices), n_tags]``: mean sigmoid over each clip's windows."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    window = model.window_samples
    scores = np.zeros((len(indices), model.n_tags), dtype=np.float64)
    pending: list[tuple[int, np.ndarray]] = []  # (row, windows) waiting for a full batch

    def flush() -> None:
        batch = torch.from_numpy(np.concatenate([w for _, w in pending])).to(device)
        out = model(batch).float().cpu().numpy()  # (sum of windows, n_tags)
        at = 0
        for row, windows in pending:
            scores[row] = out[at : at + len(windows)].mean(axis=0)
            at += len(windows)
        pending.clear()

    hop = hop_samples or model.default_hop_samples
    for row, i in enumerate(tqdm(indices, desc="score", unit="clip", disable=not progress)):
        try:
            windows = [w.samples for w in clip_windows(to_float(data.audio(i)), window, hop)]
        except ClipTooShortError as exc:
            raise DataError(
                f"clip {data.clips[i].clip_id} of {data.root} is too short for {model.arch}: "
                f"{exc.length / model.sample_rate:.2f} s, the least it scores is "
                f"{exc.minimum / model.sample_rate:.2f} s; prepare with --model {model.arch} "
                "(it skips such clips) or a larger --min-seconds"
            ) from None
        pending.append((row, np.stack(windows)))
        if sum(len(w) for _, w in pending) >= batch_size:
            flush()
    if pending:
        flush()
    model.train(was_training)
    return scores


def bce(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary cross-entropy of clip scores over the known labels, the loss the plateau
    schedule watches."""
    known = ~np.isnan(labels)
    y, p = labels[known], np.clip(scores[known], 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if y.size else float("nan")


# -- metrics -----------------------------------------------------------------------------------
@dataclass
class TagResult:
    tag: str
    positives: int
    roc_auc: float  # NaN when the set has no positive or no negative for this tag
    pr_auc: float
    threshold: float = DEFAULT_THRESHOLD
    f1: float = float("nan")  # at the threshold, on the set the metrics come from
    on_positives: float = float("nan")  # share of the tag's clips it is on for (recall)
    on_negatives: float = float("nan")  # share of the other known clips it is on for


def tag_metrics(labels: np.ndarray, scores: np.ndarray, tags: list[str]) -> list[TagResult]:
    results = []
    for i, tag in enumerate(tags):
        y, s = _known(labels[:, i], scores[:, i])
        positives = int(y.sum())
        if 0 < positives < len(y):
            results.append(
                TagResult(tag, positives, roc_auc_score(y, s), average_precision_score(y, s))
            )
        else:
            results.append(TagResult(tag, positives, float("nan"), float("nan")))
    return results


def _known(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One tag's labels and scores on the clips that know it."""
    known = ~np.isnan(y)
    return y[known], s[known]


def summarise(results: list[TagResult]) -> dict[str, Any]:
    scored = [r for r in results if not np.isnan(r.roc_auc)]
    if not scored:
        return {key: float("nan") for key in SUMMARY_KEYS} | {"tags_scored": 0}
    weights = np.array([r.positives for r in scored], dtype=np.float64)
    roc = np.array([r.roc_auc for r in scored])
    return {
        "roc_auc_macro": float(roc.mean()),
        "pr_auc_macro": float(np.mean([r.pr_auc for r in scored])),
        "roc_auc_weighted": float(np.sum(weights * roc) / weights.sum()),
        "tags_scored": len(scored),
        "tags_without_auc": [r.tag for r in results if np.isnan(r.roc_auc)],
    }


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, fallback: list[float] | None = None
) -> list[float]:
    """Per tag, the score threshold with the best F1 on these clips; where no known clip
    has the tag, ``fallback``'s (a card's thresholds) or 0.5."""
    thresholds = []
    for i in range(labels.shape[1]):
        y, s = _known(labels[:, i], scores[:, i])
        if y.sum() == 0:
            thresholds.append(fallback[i] if fallback is not None else DEFAULT_THRESHOLD)
            continue
        precision, recall, cuts = precision_recall_curve(y, s)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))  # the last point has no threshold
        thresholds.append(_middle_of_gap(float(cuts[best]), s))
    return thresholds


def _middle_of_gap(cut: float, scores: np.ndarray) -> float:
    """The threshold halfway (in logits) between ``cut``, the lowest score that the best
    F1 turns on, and the highest score below it: the same clips on, with the margin
    shared. The cut itself sits on one validation clip's score, and a tag whose scores
    separate well would be set off by any new clip a hair below that one."""
    below = scores[scores < cut]
    if not below.size:
        return float(np.clip(cut, 0.0, 1.0))
    ends = np.clip([cut, below.max()], 1e-6, 1 - 1e-6)
    middle = np.log(ends / (1 - ends)).mean()
    return float(1 / (1 + np.exp(-middle)))


def f1_at(labels: np.ndarray, scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """F1 per tag at ``thresholds``; unknown labels (NaN) count neither way."""
    predicted = scores >= np.asarray(thresholds)[None, :]
    tp = (predicted & (labels > 0)).sum(axis=0)  # NaN compares False both ways
    fp = (predicted & (labels == 0)).sum(axis=0)
    fn = (~predicted & (labels > 0)).sum(axis=0)
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


# -- the whole evaluation ----------------------------------------------------------------------
@dataclass
class Evaluation:
    split: str
    summary: dict[str, Any]
    per_tag: list[TagResult]
    thresholds: list[float]
    labels: np.ndarray
    scores: np.ndarray


def evaluate_model(
    model: torch.nn.Module,
    data: PreparedData,
    *,
    split: str = "test",
    threshold_split: str = "valid",
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: torch.device | str = "cpu",
    progress: bool = False,
    tags: list[str] | None = None,
    fallback_thresholds: list[float] | None = None,
    excludes: dict[str, list[str]] | None = None,
) -> Evaluation:
    """Thresholds from ``threshold_split``, metrics and F1 on ``split``.

    ``tags``: the model's tags, in its output order (default: the set's own). The set's
    labels are matched to them by name; a tag the set lacks has no labels, and keeps its
    ``fallback_thresholds`` entry (the card's) where there is one. ``excludes`` (the
    card's): the shares of clips a tag is on for count it as tagd publishes it, off while
    a tag that excludes it is on; F1 is each tag's own at its threshold.
    """
    tags = list(tags or data.tags)
    if model.n_tags != len(tags):
        raise ValueError(f"the model outputs {model.n_tags} tags, not the {len(tags)} given")
    if not set(tags) & set(data.tags):
        raise DataError(
            f"{data.root} has none of the model's tags (it has {', '.join(data.tags[:5])}...; "
            f"the model {', '.join(tags[:5])}...); evaluate on a set labelled with them"
        )
    indices = data.indices(split)
    if not indices:
        raise ValueError(f"{data.root} has no {split} clips to evaluate on")
    kwargs = dict(hop_samples=hop_samples, batch_size=batch_size, device=device, progress=progress)
    labels = data.label_matrix(indices, tags)
    scores = predict_clips(model, data, indices, **kwargs)
    threshold_indices = data.indices(threshold_split)
    if threshold_indices and threshold_split != split:
        thresholds = choose_thresholds(
            data.label_matrix(threshold_indices, tags),
            predict_clips(model, data, threshold_indices, **kwargs),
            fallback_thresholds,
        )
    elif fallback_thresholds is not None:  # a set only to test on: the card's thresholds
        log.info("no %s clips in %s: scored at the card's thresholds", threshold_split, data.root)
        thresholds = list(fallback_thresholds)
    else:
        log.warning("no %s clips: thresholds chosen on %s itself", threshold_split, split)
        thresholds = choose_thresholds(labels, scores)
    per_tag = tag_metrics(labels, scores, tags)
    published = exclusions_applied(scores >= np.asarray(thresholds), tags, excludes or {})
    for i, (result, threshold, f1) in enumerate(
        zip(per_tag, thresholds, f1_at(labels, scores, thresholds), strict=True)
    ):
        result.threshold, result.f1 = threshold, float(f1)
        known = ~np.isnan(labels[:, i])
        y, on = labels[known, i], published[known, i]
        result.on_positives = float(on[y == 1].mean()) if (y == 1).any() else float("nan")
        result.on_negatives = float(on[y == 0].mean()) if (y == 0).any() else float("nan")
    summary = summarise(per_tag)
    summary["f1_macro"] = float(
        np.mean([r.f1 for r in per_tag if not np.isnan(r.roc_auc)] or [np.nan])
    )
    summary["clips"] = len(indices)
    summary["tags_not_in_model"] = [tag for tag in data.tags if tag not in tags]
    summary["tags_not_in_data"] = [tag for tag in tags if tag not in data.tags]
    return Evaluation(split, summary, per_tag, thresholds, labels, scores)


# -- files: table, plots, report ---------------------------------------------------------------
def write_outputs(
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    title: str,
    log_csv: str | Path | None = None,
    roc_tags: list[str] | None = None,
) -> dict[str, Path]:
    """metrics.json, per_tag.csv, PNG plots and report.md in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out_dir / "metrics.json", "per_tag": out_dir / "per_tag.csv"}
    files["metrics"].write_text(
        json.dumps({"split": evaluation.split, **evaluation.summary}, indent=2) + "\n"
    )
    with files["per_tag"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "tag",
                "positives",
                "roc_auc",
                "pr_auc",
                "threshold",
                "f1",
                "on_positives",
                "on_negatives",
            ]
        )
        for r in evaluation.per_tag:
            writer.writerow(
                [
                    r.tag,
                    r.positives,
                    f"{r.roc_auc:.4f}",
                    f"{r.pr_auc:.4f}",
                    f"{r.threshold:.4f}",
                    f"{r.f1:.4f}",
                    f"{r.on_positives:.4f}",
                    f"{r.on_negatives:.4f}",
                ]
            )

    files["tag_auc_plot"] = plot_tag_auc(evaluation.per_tag, out_dir / "tag_roc_auc.png")
    chosen = roc_tags or _extreme_tags(evaluation.per_tag, ROC_PLOT_TAGS)
    files["roc_plot"] = plot_roc_curves(evaluation, chosen, out_dir / "roc_curves.png")
    if log_csv is not None and Path(log_csv).is_file():
        files["curves_plot"] = plot_training_curves(log_csv, out_dir / "training_curves.png")
    files["report"] = out_dir / "report.md"
    files["report"].write_text(_report(evaluation, title, files))
    return files


def _extreme_tags(per_tag: list[TagResult], count: int) -> list[str]:
    scored = sorted((r for r in per_tag if not np.isnan(r.roc_auc)), key=lambda r: -r.roc_auc)
    if len(scored) <= count:
        return [r.tag for r in scored]
    return [r.tag for r in scored[: count // 2]] + [r.tag for r in scored[-(count - count // 2) :]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_tag_auc(per_tag: list[TagResult], path: Path) -> Path:
    plt = _pyplot()
    ordered = sorted(per_tag, key=lambda r: -np.nan_to_num(r.roc_auc))
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(ordered) + 2), 4))
    ax.bar(range(len(ordered)), [np.nan_to_num(r.roc_auc) for r in ordered], color="#4477aa")
    ax.set_xticks(range(len(ordered)), [r.tag for r in ordered], rotation=90, fontsize=7)
    ax.set_ylim(0.0, 1.0)  # from 0: a tag below chance gets a bar too
    ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle="--", label="chance")
    ax.legend(loc="lower left", fontsize=7)
    ax.set_ylabel("ROC-AUC")
    ax.set_title("ROC-AUC per tag")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_roc_curves(evaluation: Evaluation, tags: list[str], path: Path) -> Path:
    plt = _pyplot()
    index_of = {r.tag: i for i, r in enumerate(evaluation.per_tag)}
    unknown = [tag for tag in tags if tag not in index_of]
    if unknown:
        raise ValueError(f"unknown tags for the ROC plot: {', '.join(unknown)}")
    fig, ax = plt.subplots(figsize=(5, 5))
    for tag in tags:
        i = index_of[tag]
        y, s = _known(evaluation.labels[:, i], evaluation.scores[:, i])
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{tag} ({evaluation.per_tag[i].roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curves ({evaluation.split})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training_curves(log_csv: str | Path, path: Path) -> Path:
    plt = _pyplot()
    with Path(log_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [float(r["train_loss"]) for r in rows], label="train (window)")
    loss_ax.plot(epochs, [float(r["valid_loss"]) for r in rows], label="valid (clip)")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("binary cross-entropy")
    loss_ax.legend()
    auc_ax.plot(epochs, [float(r["valid_roc_auc"]) for r in rows], label="ROC-AUC")
    auc_ax.plot(epochs, [float(r["valid_pr_auc"]) for r in rows], label="PR-AUC")
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("validation, macro")
    auc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _report(evaluation: Evaluation, title: str, files: dict[str, Path]) -> str:
    s = evaluation.summary
    lines = [
        f"# {title}",
        "",
        f"{s['clips']} {evaluation.split} clips; clip score = mean over windows covering the clip.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| macro ROC-AUC | {s['roc_auc_macro']:.4f} |",
        f"| macro PR-AUC | {s['pr_auc_macro']:.4f} |",
        f"| ROC-AUC weighted by tag frequency | {s['roc_auc_weighted']:.4f} |",
        f"| macro F1 at validation thresholds | {s['f1_macro']:.4f} |",
        "",
    ]
    if s.get("tags_not_in_model"):
        lines += [
            f"In the set, not in the model (skipped): {', '.join(s['tags_not_in_model'])}",
            "",
        ]
    if s.get("tags_without_auc"):
        lines += [
            f"No AUC (no positive or no negative clip): {', '.join(s['tags_without_auc'])}",
            "",
        ]
    for key, caption in (
        ("curves_plot", "Training curves"),
        ("tag_auc_plot", "ROC-AUC per tag"),
        ("roc_plot", "ROC curves"),
    ):
        if key in files:
            lines += [f"![{caption}]({files[key].name})", ""]
    lines += [
        "| tag | positives | ROC-AUC | PR-AUC | threshold | F1 | on for its clips | on for the others |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.tag} | {r.positives} | {r.roc_auc:.4f} | {r.pr_auc:.4f} | {r.threshold:.3f} | {r.f1:.3f} | {_share(r.on_positives)} | {_share(r.on_negatives)} |"
        for r in evaluation.per_tag
    ]
    return "\n".join(lines) + "\n"


def _share(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.0%}"


def card_scores(evaluation: Evaluation) -> dict[str, Any]:
    """What the model card keeps of an evaluation: the averages and each tag's AUC."""
    return {
        **{key: round(evaluation.summary[key], 4) for key in (*SUMMARY_KEYS, "f1_macro")},
        "clips": evaluation.summary["clips"],
        "roc_auc_per_tag": {
            r.tag: None if np.isnan(r.roc_auc) else round(r.roc_auc, 4) for r in evaluation.per_tag
        },
    }


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    split: str = "test",
    update_checkpoint: bool = True,
    roc_tags: list[str] | None = None,
    hop_seconds: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    device: str = "auto",
    progress: bool = True,
) -> tuple[Evaluation, dict[str, Path], ModelCard]:
    """Evaluate a checkpoint, write the report, put thresholds and scores in its card.

    ``hop_seconds``: the hop between a clip's windows, in seconds as ``tagd tag --hop``
    takes it and converted the same way (``ModelCard.hop_from_seconds``); None: the
    model's hop. The card (with validation thresholds and ``scores[split]``) is written
    beside the report as ``card.json`` and, with ``update_checkpoint``, back into the
    checkpoint, so that ``tagd-train export`` ships them.
    """
    if hop_seconds is not None and not hop_seconds > 0:
        raise ValueError(f"the hop must be a positive number of seconds, got {hop_seconds!r}")
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    device = resolve_device(device)
    model = model_from_checkpoint(checkpoint).to(device)
    data = PreparedData(data_dir)
    tags = list(checkpoint["tags"])
    skipped = [tag for tag in data.tags if tag not in tags]
    if skipped and set(tags) & set(data.tags):
        log.warning("%s: tags the model does not have, skipped: %s", data.root, ", ".join(skipped))
    if set(tags) & set(data.tags) and set(tags) - set(data.tags):
        log.warning(
            "%s has no labels for the model's %s: not scored",
            data.root,
            ", ".join(tag for tag in tags if tag not in data.tags),
        )
    if data.sample_rate != model.sample_rate:
        raise DataError(
            f"{data.root} is prepared at {data.sample_rate} Hz but {model.arch} takes "
            f"{model.sample_rate} Hz; prepare the data again for this model"
        )
    card = card_from_checkpoint(checkpoint)
    # a card written before exclusions gets them, as it gets the thresholds chosen here
    card.excludes = card.excludes or exclusions(card.tags)
    evaluation = evaluate_model(
        model,
        data,
        split=split,
        hop_samples=card.hop_from_seconds(hop_seconds) if hop_seconds else None,
        batch_size=batch_size,
        device=device,
        progress=progress,
        tags=tags,
        fallback_thresholds=card.thresholds,
        excludes=card.excludes,
    )
    card.thresholds = evaluation.thresholds
    card.scores = {**card.scores, split: card_scores(evaluation)}
    card.training = {**card.training, "thresholds": "max F1 per tag on the valid split"}
    card.validate()

    out_dir = Path(out_dir) if out_dir else checkpoint_path.parent / f"eval-{split}"
    files = write_outputs(
        evaluation,
        out_dir,
        title=f"{card.name} ({card.architecture}) on {split}",
        log_csv=checkpoint_path.parent / "log.csv",
        roc_tags=roc_tags,
    )
    files["card"] = out_dir / "card.json"
    card.save(files["card"])
    if update_checkpoint:
        checkpoint["card"] = card.to_dict()
        save_checkpoint(checkpoint_path, checkpoint)
    return evaluation, files, card
