"""Engine stage: OUT/onnx (+ OUT/calibration for int8) -> OUT/engines/<backend>-<precision>/<submodel>/.

    build_engines(OUT, "ort-cpu", "fp32")      # what `make engine` runs
    engine = load_engine(OUT, "ort-cpu", "fp32", "unet")
    engine.run(engine.spec.sample_inputs({"B": 1, "H": 512, "W": 512}))

Each engine folder is written in a temporary sibling and renamed into place, engine.json last
inside it, so a folder either holds a finished, recorded engine or nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from toonark.engines.metadata import (ENGINE_JSON, EngineError, check_metadata, engine_file_name, make_command,
                                      make_metadata, read_metadata)
from toonark.specs import PRECISIONS, SERVED_SUBMODELS, BuildInfo
from toonark.files import atomic_dir, read_json, sha256_onnx, write_json
from toonark.layout import BuildLayout
from toonark.engines.backends import backend_for

log = logging.getLogger(__name__)

OPTIONAL_SUBMODELS = ("vae_encoder",)  # built when its ONNX was exported (image-to-image users)


def source_onnx(build_dir: Path, backend: str, precision: str, submodel: str, fused: bool | None = None) -> Path:
    """The ONNX an engine is built from. int8: the calibrated QDQ UNet; the other submodels of an int8
    build come from fp16 on GPUs and from fp32 on the CPU (ORT's CPU fp16 kernels are few).
    Fused builds (default for ort-cuda fp16, Backend.default_fuse) start from the fp32 export:
    ORT's fusions match fp32 graphs and convert to fp16 themselves."""
    kind = backend_for(backend)
    if fused is None:
        fused = kind.default_fuse(precision)
    return kind.source_onnx(BuildLayout(build_dir), precision, submodel, fused)


def check_int8_calibration(build_dir: Path) -> dict:
    """Refuse an int8 build without a passing, current calibration; return the report."""
    layout = BuildLayout(build_dir)
    fix = f"run `make calibrate OUT={build_dir}` first"
    report_path = layout.calibration / "report.json"
    if not layout.int8_unet.is_file():
        raise EngineError(f"no INT8 UNet: {layout.int8_unet} is missing; {fix}")
    try:
        report = read_json(report_path, "calibration report", f"R{fix[1:]}.")
    except (FileNotFoundError, ValueError) as err:
        raise EngineError(str(err)) from None
    if not report.get("passed", False):
        metrics, thresholds = report.get("metrics", {}), report.get("thresholds", {})
        # `make calibrate` lists the missed thresholds in "failing" ("psnr_db 17.2 < 25"); older reports did not.
        failing = ", ".join(report.get("failing") or [f"{name} {metrics.get(name)!r} vs threshold {limit!r}"
                                                      for name, limit in thresholds.items()])
        raise EngineError(f"INT8 calibration failed its quality gate ({report_path}): {failing or 'no metrics'}. "
                          f"Advice: {report.get('advice') or 'none given'}. Adjust it and run "
                          f"`make calibrate OUT={build_dir}` again, or build PRECISION=fp16.")
    recorded = report.get("source_onnx_sha256")
    # Calibration quantizes the fp32 UNet (calibration.capture.source_unet): only its hash can match.
    from toonark.family import family_for_folder
    step_model = family_for_folder(layout.pipeline).denoiser_submodel   # "unet"; Qwen-Image: "transformer"
    unet = layout.onnx_model("fp32", step_model)
    current = sha256_onnx(unet) if unet.is_file() else None
    if recorded != current:
        now = f"onnx/fp32/{step_model} {current[:12]}" if current else "no fp32 UNet ONNX"
        raise EngineError(f"INT8 calibration is stale: {report_path} was made from UNet ONNX sha256 "
                          f"{str(recorded)[:12]}, the current export has {now}; run `make calibrate OUT={build_dir}` "
                          f"again")
    # The gate scored one INT8 model: refuse another one in its place (a re-calibration that died
    # after quantizing, a hand-copied file).
    scored, on_disk = report.get("int8_onnx_sha256"), sha256_onnx(layout.int8_unet)
    if scored != on_disk:
        raise EngineError(f"INT8 UNet {layout.int8_unet} (sha256 {on_disk[:12]}) is not the model the quality gate "
                          f"scored ({str(scored)[:12]}); run `make calibrate OUT={build_dir}` again")
    return report


def select_submodels(build_dir: Path, backend: str, precision: str, specs: dict, submodels=None) -> list[str]:
    if submodels is None:
        optional = [name for name in OPTIONAL_SUBMODELS if source_onnx(build_dir, backend, precision, name).is_file()]
        # The family's served submodels (SD: text_encoder, unet, vae_decoder; Qwen-Image: ..., transformer, ...).
        from toonark.family import family_for_folder
        served = family_for_folder(BuildLayout(build_dir).pipeline).served_submodels or SERVED_SUBMODELS
        return list(served) + optional
    chosen = list(dict.fromkeys(submodels))
    for name in chosen:
        if name not in specs:
            raise ValueError(f"unknown submodel {name!r}; choose from {', '.join(specs)}")
    return chosen


def _up_to_date(build_dir: Path, backend: str, precision: str, name: str, source: Path, settings: dict,
                limits, source_sha256: str | None = None) -> dict | None:
    try:
        metadata = read_metadata(build_dir, backend, precision, name)
    except (EngineError, RuntimeError):
        return None
    # The cheap comparisons first: a changed setting or limit needs no hashing to be rebuilt.
    comparable = backend_for(backend).comparable
    if (comparable(metadata.get("settings", {})) != comparable(settings)
            or metadata.get("limits") != limits.to_json()):
        return None
    try:
        check_metadata(metadata, build_dir=build_dir, backend=backend, precision=precision, submodel=name,
                       source_onnx=source, source_sha256=source_sha256)
    except (EngineError, RuntimeError):
        return None
    return metadata


def build_engines(build_dir, backend: str, precision: str, submodels=None, force: bool = False, *,
                  threads: int | None = None, device_id: int = 0, trt_options: dict | None = None,
                  fuse: bool | None = None) -> dict:
    """Build the engines of one backend and precision; return {submodel: engine.json content plus
    "status": "built" | "up to date"}.

    Engines whose engine.json still matches their source ONNX, settings and limits are kept
    ("up to date") unless `force`. threads: ORT intra-op threads recorded as the load default
    (0 = ONNX Runtime's choice). trt_options: see `trt_build_plan`. fuse: build ORT fp16 engines from
    engines.fusions.fuse_for_cuda over the fp32 export (None: on for ort-cuda fp16, engines/ort.py default_fuse);
    the fusion report (op counts) goes into engine.json["fusion"].
    """
    build_dir = Path(build_dir)
    kind = backend_for(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    info = BuildInfo.read(build_dir)
    specs = info.specs
    if fuse is None:
        fuse = kind.default_fuse(precision)
    kind.check_fuse(precision, fuse)
    names = select_submodels(build_dir, backend, precision, specs, submodels)
    kind.check_available()  # fail before any work, with the install hint
    from toonark.family import family_for_folder
    if precision == "int8" and family_for_folder(BuildLayout(build_dir).pipeline).denoiser_submodel in names:
        check_int8_calibration(build_dir)
    for name in names:
        source = source_onnx(build_dir, backend, precision, name, fused=fuse)
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the {name} engine is built from it. Run `make export "
                                    f"MODEL=<diffusers folder> OUT={build_dir}` first.")

    layout = BuildLayout(build_dir)
    results = {}
    for name in names:
        spec = specs[name]
        source = source_onnx(build_dir, backend, precision, name, fused=fuse)
        settings = kind.settings(precision, spec, info.limits, build_dir, threads=threads, device_id=device_id,
                                 trt_options=trt_options, fuse=fuse)
        final = layout.engine_dir(backend, precision) / name
        source_sha = sha256_onnx(source)  # once: the up-to-date check and engine.json both need it
        if not force and (current := _up_to_date(build_dir, backend, precision, name, source, settings, info.limits,
                                                 source_sha)):
            log.info("%s-%s/%s: up to date (%s)", backend, precision, name, final)
            results[name] = {**current, "status": "up to date"}
            continue
        started = time.perf_counter()
        with atomic_dir(final) as tmp:
            io, fusion = kind.build(source, tmp, name, settings)
            seconds = time.perf_counter() - started
            metadata = make_metadata(submodel=name, backend=backend, precision=precision, source_onnx=source,
                                     engine_dir=tmp, profile=spec.profile(info.limits), limits=info.limits,
                                     settings=settings, io=io, build_seconds=seconds, build_dir=build_dir,
                                     source_sha256=source_sha)
            if fusion is not None:
                metadata["fusion"] = fusion   # op counts before / after, fused ops (MultiHeadAttention, GroupNorm...)
            write_json(tmp / ENGINE_JSON, metadata)
        log.info("%s-%s/%s: built in %.1f s (%s)", backend, precision, name, seconds, final)
        results[name] = {**metadata, "status": "built"}
    return results


def load_engine(build_dir, backend: str, precision: str, submodel: str, *, verify: bool = True, **options):
    """Open a built engine after checking it against its engine.json and its current source ONNX.

    verify=False skips the two content hashes (engine file, source ONNX) for fast restarts of a
    trusted build; the version / GPU checks of TensorRT plans always run.
    options: ort-*: threads, cuda_graph, graph_sizes, fallback; tensorrt: device_id (default: the GPU it was
    built on; another must be the same GPU model), stream.
    """
    build_dir = Path(build_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    specs = BuildInfo.read(build_dir).specs
    if submodel not in specs:
        raise ValueError(f"unknown submodel {submodel!r}; choose from {', '.join(specs)}")
    metadata = read_metadata(build_dir, backend, precision, submodel)
    source = source_onnx(build_dir, backend, precision, submodel, fused=bool(metadata.get("fusion")))
    check_metadata(metadata, build_dir=build_dir, backend=backend, precision=precision, submodel=submodel,
                   source_onnx=source, verify_hashes=verify)
    engine_path = BuildLayout(build_dir).engine_dir(backend, precision) / submodel / engine_file_name(backend)
    return backend_for(backend).load(engine_path, specs[submodel], metadata, **options)


__all__ = ["build_engines", "load_engine", "source_onnx", "check_int8_calibration", "make_command"]
