"""Random-weight diffusers pipelines built from configs: `tiny` for tests and the demo,
`sd15` (SD-1.5 shapes: UNet 860 M, VAE 84 M, CLIP-L) for benchmarks.

No weights can be downloaded here, so everything downstream is exercised on these. The
tokenizer is the real CLIP BPE (49408 tokens), rebuilt from the merges file that
open_clip_torch ships, so prompt handling behaves as with a real SD checkpoint.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from toonark.files import atomic_dir

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77

# Component configs: diffusers / transformers keyword arguments, nothing else.
CONFIGS = {
    "tiny": {
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32),
        "unet": dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                     attention_head_dim=4, norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        # Four blocks, like SD's VAE, so the latent is 1/8 of the image as in the real model.
        "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=256,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    },
    "sd15": {
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768, hidden_act="quick_gelu"),
        "unet": dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults are SD-1.5's UNet
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    },
}

# Safety checkers (diffusers StableDiffusionSafetyChecker: a CLIP vision tower + 17 concept and 3
# special-care embeddings with one cosine threshold each). Only the vision half is used; the text
# half of CLIPConfig is required by the class but never run, so it is as small as allowed.
# An inpainting pipeline (diffusers' StableDiffusionInpaintPipeline): the tiny one with a 9-channel UNet
# (latents 4 + mask 1 + masked-picture latents 4), as stable-diffusion-inpainting is SD-1.5's.
CONFIGS["tiny-inpaint"] = {**CONFIGS["tiny"], "unet": {**CONFIGS["tiny"]["unet"], "in_channels": 9, "out_channels": 4}}
INPAINT_KINDS = ("tiny-inpaint",)

SAFETY_CHECKER_CONFIGS = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=224, patch_size=32),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
                 projection_dim=32),
    "sd15": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=224, patch_size=14),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 projection_dim=768),
}

SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
                        timestep_spacing="leading", steps_offset=1)


def clip_bpe_merges_path() -> Path:
    """The CLIP BPE merges that open_clip_torch ships (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary. Run `make setup`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from open_clip_torch; reinstall it with `make setup`.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (the tokenizer's base alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt in the exact order of openai/clip-vit-large-patch14's tokenizer."""
    lines = gzip.open(clip_bpe_merges_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))


def random_safety_checker(kind: str = "tiny", seed: int = 0):
    """(StableDiffusionSafetyChecker, CLIPImageProcessor) with seeded random weights.

    Concept and special-care embeddings are random; every threshold is 1.0, the diffusers
    constructor's value: a cosine similarity never exceeds 1, so this checker flags nothing until
    its thresholds are lowered (tests force both outcomes that way, see export/safety_checker.py)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    cfg = SAFETY_CHECKER_CONFIGS[kind]
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=cfg["vision"], text_config=cfg["text"],
                                                      projection_dim=cfg["projection_dim"]))
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
    return checker.eval(), CLIPImageProcessor()   # OpenAI CLIP preprocessing: 224 crop, CLIP mean/std


def build_modules(kind: str = "tiny", seed: int = 0) -> dict:
    """The seeded random-weight text encoder, UNet and VAE of a pipeline kind, in memory (what
    build_pipeline saves; the GPU bench builds them directly, without tokenizer files)."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {sorted(CONFIGS)}")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CONFIGS[kind]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                **cfg["text_encoder"]))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(latent_channels=unet.config.out_channels, **cfg["vae"])   # 4 also for a 9-channel UNet
    return {"text_encoder": text_encoder, "unet": unet, "vae": vae}


def build_pipeline(out: Path, kind: str = "tiny", seed: int = 0, with_safety_checker: bool = False) -> Path:
    """Write a diffusers-format folder (safetensors weights) with seeded random weights.
    `with_safety_checker` adds safety_checker/ and feature_extractor/ (random checker, seed + 3);
    the other components are the same as without it."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {sorted(CONFIGS)}")
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with atomic_dir(Path(out)) as tmp:
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        modules = build_modules(kind, seed)
        pipeline_class = StableDiffusionInpaintPipeline if kind in INPAINT_KINDS else StableDiffusionPipeline
        pipe = pipeline_class(**modules, tokenizer=tokenizer,
                                       scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if with_safety_checker:
            checker, feature_extractor = random_safety_checker(kind, seed + 3)
            pipe.register_modules(safety_checker=checker, feature_extractor=feature_extractor)
            pipe.register_to_config(requires_safety_checker=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)


def pipeline_kinds() -> dict:
    """Every `make tiny KIND=...`: {kind: builder(out, kind, seed) -> Path}. Stable Diffusion kinds come
    from CONFIGS above, Qwen-Image kinds from export/qwen_pipelines.py."""
    from toonark.export.qwen_pipelines import QWEN_CONFIGS, build_qwen_pipeline
    return {**{kind: build_pipeline for kind in CONFIGS}, **{kind: build_qwen_pipeline for kind in QWEN_CONFIGS}}
