"""Random-weight Qwen-Image folders (`make tiny KIND=qwen-image | qwen-image-shaped`): the second model
family's test and benchmark inputs, since no weights can be downloaded here.

- `qwen-image`: diffusers' own test sizes (2 blocks, 3 heads of 16, a 16-wide 2-layer Qwen2.5-VL text
  model), a VAE with the real layout (4 levels, 8x spatial downsampling) at tiny widths. Seconds on CPU.
- `qwen-image-shaped`: the real widths (24 heads x 128 = 3072, text width 3584, 64 packed latent channels,
  RoPE axes 16/56/56, the real VAE widths) at reduced depth, for GPU timing: a block costs what a real
  block costs, so the full-depth (60 block) time is extrapolated per block.

The tokenizer: no Qwen2 vocabulary (151 k tokens) ships in a package installable here, so a small
byte-level BPE is trained with the `tokenizers` library on the project's own prompt data (the kid
template, negative prompt, calibration subjects, the Qwen-Image system prompt), with Qwen2's
pre-tokenizer pattern and its chat special tokens. It is saved in Qwen2's formats (vocab.json,
merges.txt, tokenizer.json), so transformers' Qwen2Tokenizer/Qwen2TokenizerFast and toonark's torch-free
tokenizer read the same files and give the same ids (tests/test_qwen_image.py).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from toonark.files import atomic_dir

# The chat template and number of leading template tokens QwenImagePipeline drops (diffusers 0.39,
# pipeline_qwenimage.py); toonark.family.QwenImage reads them from here via the folder's toonark config.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 34
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
BPE_VOCAB_SIZE = 2048

# FlowMatchEulerDiscreteScheduler as Qwen/Qwen-Image ships it: resolution-dependent (exponential)
# shift between base_shift at 256 image tokens and max_shift at 8192, stretched to end at 0.02.
SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                        max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                        stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

QWEN_CONFIGS = {
    "qwen-image": {
        "transformer": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                            num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                            axes_dims_rope=(8, 4, 4)),
        "text": dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, rope_theta=1000000.0,
                     rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        "vision": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        # The real VAE's layout (3 downsamplings: 8 px per latent) at tiny widths.
        "vae": dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                    temperal_downsample=[False, True, True]),
    },
    "qwen-image-shaped": {
        "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                            axes_dims_rope=(16, 56, 56)),
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                     num_key_value_heads=4, rope_theta=1000000.0,
                     rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}),
        "vision": dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=3584),
        "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True]),
    },
}


def tokenizer_corpus() -> list[str]:
    """The texts the tiny BPE is trained on: every calibration subject in the kid template, the
    default negative prompt, and the Qwen-Image chat template (so the template is a few tokens)."""
    from importlib.resources import files
    parts = json.loads((files("toonark.calibration") / "prompt_parts.json").read_text(encoding="utf-8"))
    policy = json.loads((files("toonark") / "data" / "prompt_policy.json").read_text(encoding="utf-8"))
    subjects = [parts["subject"].format(animal=a, action=b, setting=c)
                for a, b, c in itertools.product(parts["animals"], parts["actions"], parts["settings"])]
    texts = [policy["template"].format(subject=s) for s in subjects]
    return texts + [policy["negative_prompt"], PROMPT_TEMPLATE.format(policy["template"])] * 8


def train_tokenizer(vocab_size: int = BPE_VOCAB_SIZE):
    """A byte-level BPE (tokenizers.Tokenizer) with Qwen2's split pattern and special tokens first."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


def write_qwen_tokenizer(folder: Path):
    """vocab.json + merges.txt + tokenizer.json + configs; returns the transformers fast tokenizer."""
    from transformers import Qwen2TokenizerFast
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = train_tokenizer()
    backend.model.save(str(folder))           # vocab.json, merges.txt (the slow tokenizer's files)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = Qwen2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                                   tokenizer_file=str(folder / "tokenizer.json"), unk_token=None,
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="right",
                                   model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_qwen_modules(kind: str = "qwen-image", seed: int = 0, vocab_size: int = BPE_VOCAB_SIZE) -> dict:
    """Seeded random transformer, text encoder (Qwen2.5-VL) and VAE of a kind, in memory (the GPU
    script builds the transformer this way, without tokenizer files)."""
    if kind not in QWEN_CONFIGS:
        raise ValueError(f"unknown Qwen-Image kind {kind!r}; choose one of {sorted(QWEN_CONFIGS)}")
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = QWEN_CONFIGS[kind]
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**cfg["transformer"])
    torch.manual_seed(seed + 1)
    z_dim = cfg["vae"]["z_dim"]
    # Random weights: latents are taken as already normalised (mean 0, std 1 per channel); the real
    # model's 16 per-channel statistics go through the same code (toonark.family.QwenImage).
    vae = AutoencoderKLQwenImage(**cfg["vae"], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
    torch.manual_seed(seed + 2)
    # Vision token ids past the tiny vocabulary: text-only prompts never contain them.
    config = Qwen2_5_VLConfig(text_config=dict(cfg["text"], vocab_size=vocab_size), vision_config=cfg["vision"],
                              hidden_size=cfg["text"]["hidden_size"], vocab_size=vocab_size,
                              vision_start_token_id=vocab_size + 1, vision_end_token_id=vocab_size + 2,
                              vision_token_id=vocab_size + 3, image_token_id=vocab_size + 4,
                              video_token_id=vocab_size + 5)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def build_qwen_pipeline(out: Path, kind: str = "qwen-image", seed: int = 0) -> Path:
    """Write a diffusers QwenImagePipeline folder (safetensors) with seeded random weights."""
    if kind not in QWEN_CONFIGS:
        raise ValueError(f"unknown Qwen-Image kind {kind!r}; choose one of {sorted(QWEN_CONFIGS)}")
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    with atomic_dir(Path(out)) as tmp:
        tokenizer = write_qwen_tokenizer(tmp / "tokenizer")
        modules = build_qwen_modules(kind, seed, vocab_size=len(tokenizer))
        pipe = QwenImagePipeline(**modules, tokenizer=tokenizer,
                                 scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out)
