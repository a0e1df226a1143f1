"""The default FCN recipe learns timbre from rendered music, and the papers' recipe is kept.

The data is real rendering (FluidSynth with a General MIDI soundfont, espeak-ng speech;
trainer/data/rendered.py), small enough for the suite: 29.1 s clips, a narrow FCN-5,
a few epochs. It fails when the default recipe cannot tell instrument families apart
(as dropout after every pool could not); bench/quality.py measures the 400-clip case.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.data.dataset import PreparedData
from trainer.data.mtt import load_mtt
from trainer.data.prepare import prepare
from trainer.evaluate import evaluate_model
from trainer.train import TrainConfig, train

rendered = pytest.importorskip("trainer.data.rendered")
INSTRUMENTS = ("piano", "bells", "organ", "guitar", "bass", "strings", "brass", "woodwind", "synth")
# The fcn recipe shows at least 512 examples an epoch: 84 training clips, 7 crops each, so
# one epoch here is about the 8 passes over the clips this test trained before that rule.
CLIPS, EPOCHS = 120, 1


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> PreparedData:
    try:
        rendered.check_tools()
    except rendered.DataError as exc:
        pytest.skip(str(exc))  # CI installs them: scripts/install.sh
    root = tmp_path_factory.mktemp("rendered")
    # rendered at FCN's 12 kHz: nothing to resample in prepare
    annotations = rendered.write_rendered(
        root / "mtt", CLIPS, seed=11, sample_rate=12_000, audio_format="wav", jobs=2
    )
    prepare(
        load_mtt(annotations, n_tags=None), root / "prepared", 12_000, workers=2, progress=False
    )
    return PreparedData(root / "prepared")


def instrument_auc(data: PreparedData, run_dir, **overrides) -> tuple[float, dict]:
    config = TrainConfig(
        data=str(data.root),
        out=str(run_dir),
        model="fcn5",
        hparams={"width": 0.125},
        epochs=EPOCHS,
        progress=False,
        tensorboard=False,
        **overrides,
    )
    result = train(config)
    evaluation = evaluate_model(model_from_checkpoint(load_checkpoint(result.best_path)), data)
    per_tag = {r.tag: r.roc_auc for r in evaluation.per_tag}
    return float(np.nanmean([per_tag[t] for t in INSTRUMENTS])), evaluation.summary


# Measured on the development VM with this seed: the default recipe 0.66 on the instrument
# tags and 0.75 macro; the papers' recipe (choi2016: dropout after every pool) 0.47 and
# 0.54. The bounds sit between, with room for run-to-run noise on 24 test clips.
@pytest.mark.slow
@pytest.mark.timeout(900)  # a hung-test guard only: about a minute on two idle cores
def test_default_fcn_recipe_learns_instrument_families(music, tmp_path):
    instruments, summary = instrument_auc(music, tmp_path / "default")
    assert instruments >= 0.6, f"instrument tags at {instruments:.3f} ROC-AUC (0.5 is chance)"
    assert summary["roc_auc_macro"] >= 0.65
