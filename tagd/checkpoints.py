"""The checkpoint format, checked the same way by the trainer and by the torch engine.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads without
unpickling code; trainer/checkpoint.py describes its keys and writes it. This module
holds only what both sides check, so that tagd needs neither torch nor the trainer for it.
"""

from __future__ import annotations

from typing import Any

CHECKPOINT_FORMAT = "tagd-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("arch", "hparams", "n_tags", "tags", "state_dict", "card")


def checkpoint_problem(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` (what torch.load returned) is not a usable tagd checkpoint, or None."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        return "not a tagd checkpoint (written by `tagd-train train`?)"
    if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
        return f"checkpoint version {checkpoint['version']} is newer than this tagd"
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        return f"checkpoint lacks {', '.join(missing)}"
    return None
