"""A model trained with real recordings tags real speech from a package it never heard.

The training set is rendered as `tagd-train synthetic --kind rendered` renders it (several
soundfonts, a production/transmission chain per clip, real voices and real music from
Debian packages beside espeak-ng), small enough for the suite: one small speech package and
one small music package, a narrow FCN-5, one epoch. Then the model tags real recordings of
two other packages, a voice and a score it has never heard, at its card's thresholds.
It fails when `speech` does not fire on real speech, or fires on music, as it did when
every model had heard only espeak-ng. bench/quality.py measures the 400-clip case.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.data.dataset import DataError, PreparedData
from trainer.data.manifest import load_manifest
from trainer.data.prepare import prepare
from trainer.evaluate import predict_clips
from trainer.train import TrainConfig, train

rendered = pytest.importorskip("trainer.data.rendered")
recordings = pytest.importorskip("trainer.data.recordings")
RATE = 12_000  # FCN's: nothing to resample in prepare
CLIPS, EPOCHS = 120, 1


@pytest.fixture(scope="module")
def sources():
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("real recordings come from Debian packages: apt-get and dpkg-deb")
    try:
        fonts = ",".join(f for f in ("fluidr3", "timgm6mb") if f in rendered.installed_soundfonts())
        return rendered.make_sources(
            fonts or "fluidr3", f"{recordings.SMALL_TRAIN_SPEECH},{recordings.SMALL_TRAIN_MUSIC}"
        )
    except DataError as exc:
        pytest.skip(str(exc))  # CI installs the tools: scripts/install.sh


def _prepared(manifest, out, split=None) -> PreparedData:
    labelled = load_manifest(manifest)
    if split:
        labelled.clips = [dataclasses.replace(clip, split=split) for clip in labelled.clips]
    prepare(labelled, out, RATE, workers=2, progress=False)
    return PreparedData(out)


def test_held_out_packages_are_neither_trained_on_nor_in_the_small_train_set():
    roles = {name: p.role for name, p in recordings.PACKAGES.items()}
    assert roles[recordings.SMALL_TRAIN_SPEECH] == roles[recordings.SMALL_TRAIN_MUSIC] == "train"
    assert (
        roles[recordings.SMALL_HELDOUT_SPEECH] == roles[recordings.SMALL_HELDOUT_MUSIC] == "heldout"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hung-test guard only: about two minutes on two idle cores
def test_speech_fires_on_real_speech_from_a_package_never_trained_on(sources, tmp_path):
    manifest = rendered.write_rendered(
        tmp_path / "train",
        CLIPS,
        seed=5,
        sample_rate=RATE,
        layout="manifest",
        audio_format="wav",
        sources=sources,
    )
    data = _prepared(manifest, tmp_path / "train-prepared")
    assert data.partial  # the real music's instruments are unknown, not absent
    result = train(
        TrainConfig(
            data=str(data.root),
            out=str(tmp_path / "run"),
            model="fcn5",
            hparams={"width": 0.125},
            epochs=EPOCHS,
            progress=False,
            tensorboard=False,
        )
    )

    packages = [recordings.SMALL_HELDOUT_SPEECH, recordings.SMALL_HELDOUT_MUSIC]
    held_out = recordings.write_recordings_set(
        tmp_path / "heldout", packages, sample_rate=RATE, max_clips_per_package=12
    )
    real = _prepared(held_out, tmp_path / "heldout-prepared", split="test")
    stored = load_checkpoint(result.best_path)
    tags, thresholds = stored["tags"], stored["card"]["thresholds"]
    clips = real.indices("test")
    scores = predict_clips(model_from_checkpoint(stored), real, clips)[:, tags.index("speech")]
    is_speech = real.label_matrix(clips, ["speech"])[:, 0] == 1
    assert is_speech.sum() >= 10 and (~is_speech).sum() >= 10
    speech_on = scores >= thresholds[tags.index("speech")]
    report = (
        f"speech ROC-AUC {roc_auc_score(is_speech, scores):.3f}; speech on for "
        f"{speech_on[is_speech].mean():.0%} of {is_speech.sum()} speech clips and "
        f"{speech_on[~is_speech].mean():.0%} of {(~is_speech).sum()} music clips"
    )
    print(report)
    assert roc_auc_score(is_speech, scores) >= 0.9, report
    assert speech_on[is_speech].mean() >= 0.75, report
    assert speech_on[~is_speech].mean() <= 0.25, report
    assert np.isfinite(scores).all()
