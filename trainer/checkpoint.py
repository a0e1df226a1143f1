"""Checkpoints: one ``.pt`` file that rebuilds a model and says what it is.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so that
``torch.load(path, weights_only=True)`` reads it without unpickling code (the daemon's
torch engine loads ``.pt`` files that way)::

    format, version        "tagd-checkpoint", 1
    arch, hparams, n_tags  create_model(arch, n_tags, **hparams) rebuilds the network
    tags                   output order
    state_dict             the weights
    card                   ModelCard.to_dict(): audio contract, thresholds, scores, training
    config, history, epoch, ...   training state; ``last.pt`` adds optimizer and RNG state
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tagd.card import CardError, ModelCard
from tagd.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, checkpoint_problem
from trainer.models import TaggerModel, create_model

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a tagd checkpoint."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)
    os.replace(tmp, path)


def read_tensors_file(path: str | Path, what: str = "checkpoint") -> Any:
    """A ``.pt`` file of tensors and plain values, never code (``weights_only``);
    CheckpointError naming ``what`` when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        # weights_only refuses pickled code; a truncated file fails here too
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable {what} ({first_line})") from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    checkpoint = read_tensors_file(path)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> TaggerModel:
    try:
        model = create_model(checkpoint["arch"], checkpoint["n_tags"], **checkpoint["hparams"])
        model.load_state_dict(checkpoint["state_dict"])
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not rebuild its model: {exc}") from exc
    return model


def card_from_checkpoint(checkpoint: dict[str, Any]) -> ModelCard:
    try:
        return ModelCard.from_dict(checkpoint["card"])
    except CardError as exc:
        raise CheckpointError(f"checkpoint carries a bad model card: {exc}") from exc
