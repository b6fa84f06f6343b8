"""Generate the Triton model repository for a build folder: `write_repo(OUT)` -> OUT/triton_model_repo.

    toonark (ensemble)  PROMPT, NEGATIVE_PROMPT?, SEED?, STEPS?, GUIDANCE?, WIDTH?, HEIGHT?, FORMAT?, NUM_IMAGES?,
                        QUALITY? -> IMAGE [, NSFW when the build has a safety checker]
      preprocess    (python)  kid template + safety + CLIP tokenizer -> input_ids (2B, L), uncond first;
                              resolves the defaults of every optional input (the one place they live);
                              the prompt embeddings from toonark's prompt-embedding cache
                              (toonark.embedding_cache), calling `text_encoder` by BLS on a miss
      text_encoder  (engine)  input_ids -> last_hidden_state                            (BLS only)
      denoise       (python)  DPM-Solver++ 2M with classifier-free guidance; calls `unet` by BLS each step;
                              returns the VAE decoder's input (the model family's latents_to_vae: the
                              one place the scaling factor is applied)
      unet          (engine)  sample, timestep, encoder_hidden_states -> out_sample     (BLS only)
      vae_decoder   (engine)  latent_sample -> sample
      safety_checker (python) only when OUT/safety_checker/ exists (export/safety_checker.py): CLIP safety
                              checker on the decoded images; flagged ones become white, NSFW flags them
      postprocess   (python)  sample (B, 3, H, W) in [-1, 1] -> one PNG / WebP per image (WebP at QUALITY)

Every Python model reports toonark_* Prometheus metrics (triton_model_repo/metrics.py).

Every config.pbtxt is written here: the ensemble I/O comes from toonark.api's ENSEMBLE_INPUTS /
ENSEMBLE_OUTPUTS (the served API, declared once), every submodel I/O block from the specs (toonark.specs). Triton 2.51 ensembles
accept `optional: true` inputs (checked on the bundled server) and hand "absent" on to the step that
declares the same input optional, so `preprocess` declares them optional and fills in the defaults.

Layouts (same generator):
  python            engines run in a Python-backend ONNX Runtime runner (onnx_runner/1/model.py copied
                    into each engine model); what the pip-bundled CPU server runs.
  onnxruntime_onnx  platform onnxruntime_onnx + 1/model.onnx (NGC tritonserver images).
  tensorrt_plan     platform tensorrt_plan + 1/model.plan, KIND_GPU (NGC images with the same TensorRT).

Scalars: Triton has no 0-d tensors, so the spec declares the UNet's `timestep` with shape [1] and
export gives the ONNX that input shape; the native onnxruntime_onnx / tensorrt_plan backends feed it as is.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from toonark import triton_model_repo
# The served API (ensemble I/O, resolved tensors, defaults) is declared in toonark/api.py; re-exported here
# for the generator's readers.
from toonark.api import (ENSEMBLE, ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, NSFW_OUTPUT, RESOLVED,  # noqa: F401
                         DENOISE_INPUTS, POSTPROCESS_INPUTS, Port, config_defaults)
from toonark.embedding_cache import DEFAULT_MAX_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from toonark.engines.backends import backend_for
from toonark.files import atomic_dir
from toonark.layout import BuildLayout
from toonark.specs import SERVED_SUBMODELS, BuildInfo, SubmodelSpec, TensorSpec

LAYOUTS = ("python", "onnxruntime_onnx", "tensorrt_plan")
# The model folders Triton loads (thin model.py files) live in the triton_model_repo package.
SOURCE_DIR = Path(triton_model_repo.__file__).resolve().parent


_TRITON_TYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
                 "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def triton_type(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _TRITON_TYPES:
        raise ValueError(f"no Triton type for numpy dtype {name!r}; extend _TRITON_TYPES in {__file__}")
    return _TRITON_TYPES[name]


def io_precision(precision: str) -> str:
    """Float dtype at the engine boundary: fp16 engines take and return fp16, int8/fp32 engines fp32."""
    return "fp16" if precision == "fp16" else "fp32"


def spec_port(tensor: TensorSpec, precision: str, name: str | None = None, dtype=None) -> Port:
    """A spec tensor as a Triton I/O entry, with the spec's dims (the UNet's timestep is (1,) in the spec:
    Triton has no 0-d tensors)."""
    dims = tuple(tensor.triton_dims())
    dtype = dtype or tensor.numpy_dtype(io_precision(precision))
    return Port(name or tensor.name, triton_type(dtype), dims)


def serving_defaults(info: BuildInfo) -> dict[str, str]:
    """Defaults of the optional ensemble inputs (toonark.api.config_defaults; strings: Triton config parameters
    are strings). Steps, the template and the negative prompt come from toonark.prompts' policy at serve time."""
    return config_defaults(info)


# --- config.pbtxt text ------------------------------------------------------------------------

def _quote(value: str) -> str:
    return json.dumps(str(value))  # pbtxt string literals accept JSON escapes for these characters


def _io_block(kind: str, ports) -> str:
    rows = []
    for port in ports:
        dims = ", ".join(str(d) for d in port.dims)
        extra = " optional: true" if port.optional else ""
        if port.reshape is not None:
            extra += f" reshape: {{ shape: [ {', '.join(str(d) for d in port.reshape)} ] }}"
        rows.append(f'  {{ name: {_quote(port.name)} data_type: TYPE_{port.triton_type} dims: [ {dims} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}\n"
                   for k, v in sorted(params.items()))


@dataclass(frozen=True)
class QueuePolicy:
    """Back-pressure of every non-ensemble model: at most `max_queue_size` requests wait for an
    instance; more are rejected at once (HTTP 503 / gRPC UNAVAILABLE "Exceeds maximum queue size"),
    and one that waited longer than `timeout_s` (0: no limit) is rejected with "Request timeout expired".
    Triton 2.51 accepts `dynamic_batching { default_queue_policy }` on max_batch_size 0 models (checked
    on the bundled server: nothing is batched, the queue limits apply); ensembles have no queue of
    their own, so the limit bites at the slowest step (denoise)."""
    max_queue_size: int = 16
    timeout_s: float = 0.0

    def __post_init__(self):
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if not self.timeout_s >= 0:
            raise ValueError(f"queue timeout must be >= 0 seconds, got {self.timeout_s}")

    def config_text(self) -> str:
        return (f"dynamic_batching {{ default_queue_policy {{ timeout_action: REJECT "
                f"default_timeout_microseconds: {int(round(self.timeout_s * 1e6))} "
                f"max_queue_size: {self.max_queue_size} }} }}\n")


def model_config(name: str, inputs, outputs, *, backend: str | None = None, platform: str | None = None,
                 kind: str = "KIND_CPU", count: int = 1, params: dict[str, str] | None = None,
                 default_model_filename: str | None = None) -> str:
    head = f"name: {_quote(name)}\n"
    head += f"backend: {_quote(backend)}\n" if backend else f"platform: {_quote(platform)}\n"
    if default_model_filename:
        head += f"default_model_filename: {_quote(default_model_filename)}\n"
    head += "max_batch_size: 0\n"
    text = head + _io_block("input", inputs) + _io_block("output", outputs)
    text += f"instance_group [ {{ kind: {kind} count: {count} }} ]\n"
    return text + _parameters(params or {})


def ensemble_config(steps: list[tuple[str, dict[str, str], dict[str, str]]], outputs=ENSEMBLE_OUTPUTS) -> str:
    """steps: (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    text = (f"name: {_quote(ENSEMBLE)}\nplatform: \"ensemble\"\nmax_batch_size: 0\n"
            + _io_block("input", ENSEMBLE_INPUTS) + _io_block("output", outputs))
    rows = []
    for model, inputs, outputs in steps:
        maps = "".join(f" input_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in inputs.items())
        maps += "".join(f" output_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in outputs.items())
        rows.append(f"  {{ model_name: {_quote(model)} model_version: -1{maps} }}")
    return text + "ensemble_scheduling { step [\n" + ",\n".join(rows) + "\n] }\n"


def _engine_io(spec: SubmodelSpec, precision: str, metadata: dict | None):
    """Spec I/O with dtypes from engine.json when it records them (the engine's real boundary)."""
    io = (metadata or {}).get("io", {})

    def port(tensor: TensorSpec, side: str) -> Port:
        recorded = io.get(side, {}).get(tensor.name, {}).get("dtype")
        return spec_port(tensor, precision, dtype=np.dtype(recorded) if recorded else None)

    return [port(t, "inputs") for t in spec.inputs], [port(t, "outputs") for t in spec.outputs]


def repo_configs(info: BuildInfo, *, backend: str = "ort-cpu", precision: str = "fp32", layout: str = "python",
                 metadata: dict[str, dict] | None = None, intra_op_threads: int = 0,
                 queue: QueuePolicy | None = None, safety_checker: dict | None = None,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                 instances: dict[str, int] | None = None) -> dict[str, str]:
    """{model name: config.pbtxt text} for every model of the repository (no files touched).
    queue: the back-pressure limits of every non-ensemble model (default QueuePolicy()).
    prompt_cache_bytes: bound of the prompt-embedding cache of each preprocess instance (0: off).
    instances: {model: instance count} where it is not 1 (with_instances)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    # Which layout serves which engine files: the native TensorRT backend takes plans, the others ONNX.
    serves_plans = backend_for(backend, strict=False).engine_file.endswith(".plan")
    if layout == "tensorrt_plan" and not serves_plans:
        raise ValueError(f"layout tensorrt_plan serves TensorRT plans, but backend is {backend!r}; "
                         f"use --backend tensorrt (build it with `make engine BACKEND=tensorrt`)")
    if layout != "tensorrt_plan" and serves_plans:
        raise ValueError(f"backend tensorrt builds .plan files; serve them with --layout tensorrt_plan, not {layout!r}")
    specs = info.specs
    metadata = metadata or {}
    te, unet, vae = (specs[n] for n in SERVED_SUBMODELS)
    engine_kind = backend_for(backend, strict=False).triton_kind
    configs = {}
    for spec in (te, unet, vae):
        inputs, outputs = _engine_io(spec, precision, metadata.get(spec.name))
        # No Triton response cache anywhere: Triton 2.51 stores a failed response and replays it as an empty
        # success until restart (recipe gotcha 6), so a text encoder killed mid-request poisoned its prompt
        # (issue 18). The prompt-embedding cache is toonark's own, in preprocess (PromptEncoder), in every layout.
        if layout == "python":
            # ort-cuda: a KIND_GPU instance (Triton pins it to the GPU); the UNet and the VAE decoder replay a
            # CUDA graph at the opt size (batch opt_batch, opt_image square), other sizes run a dynamic session.
            graph = backend_for(backend, strict=False).serves_cuda_graphs and spec.name != te.name
            configs[spec.name] = model_config(
                spec.name, inputs, outputs, backend="python", kind=engine_kind,
                # No execution provider here: OrtEngine takes its providers from engine.json.
                params={"engine_file": "model.onnx", "intra_op_threads": str(intra_op_threads),
                        **({"cuda_graph_sizes": f"B={info.limits.opt_batch},H={info.limits.opt_image},"
                                                f"W={info.limits.opt_image}"} if graph else {})})
        elif layout == "onnxruntime_onnx":
            configs[spec.name] = model_config(spec.name, inputs, outputs, platform="onnxruntime_onnx",
                                              kind=engine_kind, default_model_filename="model.onnx")
        else:
            configs[spec.name] = model_config(spec.name, inputs, outputs, platform="tensorrt_plan",
                                              kind="KIND_GPU", default_model_filename="model.plan")
    te_in, te_out = _engine_io(te, precision, metadata.get(te.name))
    unet_in, _ = _engine_io(unet, precision, metadata.get(unet.name))
    vae_in, vae_out = _engine_io(vae, precision, metadata.get(vae.name))
    hidden = te_out[0]
    # Every preprocess input is optional, PROMPT too (the ensemble requires it): a request without PROMPT
    # then gets preprocess' clear refusal instead of Triton's "unexpected deadlock" of the ensemble.
    # preprocess hands the prompt embeddings on (its cache, or text_encoder by BLS): the same in every layout,
    # since only a Python model can own a cache that never stores a failure (text_encoder is native in
    # the onnxruntime_onnx / tensorrt_plan layouts).
    configs["preprocess"] = model_config("preprocess", [replace(p, optional=True) for p in ENSEMBLE_INPUTS],
                                         [hidden, *RESOLVED], backend="python",
                                         params={**serving_defaults(info), "text_encoder_model": te.name,
                                                 "text_encoder_input": te_in[0].name,
                                                 "text_encoder_input_type": "TYPE_" + te_in[0].triton_type,
                                                 "text_hidden_name": hidden.name,
                                                 "prompt_cache_bytes": str(int(prompt_cache_bytes))})
    configs["denoise"] = model_config(
        "denoise", [Port(hidden.name, hidden.triton_type, hidden.dims), *DENOISE_INPUTS], [vae_in[0]],
        backend="python",
        params={"unet_model": unet.name, "unet_output": unet.output_names[0],
                "unet_float_type": "TYPE_" + unet_in[0].triton_type, "text_hidden_name": hidden.name,
                "latent_name": vae_in[0].name})
    configs["postprocess"] = model_config("postprocess", [vae_out[0], *POSTPROCESS_INPUTS], list(ENSEMBLE_OUTPUTS),
                                          backend="python")
    resolved = {p.name: p.name for p in RESOLVED}
    steps = [
        ("preprocess", {p.name: p.name for p in ENSEMBLE_INPUTS},
         {hidden.name: "text_embeddings", **resolved}),
        ("denoise", {hidden.name: "text_embeddings", **{p.name: p.name for p in DENOISE_INPUTS}},
         {vae_in[0].name: "latents"}),
        (vae.name, {vae_in[0].name: "latents"}, {vae_out[0].name: "decoded"}),
    ]
    outputs = ENSEMBLE_OUTPUTS
    images = "decoded"
    if safety_checker is not None:
        # Between the VAE and the encoder: flagged images leave as white ones, NSFW says which.
        thresholds = safety_checker["thresholds"]
        from toonark.export.safety_checker import Thresholds
        checked = Port("checked", vae_out[0].triton_type, vae_out[0].dims)
        configs["safety_checker"] = model_config(
            "safety_checker", [replace(vae_out[0], name="images")], [checked, NSFW_OUTPUT], backend="python",
            params={"intra_op_threads": str(intra_op_threads),
                    "concept_thresholds": Thresholds.format(thresholds["concept"]),
                    "special_care_thresholds": Thresholds.format(thresholds["special_care"]),
                    "safety_adjustment": str(float(thresholds.get("adjustment", 0.0)))})
        steps.append(("safety_checker", {"images": "decoded"}, {"checked": "checked", NSFW_OUTPUT.name: NSFW_OUTPUT.name}))
        outputs, images = ENSEMBLE_OUTPUTS + (NSFW_OUTPUT,), "checked"
    steps.append(("postprocess", {vae_out[0].name: images, **{p.name: p.name for p in POSTPROCESS_INPUTS}},
                  {p.name: p.name for p in ENSEMBLE_OUTPUTS}))
    configs[ENSEMBLE] = ensemble_config(steps, outputs)
    policy = (queue or QueuePolicy()).config_text()
    for name in configs:
        if name != ENSEMBLE:
            configs[name] += policy
    return with_instances(configs, instances or {})


def python_model_names(layout: str) -> list[str]:
    """The models that run as Python-backend processes in `layout` (what the watchdog reloads)."""
    return ["preprocess", "denoise", "postprocess"] + (list(SERVED_SUBMODELS) if layout == "python" else [])


def with_instances(configs: dict[str, str], instances: dict[str, int]) -> dict[str, str]:
    """More than one instance (process) of a model, where memory allows (issue 18): a killed process then
    costs less, since the other instance keeps serving while the watchdog reloads it (tiny build, 8 clients:
    p99 while a process is down 2.3-3.2 s with 2 instances of each Python model, 3-12 s with one)."""
    out = dict(configs)
    for model, count in instances.items():
        if model not in out or model == ENSEMBLE:
            raise ValueError(f"instances: no model {model!r} to scale; choose from "
                             f"{', '.join(m for m in out if m != ENSEMBLE)}")
        if count < 1:
            raise ValueError(f"instances: {model} needs at least 1 instance, got {count}")
        out[model] = out[model].replace("count: 1 }", f"count: {int(count)} }}", 1)
    return out


# --- files ------------------------------------------------------------------------------------

def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # other filesystem, or links not allowed
        shutil.copy2(source, target)


def _copy_tree(source: Path, target: Path, what: str, fix: str) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"{what} not found: {source}. {fix}")
    shutil.copytree(source, target)


def write_repo(build_dir: Path, backend: str = "ort-cpu", precision: str = "fp32", layout: str = "python", *,
               out: Path | None = None, intra_op_threads: int = 0, queue: QueuePolicy | None = None,
               verify_engines: bool = True, safety_checker: bool | None = None,
               prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, instances: dict[str, int] | None = None) -> Path:
    """Write the Triton model repository for the engines of `build_dir` (default OUT/triton_model_repo).

    The folder is replaced atomically; engine files are hard-linked (copied across filesystems)
    into <model>/1/, model.py sources are copied from this source tree, and the tokenizer,
    scheduler config and toonark.json go into <model>/1/pipeline/ of the models that read them.
    queue: back-pressure limits (QueuePolicy). verify_engines: refuse (EngineError naming the fix) an
    engine that no longer matches its engine.json (corrupt) or its source ONNX (stale), as load_engine does.
    """
    build_dir = Path(build_dir)
    paths = BuildLayout(build_dir)
    info = BuildInfo.read(build_dir)
    fix_export = f"Run `make export MODEL=<diffusers folder> OUT={build_dir}` first."
    engine_root = paths.engine_dir(backend, precision)
    engine_backend = backend_for(backend)
    engine_name = engine_backend.engine_file
    metadata = {}
    for name in SERVED_SUBMODELS:
        engine = engine_root / name / engine_name
        if not engine.is_file():
            raise FileNotFoundError(f"no {backend} {precision} engine for {name}: {engine} is missing. Build it with "
                                    f"`make engine OUT={build_dir} BACKEND={backend} PRECISION={precision}`.")
        if verify_engines:
            from toonark.engines.build import source_onnx
            from toonark.engines.metadata import check_metadata, read_metadata
            metadata[name] = read_metadata(build_dir, backend, precision, name)
            check_metadata(metadata[name], build_dir=build_dir, backend=backend, precision=precision, submodel=name,
                           source_onnx=source_onnx(build_dir, backend, precision, name,
                                                   fused=bool(metadata[name].get("fusion"))))
            continue
        meta_path = engine_root / name / "engine.json"
        metadata[name] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    from toonark.export.safety_checker import METADATA_FILE, checker_dir
    checker = checker_dir(build_dir)
    checker_meta = None
    if safety_checker is not False and (checker / "model.onnx").is_file():
        checker_meta = json.loads((checker / METADATA_FILE).read_text())
    elif safety_checker is True:
        raise FileNotFoundError(f"no safety checker in {checker}: export one from a pipeline folder that has "
                                f"safety_checker/ (toonark.export.safety_checker.export_safety_checker)")
    configs = repo_configs(info, backend=backend, precision=precision, layout=layout, metadata=metadata,
                           intra_op_threads=intra_op_threads, queue=queue, safety_checker=checker_meta,
                           prompt_cache_bytes=prompt_cache_bytes, instances=instances)
    target = Path(out) if out else paths.triton_repo
    with atomic_dir(target) as tmp:
        for name, text in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
        for name in SERVED_SUBMODELS:
            version = tmp / name / "1"
            metadata_file = engine_root / name / "engine.json"
            for source in engine_backend.engine_files(engine_root / name) + ([metadata_file] if metadata_file.is_file() else []):
                _link_or_copy(source, version / source.name)
            if layout == "python":
                shutil.copy2(SOURCE_DIR / "onnx_runner" / "1" / "model.py", version / "model.py")
        for name in ("preprocess", "denoise", "postprocess"):
            shutil.copy2(SOURCE_DIR / name / "1" / "model.py", tmp / name / "1" / "model.py")
        if checker_meta is not None:   # safety_checker: None = when the build has one, True = required, False = off
            _link_or_copy(checker / "model.onnx", tmp / "safety_checker" / "1" / "model.onnx")
            shutil.copy2(checker / METADATA_FILE, tmp / "safety_checker" / "1" / METADATA_FILE)
            shutil.copy2(SOURCE_DIR / "safety_checker" / "1" / "model.py", tmp / "safety_checker" / "1" / "model.py")
        # What each Python model reads at initialize: <model>/1/pipeline/ is a BuildLayout pipeline folder,
        # so BuildInfo.read(<model>/1) works there exactly as on the build folder.
        parts = {"preprocess": ("tokenizer",), "denoise": ("scheduler",), "postprocess": ()}
        if layout == "python":
            parts.update({name: () for name in SERVED_SUBMODELS})
        for name, folders in parts.items():
            pipeline = tmp / name / "1" / "pipeline"
            pipeline.mkdir()
            shutil.copy2(paths.pipeline_info, pipeline / paths.pipeline_info.name)
            if (paths.pipeline / "model_index.json").is_file():   # the model family (toonark.family_for_folder)
                shutil.copy2(paths.pipeline / "model_index.json", pipeline / "model_index.json")
            for part in folders:
                _copy_tree(paths.pipeline / part, pipeline / part, f"pipeline {part}", fix_export)
        (tmp / "README.txt").write_text(
            f"Generated by toonark.serving.repository.write_repo from {build_dir.resolve()}\n"
            f"backend {backend}, precision {precision}, layout {layout}. Do not edit: regenerate with "
            f"`make repo OUT={build_dir} BACKEND={backend} PRECISION={precision}`.\n")
    return target
