"""TensorRT backend (TensorRT 10 and 11), a serialized ``.plan`` plus its ``.plan.json`` card.

Written against the tensor-name API that TensorRT 10 introduced and 11 kept:
``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` on a stream of our
own (never the default stream). Device memory comes from cuda-python's runtime bindings.
Buffers are allocated once for the profile's max batch and reused; each call copies the
batch in, runs, and copies the scores out.

A plan is code-like: it may embed plugins. Load only plans you built or trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tagd.card import ModelCard, read_card
from tagd.engines.base import Engine, EngineError

log = logging.getLogger(__name__)


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


class TensorRTEngine(Engine):
    backend = "tensorrt"
    on_accelerator = True

    def __init__(self, path: Path, card: ModelCard, trt, cudart, engine):
        super().__init__(path, card)
        self._trt = trt
        self._cudart = cudart
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{path}: could not create an execution context (GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(
                f"{path}: expected one input and one output, found {inputs} → {outputs}"
            )
        self._input, self._output = inputs[0], outputs[0]
        for name in (self._input, self._output):
            dtype = engine.get_tensor_dtype(name)
            if dtype != trt.DataType.FLOAT:
                raise EngineError(
                    f"{path}: tensor {name!r} is {dtype}, tagd expects float32 I/O "
                    f"(build fp16 plans with fp32 inputs and outputs)"
                )
        card.check_io(
            list(engine.get_tensor_shape(self._input)),
            list(engine.get_tensor_shape(self._output)),
            source=str(path),
        )
        _min, _opt, max_shape = engine.get_tensor_profile_shape(self._input, 0)
        self.max_batch = int(max_shape[0])
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._in_bytes = self.max_batch * card.window_samples * 4
        self._out_bytes = self.max_batch * card.n_tags * 4
        self._d_in = _cuda_check(cudart.cudaMalloc(self._in_bytes), "cudaMalloc")
        self._d_out = _cuda_check(cudart.cudaMalloc(self._out_bytes), "cudaMalloc")
        self._context.set_tensor_address(self._input, int(self._d_in))
        self._context.set_tensor_address(self._output, int(self._d_out))

    @classmethod
    def load(cls, path: Path) -> TensorRTEngine:
        trt, cudart = _import_sdk()
        card = read_card(path)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineError(
                f"{path}: TensorRT could not deserialize it (built by another TensorRT "
                f"version or for another GPU? rebuild it with `tagd-train compile`)"
            )
        instance = cls(path, card, trt, cudart, engine)
        # The engine is the runtime's: keep the runtime and its logger alive as long
        # (and release them after it, in close).
        instance._runtime, instance._logger = runtime, logger
        log.info(
            "loaded %s (max batch %d, TensorRT %s)",
            instance.describe(),
            instance.max_batch,
            trt.__version__,
        )
        return instance

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = self._check_batch(batch)
        cudart = self._cudart
        size = batch.shape[0]
        scores = np.empty((size, self.card.n_tags), dtype=np.float32)
        if not self._context.set_input_shape(self._input, (size, self.card.window_samples)):
            raise EngineError(f"batch of {size} is outside the plan's optimization profile")
        _cuda_check(
            cudart.cudaMemcpyAsync(
                self._d_in, batch.ctypes.data, batch.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream,
            ),
            "copy to device",
        )  # fmt: skip
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT execute_async_v3 failed")
        _cuda_check(
            cudart.cudaMemcpyAsync(
                scores.ctypes.data, self._d_out, scores.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream,
            ),
            "copy to host",
        )  # fmt: skip
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return scores

    def close(self) -> None:
        # Context, then engine, then runtime; device memory once nothing refers to it.
        self._context = None
        self._engine = None
        cudart = self._cudart
        for pointer in (self._d_in, self._d_out):
            cudart.cudaFree(pointer)
        cudart.cudaStreamDestroy(self._stream)
        self._runtime = self._logger = None
