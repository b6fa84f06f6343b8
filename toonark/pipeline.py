"""The numpy text-to-image pipeline over built engines: the offline reference the Triton server
must match, the loop calibration captures UNet inputs from, and the loop the GPU bench times.

Each piece is a small function (tokenize, initial_latents, unet_feeds, classifier_free_guidance,
decode, to_uint8_hwc) so the Triton models call the very same code and compute exactly the same
thing; `Text2ImagePipeline` only strings them together and times them.

Torch-free at import and at run time: transformers imports torch as soon as it is imported
(transformers.utils.import_utils), so the CLIP tokenizer is rebuilt with the `tokenizers` library
from the vocab.json / merges.txt that diffusers' CLIPTokenizer reads (tests check equal ids).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from toonark import api, tiling
from toonark.specs import SD, BuildInfo, PipelineDims, ShapeLimits
from toonark.scheduler import DPMSolverMultistep
from toonark.family import FAMILIES, ModelFamily, StableDiffusion

STABLE_DIFFUSION = FAMILIES[StableDiffusion.name]

# Tokenization lives in toonark.tokenizer; re-exported here for the stages that call it as pipeline.*.
from toonark.tokenizer import ClipTokenizer, load_tokenizer, tokenize  # noqa: F401


def latent_shape(batch: int, dims: PipelineDims, height: int, width: int) -> tuple[int, int, int, int]:
    for label, value in (("height", height), ("width", width)):
        if value <= 0 or value % dims.vae_scale:
            raise ValueError(f"{label} {value} must be a positive multiple of {dims.vae_scale} (the VAE's "
                             f"pixels per latent)")
    return batch, dims.latent_channels, height // dims.vae_scale, width // dims.vae_scale


def initial_latents(seed: int, batch: int, dims: PipelineDims, height: int, width: int, *,
                    init_noise_sigma: float = 1.0) -> np.ndarray:
    """The starting noise of a request: float32 (batch, C, H/scale, W/scale) from PCG64(seed),
    times the scheduler's init_noise_sigma (1.0 for DPM-Solver++). The server and the offline
    pipeline both call this, so one seed gives one image everywhere."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative integer")
    shape = latent_shape(batch, dims, height, width)
    noise = np.random.Generator(np.random.PCG64(int(seed))).standard_normal(shape, dtype=np.float32)
    return noise * np.float32(init_noise_sigma)


def unet_feeds(latents: np.ndarray, timestep: int, text_embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """UNet inputs for classifier-free guidance (names of export/specs.py): the latents twice,
    matching text_embeddings' [uncond x B, cond x B] rows, and the timestep as float32 of shape [1]."""
    if text_embeddings.shape[0] != 2 * latents.shape[0]:
        raise ValueError(f"text embeddings have {text_embeddings.shape[0]} rows for {latents.shape[0]} latents; "
                         f"classifier-free guidance needs 2B rows ([uncond x B, cond x B])")
    return {SD.sample: np.concatenate([latents, latents]),
            SD.timestep: np.full((1,), timestep, dtype=np.float32),
            SD.encoder_hidden_states: text_embeddings}


def classifier_free_guidance(noise_pred: np.ndarray, guidance: float) -> np.ndarray:
    """uncond + guidance * (cond - uncond) over the UNet's [uncond x B, cond x B] output, in float32."""
    noise_pred = noise_pred.astype(np.float32, copy=False)
    uncond, cond = np.split(noise_pred, 2)
    return uncond + np.float32(guidance) * (cond - uncond)


def denoise_latents(scheduler, latents: np.ndarray, text_embeddings: np.ndarray, schedule, guidance: float,
                    unet: Callable[[dict[str, np.ndarray]], np.ndarray],
                    step_callback: StepCallback | None = None, edit=None) -> tuple[np.ndarray, list[float], float]:
    """The DPM-Solver++ loop with classifier-free guidance: the one loop of the offline pipeline and
    of the served `denoise` model (there `unet` is a BLS call), so both draw the same image.
    unet(feeds) returns the (2B, ...) noise prediction (a toonark.tiling.TiledUnet for large pictures).
    edit: a toonark.editing.EditPlan (image-to-image / inpainting): start step, extra UNet channels, blend.
    Returns (latents, UNet ms per step, solver ms)."""
    state = scheduler.initial_state(schedule, edit.start if edit is not None else 0)
    extra = edit.extra if edit is not None else None
    unet_ms, scheduler_ms = [], 0.0
    while not state.done:
        feeds = unet_feeds(scheduler.scale_model_input(latents, state), state.timestep, text_embeddings)
        if extra is not None:   # inpainting UNet: [latents, mask, masked-picture latents] (toonark.editing)
            from toonark.editing import unet_sample
            feeds[SD.sample] = unet_sample(feeds[SD.sample][:latents.shape[0]], extra)
        if step_callback is not None:
            step_callback(state.step_index, state.timestep, feeds, latents)
        before = time.perf_counter()
        noise_pred = unet(feeds)
        after = time.perf_counter()
        latents, state = scheduler.step(classifier_free_guidance(noise_pred, guidance), latents, state)
        if edit is not None:
            latents = edit.after_step(state.step_index, latents)
        unet_ms.append((after - before) * 1e3)
        scheduler_ms += (time.perf_counter() - after) * 1e3   # guidance combine + solver step
    return latents, unet_ms, scheduler_ms


def decode(vae_decoder, latents: np.ndarray, dims: PipelineDims, family: ModelFamily = STABLE_DIFFUSION) -> np.ndarray:
    """Latents -> float32 images (B, 3, H, W) in about [-1, 1] (vae_decoder: an engine, or a
    toonark.tiling.TiledVae around one for pictures above the profile)."""
    scaled = family.latents_to_vae(latents, dims)
    return vae_decoder.run({SD.latent_sample: scaled})[SD.image].astype(np.float32, copy=False)


def to_uint8_hwc(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8: round(clip(x / 2 + 0.5, 0, 1) * 255)."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.round(pixels * 255).astype(np.uint8).transpose(0, 2, 3, 1)


StepCallback = Callable[[int, int, dict, np.ndarray], None]


@dataclass
class Text2ImageResult:
    images: np.ndarray          # uint8 (B, H, W, 3)
    decoded: np.ndarray         # float32 (B, 3, H, W), the VAE output in [-1, 1]
    timings: dict               # milliseconds: tokenize_ms, text_encoder_ms, unet_ms (one per step), ...
    truncated: list[bool] = field(default_factory=list)   # per prompt: were tokens cut off
    timesteps: np.ndarray | None = None


class Text2ImagePipeline:
    """Prompt -> images with the engines of one build (any backend / precision).

    engines: {"text_encoder", "unet", "vae_decoder": Engine}; limits (optional): the build's
    profile limits, checked per request so a bad size fails before any engine runs.
    Classifier-free guidance always runs the text encoder and UNet at 2B (the engines' profiles
    are built for 2B), also at guidance 1.0, where the result equals the conditional prediction.
    """

    def __init__(self, engines: dict, tokenizer: ClipTokenizer, scheduler: DPMSolverMultistep, dims: PipelineDims,
                 limits: ShapeLimits | None = None, device_loop=None, family: ModelFamily = STABLE_DIFFUSION):
        missing = [name for name in family.served_submodels if name not in engines]
        if missing:
            raise ValueError(f"engines {missing} are missing; the pipeline needs {list(family.served_submodels)}")
        self.engines, self.tokenizer, self.scheduler, self.dims, self.limits = engines, tokenizer, scheduler, dims, limits
        self.family = family
        # A DeviceLoop (toonark.engines.ort_loop): the whole loop on the engines' device (ort-cuda builds).
        # Built engines and the loop come from toonark.engines.pipeline.load_pipeline.
        self.device_loop = device_loop

    def _prompts(self, prompt: str | Sequence[str], batch: int, label: str) -> list[str]:
        if isinstance(prompt, str):
            return [prompt] * batch
        prompts = list(prompt)
        if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{label} must be a string or {batch} strings (batch={batch}), got {prompt!r}")
        return prompts

    def encode_text(self, prompts: list[str], negative_prompts: list[str]) -> tuple[np.ndarray, list[bool], dict]:
        """[uncond x B, cond x B] text embeddings, per-prompt truncation, and the two timings."""
        start = time.perf_counter()
        ids, truncated = self.family.encode_prompts(self.tokenizer, prompts, negative_prompts, self.dims)
        tokenized = time.perf_counter()
        embeddings = self.engines["text_encoder"].run({SD.input_ids: ids})[SD.text_embeddings]
        encoded = time.perf_counter()
        return (embeddings.astype(np.float32, copy=False), truncated[len(prompts):],
                {"tokenize_ms": (tokenized - start) * 1e3, "text_encoder_ms": (encoded - tokenized) * 1e3})

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", seed: int = 0,
                 steps: int = 20, guidance: float = api.DEFAULT_GUIDANCE, width: int | None = None,
                 height: int | None = None,
                 batch: int = 1, step_callback: StepCallback | None = None,
                 latents: np.ndarray | None = None, edit=None, seeds: Sequence[int] | None = None,
                 tile: int | None = None, tile_overlap: int | None = None) -> Text2ImageResult:
        """Generate `batch` images. width/height default to the build's opt image size (512 without
        limits). step_callback(step_index, timestep, unet_feeds, latents) runs before each UNet call
        with its exact inputs (calibration capture). latents overrides the seeded starting noise.
        edit: a toonark.image_input.EditInput (image-to-image, inpainting with its mask), encoded by the
        vae_encoder engine; seeds: the per-image seeds of its encoder samples (default [seed]).
        Sizes above the profile run in tiles (toonark.tiling) of `tile` pixels overlapping by `tile_overlap`
        (defaults from the profile); timings["tiles"] describes the grid."""
        start = time.perf_counter()
        default_size = self.limits.opt_image if self.limits else 512
        width, height = width or default_size, height or default_size
        scale = api.offline_batch_and_guidance(batch, guidance)
        if not math.isfinite(scale):
            raise ValueError(f"guidance {guidance!r} must be a finite number ({api.DEFAULT_GUIDANCE} is SD-1.5's "
                             f"usual value)")
        low, high = api.GUIDANCE_RANGE
        if not low <= scale <= high:   # the served range (toonark.api): offline accepts what the server accepts
            raise ValueError(f"guidance {guidance!r} is out of range; use {low:g}..{high:g} "
                             f"({api.DEFAULT_GUIDANCE} is typical)")
        if self.limits is not None:
            tiling.check_size(self.limits, batch, height, width)
        prompts = self._prompts(prompt, batch, "prompt")
        negatives = self._prompts(negative_prompt, batch, "negative_prompt")
        schedule = self.scheduler.schedule(steps)
        if latents is None:
            latents = initial_latents(seed, batch, self.dims, height, width,
                                      init_noise_sigma=self.scheduler.init_noise_sigma)
        elif latents.shape != latent_shape(batch, self.dims, height, width):
            raise ValueError(f"latents of shape {latents.shape} do not fit batch={batch} {height}x{width}; expected "
                             f"{latent_shape(batch, self.dims, height, width)}")
        plan = (tiling.TilePlan.for_size(self.limits, self.dims, height, width, tile, tile_overlap)
                if self.limits is not None else None)
        tiled = plan is not None and plan.tiled

        if self.device_loop is not None and step_callback is None and edit is None and not tiled:
            return self._call_on_device(prompts, negatives, latents, schedule, scale, start)
        timings: dict = {}
        edit_plan = None
        if edit is not None:
            before = time.perf_counter()
            edit_plan = self.edit_plan(edit, schedule, list(seeds) if seeds is not None else [seed], latents)
            latents = edit_plan.latents
            timings["vae_encoder_ms"] = (time.perf_counter() - before) * 1e3
        text_embeddings, truncated, text_timings = self.encode_text(prompts, negatives)
        timings.update(text_timings)
        engine = self.engines["unet"]
        unet = lambda feeds: engine.run(feeds)[SD.noise_pred]   # noqa: E731
        if tiled:
            unet = tiling.TiledUnet(unet, plan, max_rows=2 * self.limits.max_batch)
        latents, unet_ms, scheduler_ms = denoise_latents(self.scheduler, latents, text_embeddings, schedule, scale,
                                                         unet, step_callback, edit=edit_plan)
        before = time.perf_counter()
        decoded = decode(self.vae("vae_decoder", tile, tile_overlap), latents, self.dims, self.family)
        decoded_at = time.perf_counter()
        images = to_uint8_hwc(decoded)
        timings.update(unet_ms=unet_ms, scheduler_ms=scheduler_ms, vae_decoder_ms=(decoded_at - before) * 1e3,
                       total_ms=(time.perf_counter() - start) * 1e3)
        if tiled:
            timings.update(tiles=plan.describe(self.dims.vae_scale), unet_calls_per_step=unet.calls)
        return Text2ImageResult(images=images, decoded=decoded, timings=timings, truncated=truncated,
                                timesteps=schedule.timesteps)

    def vae(self, name: str, tile: int | None = None, overlap: int | None = None):
        """The VAE engine `name` (vae_decoder / vae_encoder), tiled above the profile (toonark.tiling.TiledVae)."""
        if name not in self.engines:
            raise ValueError(f"this pipeline has no {name} engine; image input needs it: build it with "
                             f"`make engine` after `make export` (it is exported with the other submodels)")
        if self.limits is None:
            return self.engines[name]
        return tiling.TiledVae(self.engines[name].run, name, self.limits, self.dims, tile, overlap)

    def edit_plan(self, edit, schedule, seeds: list[int], noise: np.ndarray):
        """toonark.editing.EditPlan of an image-to-image / inpainting request (runs the VAE encoder)."""
        from toonark.editing import EditPlan
        encoder = self.vae("vae_encoder")
        return EditPlan.build(edit, lambda image: encoder.run({SD.image: image})[SD.latent_parameters], schedule,
                              seeds, noise, self.dims, self.dims.unet_channels, self.scheduler.init_noise_sigma)

    def generate(self, policy=None, **request) -> Text2ImageResult:
        """A served request, offline: the ensemble's inputs as keywords (prompt=<subject>, negative_prompt,
        seed, steps, preset, guidance, width, height, num_images; format / quality are accepted and only
        matter to the server's encoder), resolved by toonark.api.resolve_request with the prompt policy
        (template, negative prompt, presets, safety check), so it accepts and refuses exactly what the
        server does (api.RequestError) and draws the same pixels."""
        if self.limits is None:
            raise ValueError("generate needs the build's limits (load the pipeline with "
                             "toonark.engines.pipeline.load_pipeline)")
        if policy is None:
            from toonark.prompts import PromptPolicy
            policy = PromptPolicy.load()
        resolved = api.resolve_request(BuildInfo(self.dims, self.limits), policy, **request)
        resolved.input_ids(self.tokenizer, self.family, self.dims)   # refuses a prompt past the text window
        latents = None
        if resolved.image_seeds:   # NUM_IMAGES: image i from seed SEED + i alone, as the served denoise draws it
            latents = np.concatenate([initial_latents(s, 1, self.dims, resolved.height, resolved.width,
                                                      init_noise_sigma=self.scheduler.init_noise_sigma)
                                      for s in resolved.image_seeds])
        return self(list(resolved.prompts), list(resolved.negatives), seed=resolved.seed, steps=resolved.steps,
                    guidance=resolved.guidance, width=resolved.width, height=resolved.height, batch=resolved.batch,
                    latents=latents, edit=resolved.edit, seeds=resolved.seeds)

    def _call_on_device(self, prompts: list[str], negatives: list[str], latents: np.ndarray, schedule, guidance: float,
                        start: float) -> Text2ImageResult:
        """The same request on the device loop: token ids and the starting noise go up once, the image
        comes back once; per step only the timestep and six solver coefficients cross."""
        before = time.perf_counter()
        ids, truncated = self.family.encode_prompts(self.tokenizer, prompts, negatives, self.dims)
        timings = {"tokenize_ms": (time.perf_counter() - before) * 1e3}
        config = self.scheduler.config
        decoded = self.device_loop.image(ids, latents, schedule, guidance, solver_order=config.solver_order,
                                         prediction_type=config.prediction_type, timings=timings)
        images = to_uint8_hwc(decoded)
        timings.update(total_ms=(time.perf_counter() - start) * 1e3, device_loop=True)
        return Text2ImageResult(images=images, decoded=decoded, timings=timings, truncated=truncated[len(prompts):],
                                timesteps=schedule.timesteps)
