"""trtexec and polygraphy command lines for a build folder, from the same specs and limits the
Python builder uses, so a plan built by hand has the same profile as `make engine`'s.

Every command is an argument list (run it with subprocess, print it with shlex.join). Shape
arguments list only the dynamic inputs: TensorRT takes a static input's shape (the UNet's
`timestep`, shape [1]) from the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toonark.engines.backends import backend_for
from toonark.engines.build import source_onnx
from toonark.engines.tensorrt import TrtBuildPlan, trt_build_plan
from toonark.specs import PRECISIONS, Axis, BuildInfo
from toonark.layout import BuildLayout

# The TrtBuildPlan's flags as trtexec / polygraphy spell them: one plan drives the Python builder and the
# printed lines, so `--strongly-typed` / `--refit` / the precision read the same in both. int8 plans come from
# the explicit QDQ UNet (no calibrator).
TRTEXEC_FLAGS = {"FP16": "--fp16", "INT8": "--int8", "REFIT": "--refit", "STRONGLY_TYPED": "--stronglyTyped"}
POLYGRAPHY_FLAGS = {"FP16": "--fp16", "INT8": "--int8", "REFIT": "--refittable", "STRONGLY_TYPED": "--strongly-typed"}
# TensorRT vs ONNX Runtime on the same ONNX: fp32 runs TF32 matmuls/convs by default; int8 is judged by
# `make calibrate`'s gate, this only catches a broken build.
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


def dynamic_inputs(spec) -> list[str]:
    return [t.name for t in spec.inputs if any(isinstance(d, Axis) for d in t.dims)]


def _shapes(spec, plan: TrtBuildPlan, level: str) -> list[tuple[str, tuple[int, ...]]]:
    index = ("min", "opt", "max").index(level)
    profile = {name: (mn, opt, mx) for name, mn, opt, mx in plan.profile}
    return [(name, profile[name][index]) for name in dynamic_inputs(spec)]


def trtexec_shapes(spec, plan: TrtBuildPlan, level: str) -> str:
    """'sample:2x4x8x8,encoder_hidden_states:2x77x768' at "min" / "opt" / "max"."""
    return ",".join(f"{name}:{'x'.join(str(v) for v in shape)}" for name, shape in _shapes(spec, plan, level))


def polygraphy_shapes(spec, plan: TrtBuildPlan, level: str) -> list[str]:
    """['sample:[2,4,8,8]', 'encoder_hidden_states:[2,77,768]'] at one level."""
    return [f"{name}:[{','.join(str(v) for v in shape)}]" for name, shape in _shapes(spec, plan, level)]


def _flags(plan: TrtBuildPlan, spelling: dict[str, str]) -> list[str]:
    return [spelling[flag] for flag in plan.network_flags + plan.builder_flags]


def trtexec_plan_path(build_dir: Path, precision: str, submodel: str) -> Path:
    """Plans from trtexec go beside, never over, the recorded ones of `make engine`."""
    return BuildLayout(build_dir).root / "engines" / "trtexec" / precision / f"{submodel}.plan"


def trtexec_build(onnx: Path, plan_path: Path, spec, plan: TrtBuildPlan) -> list[str]:
    """The trtexec line that builds what build_trt_engine builds from `plan`."""
    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan_path}"]
    if dynamic_inputs(spec):
        argv += [f"--minShapes={trtexec_shapes(spec, plan, 'min')}",
                 f"--optShapes={trtexec_shapes(spec, plan, 'opt')}",
                 f"--maxShapes={trtexec_shapes(spec, plan, 'max')}"]
    argv += _flags(plan, TRTEXEC_FLAGS)
    # A bare number is MiB in every TensorRT 10 trtexec; 10.0 reads an "M" suffix as bytes and then scales
    # it to MiB again (2^20 times too large), so no suffix.
    argv += [f"--memPoolSize=workspace:{plan.workspace_bytes >> 20}",
             f"--builderOptimizationLevel={plan.optimization_level}"]
    if plan.timing_cache:
        argv.append(f"--timingCacheFile={plan.timing_cache}")
    return argv


def trtexec_benchmark(plan_path: Path, spec, plan: TrtBuildPlan) -> list[str]:
    argv = ["trtexec", f"--loadEngine={plan_path}"]
    if dynamic_inputs(spec):
        argv.append(f"--shapes={trtexec_shapes(spec, plan, 'opt')}")
    return argv + ["--useCudaGraph", "--noDataTransfers", "--useSpinWait"]


def polygraphy_compare(onnx: Path, spec, plan: TrtBuildPlan) -> list[str]:
    """TensorRT (built as `plan` says) vs ONNX Runtime on random inputs at the opt shapes."""
    atol, rtol = TOLERANCES[plan.precision]
    argv = ["polygraphy", "run", str(onnx), "--trt", "--onnxrt"] + _flags(plan, POLYGRAPHY_FLAGS)
    if dynamic_inputs(spec):
        argv += ["--trt-min-shapes", *polygraphy_shapes(spec, plan, "min"),
                 "--trt-opt-shapes", *polygraphy_shapes(spec, plan, "opt"),
                 "--trt-max-shapes", *polygraphy_shapes(spec, plan, "max"),
                 "--input-shapes", *polygraphy_shapes(spec, plan, "opt")]
    return argv + ["--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]


@dataclass(frozen=True)
class CommandSet:
    submodel: str
    precision: str
    onnx: Path
    build: list[str]
    benchmark: list[str]
    compare: list[str]


def build_dir_commands(build_dir: Path, precisions=PRECISIONS, submodels=None,
                       trt_options: dict | None = None) -> list[CommandSet]:
    """Command lines for every submodel whose source ONNX exists, per precision (TensorRT sources:
    fp32 / fp16 exports, the calibrated QDQ UNet for int8 and fp16 for the rest of an int8 build).
    trt_options: as for `make engine` (trt_build_plan: refit, strongly_typed, workspace_bytes, ...); the
    lines are made from the same TrtBuildPlan TensorRTBackend.settings makes."""
    build_dir = Path(build_dir)
    info = BuildInfo.read(build_dir)
    layout = BuildLayout(build_dir)
    kind = backend_for("tensorrt")
    options = {"timing_cache": str(layout.timing_cache), **(trt_options or {})}
    result = []
    for precision in precisions:
        for name, spec in info.specs.items():
            if submodels is not None and name not in submodels:
                continue
            if kind.build_precision(precision, name) != precision:
                continue  # the rest of an int8 build is the fp16 plan: its lines are the fp16 ones
            onnx = source_onnx(build_dir, "tensorrt", precision, name)
            if not onnx.is_file():
                continue
            plan_path = trtexec_plan_path(build_dir, precision, name)
            plan = trt_build_plan(spec, info.limits, precision, options)
            result.append(CommandSet(name, precision, onnx, trtexec_build(onnx, plan_path, spec, plan),
                                     trtexec_benchmark(plan_path, spec, plan), polygraphy_compare(onnx, spec, plan)))
    return result
