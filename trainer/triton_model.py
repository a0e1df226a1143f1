"""The incremental model of a Triton repository: a ``python`` backend model behind the
sequence batcher, keeping each stream's state itself (docs/triton.md).

`tagd-train triton-repo` copies this file into ``<model>_seq/1/model.py`` beside the
prime and step graphs; Triton's python backend runs it. It needs numpy, onnxruntime and
Triton's ``triton_python_backend_utils`` only: not tagd, which a Triton image lacks.

One request is one window of one sequence (a stream; the CORRID control):

- **START**: ``audio`` is the whole window. The prime graph scores it; the model keeps
  the graph's state and the window's last ``window - hop`` samples.
- **Otherwise**: ``audio`` is the hop's new samples, the ``hop`` samples after the last
  window's end. The model rebuilds the window from the kept tail, the step graph scores
  it from the kept state, and both move on. This is what keeps the wire small: FCN-4
  sends 160 kB a hop instead of a 1.4 MB window.
- **END** frees the sequence's state (its ``audio`` may be empty: nothing is scored).

A request that does not fit (no state for its sequence, ``audio`` of the wrong length)
gets an error naming what to send; the client starts the sequence again. The model
frees a sequence idle for ``idle_seconds`` (the sequence batcher's idle timeout, which
frees Triton's slot without telling the model), so a front end that vanished without
END costs memory for that long only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The python backend's stub starts its interpreter ignoring the environment (as `python
# -E`): PYTHONPATH's folders, where a server started from a virtual environment finds
# numpy and onnxruntime, are added here. A server whose Python has them needs none.
sys.path.extend(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

# Execution providers tried in this order where the onnxruntime build has them.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass
class _Sequence:
    tail: np.ndarray  # the last window's samples after its first hop: [window - hop]
    states: list[np.ndarray]  # the step graph's state inputs, without the batch axis
    used: float  # monotonic time of its last request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.window = int(params["window_samples"])
        self.hop = int(params["hop_samples"])
        self.n_tags = int(params["n_tags"])
        self.idle_seconds = float(params["idle_seconds"])
        self.state_inputs = json.loads(params["state_inputs"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = int(params.get("threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
        self.prime = ort.InferenceSession(
            str(folder / params["prime"]), sess_options=options, providers=providers
        )
        self.step = ort.InferenceSession(
            str(folder / params["step"]), sess_options=options, providers=providers
        )
        self.waveform = self.prime.get_inputs()[0].name
        # the scores and the state; graphs exported with an aggregator give the window
        # embedding last, which no one asks of Triton
        self.outputs = [o.name for o in self.step.get_outputs()][: 1 + len(self.state_inputs)]
        self.sequences: dict[int, _Sequence] = {}

    def execute(self, requests: list) -> list:
        now = time.monotonic()
        self._expire(now)
        responses: list = [None] * len(requests)
        primes: list[tuple[int, int, np.ndarray]] = []  # (request, sequence, window)
        steps: list[tuple[int, int, np.ndarray]] = []  # (request, sequence, new samples)
        for index, request in enumerate(requests):
            sequence = int(_input(request, "CORRID").reshape(-1)[0])
            start = bool(_input(request, "START").reshape(-1)[0])
            end = bool(_input(request, "END").reshape(-1)[0])
            audio = _input(request, "audio").reshape(-1).astype(np.float32, copy=False)
            if end and audio.size == 0:
                self.sequences.pop(sequence, None)
                responses[index] = _scores(np.zeros(self.n_tags, np.float32))
                continue
            problem = self._problem(sequence, start, audio.size)
            if problem:
                self.sequences.pop(sequence, None)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(problem)
                )
                continue
            (primes if start else steps).append((index, sequence, audio))
            if end:  # scored, then freed: the stream ends with this window
                self.sequences.pop(sequence, None)
        if primes:
            windows = np.stack([audio for _, _, audio in primes])
            scores, *states = self.prime.run(self.outputs, {self.waveform: windows})
            self._keep(primes, windows, scores, states, responses, requests, now)
        if steps:
            kept = [self.sequences[sequence] for _, sequence, _ in steps]
            windows = np.stack(
                [
                    np.concatenate([seq.tail, new])
                    for seq, (_, _, new) in zip(kept, steps, strict=True)
                ]
            )
            feeds = {self.waveform: windows}
            for i, name in enumerate(self.state_inputs):
                feeds[name] = np.stack([seq.states[i] for seq in kept])
            scores, *states = self.step.run(self.outputs, feeds)
            self._keep(steps, windows, scores, states, responses, requests, now)
        return responses

    def _problem(self, sequence: int, start: bool, samples: int) -> str:
        """What is wrong with a request, or ""."""
        if start:
            if samples != self.window:
                return f"START needs a whole window of {self.window} samples, got {samples}"
            return ""
        if sequence not in self.sequences:
            return f"sequence {sequence} has no state here: send its window again with START"
        if samples != self.hop:
            return (
                f"a continuing request carries the hop's {self.hop} new samples, got "
                f"{samples}: send the whole window with START to start again"
            )
        return ""

    def _keep(self, rows, windows, scores, states, responses, requests, now: float) -> None:
        for row, (index, sequence, _) in enumerate(rows):
            responses[index] = _scores(scores[row])
            if bool(_input(requests[index], "END").reshape(-1)[0]):
                continue
            self.sequences[sequence] = _Sequence(
                tail=windows[row, self.hop :].copy(),
                states=[state[row].copy() for state in states],
                used=now,
            )

    def _expire(self, now: float) -> None:
        idle = [s for s, kept in self.sequences.items() if now - kept.used > self.idle_seconds]
        for sequence in idle:
            del self.sequences[sequence]

    def finalize(self) -> None:
        self.sequences.clear()


def _input(request, name: str) -> np.ndarray:
    # DLPack again (see _scores): as_numpy() is numpy 1's too
    return np.from_dlpack(pb_utils.get_input_tensor_by_name(request, name))


def _scores(scores: np.ndarray):
    # Through DLPack, not pb_utils.Tensor(name, array): stubs built against numpy 1 read
    # a numpy 2 array's item size wrongly and send an empty tensor (seen with 2.51's).
    row = np.array(scores[None, :], dtype=np.float32)
    tensor = pb_utils.Tensor.from_dlpack("scores", row)
    return pb_utils.InferenceResponse(output_tensors=[tensor])
