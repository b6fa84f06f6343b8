"""Export stage: a diffusers text-to-image folder -> OUT/onnx/<precision>/<submodel>/model.onnx,
a parity report per precision, and OUT/pipeline/ (tokenizer, scheduler, toonark.json).

Why these tools:
- fp32 graphs come from optimum's ONNX exporter (`onnx_export_from_model`, the function
  `main_export` delegates to once it has loaded the model): it knows how to wrap diffusers'
  UNet / VAE / CLIP for tracing (opset 18, TorchScript exporter) and validates the result against
  PyTorch. We load the pipeline ourselves so only safetensors are ever read, and pass
  `custom_onnx_configs` built from the spec so the ONNX axis names are the spec's ("2B", "H/8").
  Its `--optimize` is broken for diffusion pipelines (see /work/shared/optimum-notes.md), so
  cleanup is our own pass list (export/graph.py: graphsurgeon, polygraphy, onnx.checker).
- fp16 graphs are converted from the cleaned fp32 graph with onnxruntime.transformers' float16
  converter, because optimum exports fp16 only on CUDA. `keep_io_types=True` keeps float32 I/O,
  so every precision has the same I/O and the spec's "float" means float32 in the ONNX; the
  casts to fp16 sit inside the graph.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from toonark.family import family_for_folder
from toonark.specs import BuildInfo, PipelineDims, ShapeLimits, SubmodelSpec
from toonark.files import atomic_dir, read_json, sha256_file, sha256_tree, write_json
from toonark.layout import BuildLayout

log = logging.getLogger(__name__)

# Bump when a change here changes the exported files; it is part of the up-to-date key.
EXPORT_CODE_VERSION = 2   # 2: UNet timestep input of shape [1]
OPSET = 18
EXPORT_PRECISIONS = ("fp32", "fp16")
COMPONENTS = ("text_encoder", "unet", "vae")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# Components hashed into the up-to-date key: the only files the ONNX graphs depend on.
HASHED_SUFFIXES = (".json", ".safetensors")

# fp16 conversion keeps only onnxruntime's DEFAULT_OP_BLOCK_LIST in fp32. Also blocking the
# normalisation ops (InstanceNormalization = exported GroupNorm, LayerNormalization, Softmax, ...)
# gave no better parity (tiny pipeline, ORT CPU: UNet max_rel 4.5e-3 either way, VAE decoder 1.3e-3
# without vs 3.0e-3 with) because ORT's CPU EP computes every fp16 Conv/MatMul/norm in fp32 behind
# inserted Casts; only fp16 *storage* rounding is measured there. Revisit on a GPU parity run.
FP16_KEEP_FP32_OPS: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportKey:
    """Everything that changes an exported precision folder; stored in export.json."""
    source_sha256: str
    precision: str
    opset: int
    limits: dict
    submodels: tuple[str, ...]
    code_version: int
    tool_versions: dict

    def to_json(self) -> dict:
        return {**self.__dict__, "submodels": list(self.submodels)}


def check_model_folder(model_dir: Path, components: tuple[str, ...] = COMPONENTS) -> PipelineDims:
    """Read the pipeline's sizes; refuse folders whose weights exist only as pickles."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}. Pass a diffusers folder saved by "
                                f"save_pretrained (make tiny MODEL={model_dir} writes a random-weight one)")
    dims = family_for_folder(model_dir).dims_from_folder(model_dir)
    for component in components:
        folder = model_dir / component
        if any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{pickles[0]} is a pickle checkpoint; only safetensors weights are read "
                             f"(pickles can run code on load). Convert it with "
                             f"`save_pretrained(..., safe_serialization=True)`")
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; save the pipeline with "
                                f"`save_pretrained(..., safe_serialization=True)`")
    return dims


def source_hash(model_dir: Path, components: tuple[str, ...] = COMPONENTS) -> str:
    """Hash of the configs and safetensors of the components the graphs are exported from."""
    digest = hashlib.sha256()
    for component in components:
        digest.update(component.encode())
        digest.update(sha256_tree(Path(model_dir) / component, HASHED_SUFFIXES).encode())
    return digest.hexdigest()


def tool_versions() -> dict:
    from importlib.metadata import version
    return {name: version(name) for name in ("torch", "diffusers", "transformers", "optimum-onnx", "onnx",
                                              "onnxruntime", "polygraphy", "onnx_graphsurgeon")}


def load_pipeline(model_dir: Path):
    """The diffusers pipeline in fp32 on CPU, safetensors only (use_safetensors=True)."""
    import torch
    from diffusers import DiffusionPipeline
    pipeline = DiffusionPipeline.from_pretrained(str(model_dir), use_safetensors=True, torch_dtype=torch.float32,
                                                 safety_checker=None, requires_safety_checker=False)
    for component in COMPONENTS:
        getattr(pipeline, component).eval()
    return pipeline


def spec_onnx_configs(pipeline, specs: dict[str, SubmodelSpec]) -> dict:
    """optimum OnnxConfigs whose inputs/outputs are the spec's names and axis names."""
    from optimum.exporters.onnx.model_configs import (CLIPTextOnnxConfig, UNetOnnxConfig, VaeDecoderOnnxConfig,
                                                      VaeEncoderOnnxConfig)

    def declared(tensors) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in tensors}

    class SpecText(CLIPTextOnnxConfig):
        @property
        def inputs(self):
            return declared(specs["text_encoder"].inputs)

        @property
        def outputs(self):
            # optimum's CLIP wrapper also returns pooler_output; declared here so validation
            # accepts it, then pruned by GraphPasses.select_outputs.
            batch = specs["text_encoder"].inputs[0].dynamic_axes()
            return {**declared(specs["text_encoder"].outputs), "pooler_output": batch}

    def with_spec(base, name):
        return type(f"Spec{base.__name__}", (base,), {
            "inputs": property(lambda self: declared(specs[name].inputs)),
            "outputs": property(lambda self: declared(specs[name].outputs)),
        })

    def build(cls, config, task):
        return cls(config, task=task, int_dtype="int64", float_dtype="fp32")

    return {
        "text_encoder": build(SpecText, pipeline.text_encoder.config, "feature-extraction"),
        "unet": build(with_spec(UNetOnnxConfig, "unet"), pipeline.unet.config, "semantic-segmentation"),
        "vae_encoder": build(with_spec(VaeEncoderOnnxConfig, "vae_encoder"), pipeline.vae.config, "semantic-segmentation"),
        "vae_decoder": build(with_spec(VaeDecoderOnnxConfig, "vae_decoder"), pipeline.vae.config, "semantic-segmentation"),
    }


def export_raw_fp32(pipeline, dims: PipelineDims, specs: dict[str, SubmodelSpec], out_dir: Path) -> None:
    """optimum export of all four submodels to out_dir/<submodel>/model.onnx, validated by optimum."""
    from optimum.exporters.onnx import onnx_export_from_model
    onnx_export_from_model(
        pipeline, out_dir, opset=OPSET, task="text-to-image", do_validation=True,
        custom_onnx_configs=spec_onnx_configs(pipeline, specs),
        # Dummy shapes for tracing: the text axis is fixed, so trace at the model's length.
        sequence_length=dims.text_length)


def clean_fp32(raw_path: Path, spec: SubmodelSpec, out_path: Path) -> list:
    from toonark.export.graph import GraphPasses, check_against_spec, load_model, save_model
    graph = GraphPasses(load_model(raw_path), spec.name)
    graph.select_outputs(spec.output_names).vectorize_scalar_inputs(spec).fold_constants().infer_shapes().name_io_axes(spec).check()
    check_against_spec(graph.model, spec)
    save_model(graph.model, out_path)
    return graph.history


def convert_fp16(fp32_path: Path, spec: SubmodelSpec, out_path: Path) -> list:
    """fp32 ONNX -> fp16 weights and compute, float32 I/O (keep_io_types)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from toonark.export.graph import GraphPasses, check_against_spec, load_model, model_bytes, save_model, \
        PROTOBUF_LIMIT_BYTES
    model = load_model(fp32_path)
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32_OPS),
        # The fp32 graph is already shape-inferred; onnx's in-memory inference fails past 2 GiB.
        disable_shape_infer=model_bytes(model) >= PROTOBUF_LIMIT_BYTES)
    graph = GraphPasses(converted, f"{spec.name} fp16").cleanup().name_io_axes(spec).check()
    check_against_spec(graph.model, spec)
    save_model(graph.model, out_path)
    return graph.history


def measure_parity(specs, submodels, precision_dirs: dict[str, Path], modules, limits: ShapeLimits):
    """Parity rows per precision, at the limits' opt and min sizes; the torch reference runs once."""
    from tqdm import tqdm
    from toonark.export.parity import measure, ort_session, torch_reference
    rows: dict[str, list] = {precision: [] for precision in precision_dirs}
    steps = [(name, level) for name in submodels for level in ("opt", "min")]
    for name, level in tqdm(steps, desc="parity", unit="check"):
        spec, sizes = specs[name], limits.sizes(level)
        feeds = spec.sample_inputs(sizes, "fp32", seed=0)
        reference = torch_reference(spec, modules, feeds)
        for precision, folder in precision_dirs.items():
            session = ort_session(folder / name / "model.onnx")
            rows[precision] += measure(spec, precision, level, sizes, session, feeds, reference)
            del session
    return rows


def _files_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "export.json"}


def is_up_to_date(layout: BuildLayout, precision: str, key: ExportKey) -> bool:
    report_path = layout.export_report(precision)
    if not report_path.is_file():
        return False
    try:
        report = read_json(report_path, "export report", "")
    except ValueError:
        return False
    if report.get("key") != key.to_json():
        return False
    return report.get("files") == _files_hashes(layout.onnx_dir(precision))


def write_pipeline_folder(model_dir: Path, out_dir: Path, dims: PipelineDims, limits: ShapeLimits) -> None:
    layout = BuildLayout(out_dir)
    with atomic_dir(layout.pipeline) as tmp:
        for folder in ("tokenizer", "scheduler"):
            if (model_dir / folder).is_dir():
                shutil.copytree(model_dir / folder, tmp / folder)
        if (model_dir / "model_index.json").is_file():
            shutil.copy2(model_dir / "model_index.json", tmp / "model_index.json")
        # Inside the swap: a crash never leaves a new pipeline/ beside an old (or no) toonark.json.
        write_json(tmp / layout.pipeline_info.relative_to(layout.pipeline), BuildInfo(dims, limits).to_json())


def check_profiles(specs: dict[str, SubmodelSpec], limits: ShapeLimits) -> None:
    """Every submodel's profile at the limits, before any work: e.g. an image step that is not a
    multiple of the VAE scale would otherwise surface only in parity, after the whole export."""
    for spec in specs.values():
        try:
            spec.profile(limits)
        except ValueError as err:
            raise ValueError(f"shape limits {limits.to_json()} do not fit {spec.name}: {err}; choose "
                             f"--min/--opt/--max-image and --image-step that are multiples of it") from None


def _kept_submodels(layout: BuildLayout, precision: str, key: ExportKey, specs: dict) -> tuple[list[str], dict]:
    """Submodels already in onnx/<precision>/ that a subset export leaves alone, and their export.json.
    Refuses when they were exported from another model, limits or code version (mixing them would
    build engines that disagree)."""
    folder = layout.onnx_dir(precision)
    kept = [name for name in specs if name not in key.submodels and (folder / name).is_dir()]
    if not kept:
        return [], {}
    try:
        old = read_json(layout.export_report(precision), "export report", "")
    except (FileNotFoundError, ValueError):
        old = {}
    old_key, new_key = dict(old.get("key", {})), key.to_json()
    differ = [k for k in ("source_sha256", "precision", "opset", "limits", "code_version")
              if old_key.get(k) != new_key[k]]
    if not old_key or differ:
        why = f"{', '.join(differ)} differ" if old_key else "its export.json is missing or invalid"
        raise ValueError(f"exporting only {', '.join(key.submodels)} would leave {', '.join(kept)} in {folder} "
                         f"from another export ({why}); "
                         f"export every submodel (omit the submodel selection) to replace them")
    return kept, old


def export_pipeline(model_dir, out_dir, precisions=EXPORT_PRECISIONS, limits: ShapeLimits = ShapeLimits(),
                    submodels=None, force: bool = False) -> dict:
    """Export, clean, convert and parity-check the pipeline's submodels; return the report
    {precision: export.json content}. Precisions whose key and files match are skipped."""
    from toonark.export.parity import FP16_CPU_PARITY_METHOD, format_table, raise_on_failure
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precisions = tuple(dict.fromkeys(precisions))
    for precision in precisions:
        if precision not in EXPORT_PRECISIONS:
            raise ValueError(f"precision {precision!r} cannot be exported; choose from {', '.join(EXPORT_PRECISIONS)} "
                             f"(int8 comes from `make calibrate`)")
    family = family_for_folder(model_dir)
    exporter = family_exporter(family.name)
    dims = check_model_folder(model_dir, exporter.components)
    specs = family.specs(dims)   # the family's declarations (model_index.json)
    limits = family.default_limits(limits, dims)   # e.g. Qwen-Image's text-length axis
    dims = family.build_dims(dims, limits)
    check_profiles(specs, limits)
    submodels = tuple(specs) if submodels is None else tuple(submodels)
    for name in submodels:
        if name not in specs:
            raise ValueError(f"unknown submodel {name!r}; choose from {', '.join(specs)}")
    layout = BuildLayout(out_dir)
    source = source_hash(model_dir, exporter.components)
    versions = tool_versions()
    keys = {p: ExportKey(source, p, OPSET, limits.to_json(), submodels, EXPORT_CODE_VERSION, versions)
            for p in precisions}

    report = {}
    stale = []
    for precision in precisions:
        if not force and is_up_to_date(layout, precision, keys[precision]):
            log.info("onnx/%s: up to date (%s)", precision, layout.onnx_dir(precision))
            report[precision] = read_json(layout.export_report(precision), "export report", "")
        else:
            stale.append(precision)
    # A subset export keeps the other submodels' files; decided (or refused) before any work.
    kept = {precision: _kept_submodels(layout, precision, keys[precision], specs) for precision in stale}

    if stale:
        started = time.perf_counter()
        pipeline = exporter.load(model_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Scratch space beside the outputs (same disk: SD-1.5's fp32 UNet alone is 3.4 GB).
        with tempfile.TemporaryDirectory(prefix=".export-work-", dir=out_dir) as work:
            work = Path(work)
            exporter.export_raw(pipeline, dims, specs, work / "raw", submodels, limits)
            export_seconds = time.perf_counter() - started
            staged, passes = {}, {}
            for precision in ("fp32",) + tuple(p for p in stale if p != "fp32"):
                staged[precision] = work / precision
                for name in submodels:
                    target = staged[precision] / name / "model.onnx"
                    if precision == "fp32":
                        passes[(precision, name)] = clean_fp32(work / "raw" / name / "model.onnx", specs[name], target)
                    else:
                        passes[(precision, name)] = convert_fp16(staged["fp32"] / name / "model.onnx", specs[name], target)
            modules = {c: getattr(pipeline, c) for c in exporter.components}
            rows = exporter.parity(specs, submodels, {p: staged[p] for p in stale}, modules, limits, dims)
            for precision in stale:
                log.info("%s", format_table(rows[precision]))
                raise_on_failure(rows[precision])
            for precision in stale:
                kept_names, old_report = kept[precision]
                with atomic_dir(layout.onnx_dir(precision)) as tmp:
                    for name in submodels:  # a rename: scratch space is on the same disk
                        shutil.move(staged[precision] / name, tmp / name)
                    for name in kept_names:  # hard links: the old folder stays whole until the swap
                        shutil.copytree(layout.onnx_dir(precision) / name, tmp / name, copy_function=os.link)
                    all_names = tuple(n for n in specs if n in submodels or n in kept_names)
                    key = ExportKey(**{**keys[precision].__dict__, "submodels": all_names})
                    content = {
                        "key": key.to_json(),
                        "files": _files_hashes(tmp),
                        "parity": [r for r in old_report.get("parity", []) if r.get("submodel") in kept_names]
                        + [r.to_json() for r in rows[precision]],
                        "passes": {**{n: v for n, v in old_report.get("passes", {}).items() if n in kept_names},
                                   **{name: passes[(precision, name)] for name in submodels}},
                        "optimum_export_seconds": round(export_seconds, 2),
                        "parity_method": FP16_CPU_PARITY_METHOD if precision == "fp16" else
                        "onnxruntime CPUExecutionProvider vs the PyTorch module in fp32, same inputs",
                    }
                    write_json(tmp / "export.json", content)
                report[precision] = content
                log.info("onnx/%s: wrote %s to %s", precision, ", ".join(submodels), layout.onnx_dir(precision))
    write_pipeline_folder(model_dir, out_dir, dims, limits)
    # The pipeline's safety_checker/, when it has one: OUT/safety_checker/ (torch.onnx, not optimum; see there).
    from toonark.export.safety_checker import export_safety_checker
    export_safety_checker(model_dir, out_dir, force=force)
    return report


class StableDiffusionExport:
    """How the Stable Diffusion family is exported: optimum's exporter with the spec's configs."""
    components = COMPONENTS

    def load(self, model_dir: Path):
        return load_pipeline(model_dir)

    def export_raw(self, pipeline, dims, specs, out_dir: Path, submodels, limits: ShapeLimits) -> None:
        export_raw_fp32(pipeline, dims, specs, out_dir)

    def parity(self, specs, submodels, precision_dirs, modules, limits: ShapeLimits, dims):
        return measure_parity(specs, submodels, precision_dirs, modules, limits)


def family_exporter(family_name: str):
    """The exporter object of a model family (toonark.family): {family name: exporter}."""
    from toonark.export.qwen_export import QwenImageExport
    exporters = {"stable-diffusion": StableDiffusionExport(), "qwen-image": QwenImageExport()}
    if family_name not in exporters:
        raise ValueError(f"no exporter for model family {family_name!r}; add one in export/onnx_export.py's "
                         f"family_exporter")
    return exporters[family_name]
