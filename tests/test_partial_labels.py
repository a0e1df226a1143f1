"""Partial labels: a clip that does not know a tag is left out of that tag's loss and metrics,
and a model is evaluated on any set whose tags overlap its own, matched by name."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from sklearn.metrics import roc_auc_score

from trainer.checkpoint import load_checkpoint
from trainer.data.dataset import PreparedData
from trainer.data.manifest import load_manifest, write_manifest
from trainer.data.prepare import prepare
from trainer.evaluate import bce, choose_thresholds, evaluate_checkpoint, f1_at, tag_metrics
from trainer.train import TrainConfig, masked_bce, train

NAN = np.nan


def test_the_known_column_makes_the_other_tags_unknown_through_prepare(tmp_path, music):
    rows, known = [], []
    for i in range(4):
        soundfile.write(tmp_path / f"{i}.wav", music(2.0, 8000, seed=i), 8000, subtype="PCM_16")
    rows = [
        ("0.wav", ["speech"], "train"),  # a real voice: knows speech and instrumental only
        ("1.wav", ["instrumental"], "train"),  # a game score: the same two tags
        ("2.wav", ["piano", "instrumental"], "train"),  # fully labelled
        ("3.wav", [], "train"),  # knows speech and instrumental: both absent
    ]
    known = [
        ["speech", "instrumental"],
        ["speech", "instrumental"],
        None,
        ["speech", "instrumental"],
    ]
    write_manifest(tmp_path / "m.csv", rows, known=known, extra={"package": ["a", "b", "c", "d"]})
    labelled = load_manifest(tmp_path / "m.csv")
    assert labelled.notes["clips with partial labels"] == 3
    assert len(labelled.clips) == 4  # a partly labelled clip with no tag present still counts

    prepare(labelled, tmp_path / "prep", 8000, workers=1, progress=False)
    data = PreparedData(tmp_path / "prep")
    assert data.partial
    column = {tag: i for i, tag in enumerate(data.tags)}
    rows_by_id = {clip.clip_id: i for i, clip in enumerate(data.clips)}

    def row(clip_id):
        labels = data.labels(rows_by_id[clip_id])
        return {tag: labels[column[tag]] for tag in data.tags}

    speech = row("0.wav")
    assert speech["speech"] == 1 and speech["instrumental"] == 0 and np.isnan(speech["piano"])
    assert row("1.wav")["instrumental"] == 1 and np.isnan(row("1.wav")["piano"])
    assert row("2.wav") == {"speech": 0, "instrumental": 1, "piano": 1}
    silent = row("3.wav")
    assert silent["speech"] == 0 and silent["instrumental"] == 0 and np.isnan(silent["piano"])
    # columns by name, in any order; a tag the set lacks is unknown for every clip
    matrix = data.label_matrix([rows_by_id["2.wav"]], ["drums", "piano", "speech"])
    assert np.isnan(matrix[0, 0]) and matrix[0, 1:].tolist() == [1, 0]


def test_masked_bce_is_bce_over_the_known_labels_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    targets = torch.tensor(
        [[1, 0, NAN], [0, NAN, NAN], [1, 1, 0], [NAN, 0, 1], [0, 0, 0], [1, NAN, 1]]
    )
    known = ~torch.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert masked_bce(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    full = torch.randint(0, 2, (6, 3)).float()
    assert masked_bce(logits, full).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, full).item(), rel=1e-6
    )
    # an unknown label gets no gradient, whatever the model says there
    logits.requires_grad_(True)
    masked_bce(logits, targets).backward()
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)


def test_metrics_and_thresholds_take_only_the_clips_that_know_a_tag():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (40, 2)).astype(np.float32)
    scores = rng.random((40, 2))
    hidden = labels.copy()
    hidden[:15, 0] = NAN  # 15 clips do not know tag a
    hidden[:, 1] = NAN  # nobody knows tag b
    results = tag_metrics(hidden, scores, ["a", "b"])
    assert results[0].roc_auc == pytest.approx(roc_auc_score(labels[15:, 0], scores[15:, 0]))
    assert results[0].positives == int(labels[15:, 0].sum())
    assert np.isnan(results[1].roc_auc)
    assert choose_thresholds(hidden, scores, fallback=[0.5, 0.37])[1] == 0.37
    assert choose_thresholds(hidden, scores)[0] == choose_thresholds(labels[15:], scores[15:])[0]
    assert f1_at(hidden, scores, [0.5, 0.5])[0] == pytest.approx(
        f1_at(labels[15:], scores[15:], [0.5, 0.5])[0]
    )
    assert bce(hidden, scores) == pytest.approx(bce(labels[15:, :1], scores[15:, :1]))


def _manifest_set(root, music, clips, make_row):
    root.mkdir()
    rows, known = [], []
    for i in range(clips):
        soundfile.write(root / f"{i}.wav", music(1.5, 22050, seed=i), 22050, subtype="PCM_16")
        tags, knows, split = make_row(i)
        rows.append((f"{i}.wav", tags, split))
        known.append(knows)
    write_manifest(root / "m.csv", rows, known=known)
    prepare(load_manifest(root / "m.csv"), root / "prep", 22050, workers=1, progress=False)
    return root / "prep"


def test_a_model_trains_on_partial_labels_and_is_evaluated_on_another_tag_set(tmp_path, music):
    splits = ["train"] * 6 + ["valid"] * 3 + ["test"] * 3

    def trained_row(i):  # every third clip is a "real recording" that knows only speech
        tags = [
            t for t, on in (("speech", i % 2), ("piano", i % 3 == 0), ("drums", i % 4 < 2)) if on
        ]
        return tags, (["speech"] if i % 3 == 1 else None), splits[i]

    prepared = _manifest_set(tmp_path / "a", music, 12, trained_row)
    result = train(
        TrainConfig(
            data=str(prepared),
            out=str(tmp_path / "run"),
            model="samplecnn",
            hparams={"width": 0.125, "n": 3},
            epochs=1,
            progress=False,
            tensorboard=False,
            device="cpu",
        ),
    )
    assert np.isfinite(result.history[0]["train_loss"])

    # another set: tags in another order, one the model lacks, one it has left out
    def other_row(i):
        tags = [
            t for t, on in (("drums", i % 2), ("speech", i % 3 == 0), ("brass", i % 4 == 0)) if on
        ]
        return tags, None, "valid" if i < 4 else "test"

    other = _manifest_set(tmp_path / "b", music, 10, other_row)
    checkpoint_tags = load_checkpoint(result.best_path)["tags"]
    card_thresholds = load_checkpoint(result.best_path)["card"]["thresholds"]
    evaluation, files, card = evaluate_checkpoint(
        result.best_path, other, tmp_path / "eval", update_checkpoint=False, progress=False
    )
    assert [r.tag for r in evaluation.per_tag] == checkpoint_tags
    assert evaluation.summary["tags_not_in_model"] == ["brass"]
    assert evaluation.summary["tags_not_in_data"] == ["piano"]
    piano = checkpoint_tags.index("piano")
    assert np.isnan(evaluation.per_tag[piano].roc_auc)
    assert card.thresholds[piano] == card_thresholds[piano]  # no labels: the card's stays
    assert "skipped): brass" in files["report"].read_text()
    # the share of a tag's clips it is on for, and of the others, at the card's threshold
    speech = checkpoint_tags.index("speech")
    y, s = evaluation.labels[:, speech], evaluation.scores[:, speech]
    on = s >= card.thresholds[speech]
    result = evaluation.per_tag[speech]
    assert (result.on_positives, result.on_negatives) == (on[y == 1].mean(), on[y == 0].mean())
    assert "| on for its clips | on for the others |" in files["report"].read_text()


def test_a_threshold_sits_in_the_middle_of_the_gap_it_leaves():
    """Best F1 turns on the clips from 0.9 up; the threshold is halfway in logits between
    0.9 and 0.1, the highest score left off, not on the lowest positive's score."""
    labels = np.array([[1], [1], [1], [0], [0], [0]], dtype=np.float32)
    scores = np.array([[0.99], [0.95], [0.9], [0.1], [0.05], [0.01]])
    assert choose_thresholds(labels, scores)[0] == pytest.approx(0.5)
    lopsided = np.array([[0.999], [0.99], [0.97], [0.6], [0.2], [0.1]])
    threshold = choose_thresholds(labels, lopsided)[0]
    assert 0.6 < threshold < 0.97
    logit = np.log(threshold / (1 - threshold))
    assert logit == pytest.approx((np.log(0.97 / 0.03) + np.log(0.6 / 0.4)) / 2)
    assert f1_at(labels, lopsided, [threshold])[0] == 1.0
