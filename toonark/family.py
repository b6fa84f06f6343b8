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

    def dims_from_folder(self, folder: Path) -> PipelineDims:
        raise NotImplementedError

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


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusion(),)}


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
