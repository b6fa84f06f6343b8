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


def build_pipeline(out: Path, kind: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers-format folder (safetensors weights) with seeded random weights."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {sorted(CONFIGS)}")
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = CONFIGS[kind]
    with atomic_dir(Path(out)) as tmp:
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                                                    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                    **cfg["text_encoder"]))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**cfg["unet"])
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(latent_channels=unet.config.in_channels, **cfg["vae"])
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)
