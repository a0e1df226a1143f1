"""Turn windows: two training clips joined at a random point, labelled by their shares.

A turn's audio is the first clip up to the join and the second after it; each tag's
target is the share-weighted mix of the two clips' labels, unknown where either clip
leaves the tag unknown; the windows of an epoch are the same in every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from trainer.data.dataset import PreparedData, crop
from trainer.data.manifest import load_manifest, write_manifest
from trainer.data.prepare import prepare
from trainer.train import TURN_CROSSFADE_SECONDS, CropDataset, masked_bce

RATE = 8_000
CLIP_SAMPLES = 2 * RATE
WINDOW = RATE // 2  # shorter than a clip, so that pieces start at random places
TALK, TUNE = 0.25, -0.5  # constant clips: a window's mean tells how much of each it holds


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> PreparedData:
    """talk: speech, piano unknown; tune: music and piano; hum: noise, music only."""
    root = tmp_path_factory.mktemp("turns")
    noise = np.random.default_rng(3).uniform(-0.5, 0.5, CLIP_SAMPLES)
    audio = {
        "talk": np.full(CLIP_SAMPLES, TALK),
        "tune": np.full(CLIP_SAMPLES, TUNE),
        "hum": noise,
    }
    for name, samples in audio.items():
        soundfile.write(root / f"{name}.wav", samples, RATE, subtype="PCM_16")
    write_manifest(
        root / "manifest.csv",
        [
            ("talk.wav", ["speech"], "train"),
            ("tune.wav", ["music", "piano"], "train"),
            ("hum.wav", ["music"], "train"),
        ],
        known=[["speech", "music"], None, None],
    )
    prepare(load_manifest(root / "manifest.csv"), root / "prepared", RATE, progress=False)
    return PreparedData(root / "prepared")


def named(data: PreparedData) -> dict[str, int]:
    return {Path(clip.clip_id).stem: i for i, clip in enumerate(data.clips)}


def target_of(data: PreparedData, target: torch.Tensor) -> dict[str, float]:
    return dict(zip(data.tags, target.tolist(), strict=True))


def dataset(data: PreparedData, turns: float, seed: int = 5, crops: int = 40) -> CropDataset:
    return CropDataset(data, data.indices("train"), WINDOW, crops, seed, turns=turns)


def test_a_turn_holds_each_clip_by_its_share_and_is_labelled_so(clips):
    ids = named(clips)
    talk, tune = ids["talk"], ids["tune"]
    level = {talk: TALK, tune: TUNE}
    examples = dataset(clips, turns=1.0)
    examples.set_epoch(2)
    checked = 0
    for item in range(len(examples)):
        first = examples.indices[item % len(examples.indices)]
        second = examples.indices[examples.partner[item]]
        if {first, second} != {talk, tune}:
            continue
        window, target = examples[item]
        share = examples.join[item] / WINDOW
        # the first clip's share of the audio is the join's, crossfade and all
        heard = (window.double().mean().item() - level[second]) / (level[first] - level[second])
        assert heard == pytest.approx(share, abs=1e-6)
        assert window[0].item() == level[first] and window[-1].item() == level[second]
        speech_share = share if first == talk else 1 - share
        expected = {"speech": speech_share, "music": 1 - speech_share, "piano": float("nan")}
        assert target_of(clips, target) == pytest.approx(expected, nan_ok=True)
        checked += 1
    assert checked >= 10
    half_fade = round(TURN_CROSSFADE_SECONDS * RATE / 2)
    assert examples.join.min() >= half_fade and examples.join.max() <= WINDOW - half_fade


def test_a_turn_is_the_two_clips_own_audio_either_side_of_the_fade(clips):
    ids = named(clips)
    examples = dataset(clips, turns=1.0)
    examples.set_epoch(1)
    half_fade = examples.half_fade
    checked = 0
    for item in range(len(examples)):
        first = examples.indices[item % len(examples.indices)]
        second = examples.indices[examples.partner[item]]
        if ids["hum"] not in (first, second):
            continue
        window, target = examples[item]
        join = int(examples.join[item])
        head = crop(clips.audio(first), int(examples.first_starts[item]), join - half_fade)
        tail_start = int(examples.second_starts[item]) + 2 * half_fade
        tail = crop(clips.audio(second), tail_start, WINDOW - join - half_fade)
        assert np.array_equal(window[: join - half_fade].numpy(), head)
        assert np.array_equal(window[join + half_fade :].numpy(), tail)
        share = join / WINDOW
        if (first, second) == (ids["hum"], ids["tune"]):
            expected = {"speech": 0.0, "music": 1.0, "piano": 1 - share}
            assert target_of(clips, target) == pytest.approx(expected)
        checked += 1
    assert checked >= 10


def test_turns_are_the_same_in_every_run_of_an_epoch_and_leave_plain_windows_alone(clips):
    examples, again, plain = dataset(clips, 0.5), dataset(clips, 0.5), dataset(clips, 0.0)
    for epoch in (3, 4):
        for each in (examples, again, plain):
            each.set_epoch(epoch)
        turned = examples.partner >= 0
        assert 0 < turned.sum() < len(examples) and not (plain.partner >= 0).any()
        for item in range(len(examples)):
            window, target = examples[item]
            window_again, target_again = again[item]
            assert torch.equal(window, window_again)
            assert torch.equal(target.isnan(), target_again.isnan())
            assert torch.equal(target.nan_to_num(), target_again.nan_to_num())
            if not turned[item]:
                assert torch.equal(window, plain[item][0])
    examples.set_epoch(3)
    joins = examples.join.copy()
    examples.set_epoch(4)
    assert not np.array_equal(joins, examples.join)


def test_turns_must_be_a_probability(clips):
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="turns is a probability"):
            dataset(clips, bad)


def test_masked_bce_takes_shares_as_targets():
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.4, 0.8, 0.1]])
    targets = torch.tensor([[0.25, 1.0, float("nan")], [0.0, 0.6, 0.9]])
    p = torch.sigmoid(logits)
    each = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    expected = each[~targets.isnan()].mean()
    assert masked_bce(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # a share's loss is least where the score is the share
    share = torch.tensor([[0.3]])
    losses = [masked_bce(torch.logit(torch.tensor([[q]])), share).item() for q in (0.2, 0.3, 0.4)]
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_a_window_shorter_than_the_fade_still_turns(clips):
    """SampleCNN's windows can be a few hundred samples: the fade shrinks to fit."""
    window = 81  # a tiny SampleCNN's (3^4); the fade alone is 100 samples here
    examples = CropDataset(clips, list(range(3)), window, 8, seed=0, turns=1.0)
    assert examples.half_fade == window // 4
    for item in range(len(examples)):
        audio, target = examples[item]
        assert audio.shape == (window,) and target.shape == (len(clips.tags),)
        assert torch.isfinite(audio).all()
