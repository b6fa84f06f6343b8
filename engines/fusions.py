"""ONNX Runtime's diffusion fusions (the ones its own Stable Diffusion demo relies on), made to
apply to toonark's export.

    report = fuse_for_cuda(build / "onnx/fp32/unet/model.onnx", out / "unet/model.onnx", "unet",
                           num_heads=8, fp16=True)
    report.fused          # {"MultiHeadAttention": 16, "GroupNorm": 21, "NhwcConv": 98, ...}

What it does, in ORT's order (fusion first, fp16 after, or the patterns no longer match):
`onnxruntime.transformers.optimizer.optimize_model(model_type=unet|vae|clip, opt_level=0,
use_gpu=True)` with the SD demo's FusionOptions (fused MultiHeadAttention with packed QKV / KV,
GroupNorm + SkipGroupNorm channels-last, BiasSplitGelu, BiasAdd, NhwcConv), then
`convert_float_to_float16`.

Why it failed before (seen on the H100 image with numpy 2.5, reproduced here with numpy 1.26
by turning its DeprecationWarning into an error): `FusionAttentionUnet.get_num_heads` reads the
head count of a torch-2 attention reshape (`Concat(batch, -1, heads, head_dim)`) as a 1-element
array and calls `int()` on it. NumPy 1.25 deprecated int() of an ndim>0 array and NumPy 2.x
raises, so the whole UNet optimisation aborts. The graph pattern itself matches; only the
scalar conversion is broken. `_robust_num_heads` replaces that one method for the duration of
the call (no site-packages edits) and falls back to the head count read from the diffusers
config when the graph does not give one.

Fused ops without CPU kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv,
packed-QKV MultiHeadAttention) run on the CUDA execution provider only; `cpu_safe=True` keeps
the subset CPU can run (attention, LayerNorm) so parity can be checked without a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

log = logging.getLogger(__name__)

# toonark submodel -> onnxruntime.transformers model_type.
MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip",
               # Qwen-Image's MMDiT: ORT's SD3/Flux recipe fuses its LayerNorms, RMSNorms and Gelus; its
               # attention pattern does not match (export/qwen_export.py fused_attention writes it fused).
               "transformer": "mmdit"}

# Contrib ops with a CUDA kernel only (a CPU session refuses the model).
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")

# What ORT's CUDA diffusion kernels accept (onnxruntime/contrib_ops/cuda/diffusion): a fused node
# outside these limits loads fine and fails at the first run, so such a fusion is switched off for
# the model instead (small test models hit this; SD-sized ones do not).
SPLIT_GELU_HIDDEN_SIZES = (2560, 5120, 10240)     # BiasSplitGelu: input hidden size (8 x block width)
# FusionOptions flags behind each fused op that the kernel limits can rule out.
KERNEL_LIMITED_FUSIONS = {"GroupNorm": ("enable_group_norm", "enable_skip_group_norm"),
                          "SkipGroupNorm": ("enable_group_norm", "enable_skip_group_norm"),
                          "BiasSplitGelu": ("enable_bias_splitgelu",)}


@dataclass
class FusionReport:
    submodel: str
    model_type: str
    fp16: bool
    seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    fused: dict[str, int] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)   # fused op -> why its fusion was switched off

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(nodes_before=self.nodes_before, nodes_after=self.nodes_after)
        return data

    def summary(self) -> str:
        fused = ", ".join(f"{k} {v}" for k, v in sorted(self.fused.items()) if v)
        return (f"{self.submodel}: {self.nodes_before} -> {self.nodes_after} nodes in {self.seconds:.1f} s"
                f"{' (fp16)' if self.fp16 else ''}; {fused or 'nothing fused'}")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _transformers_modules():
    """onnxruntime.transformers puts its own folder on sys.path and its modules import each other
    as top-level names (`import fusion_attention_unet`), so each exists twice; both get patched."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (adds the folder to sys.path)
    import fusion_attention_unet as top_level  # type: ignore[import-not-found]
    from onnxruntime.transformers import fusion_attention_unet as packaged
    return {id(m): m for m in (top_level, packaged)}.values()


@contextlib.contextmanager
def _robust_num_heads(fallback_heads: int = 0) -> Iterator[None]:
    """Replace FusionAttentionUnet.get_num_heads with a version that reads 1-element arrays
    with `.item()` (the upstream `int(array)` raises on NumPy 2.x), restoring it afterwards."""

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        value = None
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
        else:
            shape = self.model.get_constant_value(reshape_q.input[1])
            if isinstance(shape, np.ndarray) and shape.shape == (4,):
                value = shape[2]
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(-1)[0]
        if isinstance(value, (int, np.integer)) and int(value) > 0:
            return int(value)
        if fallback_heads > 0:
            log.info("num_heads not found in the graph at %s; using %d from the config", reshape_q.name, fallback_heads)
        return fallback_heads

    saved = [(m, m.FusionAttentionUnet.get_num_heads) for m in _transformers_modules()]
    try:
        for module, _ in saved:
            module.FusionAttentionUnet.get_num_heads = get_num_heads
        yield
    finally:
        for module, original in saved:
            module.FusionAttentionUnet.get_num_heads = original


def fusion_options(model_type: str, fp16: bool = True, cpu_safe: bool = False):
    """FusionOptions as ORT's SD demo (optimize_pipeline.py) sets them; `cpu_safe` keeps only
    fusions whose ops have CPU kernels."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions(model_type)
    if model_type == "unet":
        options.enable_packed_kv = fp16 and not cpu_safe
        options.enable_packed_qkv = fp16 and not cpu_safe
        options.enable_bias_add = not cpu_safe
    if cpu_safe:
        for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
            setattr(options, name, False)
    return options


def kernel_refusals(model: onnx.ModelProto) -> dict[str, str]:
    """{fused op type: reason} for fused nodes ORT's CUDA kernels would refuse at run time."""
    lengths = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    refusals: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
            channels = lengths.get(node.input[1], 0)   # gamma
            if groups and channels and (channels % groups or (channels // groups) % 2):
                refusals.setdefault(node.op_type, f"{node.name}: {channels} channels in {groups} groups "
                                                  f"(the CUDA kernel needs an even number of channels per group)")
        elif node.op_type == "BiasSplitGelu":
            hidden = lengths.get(node.input[1], 0)     # bias
            if hidden not in SPLIT_GELU_HIDDEN_SIZES:
                refusals.setdefault(node.op_type, f"{node.name}: hidden size {hidden} "
                                                  f"(the CUDA kernel takes {', '.join(map(str, SPLIT_GELU_HIDDEN_SIZES))})")
    return refusals


def heads_from_config(config: dict) -> int:
    """Attention heads of a diffusers UNet config (SD-1.x stores the head *count* in
    `attention_head_dim`); 0 when it varies per block, so the graph value is used."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 0
    if isinstance(heads, (list, tuple)):
        heads = heads[0] if len(set(heads)) == 1 else 0
    return int(heads)


def fuse_model(model: onnx.ModelProto | str | Path, submodel: str, *, num_heads: int = 0, hidden_size: int = 0,
               fp16: bool = True, keep_io_types: bool | list[str] = True, cpu_safe: bool = False,
               respect_kernel_limits: bool = True):
    """Run the fusions (and fp16 conversion) in memory; returns (OnnxModel, FusionReport).
    With `respect_kernel_limits`, a fusion whose CUDA kernel would refuse this model's sizes
    (kernel_refusals) is switched off and the model fused again; off only to study the patterns."""
    from onnxruntime.transformers.optimizer import optimize_model

    if submodel not in MODEL_TYPES:
        raise ValueError(f"no fusion recipe for submodel {submodel!r}; choose one of {sorted(MODEL_TYPES)}")
    model_type = MODEL_TYPES[submodel]
    source = None if isinstance(model, onnx.ModelProto) else str(model)
    if source is not None:
        model = onnx.load(source, load_external_data=True)
    # optimize_model edits the proto it is given: keep a pristine copy for a second pass only when
    # there is no file to reload it from.
    pristine = copy.deepcopy(model) if source is None else None
    before = op_counts(model)
    started = time.perf_counter()
    options = fusion_options(model_type, fp16, cpu_safe)
    disabled: dict[str, str] = {}
    for attempt in range(2):
        with _robust_num_heads(num_heads), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # optimize_model takes a path or a ModelProto; the proto route avoids a second 3 GB read.
            optimized = optimize_model(model, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=0, optimization_options=options, use_gpu=True,
                                       only_onnxruntime=False)
        refusals = kernel_refusals(optimized.model) if respect_kernel_limits else {}
        if not refusals or attempt:
            break
        log.info("%s: fusing again without %s: %s", submodel, ", ".join(refusals), "; ".join(refusals.values()))
        disabled.update(refusals)
        for op_type in refusals:
            for flag in KERNEL_LIMITED_FUSIONS[op_type]:
                setattr(options, flag, False)
        model = onnx.load(source, load_external_data=True) if source is not None else pristine
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=keep_io_types, op_block_list=[])
    report = FusionReport(submodel=submodel, model_type=model_type, fp16=fp16,
                          seconds=round(time.perf_counter() - started, 2), ops_before=before,
                          ops_after=op_counts(optimized.model), fused=fused, disabled=disabled)
    log.info("%s", report.summary())
    return optimized, report


def fuse_for_cuda(src_onnx: str | Path, dst_onnx: str | Path, submodel: str, *, num_heads: int = 0,
                  hidden_size: int = 0, fp16: bool = True, keep_io_types: bool | list[str] = True,
                  cpu_safe: bool = False, respect_kernel_limits: bool = True) -> FusionReport:
    """Fuse `src_onnx` (an fp32 export) for the CUDA execution provider and write `dst_onnx`
    (weights in one `model.onnx.data` beside it when past the protobuf limit)."""
    optimized, report = fuse_model(src_onnx, submodel, num_heads=num_heads, hidden_size=hidden_size, fp16=fp16,
                                   keep_io_types=keep_io_types, cpu_safe=cpu_safe,
                                   respect_kernel_limits=respect_kernel_limits)
    from toonark.export.graph import save_model
    # What OnnxModel.save_model_to_file does before saving: nodes in topological order and the
    # com.microsoft opset declared for the fused contrib ops.
    optimized.topological_sort()
    if any(node.domain == "com.microsoft" for node in optimized.model.graph.node) and \
            not any(opset.domain == "com.microsoft" for opset in optimized.model.opset_import):
        optimized.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_model(optimized.model, Path(dst_onnx))  # the export's one save path (external data past 2 GB)
    return report

