"""TensorRT 10 engines: ONNX -> serialized plan (one optimization profile from the spec), and a
small runtime wrapper over IExecutionContext with torch CUDA tensors as buffers.

The pure part, `trt_build_plan`, decides every build setting (flags, profile shapes, workspace,
optimization level, timing cache) without importing tensorrt, so it is tested everywhere and
recorded in engine.json; `build_trt_engine` only applies it through the TensorRT Python API.

Supported TensorRT: 10.x (SUPPORTED_TENSORRT). Weakly typed builds (BuilderFlag.FP16 / INT8, what the fp16
and the fp32-with-Q/DQ int8 UNet need) are deprecated since 10.12 and removed in 11, so 11 is refused with the
fix rather than failing inside the builder; `strongly_typed` builds take the precisions from the ONNX instead.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toonark.engines.base import Engine
from toonark.engines.metadata import prepare_feeds
from toonark.files import atomic_file

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 8 << 30   # SD-1.5's UNet tactics want a few GiB at 768x768; the pool is a cap, not a reservation
DEFAULT_OPTIMIZATION_LEVEL = 3      # TensorRT's default; 4-5 search longer for a few % more
# The TensorRT versions this builder is written against: 10.0 has every API used here (execute_async_v3,
# name-based I/O, set_memory_pool_limit, builder_optimization_level, OnnxParserRefitter); 11 removed
# BuilderFlag.FP16 / INT8 (deprecated since 10.12), which the weakly typed fp16 and int8 builds set.
SUPPORTED_TENSORRT = ((10, 0), (11, 0))   # [low, high)
SUPPORTED_TENSORRT_TEXT = ">=10.0,<11"


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT outside SUPPORTED_TENSORRT, naming the fix."""
    low, high = SUPPORTED_TENSORRT
    found = _major_minor(version)
    if found is None or not low <= found < high:
        why = ("TensorRT 11 removed BuilderFlag.FP16/INT8 (weakly typed builds), which the fp16 and int8 plans use"
               if found and found >= high else "toonark's builder and runtime use TensorRT 10 APIs")
        raise RuntimeError(f"TensorRT {version} is not supported: toonark builds with TensorRT "
                           f"{SUPPORTED_TENSORRT_TEXT} ({why}). Install it with `pip install "
                           f"'tensorrt-cu12{SUPPORTED_TENSORRT_TEXT}'`, or use deploy/Dockerfile (NGC tritonserver "
                           f"24.10, TensorRT 10.5).")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:  # also catches the PyPI stub wheels that fail at import
        raise RuntimeError(f"TensorRT is not installed (import tensorrt failed: {err}). Install the TensorRT Python "
                           f"wheel for your CUDA on a GPU machine, or build BACKEND=ort-cuda / ort-cpu.") from None
    check_tensorrt_version(getattr(tensorrt, "__version__", "unknown"))
    return tensorrt


def _cuda_runtime():
    """cuda-python's CUDA runtime bindings when installed (cuda.bindings.runtime; `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        return None


def _cuda_call(result, what: str):
    """cuda-python returns (cudaError_t, *values); raise on an error, return the values."""
    error, values = result[0], tuple(result[1:])
    if int(getattr(error, "value", error)) != 0:
        raise RuntimeError(f"{what} failed: {error}")
    return values


@contextlib.contextmanager
def cuda_device(device_id: int):
    """Make `device_id` this thread's current CUDA device for the block, then restore the previous one.

    TensorRT's builder and runtime work on the device that is current when they are created (there is no
    device argument), so the build and the deserialization run inside this block. Uses cuda-python's
    cudaGetDevice/cudaSetDevice when installed, else torch.cuda.device (a CUDA build of torch). With neither,
    device 0 is CUDA's default and needs no call; another device is refused with the fix.
    """
    device_id = int(device_id)
    runtime = _cuda_runtime()
    if runtime is not None:
        (previous,) = _cuda_call(runtime.cudaGetDevice(), "cudaGetDevice")
        if previous != device_id:
            _cuda_call(runtime.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
        try:
            yield
        finally:
            if previous != device_id:
                _cuda_call(runtime.cudaSetDevice(previous), f"cudaSetDevice({previous})")
        return
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        with torch.cuda.device(device_id):
            yield
        return
    if device_id != 0:
        raise RuntimeError(f"device_id {device_id} needs cuda-python (`pip install cuda-python`) or a CUDA build of "
                           f"torch to select the GPU; or run with CUDA_VISIBLE_DEVICES={device_id} and device id 0")
    yield


@dataclass(frozen=True)
class TrtBuildPlan:
    """Everything that shapes a TensorRT plan; part of engine.json, so a changed setting rebuilds."""
    submodel: str
    precision: str
    builder_flags: tuple[str, ...]          # trt.BuilderFlag member names
    network_flags: tuple[str, ...]          # trt.NetworkDefinitionCreationFlag member names
    profile: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]  # (input, min, opt, max)
    workspace_bytes: int
    optimization_level: int
    timing_cache: str | None
    refit: bool
    # REFIT_INDIVIDUAL: only these ONNX initializers are refittable (the LoRA targets); the builder keeps the
    # rest as constants, so the plan is not slowed down everywhere as a fully refittable one can be.
    refit_weights: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> "TrtBuildPlan":
        return cls(submodel=data["submodel"], precision=data["precision"],
                   builder_flags=tuple(data["builder_flags"]), network_flags=tuple(data["network_flags"]),
                   profile=tuple((name, tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                 for name, v in data["profile"].items()),
                   workspace_bytes=data["workspace_bytes"], optimization_level=data["optimization_level"],
                   timing_cache=data["timing_cache"], refit=data["refit"],
                   refit_weights=tuple(data.get("refit_weights", ())))

    def to_json(self) -> dict:
        data = asdict(self)
        data["profile"] = {name: {"min": list(mn), "opt": list(opt), "max": list(mx)}
                           for name, mn, opt, mx in self.profile}
        data["builder_flags"], data["network_flags"] = list(self.builder_flags), list(self.network_flags)
        data["refit_weights"] = list(self.refit_weights)
        return data


def trt_build_plan(spec, limits, precision: str, options: dict | None = None) -> TrtBuildPlan:
    """Decide the build for one submodel.

    options: workspace_bytes, optimization_level (0-5), timing_cache (path or None), refit (bool),
    strongly_typed (bool: types come from the ONNX graph, no precision flags; TensorRT's preferred
    mode for a QDQ or already-fp16 graph).

    precision: what this submodel is built at (Backend.build_precision): fp32 -> no precision flag (TF32
    stays on, TensorRT's default); fp16 -> FP16; int8 -> INT8 + FP16, only for a graph with Q/DQ (the
    calibrated UNet): TensorRT runs the Q/DQ-wrapped ops in int8 and is free to pick fp16 for the rest. The
    other submodels of an int8 build come here as fp16 (INT8 on a graph without Q/DQ only warns and falls back).
    """
    options = dict(options or {})
    unknown = set(options) - {"workspace_bytes", "optimization_level", "timing_cache", "refit", "strongly_typed",
                              "refit_weights"}
    if unknown:
        raise ValueError(f"unknown TensorRT build options {sorted(unknown)}")
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    level = int(options.get("optimization_level", DEFAULT_OPTIMIZATION_LEVEL))
    if not 0 <= level <= 5:
        raise ValueError(f"TensorRT builder optimization level must be 0..5, got {level}")
    workspace = int(options.get("workspace_bytes", DEFAULT_WORKSPACE_BYTES))
    if workspace <= 0:
        raise ValueError(f"TensorRT workspace must be positive bytes, got {workspace}")
    refit = bool(options.get("refit", False))
    strongly_typed = bool(options.get("strongly_typed", False))
    if strongly_typed:
        flags: tuple[str, ...] = ()
        network_flags: tuple[str, ...] = ("STRONGLY_TYPED",)
    else:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
        network_flags = ()
    refit_weights = tuple(sorted(options.get("refit_weights", ())))
    if refit_weights:      # LoRA targets only (TensorRT >= 10.0: BuilderFlag.REFIT_INDIVIDUAL)
        refit = True
        flags += ("REFIT_INDIVIDUAL",)
    elif refit:
        flags += ("REFIT",)
    profile = tuple((name, tuple(mn), tuple(opt), tuple(mx)) for name, (mn, opt, mx) in spec.profile(limits).items())
    cache = options.get("timing_cache")
    return TrtBuildPlan(submodel=spec.name, precision=precision, builder_flags=flags, network_flags=network_flags,
                        profile=profile, workspace_bytes=workspace, optimization_level=level,
                        timing_cache=None if cache is None else str(cache), refit=refit, refit_weights=refit_weights)


def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _io_record(trt, network) -> dict:
    def describe(tensors):
        return {t.name: {"dtype": np.dtype(trt.nptype(t.dtype)).name, "shape": list(t.shape)} for t in tensors}
    return {"inputs": describe(network.get_input(i) for i in range(network.num_inputs)),
            "outputs": describe(network.get_output(i) for i in range(network.num_outputs))}


def build_trt_engine(source_onnx: Path, plan_path: Path, plan: TrtBuildPlan, device_id: int = 0) -> dict:
    """Parse `source_onnx`, build with `plan` on CUDA device `device_id`, and return the network I/O record.

    Nothing is written until everything that can fail has: the serialized plan and the merged timing
    cache are both in memory first; then the plan is written (atomically), then the cache (atomically)."""
    trt = import_tensorrt()
    with cuda_device(device_id):
        logger = _trt_logger(trt)
        builder = trt.Builder(logger)
        network_flags = 0
        for name in plan.network_flags:
            network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves external data (model.onnx.data) relative to the model file.
        if not parser.parse_from_file(str(source_onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {source_onnx}: {errors}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        config.builder_optimization_level = plan.optimization_level
        for flag in plan.builder_flags:
            if not hasattr(trt.BuilderFlag, flag):
                raise RuntimeError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}; "
                                   + ("refit individual weights needs TensorRT >= 10.0, or build with refit=True"
                                      if flag == "REFIT_INDIVIDUAL" else "use another TensorRT"))
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for name in plan.refit_weights:
            if not network.mark_weights_refittable(name):
                raise RuntimeError(f"{source_onnx}: TensorRT cannot mark initializer {name!r} refittable (not a weight "
                                   f"of the parsed network); the LoRA weights map names ONNX initializers of this graph")

        profile = builder.create_optimization_profile()
        declared = {name: (mn, opt, mx) for name, mn, opt, mx in plan.profile}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name not in declared:
                raise RuntimeError(f"{source_onnx} has input {tensor.name!r}, which the {plan.submodel} spec does "
                                   f"not declare ({sorted(declared)}); re-export with `make export`")
            if -1 in tuple(tensor.shape):  # static inputs (the 0-d timestep) need no profile entry
                profile.set_shape(tensor.name, *declared[tensor.name])
        config.add_optimization_profile(profile)

        cache_path = Path(plan.timing_cache) if plan.timing_cache else None
        cache = attach_timing_cache(config, cache_path)  # referenced until the build is over, as TensorRT asks

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build {plan.submodel} from {source_onnx} (see the TensorRT log "
                               f"above)")
        io = _io_record(trt, network)
        cache_bytes = merged_timing_cache(config, cache_path) if cache_path is not None else None
        del cache
    with atomic_file(plan_path) as handle:
        handle.write(memoryview(serialized))
    if cache_bytes is not None:
        with atomic_file(cache_path) as handle:
            handle.write(cache_bytes)
    return io


def attach_timing_cache(config, cache_path: Path | None):
    """Give the builder the timing cache at `cache_path` (an empty one when there is none), as Polygraphy's
    CreateConfig does, and check what TensorRT answers: create_timing_cache gives None for bytes it cannot
    read (another TensorRT version, a damaged file) and set_timing_cache gives False for a cache made on a
    GPU with other device properties. Either way the build starts from an empty cache, with a warning, and
    its timings replace the file afterwards. Returns the attached cache."""
    if cache_path is not None and cache_path.is_file():
        cache = config.create_timing_cache(cache_path.read_bytes())
        if cache is None:
            log.warning("timing cache %s is not readable by this TensorRT (another version, or damaged); building "
                        "with an empty one, which replaces it", cache_path)
        elif config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        else:
            log.warning("timing cache %s was made on another GPU (TensorRT refused it); building with an empty "
                        "one, which replaces it", cache_path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT could not create an empty timing cache (see the TensorRT log above)")
    return cache


def merged_timing_cache(config, cache_path: Path) -> bytes | None:
    """This build's timings merged with what is on disk now (another build may have added some), serialized.
    A file TensorRT cannot read or combine (another GPU or version) is not merged: ours replaces it.
    None when the builder has no cache to save (nothing is written then)."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s is left as it is", cache_path)
        return None
    if cache_path.is_file():
        on_disk = config.create_timing_cache(cache_path.read_bytes())
        if on_disk is None or not cache.combine(on_disk, ignore_mismatch=False):
            log.warning("timing cache %s is from another GPU or TensorRT version; replacing it with this build's",
                        cache_path)
    return bytes(memoryview(cache.serialize()))


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
                 "int8": "int8", "bool": "bool", "bfloat16": "bfloat16"}


class TrtEngine(Engine):
    """A deserialized plan with one execution context. `run` takes and returns numpy; `run_device`
    takes torch CUDA tensors and returns torch CUDA tensors (outputs allocated per call, or passed in)."""

    def __init__(self, plan_path: Path, spec, metadata: dict, *, device_id: int = 0, stream=None):
        import torch
        trt = import_tensorrt()
        self.spec, self.metadata, self.plan_path = spec, metadata, Path(plan_path)
        self.device = torch.device("cuda", device_id)
        self._trt, self._torch = trt, torch
        self._logger = _trt_logger(trt)
        # The runtime, engine and context live on the device current at their creation: make it device_id.
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self._logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize {self.plan_path} (see the log above); rebuild it "
                                   f"with `make engine BACKEND=tensorrt`")
            self.context = self.engine.create_execution_context()
        self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: getattr(torch, _TORCH_DTYPES[np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name])
                       for n in names}

    def _refitter(self):
        """A Refitter, after checking the plan is refittable (TensorRT's Refitter constructor fails on a plan built
        without refit with only a log line) and after the work already enqueued on the engine has finished
        (refitting under a running enqueue changes weights mid-inference)."""
        if not getattr(self.engine, "refittable", False):
            raise RuntimeError(f"{self.plan_path} was built without refit, so its weights cannot be swapped; rebuild "
                               f"it with `make engine BACKEND=tensorrt` and --refit (or trtexec --refit; "
                               f"`make trtexec` prints the lines)")
        self.synchronize()
        return self._trt.Refitter(self.engine, self._logger)

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._torch.cuda.current_stream(self.device).synchronize()

    def _apply_refit(self, refitter, what: str) -> None:
        missing = list(refitter.get_missing_weights()) if hasattr(refitter, "get_missing_weights") else []
        if missing:
            raise RuntimeError(f"refitting {self.plan_path} from {what}: TensorRT also needs weights "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (weights it fused together must "
                               f"be refitted together)")
        if hasattr(refitter, "refit_cuda_engine_async"):
            ok = refitter.refit_cuda_engine_async(self.stream.cuda_stream)
            self.stream.synchronize()     # the next enqueue must see the new weights, the arrays must outlive the copy
        else:
            ok = refitter.refit_cuda_engine()
        if not ok:
            raise RuntimeError(f"refitting {self.plan_path} from {what} failed (see the TensorRT log above)")

    def refit_from_onnx(self, onnx_path: Path) -> None:
        """Swap in the weights of another ONNX with the same graph (engine built with refit=True); the ONNX
        parser-refitter's own errors are reported."""
        trt = self._trt
        refitter = self._refitter()
        parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise RuntimeError(f"TensorRT could not read refit weights from {onnx_path}: {errors or 'no detail'}")
        self._apply_refit(refitter, str(onnx_path))

    def weights_map(self) -> dict[str, str]:
        """{ONNX initializer name: engine weight name} of the refittable weights (the ONNX parser names engine
        weights after the initializers, so the map is the identity over the names TensorRT reports)."""
        refitter = self._refitter()
        return {name: name for name in refitter.get_all_weights()}

    def refit_weights(self, values: dict[str, np.ndarray], previous: dict[str, np.ndarray] | None = None) -> int:
        """Refit every weight in `values` ({ONNX initializer: array in the engine's layout}, computed from the base:
        toonark.engines.lora), plus `previous` ({name: base value}: what the last LoRA touched and this one does not,
        so A -> B -> A leaves no B delta behind). Returns the number of weights refitted."""
        trt = self._trt
        full = {**(previous or {}), **values}
        refitter = self._refitter()
        known = set(refitter.get_all_weights())
        unknown = sorted(set(full) - known)
        if unknown:
            raise RuntimeError(f"{self.plan_path}: weights {unknown[:5]} are not refittable in this plan; build it "
                               f"with refit_weights covering the LoRA targets (REFIT_INDIVIDUAL) or refit=True")
        keep = {name: np.ascontiguousarray(value) for name, value in full.items()}   # alive until the sync
        for name, value in keep.items():
            if not refitter.set_named_weights(name, trt.Weights(value)):
                raise RuntimeError(f"{self.plan_path}: TensorRT refused weights {name!r} of shape {list(value.shape)} "
                                   f"{value.dtype}")
        self._apply_refit(refitter, f"{len(keep)} LoRA weights")
        del keep
        return len(full)

    def run_device(self, feeds: dict, outputs: dict | None = None) -> dict:
        with self._torch.cuda.device(self.device):   # enqueue on the context's own device
            return self._run_device(feeds, outputs)

    def _run_device(self, feeds: dict, outputs: dict | None) -> dict:
        torch = self._torch
        keep = []
        for name in self.input_names:
            tensor = feeds[name]
            if tensor.device != self.device or tensor.dtype != self.dtypes[name]:
                tensor = tensor.to(self.device, self.dtypes[name])
            tensor = tensor.contiguous()
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"{self.spec.name} input {name!r} shape {list(tensor.shape)} is outside the "
                                 f"engine profile {self.metadata.get('profile', {}).get(name)}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        result = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = outputs[name] if outputs and name in outputs else \
                torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            result[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        # Inputs may have been produced on another stream: order this stream after the current one.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.plan_path} failed (see the log above)")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        del keep
        return result

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        feeds = prepare_feeds(self.spec, self.metadata, feeds)
        device_feeds = {name: torch.from_numpy(value).to(self.device) for name, value in feeds.items()}
        outputs = self.run_device(device_feeds)
        torch.cuda.current_stream(self.device).synchronize()
        return {name: outputs[name].cpu().numpy() for name in self.spec.output_names}
