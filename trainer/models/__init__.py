"""The model zoo: FCN-3..7 on an in-graph log-mel front end, and sample-level CNNs.

Every model takes float32 waveforms ``[batch, window_samples]`` and returns sigmoid
scores ``[batch, n_tags]``; see docs/models.md.
"""

from trainer.models.base import TaggerModel
from trainer.models.registry import create_model, list_models

__all__ = ["TaggerModel", "create_model", "list_models"]
