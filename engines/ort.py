"""ONNX Runtime engines (CPU and CUDA execution providers).

The artifact is the graph ORT optimized for the target EP, saved with
`SessionOptions.optimized_model_filepath` (external data for big models), plus the session
settings in engine.json. Loading it then skips the graph optimizers, so sessions start fast
and run the exact graph that was built and checked.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from toonark.engines.base import Engine
from toonark.ort_session import LEVELS as _LEVELS, ort_session
from toonark.engines.metadata import onnx_type_to_numpy, prepare_feeds, sizes_from_shapes

# Models whose source ONNX is at least this big get their optimized initializers in model.onnx.data
# (protobuf cannot hold 2 GiB; SD-1.5's fp32 UNet is 3.4 GB).
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_DATA_NAME = "model.onnx.data"



def _ort():
    import onnxruntime
    return onnxruntime


def cuda_provider_options(device_id: int = 0, cuda_graph: bool = False) -> dict[str, str]:
    """CUDA EP options that the GPU baseline measured (shared/gpu-baseline.md)."""
    options = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
    }
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def default_fuse(backend: str, precision: str) -> bool:
    """ort-cuda fp16 engines are built from ORT's diffusion fusions over the fp32 export (engines/fusions.py)."""
    from toonark.engines.backends import backend_for
    return backend_for(backend).default_fuse(precision)


def ort_build_settings(backend: str, *, threads: int | None = None, device_id: int = 0,
                       optimization_level: str = "all", external_data_bytes: int = EXTERNAL_DATA_BYTES,
                       fuse: bool = False) -> dict:
    """The session settings an ORT engine is built with; stored in engine.json and reused at load.

    fuse: build from `engines.fusions.fuse_for_cuda` over the fp32 export (fusions first, then fp16, float32
    I/O kept), the path toonark's GPU benchmark measured. The engine file is then the fused graph itself and
    ORT's own optimizers run at load (level "all", as measured), not at build: saving an ORT-optimized CUDA
    graph is not what was timed. On ort-cpu, fuse keeps the CPU-runnable subset (cpu_safe)."""
    if optimization_level not in _LEVELS:
        raise ValueError(f"unknown ORT optimization level {optimization_level!r}; choose one of {', '.join(_LEVELS)}")
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 lets ONNX Runtime pick), got {threads}")
    from toonark.engines.backends import OrtBackend, backend_for
    kind = backend_for(backend)
    if not isinstance(kind, OrtBackend):
        raise ValueError(f"{kind.name!r} is not an ONNX Runtime backend (ort-cpu, ort-cuda)")
    providers = kind.providers(device_id)
    return {
        "providers": providers,
        "device_id": device_id,
        "graph_optimization_level": optimization_level,
        # The saved graph is already optimized: loading it with the optimizers off is fast and runs it as built.
        "load_optimization_level": "disable_all",
        "intra_op_num_threads": 0 if threads is None else threads,  # 0: ORT uses the physical cores
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "external_data_bytes": external_data_bytes,
    } | ({"graph_optimization_level": "all", "load_optimization_level": "all",
          "fusion": {"recipe": "engines.fusions.fuse_for_cuda", "source_precision": "fp32", "fp16": True,
                     "keep_io_types": True, "cpu_safe": kind.on_cpu}} if fuse else {})


def check_cuda_available() -> None:
    ort = _ort()
    if hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu >= 1.21 finds the CUDA / cuDNN libraries of the nvidia-* wheels (or torch's) itself.
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - missing libraries surface below as a missing provider
            pass
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise RuntimeError(f"onnxruntime-gpu with CUDA is needed for BACKEND=ort-cuda; this machine has providers "
                           f"{providers}. Install onnxruntime-gpu on a CUDA machine, or build BACKEND=ort-cpu.")


def make_session(model_path: Path, settings: dict, *, level: str, threads: int | None = None,
                 spinning: bool | None = None, save_to: Path | None = None, external_data: bool = False,
                 free_dimensions: dict[str, int] | None = None, cuda_graph: bool = False,
                 initializers: dict | None = None, extra_config: dict[str, str] | None = None):
    """An InferenceSession with the recorded settings; `save_to` writes the optimized graph there.
    initializers / extra_config: LoRA weight sets (toonark.engines.lora) and the session entries they need.
    spinning=False: idle intra-op workers sleep at once instead of spinning (ORT's default is to spin).
    The served CPU layout runs several ORT pools (one per engine stub) next to denoise and tritonserver
    on a few cores; a spinning pool takes the core that the next BLS hop needs (issue 12, found by HBLS)."""
    providers = [(name, dict(options)) for name, options in settings["providers"]]
    if providers[0][0] == "CUDAExecutionProvider":
        check_cuda_available()
        if cuda_graph:
            providers[0][1]["enable_cuda_graph"] = "1"
    config = {} if spinning is None else {"session.intra_op.allow_spinning": "1" if spinning else "0"}
    if save_to is not None and external_data:
        config |= {"session.optimized_model_external_initializers_file_name": EXTERNAL_DATA_NAME,
                  "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}
    session = ort_session(model_path, providers=providers, level=level,
                          threads=settings["intra_op_num_threads"] if threads is None else threads,
                          inter_threads=settings["inter_op_num_threads"], sequential=True,
                          free_dimensions=free_dimensions, save_to=save_to, config={**config, **(extra_config or {})},
                          initializers=initializers)
    wanted = providers[0][0]
    if session.get_providers()[0] != wanted:
        # ORT falls back to CPU silently when the CUDA EP fails to load (missing cuDNN, driver too old).
        raise RuntimeError(f"ONNX Runtime could not start {wanted} for {model_path} (it fell back to "
                           f"{session.get_providers()}); check the CUDA / cuDNN libraries onnxruntime-gpu needs "
                           f"(onnxruntime.preload_dlls(), LD_LIBRARY_PATH)")
    return session


def session_io(session) -> dict:
    """{"inputs"|"outputs": {name: {"dtype", "shape"}}} of a session; symbolic dims stay names."""
    def describe(args):
        return {a.name: {"dtype": onnx_type_to_numpy(a.type), "shape": list(a.shape)} for a in args}
    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


def fuse_engine_source(source_onnx: Path, out_dir: Path, submodel: str, settings: dict) -> dict:
    """settings["fusion"] builds: ORT's diffusion fusions + fp16 over the fp32 `source_onnx`, written as
    out_dir/model.onnx (+ model.onnx.data past the protobuf limit). Returns the fusion report (op counts).
    num_heads=0: the attention head count is read from the graph (engines.fusions._robust_num_heads); the
    diffusers UNet config that heads_from_config reads is not copied into the build folder."""
    from toonark.engines.fusions import fuse_for_cuda
    fusion = settings["fusion"]
    report = fuse_for_cuda(source_onnx, Path(out_dir) / "model.onnx", submodel, num_heads=0,
                           fp16=fusion["fp16"], keep_io_types=fusion["keep_io_types"], cpu_safe=fusion["cpu_safe"])
    return report.to_json()


def build_ort_engine(source_onnx: Path, out_dir: Path, settings: dict) -> dict:
    """Optimize `source_onnx` for the settings' EP and save the result as out_dir/model.onnx
    (+ model.onnx.data). Returns the session I/O. out_dir is a fresh temporary folder.
    Fused builds (settings["fusion"]): out_dir/model.onnx is already the fused graph; it is only loaded and checked."""
    if settings.get("fusion"):
        target = Path(out_dir) / "model.onnx"
        if not target.is_file():
            raise RuntimeError(f"fused build: {target} is missing; run fuse_engine_source first")
        return session_io(make_session(target, settings, level=settings["load_optimization_level"]))
    source_bytes = sum(p.stat().st_size for p in Path(source_onnx).parent.iterdir() if p.is_file())
    external = source_bytes >= settings["external_data_bytes"]
    target = Path(out_dir) / "model.onnx"
    make_session(source_onnx, settings, level=settings["graph_optimization_level"], save_to=target,
                 external_data=external)
    if not target.is_file():
        raise RuntimeError(f"ONNX Runtime did not write the optimized model {target}")
    # Reload it the way load_engine will, so a graph that only works with the optimizers on fails here, not at serve time.
    return session_io(make_session(target, settings, level=settings["load_optimization_level"]))


def _is_torch(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


class OrtEngine(Engine):
    """A built ORT engine. `run` takes and returns numpy; on ort-cuda, `run_device` keeps tensors on the GPU
    (I/O binding) and `cuda_graph=True` with `graph_sizes={"B":..,"H":..,"W":..}` replays one captured CUDA graph.

    CUDA-graph mode: the free dimensions (2B, B, H/8, W/8, H, W...) are fixed to `graph_sizes` so every node
    sits on the GPU, and the engine owns one OrtValue per input and output (`graph_values`), bound once: a
    replay reuses the addresses it captured, so callers write into those buffers (numpy via `run`, or the
    device loop's step graph) and never bind others. A request of another shape runs on a second, dynamic
    session created on first use (`fallback=True`, the default) or is refused.
    """

    def __init__(self, model_path: Path, spec, metadata: dict, *, threads: int | None = None,
                 spinning: bool | None = None,
                 cuda_graph: bool = False, graph_sizes: dict[str, int] | None = None, fallback: bool = True,
                 initializers: dict | None = None, extra_config: dict[str, str] | None = None):
        self.spec, self.metadata, self.model_path = spec, metadata, Path(model_path)
        # LoRA weight sets (toonark.engines.lora): OrtValues that replace these initializers, dynamic session too.
        self.initializers, self.extra_config = initializers, extra_config
        settings = metadata["settings"]
        self.on_cuda = settings["providers"][0][0] == "CUDAExecutionProvider"
        self.device_id = int(settings.get("device_id", 0))
        self.cuda_graph = cuda_graph
        self.threads = threads
        self.spinning = spinning
        self.fallback = fallback
        self.graph_values: dict | None = None
        self._dynamic = None
        free_dimensions = None
        if cuda_graph:
            if not self.on_cuda:
                raise ValueError("cuda_graph=True needs an ort-cuda engine; ort-cpu has no CUDA graphs")
            if not graph_sizes:
                raise ValueError("cuda_graph=True needs graph_sizes={'B': .., 'H': .., 'W': ..}: a CUDA graph "
                                 "replays one fixed shape")
            free_dimensions = self._free_dimensions(graph_sizes)
        self.free_dimensions = free_dimensions
        self.session = make_session(self.model_path, settings, level=settings["load_optimization_level"],
                                    threads=threads, spinning=spinning, free_dimensions=free_dimensions,
                                    cuda_graph=cuda_graph, initializers=initializers, extra_config=extra_config)
        if cuda_graph:
            self.graph_sizes = dict(graph_sizes)
            self._allocate_graph_buffers(graph_sizes)

    # -- host path -------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = prepare_feeds(self.spec, self.metadata, feeds)
        if self.graph_values is not None:
            if all(tuple(np.shape(v)) == tuple(self.graph_values[k].shape()) for k, v in feeds.items()):
                for name, value in feeds.items():
                    self.graph_values[name].update_inplace(np.ascontiguousarray(value))
                self.run_bound()
                return {name: np.array(self.graph_values[name].numpy(), copy=True) for name in self.spec.output_names}
            values = self._dynamic_session(feeds).run(self.spec.output_names, feeds)
        else:
            values = self.session.run(self.spec.output_names, feeds)
        return dict(zip(self.spec.output_names, values))

    def _dynamic_session(self, feeds: dict):
        if not self.fallback:
            shapes = {k: list(self.graph_values[k].shape()) for k in feeds}
            raise ValueError(f"CUDA graph engine {self.spec.name} was captured for shapes {shapes}, got "
                             f"{ {k: list(np.shape(v)) for k, v in feeds.items()} }; load another with other "
                             f"graph_sizes")
        if self._dynamic is None:
            settings = self.metadata["settings"]
            self._dynamic = make_session(self.model_path, settings, level=settings["load_optimization_level"],
                                         threads=self.threads, spinning=self.spinning, initializers=self.initializers,
                                         extra_config=self.extra_config)
        return self._dynamic

    # -- device path (ort-cuda) ------------------------------------------------------------
    def run_device(self, feeds: dict, outputs: dict | None = None) -> dict:
        """Run with inputs and outputs on the GPU. Feeds: OrtValues, torch CUDA tensors or numpy arrays.
        Returns OrtValues on the device, or `outputs` (preallocated torch tensors) filled in place.
        In CUDA graph mode, feeds are copied into the engine's buffers and its output OrtValues are returned
        (overwritten by the next call)."""
        if not self.on_cuda:
            raise ValueError(f"run_device needs an ort-cuda engine; {self.model_path} runs on the CPU, use run()")
        if self.graph_values is not None:
            return self._run_graph_device(feeds)
        if any(_is_torch(v) for v in list(feeds.values()) + list((outputs or {}).values())):
            # ORT runs on its own CUDA stream: let the work that produced the torch tensors finish first.
            import torch
            torch.cuda.current_stream(self.device_id).synchronize()
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if _is_torch(value):
                value = value.contiguous()
                binding.bind_input(name, "cuda", self.device_id, _torch_to_numpy_dtype(value.dtype),
                                   tuple(value.shape), value.data_ptr())
            elif isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            if outputs and name in outputs:
                tensor = outputs[name]
                binding.bind_output(name, "cuda", self.device_id, _torch_to_numpy_dtype(tensor.dtype),
                                    tuple(tensor.shape), tensor.data_ptr())
            else:
                binding.bind_output(name, "cuda", self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        if outputs:
            return {name: outputs[name] for name in self.spec.output_names}
        return dict(zip(self.spec.output_names, binding.get_outputs()))

    def run_torch(self, feeds: dict) -> dict:
        """torch CUDA tensors in, freshly allocated torch CUDA tensors out (sizes from the input shapes)."""
        import torch
        sizes = sizes_from_shapes(self.spec, {name: tuple(value.shape) for name, value in feeds.items()})
        shapes = self.spec.shapes(sizes)
        io = self.metadata["io"]["outputs"]
        outputs = {name: torch.empty(shapes[name], dtype=getattr(torch, io[name]["dtype"]),
                                     device=f"cuda:{self.device_id}") for name in self.spec.output_names}
        if self.graph_values is not None:
            results = self._run_graph_device(feeds)
            for name, tensor in outputs.items():
                tensor.copy_(torch.from_numpy(results[name].numpy()))
            return outputs
        return self.run_device(feeds, outputs)

    # -- CUDA graph mode -------------------------------------------------------------------
    def _free_dimensions(self, sizes: dict[str, int]) -> dict[str, int]:
        """Symbolic dim names of the ONNX graph -> values, read from the spec's shapes at `sizes`."""
        shapes = self.spec.shapes(sizes)
        fixed: dict[str, int] = {}
        for group in ("inputs", "outputs"):
            for name, info in self.metadata["io"][group].items():
                for dim, value in zip(info["shape"], shapes.get(name, ())):
                    if isinstance(dim, str) and fixed.setdefault(dim, value) != value:
                        raise ValueError(f"ONNX dim {dim!r} would be both {fixed[dim]} and {value} at sizes {sizes}")
        return fixed

    def _allocate_graph_buffers(self, sizes: dict[str, int]) -> None:
        """One device OrtValue per input and output at `sizes`, bound once (graph_values, _graph_binding)."""
        ort = _ort()
        shapes = self.spec.shapes(sizes)
        io = self.metadata["io"]
        self.graph_values = {}
        binding = self.session.io_binding()
        for group in ("inputs", "outputs"):
            for name, info in io[group].items():
                if name not in shapes:
                    continue
                shape = list(shapes[name]) if info["shape"] else []
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(info["dtype"]).type, "cuda",
                                                                  self.device_id)
                value.update_inplace(np.zeros(shape, np.dtype(info["dtype"])))
                self.graph_values[name] = value
                (binding.bind_ortvalue_input if group == "inputs" else binding.bind_ortvalue_output)(name, value)
        self._graph_binding = binding

    def run_bound(self) -> None:
        """Replay over the engine's own buffers (graph_values); the first runs capture the graph."""
        self.session.run_with_iobinding(self._graph_binding)

    def _run_graph_device(self, feeds: dict) -> dict:
        for name, value in feeds.items():
            buffer = self.graph_values[name]
            if tuple(value.shape) != tuple(buffer.shape()):
                raise ValueError(f"CUDA graph engine {self.spec.name} was captured for {name!r} shape "
                                 f"{list(buffer.shape())}, got {list(value.shape)}; load another with other graph_sizes")
            if _is_torch(value):
                value = value.detach().cpu().numpy()
            elif not isinstance(value, np.ndarray):
                value = value.numpy()
            buffer.update_inplace(np.ascontiguousarray(value, dtype=np.dtype(self.metadata["io"]["inputs"][name]["dtype"])))
        self.run_bound()
        return {name: self.graph_values[name] for name in self.spec.output_names}


_TORCH_TO_NUMPY = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.int64": np.int64,
                   "torch.int32": np.int32}


def _torch_to_numpy_dtype(dtype) -> type:
    try:
        return _TORCH_TO_NUMPY[str(dtype)]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no ONNX Runtime binding here; use float32, float16 or int64") from None
