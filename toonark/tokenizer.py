"""CLIP tokenization without torch: the Stable Diffusion family's text encoding (toonark.family).

transformers imports torch as soon as it is imported (transformers.utils.import_utils), so the CLIP
tokenizer is rebuilt with the `tokenizers` library from the vocab.json / merges.txt that diffusers'
CLIPTokenizer reads (tests/test_pipeline.py checks equal ids). The served preprocess model, the
offline pipeline and calibration all tokenize here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer / CLIPConverter): contractions,
# letter runs, single digits, punctuation runs.
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The slow CLIPTokenizer keeps this many merges (49152 - 256 - 2); later lines are ignored.
_CLIP_MERGES = 49152 - 256 - 2


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ClipTokenizer:
    """CLIP BPE with bos/eos/pad ids: what `tokenize` needs, nothing else."""
    backend: object          # tokenizers.Tokenizer without special tokens, padding or truncation
    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_folder(cls, folder: Path) -> "ClipTokenizer":
        """From a diffusers tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json)."""
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        paths = {name: folder / name for name in ("vocab.json", "merges.txt")}
        for name, path in paths.items():
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {folder} is not a CLIP tokenizer folder "
                                        f"(OUT/pipeline/tokenizer is copied from the model by `make export`)")
        vocab = json.loads(paths["vocab.json"].read_text(encoding="utf-8"))
        lines = paths["merges.txt"].read_text(encoding="utf-8").strip().split("\n")[1:_CLIP_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        tokens = {role: _token_text(config.get(f"{role}_token")) for role in ("bos", "eos", "pad", "unk")}
        tokens = {"bos": tokens["bos"] or "<|startoftext|>", "eos": tokens["eos"] or "<|endoftext|>",
                  "pad": tokens["pad"] or "<|endoftext|>", "unk": tokens["unk"] or "<|endoftext|>"}
        for role, token in tokens.items():
            if token not in vocab:
                raise ValueError(f"{role} token {token!r} of {folder} is not in its vocab.json; the tokenizer "
                                 f"folder is inconsistent, copy it again from the diffusers model")

        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False, unk_token=tokens["unk"]))
        # Same normalisation as transformers' CLIP fast tokenizer: NFC, collapse whitespace, lower case.
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        return cls(backend, vocab[tokens["bos"]], vocab[tokens["eos"]], vocab[tokens["pad"]])


def load_tokenizer(folder: Path) -> ClipTokenizer:
    return ClipTokenizer.from_folder(folder)


def tokenize(tokenizer: ClipTokenizer, prompts: Sequence[str], length: int) -> tuple[np.ndarray, list[bool]]:
    """int64 ids (len(prompts), length): <bos> tokens <eos> padded with the pad id, as diffusers'
    `tokenizer(..., padding="max_length", truncation=True)`. Also returns, per prompt, whether
    tokens were cut off (CLIP sees at most length - 2 of them)."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it in a list")
    if length < 2:
        raise ValueError(f"text length {length} leaves no room for <bos> and <eos>")
    ids = np.full((len(prompts), length), tokenizer.pad_id, dtype=np.int64)
    truncated = []
    for row, encoding in enumerate(tokenizer.backend.encode_batch(list(prompts), add_special_tokens=False)):
        tokens = encoding.ids
        truncated.append(len(tokens) > length - 2)
        sequence = [tokenizer.bos_id] + tokens[:length - 2] + [tokenizer.eos_id]
        ids[row, :len(sequence)] = sequence
    return ids, truncated


@dataclass(frozen=True)
class QwenTokenizer:
    """Qwen2 byte-level BPE for the Qwen-Image family (toonark.family.QwenImage), torch-free: the
    folder's tokenizer.json read by the `tokenizers` library (what Qwen2TokenizerFast wraps; tests
    check equal ids with transformers), plus the pad id."""
    backend: object          # tokenizers.Tokenizer
    pad_id: int

    @classmethod
    def from_folder(cls, folder: Path) -> "QwenTokenizer":
        from tokenizers import Tokenizer
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a Qwen2 tokenizer folder "
                                    f"(OUT/pipeline/tokenizer is copied from the model by `make export`)")
        backend = Tokenizer.from_file(str(path))
        backend.no_padding()
        backend.no_truncation()
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        pad = _token_text(config.get("pad_token")) or "<|endoftext|>"
        pad_id = backend.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"pad token {pad!r} of {folder} is not in its tokenizer.json; copy the tokenizer folder "
                             f"again from the diffusers model")
        return cls(backend, pad_id)
