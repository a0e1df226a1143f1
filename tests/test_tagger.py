"""From scores to predictions: clip averaging for sample-level models, thresholds, hysteresis."""

from __future__ import annotations

import numpy as np
import pytest

from tagd.card import ModelCard
from tagd.stream import Arrival, ReadyWindow
from tagd.tagger import OFF, ON, Tagger


def card(**overrides) -> ModelCard:
    settings = {
        "name": "m",
        "architecture": "fcn4",
        "sample_rate": 100,
        "window_samples": 100,
        "hop_samples": 50,
        "tags": ["rock", "jazz", "vocal"],
        "thresholds": [0.5, 0.6, 0.3],
    }
    return ModelCard(**(settings | overrides))


def window(
    seq: int, hop: int = 50, size: int = 100, epoch: int = 1, stream: str = "s"
) -> ReadyWindow:
    return ReadyWindow(stream, seq, epoch, seq * hop, np.zeros(size, np.float32), Arrival(0, 0))


def test_one_window_models_publish_that_windows_scores_and_tags_by_score():
    tagger = Tagger(card())
    prediction = tagger.update(window(0), [0.55, 0.9, 0.1])
    np.testing.assert_array_equal(prediction.scores, np.float32([0.55, 0.9, 0.1]))
    assert (prediction.start, prediction.end, prediction.segments) == (0, 100, 1)
    assert prediction.over == ["jazz", "rock"]  # over their own thresholds, best first
    prediction = tagger.update(window(1), [0.1, 0.1, 0.1])
    assert (prediction.start, prediction.segments, prediction.over) == (50, 1, [])


def test_sample_level_predictions_average_the_segments_of_the_last_clip():
    # 1 s segments, hop 1 s, clip 3.5 s: the last three segments (Lee et al.'s 29.1 s, shrunk)
    sample_level = card(window_samples=100, hop_samples=100, clip_seconds=3.5)
    assert sample_level.windows_per_clip == 3
    tagger = Tagger(sample_level)
    means = []
    for seq, value in enumerate([0.0, 0.3, 0.6, 0.9, 0.9]):
        prediction = tagger.update(window(seq, hop=100), [value] * 3)
        means.append((round(float(prediction.scores[0]), 6), prediction.segments, prediction.start))
    assert means == [(0.0, 1, 0), (0.15, 2, 0), (0.3, 3, 0), (0.6, 3, 100), (0.8, 3, 200)]


def test_a_dropped_segment_leaves_a_hole_not_a_stale_average():
    tagger = Tagger(card(window_samples=100, hop_samples=100, clip_seconds=3.0))
    for seq in (0, 1, 2):
        tagger.update(window(seq, hop=100), [0.0] * 3)
    prediction = tagger.update(window(5, hop=100), [1.0] * 3)  # 3 and 4 were dropped
    assert (prediction.segments, float(prediction.scores[0])) == (1, 1.0)


def test_a_new_epoch_starts_the_average_afresh():
    tagger = Tagger(card(window_samples=100, hop_samples=100, clip_seconds=3.0))
    tagger.update(window(0, hop=100, epoch=1), [0.0] * 3)
    prediction = tagger.update(window(1, hop=100, epoch=2), [1.0] * 3)
    assert (prediction.segments, float(prediction.scores[0])) == (1, 1.0)


def test_streams_are_averaged_separately():
    tagger = Tagger(card(window_samples=100, hop_samples=100, clip_seconds=3.0))
    tagger.update(window(0, hop=100, stream="a"), [1.0] * 3)
    prediction = tagger.update(window(1, hop=100, stream="b"), [0.0] * 3)
    assert (prediction.segments, float(prediction.scores[0])) == (1, 0.0)


def test_tags_turn_on_after_k_predictions_and_off_under_threshold_minus_margin():
    tagger = Tagger(card(), on_after=2, off_margin=0.1)
    rock = [0.6, 0.7, 0.45, 0.55, 0.39, 0.6]  # threshold 0.5: off below 0.4
    history = []
    for seq, score in enumerate(rock):
        prediction = tagger.update(window(seq), [score, 0.0, 0.0])
        history.append([(e.tag, e.state) for e in prediction.events])
        assert ("rock" in prediction.active) == (seq in (1, 2, 3))
    assert history == [[], [("rock", ON)], [], [], [("rock", OFF)], []]


def test_a_flicker_under_threshold_resets_the_count_to_on():
    tagger = Tagger(card(), on_after=2)
    states = [
        tagger.update(window(seq), [s, 0, 0]).events for seq, s in enumerate([0.6, 0.4, 0.6, 0.6])
    ]
    assert [[e.state for e in events] for events in states] == [[], [], [], [ON]]
    assert states[3][0].score == pytest.approx(0.6) and states[3][0].threshold == 0.5


def test_scores_must_match_the_tags():
    with pytest.raises(ValueError, match="2 scores for 3 tags"):
        Tagger(card()).update(window(0), [0.1, 0.2])


@pytest.mark.parametrize("hop", [100, 7])  # a few segments per clip, and hundreds
def test_the_clip_mean_stays_numpys_mean_over_many_windows(hop):
    # With a short hop the mean is a running sum; it must not drift from the true mean.
    sample_level = card(window_samples=100, hop_samples=hop, clip_seconds=29.1)
    tagger = Tagger(sample_level)
    rng = np.random.default_rng(hop)
    # scores as a sigmoid gives them: from almost 0 to almost 1
    history = [rng.uniform(0, 1, 3).astype(np.float32) ** 8 for _ in range(2500)]
    for seq, scores in enumerate(history):
        prediction = tagger.update(window(seq, hop=hop), scores)
        kept = [s for i, s in enumerate(history[: seq + 1]) if i * hop >= seq * hop + 100 - 2910]
        assert prediction.segments == len(kept)
        expected = np.mean(kept, axis=0, dtype=np.float64).astype(np.float32)
        if prediction.segments <= 16:
            np.testing.assert_array_equal(prediction.scores, expected)
        np.testing.assert_allclose(prediction.scores, expected, rtol=1e-6, atol=1e-9)


def test_a_tag_the_card_excludes_is_off_while_the_excluding_tag_is_on():
    voiced = card(tags=["instrumental", "speech", "rock"], excludes={"instrumental": ["speech"]})
    tagger = Tagger(voiced, on_after=1, off_margin=0.1)
    steps = [  # instrumental, speech, rock
        [0.9, 0.1, 0.9],  # music alone: instrumental on
        [0.9, 0.8, 0.9],  # a voice starts: instrumental turns off, its score still 0.9
        [0.9, 0.8, 0.1],  # rock falls, so it goes off; instrumental stays off under speech
        [0.9, 0.1, 0.1],  # the voice stops: instrumental comes back at once
    ]
    seen = []
    for seq, scores in enumerate(steps):
        prediction = tagger.update(window(seq), scores)
        assert prediction.scores[0] == pytest.approx(0.9)  # scores are never gated
        seen.append(
            (prediction.over, prediction.active, [(e.tag, e.state) for e in prediction.events])
        )
    assert seen == [
        (["instrumental", "rock"], ["instrumental", "rock"], [("instrumental", ON), ("rock", ON)]),
        (["rock", "speech"], ["rock", "speech"], [("instrumental", OFF), ("speech", ON)]),
        (["speech"], ["speech"], [("rock", OFF)]),
        (["instrumental"], ["instrumental"], [("speech", OFF), ("instrumental", ON)]),
    ]
