"""Shared helpers of the trainer tests: the tiny model, synthetic prepared data, one thread.

Import the fixture into a test module with ``from trainer_support import one_torch_thread``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data import synthetic
from trainer.data.dataset import PreparedData
from trainer.data.mtt import load_mtt
from trainer.data.prepare import prepare

# SampleCNN 3^9: 19,683-sample windows (0.89 s at 22,050 Hz), 16-channel blocks. A few
# hundred training examples a second on two CPU cores, yet it hears every synthetic tag.
TINY = {"width": 0.125, "n": 8}
TINY_RATE = 22_050
N_TAGS = len(synthetic.TAGS) - 1  # all but "rare"


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Torch on one thread: on a shared two-core machine, two threads that spin-wait for
    each other are several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_prepared(
    root: Path, n_clips: int, seed: int = 1, seconds: float = 4.0
) -> PreparedData:
    """Synthetic clips in MagnaTagATune layout, prepared at the tiny model's rate."""
    annotations = synthetic.write_mtt(root / "mtt", n_clips, seed=seed, seconds=seconds)
    prepare(
        load_mtt(annotations, n_tags=N_TAGS),
        root / "prepared",
        TINY_RATE,
        workers=1,
        progress=False,
    )
    return PreparedData(root / "prepared")
