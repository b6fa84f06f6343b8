"""RecordingTensorRT: a recording stand-in for the `tensorrt` module (and cuda-python's runtime), for the tests
that check what toonark's TensorRT builder sends on machines without TensorRT.

It implements only the calls engines/tensorrt.py makes, appends each to `calls` in order, and answers the way
TensorRT 10's API documents (NvInfer.h): create_timing_cache returns None for bytes it cannot read,
set_timing_cache returns False for a cache made on a GPU with other device properties (unless
ignore_mismatch), ITimingCache.combine returns False for such a cache, build_serialized_network returns None on
failure. The network is read from the real ONNX (input names, dynamic axes as -1, dtypes). It says nothing
about TensorRT's own behaviour: tests marked `tensorrt` build real plans where TensorRT is installed.

    trt = RecordingTensorRT(version="10.5.0")
    trt.install(monkeypatch)          # sys.modules["tensorrt"] and cuda.bindings.runtime
    build_trt_engine(onnx, plan_path, plan, device_id=1)
    trt.calls                          # [("cudaGetDevice",), ("cudaSetDevice", 1), ("Builder", 1), ...]
"""
from __future__ import annotations

import enum
import types

import numpy as np

CACHE_MAGIC = b"RECORDED-TIMING-CACHE|"


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    REFIT = 5


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class Logger:
    WARNING = "WARNING"

    def __init__(self, severity=None):
        self.severity = severity


class _Tensor:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _Network:
    def __init__(self, trt, flags):
        self.trt, self.flags = trt, flags
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class _Parser:
    def __init__(self, trt, network):
        self.trt, self.network = trt, network
        self.num_errors = 0

    def parse_from_file(self, path):
        import onnx
        from onnx import helper
        self.trt.calls.append(("parse_from_file", str(path)))
        model = onnx.load(str(path), load_external_data=False)

        def tensors(values):
            for value in values:
                dims = value.type.tensor_type.shape.dim
                shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
                yield _Tensor(value.name, shape, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        initializers = {i.name for i in model.graph.initializer}
        self.network.inputs = list(tensors(v for v in model.graph.input if v.name not in initializers))
        self.network.outputs = list(tensors(model.graph.output))
        return True

    def get_error(self, i):
        raise IndexError(i)


class _TimingCache:
    def __init__(self, trt, gpu: str, entries=()):
        self.trt, self.gpu, self.entries = trt, gpu, set(entries)

    def combine(self, other, ignore_mismatch):
        self.trt.calls.append(("combine", other.gpu, ignore_mismatch))
        if other.gpu != self.gpu and not ignore_mismatch:
            return False
        self.entries |= other.entries
        return True

    def serialize(self):
        self.trt.calls.append(("serialize",))
        if self.trt.fail_serialize:
            raise RuntimeError("recorded serialize failure")
        return CACHE_MAGIC + self.gpu.encode() + b"|" + ",".join(sorted(self.entries)).encode()


def cache_bytes(gpu: str, *entries: str) -> bytes:
    """A timing cache file as RecordingTensorRT writes it."""
    return CACHE_MAGIC + gpu.encode() + b"|" + ",".join(sorted(entries)).encode()


class _Config:
    def __init__(self, trt):
        self.trt = trt
        self.cache = None
        self.profiles = []

    def set_memory_pool_limit(self, pool, size):
        self.trt.calls.append(("set_memory_pool_limit", pool.name, size))

    @property
    def builder_optimization_level(self):
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level):
        self.trt.calls.append(("builder_optimization_level", level))
        self._level = level

    def set_flag(self, flag):
        self.trt.calls.append(("set_flag", flag.name))

    def add_optimization_profile(self, profile):
        self.trt.calls.append(("add_optimization_profile",))
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        data = bytes(data)
        self.trt.calls.append(("create_timing_cache", len(data)))
        if data == b"":
            return None if self.trt.fail_empty_cache else _TimingCache(self.trt, self.trt.gpu)
        if not data.startswith(CACHE_MAGIC):
            return None
        gpu, _, entries = data[len(CACHE_MAGIC):].decode().partition("|")
        return _TimingCache(self.trt, gpu, filter(None, entries.split(",")))

    def set_timing_cache(self, cache, ignore_mismatch):
        ok = cache.gpu == self.trt.gpu or ignore_mismatch
        self.trt.calls.append(("set_timing_cache", cache.gpu, ignore_mismatch, ok))
        if ok:
            self.cache = cache
        return ok

    def get_timing_cache(self):
        self.trt.calls.append(("get_timing_cache",))
        return self.cache


class _Profile:
    def __init__(self, trt):
        self.trt = trt

    def set_shape(self, name, mn, opt, mx):
        self.trt.calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))


class _Builder:
    def __init__(self, trt, logger):
        self.trt = trt
        trt.calls.append(("Builder", trt.current_device))

    def create_network(self, flags):
        self.trt.calls.append(("create_network", flags))
        return _Network(self.trt, flags)

    def create_builder_config(self):
        return _Config(self.trt)

    def create_optimization_profile(self):
        return _Profile(self.trt)

    def build_serialized_network(self, network, config):
        self.trt.calls.append(("build_serialized_network", self.trt.current_device))
        if self.trt.fail_build:
            return None
        if config.cache is not None:
            config.cache.entries.add(f"tactics-{network.inputs[0].name}")
        return b"RECORDED-PLAN"


class RecordingCudaRuntime(types.ModuleType):
    """cuda.bindings.runtime's cudaGetDevice / cudaSetDevice, recording into the RecordingTensorRT's calls."""

    def __init__(self, trt):
        super().__init__("cuda.bindings.runtime")
        self.trt = trt

    def cudaGetDevice(self):
        self.trt.calls.append(("cudaGetDevice",))
        return (0, self.trt.current_device)

    def cudaSetDevice(self, device):
        self.trt.calls.append(("cudaSetDevice", device))
        self.trt.current_device = device
        return (0,)


class RecordingTensorRT(types.ModuleType):
    """The stand-in `tensorrt` module. gpu: the device properties timing caches are tied to."""

    BuilderFlag = BuilderFlag
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    Logger = Logger

    def __init__(self, version: str = "10.5.0", *, gpu: str = "this-gpu", fail_build: bool = False,
                 fail_serialize: bool = False, fail_empty_cache: bool = False):
        super().__init__("tensorrt")
        self.__version__ = version
        self.gpu = gpu
        self.fail_build, self.fail_serialize, self.fail_empty_cache = fail_build, fail_serialize, fail_empty_cache
        self.calls: list[tuple] = []
        self.current_device = 0

    def Builder(self, logger):  # noqa: N802 - TensorRT's name
        return _Builder(self, logger)

    def OnnxParser(self, network, logger):  # noqa: N802
        return _Parser(self, network)

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type

    def install(self, monkeypatch, cuda_runtime: bool = True) -> None:
        """Make `import tensorrt` (and, with cuda_runtime, `from cuda.bindings import runtime`) give these."""
        import sys
        monkeypatch.setitem(sys.modules, "tensorrt", self)
        if cuda_runtime:
            runtime = RecordingCudaRuntime(self)
            bindings = types.ModuleType("cuda.bindings")
            bindings.runtime = runtime
            cuda = types.ModuleType("cuda")
            cuda.bindings = bindings
            for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime)):
                monkeypatch.setitem(sys.modules, name, module)

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]
