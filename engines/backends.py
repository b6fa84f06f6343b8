"""Backends as classes: everything that differs between ort-cpu, ort-cuda and tensorrt, in one place.

    backend = backend_for("ort-cuda")
    backend.source_onnx(layout, "fp16", "unet", fused=True)    # which ONNX an engine is built from
    backend.settings(...), backend.build(...), backend.load(...), backend.check_engine(...)

engines/build.py, metadata.py and the Triton repository generator ask the backend object instead of
comparing names. A new backend is a subclass registered in BACKENDS (and its name in
toonark.layout.BACKENDS, the folder names the core knows). The CLI names stay ort-cpu | ort-cuda | tensorrt.
"""
from __future__ import annotations

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

    def source_onnx(self, layout: BuildLayout, precision: str, submodel: str, fused: bool) -> Path:
        """int8: the calibrated QDQ UNet, the other submodels from int8_companion_precision. Fused builds
        start from the fp32 export: ORT's fusions match fp32 graphs and convert to fp16 themselves."""
        if fused and precision == "fp16":
            return layout.onnx_model("fp32", submodel)
        if precision == "int8":
            from toonark.family import family_for_folder
            if submodel == family_for_folder(layout.pipeline).denoiser_submodel:   # the UNet (or transformer)
                return layout.int8_unet
            return layout.onnx_model(self.int8_companion_precision(), submodel)
        return layout.onnx_model(precision, submodel)

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
        return "cpu"


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
        return {"device_id": device_id, "trt": trt_build_plan(spec, limits, precision, options).to_json()}

    @staticmethod
    def comparable(settings: dict) -> dict:
        return {**settings, "trt": {**settings["trt"], "timing_cache": None}} if "trt" in settings else settings

    def build(self, source, out_dir, submodel, settings):
        from toonark.engines.tensorrt import TrtBuildPlan, build_trt_engine
        return build_trt_engine(source, Path(out_dir) / self.engine_file, TrtBuildPlan.from_json(settings["trt"])), None

    def load(self, engine_path, spec, metadata, **options):
        from toonark.engines.tensorrt import TrtEngine
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


class EngineError(RuntimeError):
    """An engine that must not be used (missing, corrupt, stale, built elsewhere); the message names the fix."""


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
        return "unknown-gpu"


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
