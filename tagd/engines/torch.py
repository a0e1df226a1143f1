"""PyTorch backend, for debugging a checkpoint before export. Needs the train extra.

A checkpoint is a dict loadable with ``torch.load(weights_only=True)`` (no pickle of
arbitrary objects), checked by ``tagd.checkpoints`` as the trainer checks it; the model
is rebuilt from the trainer's registry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tagd.card import CardError, ModelCard
from tagd.checkpoints import checkpoint_problem
from tagd.engines.base import Engine, EngineError

log = logging.getLogger(__name__)


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path: Path, card: ModelCard, model, torch_module):
        super().__init__(path, card)
        self._model = model
        self._torch = torch_module

    @property
    def on_accelerator(self) -> bool:
        return next(self._model.parameters()).device.type != "cpu"

    @classmethod
    def load(cls, path: Path, *, device: str = "cpu") -> TorchEngine:
        try:
            from trainer.models import create_model
        except ImportError:
            from tagd.engines import missing_sdk

            raise missing_sdk("torch and the trainer", "tagd[train]") from None
        torch, checkpoint = _read_checkpoint(path, device)
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise EngineError(f"{path}: {problem}")
        card = ModelCard.from_dict(checkpoint["card"])
        model = create_model(checkpoint["arch"], checkpoint["n_tags"], **checkpoint["hparams"])
        model.load_state_dict(checkpoint["state_dict"])
        model.eval().to(device)
        card.check_io([None, model.window_samples], [None, model.n_tags], source=str(path))
        return cls(path, card, model, torch)

    @classmethod
    def read_card(cls, path: Path) -> ModelCard:
        """The card the checkpoint carries (it has no file beside it)."""
        try:
            _, checkpoint = _read_checkpoint(path, "cpu")
        except EngineError as exc:
            raise CardError(str(exc)) from None
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise CardError(f"{path}: {problem}")
        return ModelCard.from_dict(checkpoint["card"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check_batch(batch)
        device = next(self._model.parameters()).device
        with self._torch.inference_mode():
            scores = self._model(self._torch.from_numpy(batch).to(device))
        return scores.float().cpu().numpy()


def _read_checkpoint(path: Path, device: str):
    """torch and the checkpoint's dict, read without unpickling objects."""
    try:
        import torch
    except ImportError:
        from tagd.engines import missing_sdk

        raise missing_sdk("torch and the trainer", "tagd[train]") from None
    try:
        return torch, torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many kinds on a bad file
        raise EngineError(f"{path}: not a tagd checkpoint: {exc}") from exc
