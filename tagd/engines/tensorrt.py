"""TensorRT backend (TensorRT 10 and 11), a serialized ``.plan`` plus its ``.plan.json`` card.

Written against the tensor-name API that TensorRT 10 introduced and 11 kept:
``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` on a stream of our
own (never the default stream). Device memory comes from cuda-python's runtime bindings.
Each plan's buffers, one per input and output tensor, are allocated once for the
profile's max batch and reused; each call copies the inputs in, runs, and copies the
outputs out (``_Plan``).

An FCN's incremental graphs are plans beside the main one (``tagd-train compile``
builds them; the card names them): ``TensorRTEngine.incremental`` loads the prime and
step plans of a hop, and the states go in and out as float32 arrays with the scores.

A plan is code-like: it may embed plugins. Load only plans you built or trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tagd.card import GRAPH_NAMES, HopGraphs, ModelCard, read_card
from tagd.engines.base import Engine, EngineError, IncrementalEngine

log = logging.getLogger(__name__)

FLOAT32_BYTES = 4


def _import_sdk():
    try:
        import tensorrt as trt
    except ImportError:
        from tagd.engines import missing_sdk

        raise missing_sdk("tensorrt", "tagd[tensorrt]") from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            from tagd.engines import missing_sdk

            raise missing_sdk("cuda-python", "tagd[tensorrt]") from None
    return trt, cudart


def _cuda_check(result, what: str):
    """cuda-python returns (error, *values); raise on anything but success."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise EngineError(f"CUDA {what} failed: {error}")
    return values[0] if len(values) == 1 else values


class _Plan:
    """A deserialized plan with its execution context, stream and device buffers.

    One buffer per input and output tensor, by name, for the profile's max batch. The
    engine belongs to the runtime that deserialized it: the plan holds the runtime and
    its logger as long as the engine (and releases them after it, in close).
    """

    def __init__(self, path: Path, trt, cudart, runtime, logger):
        self.path = path
        self._trt, self._cudart = trt, cudart
        self._runtime, self._logger = runtime, logger
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"{path}: TensorRT could not deserialize it (built by another TensorRT "
                f"version or for another GPU? rebuild it with `tagd-train compile`)"
            )
        self._context = self.engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{path}: could not create an execution context (GPU memory?)")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        for name in names:
            dtype = engine.get_tensor_dtype(name)
            if dtype != trt.DataType.FLOAT:
                raise EngineError(
                    f"{path}: tensor {name!r} is {dtype}, tagd expects float32 I/O "
                    f"(build fp16 plans with fp32 inputs and outputs)"
                )
        # every input at its max shape: then the context knows each output's
        for name in self.inputs:
            _min, _opt, max_shape = engine.get_tensor_profile_shape(name, 0)
            self._context.set_input_shape(name, tuple(max_shape))
        self.max_batch = int(engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        # the shape of one batch row of each tensor
        self.rows = {
            name: tuple(int(d) for d in self._context.get_tensor_shape(name))[1:] for name in names
        }
        if any(dim < 0 for row in self.rows.values() for dim in row):
            raise EngineError(
                f"{path}: tensor shapes {self.rows} depend on more than the batch; "
                f"tagd's graphs have fixed shapes: compile the model again"
            )
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers = {}
        for name in names:
            size = self.max_batch * int(np.prod(self.rows[name])) * FLOAT32_BYTES
            self._buffers[name] = _cuda_check(cudart.cudaMalloc(size), "cudaMalloc")
            self._context.set_tensor_address(name, int(self._buffers[name]))

    def sibling(self, path: Path) -> _Plan:
        """Another plan, deserialized by this one's runtime."""
        return _Plan(path, self._trt, self._cudart, self._runtime, self._logger)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs by name for float32 C-contiguous inputs by name, of one batch size."""
        cudart = self._cudart
        size = len(feeds[self.inputs[0]])
        if size > self.max_batch:
            raise EngineError(
                f"{self.path}: batch of {size} exceeds its max batch {self.max_batch}"
            )
        for name in self.inputs:
            array = feeds[name]
            if array.shape != (size, *self.rows[name]):
                raise EngineError(
                    f"{self.path}: {name} must be {[size, *self.rows[name]]}, "
                    f"got {list(array.shape)}"
                )
            if not self._context.set_input_shape(name, array.shape):
                raise EngineError(
                    f"{self.path}: {name} {list(array.shape)} is outside the "
                    f"plan's optimization profile"
                )
            _cuda_check(
                cudart.cudaMemcpyAsync(
                    self._buffers[name],
                    array.ctypes.data,
                    array.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self._stream,
                ),
                "copy to device",
            )
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError(f"{self.path}: TensorRT execute_async_v3 failed")
        results = {}
        for name in self.outputs:
            results[name] = np.empty((size, *self.rows[name]), dtype=np.float32)
            _cuda_check(
                cudart.cudaMemcpyAsync(
                    results[name].ctypes.data,
                    self._buffers[name],
                    results[name].nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self._stream,
                ),
                "copy to host",
            )
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return results

    def close(self) -> None:
        # Context, then engine, then runtime; device memory once nothing refers to it.
        if self.engine is None:
            return
        self._context = None
        self.engine = None
        for pointer in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._cudart.cudaStreamDestroy(self._stream)
        self._runtime = self._logger = None


class TensorRTEngine(Engine):
    backend = "tensorrt"
    on_accelerator = True
    has_incremental_graphs = True

    def __init__(self, path: Path, card: ModelCard, plan: _Plan):
        super().__init__(path, card)
        self._plan = plan
        self._incremental: list[TensorRTIncremental] = []
        if len(plan.inputs) != 1 or len(plan.outputs) != 1:
            raise EngineError(
                f"{path}: expected one input and one output, found {plan.inputs} → {plan.outputs}"
            )
        self._input, self._output = plan.inputs[0], plan.outputs[0]
        engine = plan.engine
        card.check_io(
            list(engine.get_tensor_shape(self._input)),
            list(engine.get_tensor_shape(self._output)),
            source=str(path),
        )
        self.max_batch = plan.max_batch

    @classmethod
    def load(cls, path: Path) -> TensorRTEngine:
        trt, cudart = _import_sdk()
        card = read_card(path)
        logger = trt.Logger(trt.Logger.WARNING)
        instance = cls(path, card, _Plan(Path(path), trt, cudart, trt.Runtime(logger), logger))
        log.info(
            "loaded %s (max batch %d, TensorRT %s)",
            instance.describe(),
            instance.max_batch,
            trt.__version__,
        )
        return instance

    def incremental(self, hop_samples: int) -> TensorRTIncremental | None:
        found = self._incremental_files(
            hop_samples, "plan", "compile the model again with `tagd-train compile`"
        )
        if found is None:
            return None
        graph, paths = found
        prime = self._plan.sibling(paths[0])
        try:
            step = self._plan.sibling(paths[1])
        except EngineError:
            prime.close()
            raise
        incremental = TensorRTIncremental(self.card, graph, prime, step)
        self._incremental.append(incremental)
        return incremental

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check_batch(batch)
        return self._plan.run({self._input: batch})[self._output]

    def close(self) -> None:
        # The incremental plans first: they share the main plan's runtime.
        for incremental in self._incremental:
            incremental.close()
        self._plan.close()


class TensorRTIncremental(IncrementalEngine):
    """Prime and step plans, built with the main plan and deserialized by its runtime."""

    def __init__(self, card: ModelCard, graph: HopGraphs, prime: _Plan, step: _Plan):
        super().__init__(card, graph)
        self._prime, self._step = prime, step
        self._state_inputs = GRAPH_NAMES.state_inputs(self.state_names)
        self._state_outputs = GRAPH_NAMES.state_outputs(self.state_names)
        rows = {GRAPH_NAMES.waveform: (card.window_samples,), GRAPH_NAMES.scores: (card.n_tags,)}
        rows.update(zip(self._state_inputs, self.state_shapes, strict=True))
        rows.update(zip(self._state_outputs, self.state_shapes, strict=True))
        if self.embeds:  # the card has an aggregator then (ModelCard.validate)
            rows[GRAPH_NAMES.embedding] = (card.aggregator.embedding_size,)
        for plan, inputs in ((prime, graph.prime_inputs), (step, graph.step_inputs)):
            expected = {name: rows[name] for name in inputs + graph.outputs}
            if plan.rows != expected:
                self.close()
                raise EngineError(
                    f"{plan.path}: tensors {plan.rows}, the card says {expected} "
                    f"(a row each); compile the model again"
                )

    def prime_and_embed(self, batch: np.ndarray):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self._split(self._prime.run({GRAPH_NAMES.waveform: batch}))

    def step_and_embed(self, batch: np.ndarray, states: list[np.ndarray]):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        feeds = {GRAPH_NAMES.waveform: batch}
        feeds.update(zip(self._state_inputs, self.check_states(states, len(batch)), strict=True))
        return self._split(self._step.run(feeds))

    def _split(self, outputs: dict[str, np.ndarray]):
        """(scores, states, embeddings or None) of the plan's outputs by name."""
        states = [outputs[name] for name in self._state_outputs]
        return outputs[GRAPH_NAMES.scores], states, outputs.get(GRAPH_NAMES.embedding)

    def close(self) -> None:
        self._prime.close()
        self._step.close()
