"""Capture the UNet's real inputs at every sampler step, for per-timestep INT8 calibration.

The TensorRT diffusion demo calibrates its INT8 UNet on the inputs the UNet actually sees while
sampling - every timestep of a full DPM-Solver++ run with classifier-free guidance - because the
activation ranges change a lot between t=999 and t=1. This does the same with toonark's own
sampler (toonark.pipeline, the served default: 20 steps, CFG) on the fp32 ORT CPU engines:
`step_callback` hands over the UNet feeds of each step, and each step is written at once to its
own shard

    OUT/calibration/capture/shards/p<prompt>_s<step>.npz   {sample, timestep, encoder_hidden_states}

so memory stays at one step's inputs however many prompts and steps are captured. The folder is
written in a temporary sibling and renamed into place with manifest.json last; the manifest's
`key` hashes the source UNet ONNX (sha256_onnx), every capture setting, the prompts, seeds and
negative prompt, the scheduler config and the fp32 text encoder ONNX, so a re-export or a changed
option makes the old capture (and the INT8 model made from it) stale.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toonark.api import DEFAULT_GUIDANCE
from toonark.calibration.prompts import Prompt, prompt_set
from toonark.files import atomic_dir, read_json, sha256_onnx, write_json
from toonark.layout import BuildLayout

MANIFEST = "manifest.json"


def _served_steps() -> int:
    from toonark.prompts import PromptPolicy
    return PromptPolicy.load().steps_for()


# What a request without STEPS / GUIDANCE gets served with: the policy's default preset, the API's default.
SERVED_STEPS = _served_steps()
SERVED_GUIDANCE = DEFAULT_GUIDANCE


@dataclass(frozen=True)
class CaptureConfig:
    prompts: int = 8            # calibration prompts (the first N of the calibration part)
    size: int = 128             # image size in pixels (square)
    steps: int = SERVED_STEPS
    guidance: float = SERVED_GUIDANCE
    backend: str = "ort-cpu"
    precision: str = "fp32"     # engines the sampler runs on

    def __post_init__(self):
        if self.prompts < 1:
            raise ValueError(f"--calib-prompts {self.prompts} must be >= 1")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1 (the served default is {SERVED_STEPS})")
        if self.guidance <= 1.0:
            raise ValueError(f"--guidance {self.guidance} must be > 1: calibration needs the CFG batch "
                             f"(cond + uncond) the served UNet sees")

    def to_json(self) -> dict:
        return asdict(self)


def capture_dir(build_dir: Path) -> Path:
    return BuildLayout(build_dir).calibration / "capture"


def denoiser_submodel(build_dir: Path) -> str:
    """The submodel the sampler calls every step: the family's (SD: unet; Qwen-Image: transformer)."""
    from toonark.family import family_for_folder
    return family_for_folder(BuildLayout(build_dir).pipeline).denoiser_submodel


def source_unet(build_dir: Path) -> Path:
    """The UNet ONNX that is quantized (and whose hash keys capture, INT8 model and report); for another
    family the submodel in its place (Qwen-Image: the transformer)."""
    path = BuildLayout(build_dir).onnx_model("fp32", denoiser_submodel(build_dir))
    if not path.is_file():
        raise FileNotFoundError(f"fp32 UNet ONNX not found: {path}; run `make export MODEL=<diffusers folder> "
                                f"OUT={build_dir}` first")
    return path


def capture_key(source_sha: str, config: CaptureConfig, prompts: tuple[Prompt, ...], negative: str = "",
                scheduler: dict | None = None, text_encoder_sha: str = "") -> str:
    """Everything the captured UNet inputs depend on: the UNet ONNX, the capture settings, the
    prompts, seeds and negative prompt, the scheduler config (timesteps, sigmas) and the text
    encoder (the encoder_hidden_states)."""
    payload = json.dumps({"source_onnx_sha256": source_sha, "config": config.to_json(),
                          "prompts": [[p.text, p.seed] for p in prompts], "negative_prompt": negative,
                          "scheduler": scheduler, "text_encoder_onnx_sha256": text_encoder_sha},
                         sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


def build_capture_key(build_dir: Path, config: CaptureConfig, source_sha: str | None = None) -> str:
    """capture_key() of this build's UNet ONNX, fp32 text encoder ONNX and OUT/pipeline/scheduler."""
    from toonark.family import family_for_folder
    layout = BuildLayout(build_dir)
    text_encoder = layout.onnx_model("fp32", "text_encoder")
    if not text_encoder.is_file():
        raise FileNotFoundError(f"fp32 text encoder ONNX not found: {text_encoder}; run `make export "
                                f"MODEL=<diffusers folder> OUT={build_dir}` first")
    return capture_key(source_sha or sha256_onnx(source_unet(build_dir)), config,
                       prompt_set().take("calibration", config.prompts), prompt_set().negative,
                       family_for_folder(layout.pipeline).sampler(layout.pipeline).config.to_dict(),
                       sha256_onnx(text_encoder))


@dataclass
class Capture:
    folder: Path
    key: str
    source_onnx_sha256: str
    shards: list[Path]
    bytes: int
    max_shard_bytes: int
    seconds: float
    cached: bool

    def to_json(self) -> dict:
        return {"key": self.key, "source_onnx_sha256": self.source_onnx_sha256, "shards": len(self.shards),
                "bytes": self.bytes, "max_shard_bytes": self.max_shard_bytes, "seconds": self.seconds,
                "cached": self.cached}


def read_capture(build_dir: Path) -> Capture | None:
    """The capture on disk, or None when there is none (or it is unfinished)."""
    folder = capture_dir(build_dir)
    try:
        manifest = read_json(folder / MANIFEST, "capture manifest", "")
    except (FileNotFoundError, ValueError):
        return None
    shards = [folder / name for name in manifest["shards"]]
    if not all(p.is_file() for p in shards):
        return None
    return Capture(folder, manifest["key"], manifest["source_onnx_sha256"], shards, manifest["bytes"],
                   manifest["max_shard_bytes"], manifest["seconds"], cached=True)


def open_pipeline(build_dir: Path, backend: str, precision: str, load_pipeline=None):
    """toonark's sampler (toonark.pipeline) on the built engines of one backend and precision.
    Engines are a later stage than calibration: the caller hands over their loader
    (toonark.engines.pipeline.load_pipeline; scripts/calibrate.py does)."""
    if load_pipeline is None:
        raise ValueError("calibration samples on built engines: pass load_pipeline="
                         "toonark.engines.pipeline.load_pipeline (scripts/calibrate.py does)")
    return load_pipeline(build_dir, backend, precision)


def replace_unet(pipeline, unet):
    """The same pipeline (tokenizer, scheduler, text encoder, VAE) with another UNet Engine (the family's
    step submodel: Qwen-Image's transformer)."""
    return type(pipeline)({**pipeline.engines, pipeline.family.denoiser_submodel: unet}, pipeline.tokenizer,
                          pipeline.scheduler,
                          pipeline.dims, pipeline.limits, family=pipeline.family)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)


def capture(build_dir: Path, config: CaptureConfig = CaptureConfig(), *, force: bool = False,
            progress: bool = True, load_pipeline=None) -> Capture:
    """Run the sampler over the first `config.prompts` calibration prompts and write one shard per
    step and prompt. An existing capture with the same key is reused unless `force`."""
    build_dir = Path(build_dir)
    source_sha = sha256_onnx(source_unet(build_dir))
    prompts = prompt_set().take("calibration", config.prompts)
    key = build_capture_key(build_dir, config, source_sha)
    existing = read_capture(build_dir)
    if existing is not None and existing.key == key and not force:
        return existing

    pipeline = open_pipeline(build_dir, config.backend, config.precision, load_pipeline)
    negative = prompt_set().negative
    started = time.perf_counter()
    names, sizes = [], []
    with atomic_dir(capture_dir(build_dir)) as folder:
        (folder / "shards").mkdir()
        bar = _progress(len(prompts) * config.steps, "capture UNet inputs", progress)
        for index, prompt in enumerate(prompts):
            def save_step(step_index, timestep, unet_feeds, latents, _index=index):
                # Written and dropped at once: nothing of a step outlives this call.
                name = f"shards/p{_index:04d}_s{step_index:03d}.npz"
                with open(folder / name, "wb") as handle:
                    # Floats as float32; integer inputs (Qwen-Image's text mask) keep their declared dtype.
                    np.savez(handle, **{k: np.asarray(v, dtype=np.float32 if np.issubdtype(np.asarray(v).dtype,
                                                                                          np.floating) else None)
                                        for k, v in unet_feeds.items()})
                names.append(name)
                sizes.append((folder / name).stat().st_size)
                bar.update(1)

            pipeline(prompt.text, negative_prompt=negative, seed=prompt.seed, steps=config.steps,
                     guidance=config.guidance, width=config.size, height=config.size, step_callback=save_step)
            expected = (index + 1) * config.steps
            if len(names) != expected:
                raise RuntimeError(f"the sampler called step_callback {len(names) - index * config.steps} times "
                                   f"for {config.steps} steps (prompt {index}); toonark.pipeline must call it once "
                                   f"per UNet call")
        bar.close()
        seconds = round(time.perf_counter() - started, 2)
        write_json(folder / MANIFEST, {"key": key, "source_onnx_sha256": source_sha, "config": config.to_json(),
                                       "prompts": [p.text for p in prompts], "seeds": [p.seed for p in prompts],
                                       "shards": names, "bytes": sum(sizes), "max_shard_bytes": max(sizes),
                                       "seconds": seconds})
    folder = capture_dir(build_dir)
    return Capture(folder, key, source_sha, [folder / n for n in names], sum(sizes), max(sizes), seconds,
                   cached=False)
