"""Inference backends, chosen by model file suffix.

``load_engine("fcn4.onnx")`` → ONNX Runtime, ``.plan``/``.engine`` → TensorRT,
``.pt`` → PyTorch (debugging); a URL by its scheme: ``triton://HOST:PORT/MODEL`` →
Triton Inference Server. Each backend module imports its SDK lazily.
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
# URL scheme → (module, class): engines on servers, not files
URL_BACKENDS: dict[str, tuple[str, str]] = {
    "triton": ("tagd.engines.triton", "TritonEngine"),
}


def engine_url_scheme(engine: str | Path) -> str | None:
    """The scheme of an engine given as a URL (``triton://…``); None for a file."""
    scheme, sep, _ = str(engine).partition("://")
    return scheme if sep and scheme.isidentifier() else None


def backend_of(path: str | Path) -> type[Engine]:
    """The backend class for a model file or URL; EngineError when it is missing or of no
    known type."""
    scheme = engine_url_scheme(path)
    if scheme is not None:
        if scheme not in URL_BACKENDS:
            known = ", ".join(f"{s}://" for s in sorted(URL_BACKENDS))
            raise EngineError(f"{path}: unknown engine URL scheme {scheme!r}; known: {known}")
        module_name, class_name = URL_BACKENDS[scheme]
        return getattr(importlib.import_module(module_name), class_name)
    path = Path(path)
    if not path.exists():
        raise EngineError(f"model file not found: {path}")
    try:
        module_name, class_name = BACKENDS[path.suffix]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise EngineError(f"{path}: unknown model type {path.suffix!r}; known: {known}") from None
    return getattr(importlib.import_module(module_name), class_name)


def option_sections() -> dict[str, list[str]]:
    """Config sections of backend options → the model file suffixes whose backend reads them."""
    sections: dict[str, list[str]] = {}
    for suffix, (module_name, class_name) in BACKENDS.items():
        section = getattr(importlib.import_module(module_name), class_name).options_section
        if section is not None:
            sections.setdefault(section, []).append(suffix)
    return sections


def load_engine(path: str | Path, *, warmup: bool = True, **options) -> Engine:
    """Load a model file with the backend its suffix names (or the engine a URL names),
    check its card, warm it up."""
    where = path if engine_url_scheme(path) else Path(path)
    engine: Engine = backend_of(path).load(where, **options)
    if warmup:
        engine.warmup()
    return engine


def missing_sdk(package: str, extra: str) -> EngineError:
    return EngineError(f"{package} is not installed; install it with: pip install '{extra}'")


__all__ = [
    "BACKENDS",
    "URL_BACKENDS",
    "Engine",
    "EngineError",
    "backend_of",
    "engine_url_scheme",
    "load_engine",
    "missing_sdk",
    "option_sections",
]
