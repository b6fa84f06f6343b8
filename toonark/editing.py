"""Image-to-image and inpainting around the one sampler, as diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline compute them (tests/test_editing.py matches both on the tiny pipeline).

    plan = EditPlan.build(edit, encode, scheduler, schedule, seeds, batch, dims, family, unet_in_channels)
    latents = plan.latents                        # the noised encoded picture at plan.start (or pure noise)
    ... sampler from plan.start; after each step: latents = plan.after_step(step_index, latents)

- The picture is encoded by the VAE encoder; its latent is a sample of the encoder's Gaussian
  (mean + exp(logvar / 2) * eps, logvar clipped to -30..20) times the scaling factor (retrieve_latents).
- STRENGTH s of n steps runs the last int(n * s) steps: start = n - int(n * s) (get_timesteps), from
  alpha * latent + sigma * noise at that step's noise level (the scheduler's add_noise).
- Inpainting with the standard 4-channel UNet: after every step the kept region (mask 0) is replaced by
  the encoded picture noised to the next step's level (the last step: the clean picture); with strength 1
  the start is pure noise. With a 9-channel inpainting UNet the mask (nearest, 1/8) and the encoded masked
  picture (image * (mask < 0.5)) are concatenated to the UNet input instead, and nothing is blended.

Noise: the start noise is toonark.pipeline.initial_latents(seed) as for text-to-image; the encoder's
samples come from their own PCG64 streams [seed, 1] (picture) and [seed, 2] (masked picture), so one seed
gives one picture everywhere (offline and served).

Core module: numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from toonark.api import RequestError
from toonark.specs import PipelineDims

IMAGE_STREAM, MASKED_IMAGE_STREAM = 1, 2


def start_index(steps: int, strength: float) -> int:
    """The first step run for `strength` (diffusers' get_timesteps); refuses a request that runs none."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise RequestError(f"STRENGTH {strength:g} with {steps} steps runs no denoising step (int(steps x "
                           f"strength) = 0); raise STRENGTH to at least {1 / steps:.3g} or send more STEPS")
    return steps - run


def posterior_noise(seeds: list[int], batch: int, shape: tuple[int, ...], stream: int) -> np.ndarray:
    """Noise for the encoder's Gaussian sample: one draw (1, ...) per seed from PCG64([seed, stream]), one
    seed for the whole batch (the picture is encoded once and repeated) or one per image."""
    draws = [np.random.Generator(np.random.PCG64([int(s), stream])).standard_normal((1,) + shape[1:],
                                                                                   dtype=np.float32)
             for s in seeds]
    noise = np.concatenate(draws)
    return noise if len(seeds) == batch else np.repeat(noise, batch, axis=0)


def sample_latents(parameters: np.ndarray, noise: np.ndarray, dims: PipelineDims) -> np.ndarray:
    """VAE encoder output (N, 2C, h, w) -> scaled latent sample (N, C, h, w) (DiagonalGaussianDistribution)."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    if noise.shape[0] != mean.shape[0]:
        mean, std = (np.repeat(a, noise.shape[0] // a.shape[0], axis=0) for a in (mean, std))
    return ((mean + std * noise) * np.float32(dims.vae_scaling_factor)).astype(np.float32)


def add_noise(schedule, index: int, latents: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """alpha * latents + sigma * noise at step `index`'s noise level (DPMSolverMultistepScheduler.add_noise)."""
    alpha, sigma = np.float32(schedule.alpha_t[index]), np.float32(schedule.sigma_t[index])
    return (alpha * latents + sigma * noise).astype(np.float32)


def mask_latents(mask: np.ndarray, scale: int) -> np.ndarray:
    """(1, 1, H, W) pixel mask -> (1, 1, H/scale, W/scale): torch's nearest interpolate (pixel i * scale)."""
    return np.ascontiguousarray(mask[:, :, ::scale, ::scale])


Encode = Callable[[np.ndarray], np.ndarray]   # (1, 3, H, W) pixels -> (1, 2C, h, w) encoder parameters


@dataclass
class EditPlan:
    """What the sampler needs for one edit request: the starting latents and step, the blend after each
    step (standard UNet inpainting) or the extra UNet input channels (inpainting UNet)."""
    latents: np.ndarray
    start: int
    schedule: object
    noise: np.ndarray
    image_latents: np.ndarray | None = None      # blending target (4-channel inpainting)
    mask: np.ndarray | None = None               # (B, 1, h, w) latent mask
    extra: np.ndarray | None = None              # (B, 1 + C, h, w): mask + masked-picture latents (9-channel)

    @classmethod
    def build(cls, edit, encode: Encode, schedule, seeds: list[int], noise: np.ndarray, dims: PipelineDims,
              unet_in_channels: int, init_noise_sigma: float = 1.0) -> "EditPlan":
        """edit: image_input.EditInput; noise: the request's starting noise (B, C, h, w) (initial_latents)."""
        steps = len(schedule)
        start = start_index(steps, edit.strength)
        batch = noise.shape[0]
        inpaint_unet = unet_in_channels != dims.latent_channels
        if inpaint_unet and edit.mask is None:
            raise RequestError("this build's UNet is an inpainting UNet: send MASK_IN with IMAGE_IN (white = "
                               "repaint; an all-white mask redraws the whole picture)")
        if edit.mask is None:   # image-to-image: always from the noised picture
            latents = sample_latents(encode(edit.image), posterior_noise(seeds, batch, noise.shape, IMAGE_STREAM), dims)
            return cls(add_noise(schedule, start, latents, noise), start, schedule, noise)
        mask = np.repeat(mask_latents(edit.mask, dims.vae_scale), batch, axis=0)
        strength_max = edit.strength == 1.0
        image_latents = None
        if not inpaint_unet or not strength_max:
            image_latents = sample_latents(encode(edit.image), posterior_noise(seeds, batch, noise.shape, IMAGE_STREAM),
                                           dims)
        latents = (noise * np.float32(init_noise_sigma) if strength_max
                   else add_noise(schedule, start, image_latents, noise))
        if not inpaint_unet:
            return cls(latents, start, schedule, noise, image_latents=image_latents, mask=mask)
        masked = edit.image * (edit.mask < 0.5)
        masked_latents = sample_latents(encode(masked), posterior_noise(seeds, batch, noise.shape,
                                                                        MASKED_IMAGE_STREAM), dims)
        return cls(latents, start, schedule, noise, extra=np.concatenate([mask, masked_latents], axis=1))

    def after_step(self, next_index: int, latents: np.ndarray) -> np.ndarray:
        """Standard-UNet inpainting: keep the picture where the mask is 0, noised to the next step's level."""
        if self.image_latents is None:
            return latents
        proper = self.image_latents
        if next_index < len(self.schedule):
            proper = add_noise(self.schedule, next_index, proper, self.noise)
        return ((1 - self.mask) * proper + self.mask * latents).astype(latents.dtype)


def unet_sample(latents: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    """The UNet's `sample` rows for classifier-free guidance: [latents (+ extra channels)] x 2."""
    sample = latents if extra is None else np.concatenate([latents, extra.astype(latents.dtype)], axis=1)
    return np.concatenate([sample, sample])

