"""The offline pipeline over a build's engines: which engines, which loop (host or device).

    pipe = load_pipeline(OUT, backend="ort-cpu", precision="fp32")
    result = pipe("a friendly dragon", seed=7)

toonark.pipeline.Text2ImagePipeline (core) takes engine objects; this module loads them for one
backend and precision and decides whether the device loop (engines/ort_loop.py) runs the request.
"""
from __future__ import annotations

from pathlib import Path

from toonark.engines.backends import backend_for
from toonark.engines.build import load_engine
from toonark.family import family_for_folder
from toonark.layout import BuildLayout
from toonark.pipeline import Text2ImagePipeline
from toonark.specs import BuildInfo


def use_device_loop(backend: str, device_loop: bool | None, scheduler) -> bool:
    """Whether load_pipeline runs the device loop. None means "where it can": on for ort-cuda unless the
    scheduler is one the step graph does not implement (e.g. solver order 3), which the host loop runs.
    An explicit True on a backend or scheduler without one raises ValueError."""
    from toonark.engines.ort_loop import check_scheduler
    if device_loop is None:
        if not backend_for(backend, strict=False).device_loop_default:
            return False
        try:
            check_scheduler(scheduler)
        except ValueError:
            return False
        return True
    if device_loop:
        if not backend_for(backend, strict=False).runs_device_loop:
            raise ValueError(f"device_loop runs ONNX Runtime engines (ort-cuda); {backend} has none")
        check_scheduler(scheduler)
    return bool(device_loop)


def load_pipeline(build_dir: Path, backend: str = "ort-cpu", precision: str | dict[str, str] = "fp32",
                  device_loop: bool | None = None, **engine_options) -> Text2ImagePipeline:
    """Tokenizer and sampler from OUT/pipeline (through the model family), engines via load_engine.
    precision may map submodels to precisions, e.g. {"unet": "int8", "text_encoder": "fp16", ...}.

    device_loop (default: on for ort-cuda): latents stay on the GPU for the whole request; the UNet writes
    into fixed buffers and a small ONNX graph does guidance + the DPM-Solver++ update there
    (toonark.engines.ort_loop). engine_options cuda_graph=True, graph_sizes={"B", "H", "W"} capture the
    UNet and the VAE decoder as CUDA graphs at those sizes (the text encoder runs without)."""
    info, layout = BuildInfo.read(build_dir), BuildLayout(build_dir)
    family = family_for_folder(layout.pipeline)
    served = family.served_submodels
    precisions = precision if isinstance(precision, dict) else dict.fromkeys(served, precision)
    missing = [name for name in served if name not in precisions]
    if missing:
        raise ValueError(f"precision mapping {precision!r} lacks {missing}; give one for each of {list(served)}")
    # Decide (and refuse) before any engine is loaded: loading is the slow part.
    scheduler = family.sampler(layout.pipeline)
    device_loop = use_device_loop(backend, device_loop, scheduler)
    graph_options = {k: engine_options.pop(k) for k in ("cuda_graph", "graph_sizes") if k in engine_options}
    engines = {name: load_engine(build_dir, backend, precisions[name], name, **engine_options,
                                 **(graph_options if name != "text_encoder" else {}))
               for name in served}
    # The VAE encoder (image input: toonark.editing) when it was built; a build without one serves text-to-image.
    encoder_precision = precisions.get("vae_encoder", precisions[served[-1]])
    if (layout.engine_dir(backend, encoder_precision) / "vae_encoder").is_dir():
        engines["vae_encoder"] = load_engine(build_dir, backend, encoder_precision, "vae_encoder", **engine_options)
    loop = None
    if device_loop:
        from toonark.engines.ort_loop import DeviceLoop
        loop = DeviceLoop({name: engines[name] for name in served}, info.dims, family)   # text-to-image only
    # The family's pipeline class (Stable Diffusion: Text2ImagePipeline; Qwen-Image: its flow-matching one).
    return family.text2image(engines, family.load_tokenizer(layout.pipeline), scheduler, info.dims, info.limits,
                             device_loop=loop)
