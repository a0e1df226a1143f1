"""Inference backends, chosen by model file suffix.

``load_engine("fcn4.onnx")`` → ONNX Runtime, ``.plan``/``.engine`` → TensorRT,
``.pt`` → PyTorch (debugging). Each backend module imports its SDK lazily.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tagd.engines.base import Engine, EngineError

# suffix → (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    ".onnx": ("tagd.engines.onnx", "OnnxEngine"),
    ".plan": ("tagd.engines.tensorrt", "TensorRTEngine"),
    ".engine": ("tagd.engines.tensorrt", "TensorRTEngine"),
    ".pt": ("tagd.engines.torch", "TorchEngine"),
}


def load_engine(path: str | Path, *, warmup: bool = True, **options) -> Engine:
    """Load a model file with the backend its suffix names, check its card, warm it up."""
    path = Path(path)
    if not path.exists():
        raise EngineError(f"model file not found: {path}")
    try:
        module_name, class_name = BACKENDS[path.suffix]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise EngineError(f"{path}: unknown model type {path.suffix!r}; known: {known}") from None
    module = importlib.import_module(module_name)
    engine: Engine = getattr(module, class_name).load(path, **options)
    if warmup:
        engine.warmup()
    return engine


def missing_sdk(package: str, extra: str) -> EngineError:
    return EngineError(f"{package} is not installed; install it with: pip install '{extra}'")


__all__ = ["BACKENDS", "Engine", "EngineError", "load_engine", "missing_sdk"]
