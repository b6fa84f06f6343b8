"""A model family: everything that differs between kinds of text-to-image pipeline, declared once.

    family = family_for_folder("OUT/pipeline")        # from model_index.json's _class_name
    specs = family.specs(info.dims)                     # the submodels' declarations (toonark.specs)
    sampler = family.sampler("OUT/pipeline")            # DPM-Solver++ for Stable Diffusion
    ids, truncated = family.encode_prompts(tokenizer, prompts, negatives, info.dims)
    vae_input = family.latents_to_vae(latents, info.dims)   # THE place the VAE scaling factor is applied

Every stage (export, calibration, engines, the served models, the offline pipeline) asks the family
instead of assuming Stable Diffusion, so a second family (an MMDiT with flow matching: other
submodels, another sampler, no classifier-free-guidance doubling, another latent scaling) is a new
subclass registered in FAMILIES, not `if` branches through the stages.

Core module: imports nothing from the stages; torch-free.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from toonark.specs import SERVED_SUBMODELS, PipelineDims, SubmodelSpec, submodel_specs

MODEL_INDEX = "model_index.json"


class ModelFamily:
    """Base class of a family. Subclasses set `name` and `pipeline_classes` (the diffusers pipeline
    class names of model_index.json that belong to it) and implement the methods below."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()
    # The submodels one text-to-image request runs, in data-flow order.
    served_submodels: tuple[str, ...] = ()
    # The served denoise model also reads the token ids (and the tokenizer folder, for the pad id).
    denoise_reads_ids: bool = False
    denoise_pipeline_parts: tuple[str, ...] = ()
    # The submodel the sampler calls every step (what INT8 calibration captures and quantizes).
    denoiser_submodel: str = "unet"
    # Served beyond text-to-image at the profile's sizes: IMAGE_IN / MASK_IN editing (a VAE encoder and the
    # family's img2img / inpainting start) and sizes above the profile in Hann-blended tiles.
    edits_images: bool = False
    tiles_large_images: bool = False
    # The served denoise may own the step submodel and run it in the device loop (engines/ort_loop: SD's UNet
    # names and DPM-Solver++ step graph; serving/repository.py's unet_loop in_process / bls_device, request
    # batching). A family without it is served over BLS with host tensors (unet_loop bls).
    device_loop: bool = False

    @property
    def dims_class(self):
        """The PipelineDims (sub)class of this family's toonark.json."""
        return PipelineDims

    def dims_from_folder(self, folder: Path) -> PipelineDims:
        raise NotImplementedError

    def default_limits(self, limits, dims: PipelineDims):
        """The build's ShapeLimits completed with what this family needs (its own axes); SD: unchanged."""
        return limits

    def build_dims(self, dims: PipelineDims, limits) -> PipelineDims:
        """The dims a build writes to toonark.json, given its limits; SD: the folder's."""
        return dims

    def text_window(self, dims: PipelineDims) -> int:
        """How many prompt tokens the text encoder reads (refusal messages): CLIP's length less <bos>/<eos>."""
        return dims.text_length - 2

    def text2image(self, engines: dict, tokenizer, scheduler, dims: PipelineDims, limits=None, device_loop=None):
        """The offline pipeline object of this family over loaded engines (engines/pipeline.py load_pipeline)."""
        from toonark.pipeline import Text2ImagePipeline
        return Text2ImagePipeline(engines, tokenizer, scheduler, dims, limits, device_loop=device_loop, family=self)

    def specs(self, dims: PipelineDims) -> dict[str, SubmodelSpec]:
        raise NotImplementedError

    def sampler(self, pipeline_dir: Path):
        raise NotImplementedError

    def load_tokenizer(self, pipeline_dir: Path):
        raise NotImplementedError

    def encode_prompts(self, tokenizer, prompts: Sequence[str], negatives: Sequence[str],
                       dims: PipelineDims) -> tuple[np.ndarray, list[bool]]:
        raise NotImplementedError

    def latents_to_vae(self, latents: np.ndarray, dims: PipelineDims) -> np.ndarray:
        raise NotImplementedError

    def vae_input_scale(self, dims: PipelineDims) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


class StableDiffusion(ModelFamily):
    """SD-1.5 / 2.1 style: CLIP text encoder, UNet with classifier-free guidance at 2B, DPM-Solver++
    over a VP schedule (toonark.scheduler), a VAE whose latents are scaled by `scaling_factor`."""

    name = "stable-diffusion"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "OnnxStableDiffusionPipeline",
                        "ORTStableDiffusionPipeline", "StableDiffusionInpaintPipeline")
    served_submodels = SERVED_SUBMODELS
    edits_images = True         # toonark.editing: diffusers' img2img / inpainting starts
    tiles_large_images = True   # toonark.tiling: MultiDiffusion-style UNet and VAE tiles
    device_loop = True          # engines/ort_loop.DeviceLoop, runtime.BlsDeviceLoop (text-to-image in the profile)

    def dims_from_folder(self, folder: Path) -> PipelineDims:
        return PipelineDims.from_folder(folder)

    def specs(self, dims: PipelineDims) -> dict[str, SubmodelSpec]:
        return submodel_specs(dims)

    def sampler(self, pipeline_dir: Path):
        from toonark.scheduler import DPMSolverMultistep
        return DPMSolverMultistep.from_file(Path(pipeline_dir) / "scheduler")

    def load_tokenizer(self, pipeline_dir: Path):
        from toonark.tokenizer import load_tokenizer
        return load_tokenizer(Path(pipeline_dir) / "tokenizer")

    def encode_prompts(self, tokenizer, prompts: Sequence[str], negatives: Sequence[str],
                       dims: PipelineDims) -> tuple[np.ndarray, list[bool]]:
        """Token ids (2B, L) in classifier-free-guidance order [uncond x B, cond x B] (the UNet's rows),
        and per row whether tokens were cut off (negatives first, then prompts)."""
        from toonark.tokenizer import tokenize
        if len(prompts) != len(negatives):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt")
        return tokenize(tokenizer, list(negatives) + list(prompts), dims.text_length)

    def vae_input_scale(self, dims: PipelineDims) -> float:
        """What latents are multiplied by before the VAE decoder: 1 / scaling_factor. The device loop
        (engines/ort_loop.py) folds it into its last step's coefficients; everything else calls
        latents_to_vae."""
        return 1.0 / dims.vae_scaling_factor

    def latents_to_vae(self, latents: np.ndarray, dims: PipelineDims) -> np.ndarray:
        """Denoised latents -> the VAE decoder's float32 input (latents / scaling_factor). The offline
        pipeline, the served denoise model and calibration all call this, so the factor is applied
        in one place."""
        return (latents / np.float32(dims.vae_scaling_factor)).astype(np.float32)


class QwenImage(ModelFamily):
    """Qwen-Image: a Qwen2.5-VL text encoder read through a chat template (its first `template_drop`
    tokens dropped), an MMDiT transformer over 2x2-packed latents with 3-axis RoPE, true
    classifier-free guidance with a norm-preserving rescale, flow-matching Euler with a
    resolution-dependent shift (toonark.flow_match), and a VAE whose latents are normalised per
    channel (latents * std + mean before decoding). Everything here is numpy, matched to diffusers'
    QwenImagePipeline (tests/test_qwen_image.py)."""

    name = "qwen-image"
    pipeline_classes = ("QwenImagePipeline",)
    served_submodels = ("text_encoder", "transformer", "vae_decoder")
    # Which text rows are padding comes from the ids (the hidden states do not say), so denoise reads them.
    denoise_reads_ids = True
    denoise_pipeline_parts = ("tokenizer",)
    denoiser_submodel = "transformer"
    # QwenImagePipeline's prompt template and how many of its leading tokens it drops (diffusers 0.39).
    prompt_template = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                       "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                       "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
    rope_theta = 10000

    @property
    def dims_class(self):
        from toonark.specs import QwenImageDims
        return QwenImageDims

    def dims_from_folder(self, folder: Path) -> PipelineDims:
        return self.dims_class.from_folder(folder)

    def specs(self, dims: PipelineDims) -> dict[str, SubmodelSpec]:
        from toonark.specs import qwen_image_specs
        return qwen_image_specs(dims)

    def default_limits(self, limits, dims):
        """The build's shape limits with the text axis filled in when not given: 1..text_length
        tokens, optimised for 64 (a kid prompt in the template is about 30-60 tokens)."""
        if limits.max_text:
            return limits
        import dataclasses
        top = dims.text_length
        return dataclasses.replace(limits, min_text=1, opt_text=min(64, top), max_text=top)

    def build_dims(self, dims: PipelineDims, limits) -> PipelineDims:
        """text_length becomes the build's longest text (the text axis' max), so every later stage and
        the refusal messages use the number the engines were built for."""
        import dataclasses
        return dataclasses.replace(dims, text_length=limits.max_text) if limits.max_text else dims

    def text_window(self, dims: PipelineDims) -> int:
        """Tokens after the dropped template tokens (the build's text axis)."""
        return dims.text_length

    def text2image(self, engines: dict, tokenizer, scheduler, dims: PipelineDims, limits=None, device_loop=None):
        from toonark.qwen_pipeline import QwenImageText2ImagePipeline
        return QwenImageText2ImagePipeline(engines, tokenizer, scheduler, dims, limits, device_loop=device_loop,
                                           family=self)

    def sampler(self, pipeline_dir: Path):
        from toonark.flow_match import FlowMatchEuler
        return FlowMatchEuler.from_file(Path(pipeline_dir) / "scheduler")

    def load_tokenizer(self, pipeline_dir: Path):
        from toonark.tokenizer import QwenTokenizer
        return QwenTokenizer.from_folder(Path(pipeline_dir) / "tokenizer")

    def encode_prompts(self, tokenizer, prompts: Sequence[str], negatives: Sequence[str],
                       dims: PipelineDims) -> tuple[np.ndarray, list[bool]]:
        """Token ids (2B, L) of the prompts in the chat template, [uncond x B, cond x B], right padded
        with the pad id to the longest row (as the pipeline's `padding=True`), and per row whether it
        is past the build's text limit (never cut: refusing keeps the template's closing tokens)."""
        if len(prompts) != len(negatives):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts; give one per prompt")
        texts = [self.prompt_template.format(p) for p in list(negatives) + list(prompts)]
        rows = [enc.ids for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return ids, [len(r) - dims.template_drop > dims.text_length for r in rows]

    def token_lengths(self, ids: np.ndarray, pad_id: int) -> np.ndarray:
        """Each row's token count: up to its last non-pad id (the template always ends in text tokens)."""
        not_pad = ids != pad_id
        return np.where(not_pad.any(axis=1), ids.shape[1] - np.argmax(not_pad[:, ::-1], axis=1), 0)

    def text_conditioning(self, hidden: np.ndarray, lengths: np.ndarray, dims: PipelineDims
                          ) -> tuple[np.ndarray, np.ndarray]:
        """The text encoder's last hidden states (2B, L, D) -> the transformer's text input: each row's
        tokens after the dropped template tokens, zero padded to the longest, and the int64 mask
        (QwenImagePipeline._get_qwen_prompt_embeds)."""
        drop = dims.template_drop
        kept = np.maximum(np.asarray(lengths) - drop, 0)
        width = max(int(kept.max()), 1)
        embeds = np.zeros((hidden.shape[0], width, hidden.shape[2]), dtype=np.float32)
        mask = np.zeros((hidden.shape[0], width), dtype=np.int64)
        for i, n in enumerate(kept):
            embeds[i, :n] = hidden[i, drop:drop + n]
            mask[i, :n] = 1
        return embeds, mask

    # Latent layout ---------------------------------------------------------------------------------
    def latent_grid(self, dims: PipelineDims, height: int, width: int) -> tuple[int, int]:
        side = dims.image_token_div
        for label, value in (("height", height), ("width", width)):
            if value <= 0 or value % side:
                raise ValueError(f"{label} {value} must be a positive multiple of {side} (the VAE's {dims.vae_scale} "
                                 f"pixels per latent x the transformer's {dims.patch_size}x{dims.patch_size} patches)")
        return height // dims.vae_scale, width // dims.vae_scale

    @staticmethod
    def pack_latents(latents: np.ndarray, patch: int = 2) -> np.ndarray:
        """(B, C, h, w) -> (B, h/2 * w/2, C * 4): QwenImagePipeline._pack_latents."""
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5)
        return np.ascontiguousarray(x.reshape(b, (h // patch) * (w // patch), c * patch * patch))

    @staticmethod
    def unpack_latents(packed: np.ndarray, h: int, w: int, patch: int = 2) -> np.ndarray:
        """(B, h/2 * w/2, C * 4) -> (B, C, h, w): QwenImagePipeline._unpack_latents (without its frame axis)."""
        b, _, channels = packed.shape
        c = channels // (patch * patch)
        x = packed.reshape(b, h // patch, w // patch, c, patch, patch).transpose(0, 3, 1, 4, 2, 5)
        return np.ascontiguousarray(x.reshape(b, c, h, w))

    def initial_latents(self, seed: int, batch: int, dims: PipelineDims, height: int, width: int) -> np.ndarray:
        """Packed float32 starting noise (B, tokens, 4C) from PCG64(seed), drawn as (B, C, h, w) like SD's."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed {seed!r} must be a non-negative integer")
        h, w = self.latent_grid(dims, height, width)
        noise = np.random.Generator(np.random.PCG64(int(seed))).standard_normal(
            (batch, dims.latent_channels, h, w), dtype=np.float32)
        return self.pack_latents(noise, dims.patch_size)

    def vae_input_scale(self, dims: PipelineDims) -> float:
        """Per-channel here (latents * std + mean): see latents_to_vae; no single factor exists."""
        raise ValueError("Qwen-Image's VAE input is normalised per channel; use latents_to_vae")

    def latents_to_vae(self, latents: np.ndarray, dims: PipelineDims) -> np.ndarray:
        """Unpacked denoised latents (B, C, h, w) -> the VAE decoder's input: latents * std + mean per channel
        (the pipeline's `latents / (1 / std) + mean`)."""
        c = dims.latent_channels
        std = np.asarray(dims.latents_std, dtype=np.float32).reshape(1, c, 1, 1)
        mean = np.asarray(dims.latents_mean, dtype=np.float32).reshape(1, c, 1, 1)
        return (latents.astype(np.float32) / (np.float32(1.0) / std) + mean).astype(np.float32)

    # RoPE ---------------------------------------------------------------------------------------------
    def _axis_angles(self, positions: np.ndarray, dim: int) -> np.ndarray:
        inv = 1.0 / np.power(np.float32(self.rope_theta), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
        return np.outer(positions.astype(np.float32), inv.astype(np.float32)).astype(np.float32)

    def rope(self, dims: PipelineDims, height: int, width: int, text_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(img_rope (2, h/2*w/2, head_dim/2), txt_rope (2, T, head_dim/2)): cos and sin of diffusers'
        QwenEmbedRope (scale_rope=True: image rows and columns centred, -n/2..n/2-1; frame index 0;
        text positions start after the image's largest half side), as real numbers because the
        complex-valued RoPE does not export to ONNX."""
        h, w = self.latent_grid(dims, height, width)
        gh, gw = h // dims.patch_size, w // dims.patch_size
        f_dim, h_dim, w_dim = dims.rope_axes
        rows = np.concatenate([np.arange(-(gh - gh // 2), 0), np.arange(gh // 2)])
        cols = np.concatenate([np.arange(-(gw - gw // 2), 0), np.arange(gw // 2)])
        frame = self._axis_angles(np.zeros(1), f_dim)                    # (1, f/2)
        angles = np.concatenate([
            np.broadcast_to(frame[:, None, None, :], (1, gh, gw, f_dim // 2)),
            np.broadcast_to(self._axis_angles(rows, h_dim)[None, :, None, :], (1, gh, gw, h_dim // 2)),
            np.broadcast_to(self._axis_angles(cols, w_dim)[None, None, :, :], (1, gh, gw, w_dim // 2)),
        ], axis=-1).reshape(gh * gw, dims.head_dim // 2)
        start = max(gh // 2, gw // 2)
        text_pos = np.arange(start, start + text_tokens)
        text_angles = np.concatenate([self._axis_angles(text_pos, d) for d in dims.rope_axes], axis=-1)
        return (np.stack([np.cos(angles), np.sin(angles)]).astype(np.float32),
                np.stack([np.cos(text_angles), np.sin(text_angles)]).astype(np.float32))


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusion(), QwenImage())}


def family_for_class(class_name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"diffusers pipeline class {class_name!r} is not a model family toonark knows; "
                     f"known: {', '.join(known)} (a new family is a ModelFamily subclass in toonark/family.py)")


def family_for_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers folder (or a build's OUT/pipeline), from model_index.json's _class_name.
    A folder without model_index.json (saved component by component) is read as Stable Diffusion,
    the only layout such folders have had."""
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        return FAMILIES[StableDiffusion.name]
    try:
        class_name = json.loads(path.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a diffusers model index ({err}); copy it again from the model") from None
    return family_for_class(class_name)
