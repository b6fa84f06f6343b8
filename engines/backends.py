"""Backends as classes: everything that differs between ort-cpu, ort-cuda and tensorrt, in one place.

    backend = backend_for("ort-cuda")
    backend.source_onnx(layout, "fp16", "unet", fused=True)    # which ONNX an engine is built from
    backend.settings(...), backend.build(...), backend.load(...), backend.check_engine(...)

engines/build.py, metadata.py and the Triton repository generator ask the backend object instead of
comparing names. A new backend is a subclass registered in BACKENDS (and its name in
toonark.layout.BACKENDS, the folder names the core knows). The CLI names stay ort-cpu | ort-cuda | tensorrt.
"""
from __future__ import annotations

import functools
from pathlib import Path

from toonark.files import sha256_file, sha256_onnx
from toonark.layout import BACKENDS as BACKEND_NAMES, BuildLayout


class Backend:
    name: str = ""
    engine_file: str = "model.onnx"
    # Triton instance kind of its engines, and whether the UNet/VAE run as CUDA graphs in the served repo.
    triton_kind: str = "KIND_GPU"
    serves_cuda_graphs: bool = False
    # The device loop (engines/ort_loop.py): on by default / allowed at all.
    device_loop_default: bool = False
    runs_device_loop: bool = False
    on_cpu: bool = False

    def __repr__(self) -> str:
        return f"<backend {self.name}>"

    # -- what an engine is built from --------------------------------------------------------
    def default_fuse(self, precision: str) -> bool:
        return False

    def check_fuse(self, precision: str, fuse: bool) -> None:
        if fuse and precision != "fp16":
            raise ValueError(f"fuse applies to ORT fp16 engines (fusions, then fp16 conversion); "
                             f"not {self.name} {precision}")

    def int8_companion_precision(self) -> str:
        """The precision the text encoder and VAE of an int8 build are built from."""
        return "fp16"

    def build_precision(self, precision: str, submodel: str) -> str:
        """The precision `submodel` of a `precision` build is built at: in an int8 build only the submodels
        `make calibrate` quantizes (their graphs carry Q/DQ) are int8; the others are int8_companion_precision
        graphs without Q/DQ, built as such (INT8 flags on them only warn and fall back)."""
        if precision == "int8" and submodel not in QUANTIZED_SUBMODELS:
            return self.int8_companion_precision()
        return precision

    def source_onnx(self, layout: BuildLayout, precision: str, submodel: str, fused: bool) -> Path:
        """int8: the calibrated QDQ UNet, the other submodels from int8_companion_precision. Fused builds
        start from the fp32 export: ORT's fusions match fp32 graphs and convert to fp16 themselves."""
        if fused and precision == "fp16":
            return layout.onnx_model("fp32", submodel)
        if precision == "int8" and submodel in QUANTIZED_SUBMODELS:
            return layout.int8_unet
        return layout.onnx_model(self.build_precision(precision, submodel), submodel)

    # -- build / load ------------------------------------------------------------------------
    def check_available(self) -> None:
        """Fail before any build work, with the install hint."""

    def settings(self, precision: str, spec, limits, build_dir: Path, *, threads, device_id, trt_options,
                 fuse: bool) -> dict:
        raise NotImplementedError

    def build(self, source: Path, out_dir: Path, submodel: str, settings: dict) -> tuple[dict, dict | None]:
        """Write the engine into out_dir; return (its I/O, fusion report or None)."""
        raise NotImplementedError

    def load(self, engine_path: Path, spec, metadata: dict, **options):
        raise NotImplementedError

    @staticmethod
    def comparable(settings: dict) -> dict:
        """Settings minus what does not make an engine stale (a moved timing cache)."""
        return settings

    # -- engine.json -------------------------------------------------------------------------
    def engine_files(self, engine_dir: Path) -> list[Path]:
        """The engine file plus, for ONNX, its external-data files."""
        main = Path(engine_dir) / self.engine_file
        extra = sorted(p for p in Path(engine_dir).iterdir() if p.name.startswith(main.name + ".") and p.is_file()) \
            if Path(engine_dir).is_dir() else []
        return [main] + extra

    def engine_hash(self, engine_dir: Path) -> str:
        return sha256_onnx(Path(engine_dir) / self.engine_file)

    def library_info(self) -> dict:
        import onnxruntime
        return {"name": "onnxruntime", "version": onnxruntime.__version__}

    def device_name(self, device_id: int = 0) -> str:
        return _gpu_name(device_id)

    def check_engine(self, metadata: dict, engine_dir: Path, fix: str) -> None:
        """Checks that always run at load (even verify=False); TensorRT: library version and GPU."""

    # -- the served repository ---------------------------------------------------------------
    def serving_runtime(self, metadata: dict[str, dict]) -> dict:
        """What the server must have to load these engines ({submodel: engine.json}); recorded by `make repo`
        in the repository and checked by the launcher at start (check_serving_runtime). ONNX needs nothing."""
        return {}

    def check_serving_runtime(self, runtime: dict, repo: Path, fix: str) -> None:
        """Raise EngineError naming `fix` when this machine cannot serve engines recorded as `runtime`."""


class OrtBackend(Backend):
    runs_device_loop = True

    def default_fuse(self, precision: str) -> bool:
        return False

    def settings(self, precision, spec, limits, build_dir, *, threads, device_id, trt_options, fuse) -> dict:
        from toonark.engines.ort import ort_build_settings
        return ort_build_settings(self, threads=threads, device_id=device_id, fuse=fuse)

    def build(self, source, out_dir, submodel, settings):
        from toonark.engines.ort import build_ort_engine, fuse_engine_source
        fusion = fuse_engine_source(source, out_dir, submodel, settings) if settings.get("fusion") else None
        return build_ort_engine(source, out_dir, settings), fusion

    def load(self, engine_path, spec, metadata, **options):
        from toonark.engines.ort import OrtEngine
        return OrtEngine(engine_path, spec, metadata, **options)

    def providers(self, device_id: int = 0) -> list:
        raise NotImplementedError


class OrtCpuBackend(OrtBackend):
    name = "ort-cpu"
    triton_kind = "KIND_CPU"
    on_cpu = True

    def int8_companion_precision(self) -> str:
        return "fp32"   # ORT's CPU fp16 kernels are few

    def providers(self, device_id: int = 0) -> list:
        return [["CPUExecutionProvider", {}]]

    def device_name(self, device_id: int = 0) -> str:
        """The CPU family an engine is laid out for (cpu_family)."""
        return cpu_family()

    def check_engine(self, metadata: dict, engine_dir: Path, fix: str) -> None:
        """The engine was saved at ORT level "all", whose layouts (NCHWc blocks) are sized for the CPU that built
        it: a tiny UNet built on an AVX2 host died with SIGFPE on an AVX-512 one (ORT 1.30; ORT 1.32: "NCHWc Conv
        input and filter shapes do not match a supported blocked layout"). Saving at "extended" and laying out at
        load would be portable but breaks LoRA switching (the layout pass copies the conv weights the LoRA engine
        swaps in place), so another family is refused with the rebuild. A fused build is laid out at load."""
        built, here = metadata.get("device"), self.device_name()
        if built != here and not metadata.get("fusion"):
            raise EngineError(f"{Path(engine_dir) / self.engine_file} was laid out by ONNX Runtime for CPU {built!r}; "
                              f"this machine is {here!r}, where that layout fails (an AVX2 build dies with SIGFPE on "
                              f"AVX-512). {fix}")


class OrtCudaBackend(OrtBackend):
    name = "ort-cuda"
    serves_cuda_graphs = True
    device_loop_default = True

    def default_fuse(self, precision: str) -> bool:
        """ort-cuda fp16 engines are built from ORT's diffusion fusions over the fp32 export (engines/fusions.py)."""
        return precision == "fp16"

    def providers(self, device_id: int = 0) -> list:
        from toonark.engines.ort import cuda_provider_options
        return [["CUDAExecutionProvider", cuda_provider_options(device_id)], ["CPUExecutionProvider", {}]]

    def check_available(self) -> None:
        from toonark.engines.ort import check_cuda_available
        check_cuda_available()


class TensorRTBackend(Backend):
    name = "tensorrt"
    engine_file = "model.plan"

    def check_fuse(self, precision: str, fuse: bool) -> None:
        if fuse:
            raise ValueError(f"fuse applies to ORT fp16 engines (fusions, then fp16 conversion); "
                             f"not {self.name} {precision}")

    def check_available(self) -> None:
        from toonark.engines.tensorrt import import_tensorrt
        import_tensorrt()

    def settings(self, precision, spec, limits, build_dir, *, threads, device_id, trt_options, fuse) -> dict:
        from toonark.engines.tensorrt import trt_build_plan
        options = {"timing_cache": str(BuildLayout(build_dir).timing_cache), **(trt_options or {})}
        plan = trt_build_plan(spec, limits, self.build_precision(precision, spec.name), options)
        return {"device_id": device_id, "trt": plan.to_json()}

    @staticmethod
    def comparable(settings: dict) -> dict:
        return {**settings, "trt": {**settings["trt"], "timing_cache": None}} if "trt" in settings else settings

    def build(self, source, out_dir, submodel, settings):
        from toonark.engines.tensorrt import TrtBuildPlan, build_trt_engine
        return build_trt_engine(source, Path(out_dir) / self.engine_file, TrtBuildPlan.from_json(settings["trt"]),
                                device_id=settings.get("device_id", 0)), None

    def load(self, engine_path, spec, metadata, **options):
        """Runs on the GPU it was built on unless device_id says otherwise; that GPU must be the same model."""
        from toonark.engines.tensorrt import TrtEngine
        built_on = metadata.get("settings", {}).get("device_id", 0)
        device_id = options.setdefault("device_id", built_on)
        if device_id != built_on and self.device_name(device_id) != metadata.get("device"):
            raise EngineError(f"{engine_path} was built for GPU {metadata.get('device')!r}; device {device_id} is "
                              f"{self.device_name(device_id)!r} (plans are tuned per GPU). Load it on device "
                              f"{built_on}, or rebuild with `make engine BACKEND=tensorrt` and --device-id {device_id}")
        return TrtEngine(engine_path, spec, metadata, **options)

    def engine_files(self, engine_dir: Path) -> list[Path]:
        return [Path(engine_dir) / self.engine_file]

    def engine_hash(self, engine_dir: Path) -> str:
        return sha256_file(Path(engine_dir) / self.engine_file)

    def library_info(self) -> dict:
        from toonark.engines.tensorrt import import_tensorrt
        return {"name": "tensorrt", "version": import_tensorrt().__version__}

    def check_engine(self, metadata: dict, engine_dir: Path, fix: str) -> None:
        from toonark.engines.tensorrt import import_tensorrt
        current = import_tensorrt().__version__
        built = metadata.get("library", {}).get("version")
        plan = Path(engine_dir) / self.engine_file
        if built != current:
            raise EngineError(f"{plan} was built with TensorRT {built}, this machine has "
                              f"TensorRT {current}; plans do not move between versions. {fix}")
        gpu = self.device_name(metadata.get("settings", {}).get("device_id", 0))
        if metadata.get("device") != gpu:
            raise EngineError(f"{plan} was built for GPU {metadata.get('device')!r}, "
                              f"this machine has {gpu!r}; plans are tuned per GPU. {fix}")

    def serving_runtime(self, metadata: dict[str, dict]) -> dict:
        """The TensorRT version and GPU the plans were built with (one of each: Triton loads every plan with
        the one libnvinfer of its image)."""
        found = {(m.get("library", {}).get("version"), m.get("device")) for m in metadata.values()}
        if len(found) != 1:
            built = ", ".join(f"{name}: TensorRT {m.get('library', {}).get('version')} on {m.get('device')!r}"
                              for name, m in sorted(metadata.items()))
            raise EngineError(f"the plans were built with different TensorRT versions or GPUs ({built}); rebuild them "
                              f"together with `make engine BACKEND=tensorrt --force`")
        version, device = found.pop()
        return {"library": {"name": "tensorrt", "version": version}, "device": device}

    def check_serving_runtime(self, runtime: dict, repo: Path, fix: str) -> None:
        """The TensorRT here must be the one that built the plans (Triton's tensorrt backend refuses any other
        with a deserialization error that does not say why), and GPU 0 the GPU model they were tuned for
        (checked when both names are known)."""
        built = runtime.get("library", {}).get("version")
        try:
            import tensorrt
            current = getattr(tensorrt, "__version__", "unknown")
        except ImportError as err:
            raise EngineError(f"{repo} serves TensorRT {built} plans, but there is no TensorRT here to check them "
                              f"against (import tensorrt failed: {err}); the pip tritonserver has no tensorrt "
                              f"backend. Serve it in the image of deploy/Dockerfile, or {fix}") from None
        if current != built:
            raise EngineError(f"{repo} holds plans built with TensorRT {built}; this machine has TensorRT {current}, "
                              f"which cannot load them. {fix}")
        gpu, recorded = self.device_name(0), runtime.get("device")
        if UNKNOWN_GPU not in (gpu, recorded) and gpu != recorded:
            raise EngineError(f"{repo} holds plans built for GPU {recorded!r}; this machine's GPU 0 is {gpu!r} "
                              f"(plans are tuned per GPU model). {fix}")


@functools.lru_cache(maxsize=None)     # the CPU does not change under a process; every engine load asks
def cpu_family() -> str:
    """"cpu <arch>", with "+avx512f" on x86 CPUs that have it: what sizes ONNX Runtime's NCHWc blocks (16 floats
    with AVX-512F, 8 without), the CPU-specific part of a graph it saves at level "all"."""
    import platform
    family = f"cpu {platform.machine() or 'unknown'}"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return family + ("+avx512f" if "avx512f" in flags else "")


class EngineError(RuntimeError):
    """An engine that must not be used (missing, corrupt, stale, built elsewhere); the message names the fix."""


UNKNOWN_GPU = "unknown-gpu"
# The submodels `make calibrate` quantizes: their int8 graph carries Q/DQ (BuildLayout.int8_unet).
QUANTIZED_SUBMODELS = ("unet", "transformer")   # every family's denoiser_submodel (what `make calibrate` quantizes)


def _gpu_name(device_id: int = 0) -> str:
    """The CUDA device's name (what a TensorRT plan is tied to)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device_id)
    except ImportError:
        pass
    try:  # No torch with CUDA: ask the driver through NVML, which the CUDA toolkit ships.
        import pynvml
        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(device_id))
        return name.decode() if isinstance(name, bytes) else name
    except Exception:  # noqa: BLE001 - any NVML failure means "unknown", never a crash
        pass
    try:  # The NGC image (CPU torch, no pynvml): nvidia-smi, which the driver mounts into the container.
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", f"--id={device_id}"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return UNKNOWN_GPU


BACKENDS: dict[str, Backend] = {b.name: b for b in (OrtCpuBackend(), OrtCudaBackend(), TensorRTBackend())}
# The core names the engine folders (toonark.layout); both lists must be the same backends.
assert tuple(BACKENDS) == tuple(BACKEND_NAMES), (tuple(BACKENDS), BACKEND_NAMES)


class _Unknown(Backend):
    """What backend_for(strict=False) answers for a name that is no backend: runs nothing."""


def backend_for(backend, strict: bool = True) -> Backend:
    """The Backend of a CLI name (or the object itself). Unknown names raise ValueError listing the choices;
    strict=False answers a backend that supports nothing (for "may it run X?" questions)."""
    if isinstance(backend, Backend):
        return backend
    try:
        return BACKENDS[backend]
    except (KeyError, TypeError):
        if not strict:
            unknown = _Unknown()
            unknown.name = str(backend)
            return unknown
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}") from None
