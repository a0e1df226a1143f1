"""Shared fixtures: tiny exported models, music-like audio, a stand-in for the publisher.

``export_model("fcn4")`` gives the path of a small, randomly initialised (fixed seed)
ONNX model with its card, exported once per test session and cached by arguments.
FCN models default to ``width=0.125`` and SampleCNN models to ``width=0.25`` so that a
window costs milliseconds; pass hyper-parameters to override. ``short_fcn4`` is the one
most daemon tests serve: that FCN-4 with a 2 s window (``support.SHORT_FCN``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from audio_fixtures import make_music

TINY_WIDTH = {"fcn": 0.125, "samplecnn": 0.25}
EXPORT_SEED = 0


@pytest.fixture(scope="session")
def export_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``export_model(arch, n_tags=8, tags=None, **hparams) -> Path`` of an ONNX file."""
    torch = pytest.importorskip("torch")
    from trainer.export import export_onnx
    from trainer.models import create_model

    folder = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def export(arch: str, n_tags: int = 8, tags: list[str] | None = None, **hparams) -> Path:
        family = "fcn" if arch.startswith("fcn") else "samplecnn"
        hparams = {"width": TINY_WIDTH[family], **hparams}
        key = json.dumps([arch, n_tags, tags, hparams], sort_keys=True)
        if key not in cache:
            torch.manual_seed(EXPORT_SEED)
            model = create_model(arch, n_tags, **hparams)
            path = folder / f"{arch}-{len(cache)}.onnx"
            export_onnx(model, path, tags=tags)
            cache[key] = path
        return cache[key]

    return export


@pytest.fixture(scope="session")
def short_fcn4(export_model) -> Path:
    """The tiny FCN-4 with a 2 s window (``support.SHORT_FCN``, 12 kHz, 8 tags), so that a
    few seconds of audio give tags."""
    from support import SHORT_FCN

    return export_model("fcn4", **SHORT_FCN)


@pytest.fixture(scope="session")
def music() -> Callable[..., np.ndarray]:
    """Factory: ``music(seconds, sample_rate, seed=0) -> float32 [n]`` music-like audio."""
    return make_music


@pytest.fixture
def tagd():
    """A stand-in for tagd serve's publisher: ``tests/support.py``'s ``FakeTagd``."""
    from support import FakeTagd

    fake = FakeTagd()
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def start_triton(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``start_triton(repository, models=None) -> LocalTriton``, a real
    ``tritonserver`` (the nvidia-pytriton wheel's, trainer/triton_local.py) on loopback
    with free ports, ready; killed when the test module ends."""
    pytest.importorskip("tritonclient.grpc")
    from trainer.triton_local import LocalTriton

    folder = tmp_path_factory.mktemp("triton-logs")
    started = []

    def start(repository: Path, models: list[str] | None = None):
        log = folder / f"tritonserver-{len(started)}.log"
        server = LocalTriton(repository, models, log_path=log)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()
