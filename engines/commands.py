"""trtexec and polygraphy command lines for a build folder, from the same specs and limits the
Python builder uses, so a plan built by hand has the same profile as `make engine`'s.

Every command is an argument list (run it with subprocess, print it with shlex.join). Shape
arguments list only the dynamic inputs: TensorRT takes a static input's shape (the UNet's
`timestep`, shape [1]) from the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toonark.engines.build import source_onnx
from toonark.engines.tensorrt import DEFAULT_OPTIMIZATION_LEVEL, DEFAULT_WORKSPACE_BYTES
from toonark.specs import PRECISIONS, Axis, BuildInfo
from toonark.layout import BuildLayout

# trtexec / polygraphy precision flags; int8 plans come from the explicit QDQ UNet (no calibrator).
PRECISION_FLAGS = {"fp32": (), "fp16": ("--fp16",), "int8": ("--int8", "--fp16")}
# TensorRT vs ONNX Runtime on the same ONNX: fp32 runs TF32 matmuls/convs by default; int8 is judged by
# `make calibrate`'s gate, this only catches a broken build.
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


def dynamic_inputs(spec) -> list[str]:
    return [t.name for t in spec.inputs if any(isinstance(d, Axis) for d in t.dims)]


def trtexec_shapes(spec, limits, level: str) -> str:
    """'sample:2x4x8x8,encoder_hidden_states:2x77x768' at "min" / "opt" / "max"."""
    index = ("min", "opt", "max").index(level)
    profile = spec.profile(limits)
    return ",".join(f"{name}:{'x'.join(str(v) for v in profile[name][index])}" for name in dynamic_inputs(spec))


def polygraphy_shapes(spec, limits, level: str) -> list[str]:
    """['sample:[2,4,8,8]', 'encoder_hidden_states:[2,77,768]'] at one level."""
    index = ("min", "opt", "max").index(level)
    profile = spec.profile(limits)
    return [f"{name}:[{','.join(str(v) for v in profile[name][index])}]" for name in dynamic_inputs(spec)]


def trtexec_plan_path(build_dir: Path, precision: str, submodel: str) -> Path:
    """Plans from trtexec go beside, never over, the recorded ones of `make engine`."""
    return BuildLayout(build_dir).root / "engines" / "trtexec" / precision / f"{submodel}.plan"


def trtexec_build(onnx: Path, plan: Path, spec, limits, precision: str, timing_cache: Path,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                  optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL) -> list[str]:
    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}"]
    if dynamic_inputs(spec):
        argv += [f"--minShapes={trtexec_shapes(spec, limits, 'min')}",
                 f"--optShapes={trtexec_shapes(spec, limits, 'opt')}",
                 f"--maxShapes={trtexec_shapes(spec, limits, 'max')}"]
    argv += list(PRECISION_FLAGS[precision])
    argv += [f"--memPoolSize=workspace:{workspace_bytes >> 20}M",
             f"--builderOptimizationLevel={optimization_level}",
             f"--timingCacheFile={timing_cache}"]
    return argv


def trtexec_benchmark(plan: Path, spec, limits) -> list[str]:
    argv = ["trtexec", f"--loadEngine={plan}"]
    if dynamic_inputs(spec):
        argv.append(f"--shapes={trtexec_shapes(spec, limits, 'opt')}")
    return argv + ["--useCudaGraph", "--noDataTransfers", "--useSpinWait"]


def polygraphy_compare(onnx: Path, spec, limits, precision: str) -> list[str]:
    """TensorRT vs ONNX Runtime on random inputs at the opt shapes."""
    atol, rtol = TOLERANCES[precision]
    argv = ["polygraphy", "run", str(onnx), "--trt", "--onnxrt"] + list(PRECISION_FLAGS[precision])
    if dynamic_inputs(spec):
        argv += ["--trt-min-shapes", *polygraphy_shapes(spec, limits, "min"),
                 "--trt-opt-shapes", *polygraphy_shapes(spec, limits, "opt"),
                 "--trt-max-shapes", *polygraphy_shapes(spec, limits, "max"),
                 "--input-shapes", *polygraphy_shapes(spec, limits, "opt")]
    return argv + ["--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]


@dataclass(frozen=True)
class CommandSet:
    submodel: str
    precision: str
    onnx: Path
    build: list[str]
    benchmark: list[str]
    compare: list[str]


def build_dir_commands(build_dir: Path, precisions=PRECISIONS, submodels=None) -> list[CommandSet]:
    """Command lines for every submodel whose source ONNX exists, per precision (TensorRT sources:
    fp32 / fp16 exports, the calibrated QDQ UNet for int8 and fp16 for the rest of an int8 build)."""
    build_dir = Path(build_dir)
    info = BuildInfo.read(build_dir)
    layout = BuildLayout(build_dir)
    from toonark.family import family_for_folder
    family = family_for_folder(layout.pipeline)
    result = []
    for precision in precisions:
        for name, spec in info.specs.items():
            if submodels is not None and name not in submodels:
                continue
            if precision == "int8" and name != family.denoiser_submodel:
                continue  # the rest of an int8 build is the fp16 plan: its lines are the fp16 ones
            onnx = source_onnx(build_dir, "tensorrt", precision, name)
            if not onnx.is_file():
                continue
            plan = trtexec_plan_path(build_dir, precision, name)
            result.append(CommandSet(name, precision, onnx,
                                     trtexec_build(onnx, plan, spec, info.limits, precision, layout.timing_cache),
                                     trtexec_benchmark(plan, spec, info.limits),
                                     polygraphy_compare(onnx, spec, info.limits, precision)))
    return result
