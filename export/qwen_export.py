"""Qwen-Image submodels as exportable torch modules (toonark.family.QwenImage; declarations in
toonark.specs.qwen_image_specs), their realistic sample inputs and their PyTorch references.

optimum has no ONNX configs for QwenImageTransformer2DModel, Qwen2.5-VL's text path or
AutoencoderKLQwenImage, so these go through torch.onnx (TorchScript exporter, opset 18) with the
spec's names and axes, like export/torch_onnx.py:
- transformer: diffusers' own blocks and weights; only the attention processor is swapped for one
  that takes RoPE as real (cos, sin) inputs (diffusers multiplies complex tensors, which neither
  exporter nor ONNX has), computed on the host by QwenImage.rope. The timestep comes as [1].
- text_encoder: the Qwen2.5-VL language model on text only: causal attention and text positions
  0..L-1 (what get_rope_index gives a right-padded text-only prompt), so the rows' real tokens are
  unchanged by the padding after them; the last hidden states (after the final norm) come out, and
  the host drops the template's first tokens (QwenImage.text_conditioning).
- vae_decoder / vae_encoder: one frame of the causal-3D VAE, 4-D in and out.
"""
from __future__ import annotations

import contextlib

import numpy as np

from toonark.family import FAMILIES, QwenImage
from toonark.specs import QI, QwenImageDims, SubmodelSpec

QWEN = FAMILIES[QwenImage.name]


def _torch():
    import torch
    return torch


def _contrib_attention():
    """A torch.autograd.Function that computes SDPA in PyTorch and exports as ONNX Runtime's fused
    com.microsoft MultiHeadAttention (q, k, v as (B, S, heads x dim), the joint text+image padding as
    key_padding_mask). ORT's transformer optimizer has no fusion for Qwen-Image's attention (q/k RMS
    norms and interleaved RoPE between the projections and the softmax: its mmdit fusion matches SD3 /
    Flux), so the ORT engine's graph carries the fused op from export instead of being pattern-matched."""
    torch = _torch()
    from torch.onnx import symbolic_helper

    class ContribMultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, key_padding_mask, heads: int):
            b, s, width = query.shape
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (query, key, value))
            mask = key_padding_mask.bool()[:, None, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return out.transpose(1, 2).reshape(b, s, width)

        @staticmethod
        def symbolic(g, query, key, value, key_padding_mask, heads: int):
            mask = g.op("Cast", key_padding_mask, to_i=6)   # INT32, as ORT wants key_padding_mask
            bias = symbolic_helper._optional_input_placeholder_tensor(g)
            return g.op("com.microsoft::MultiHeadAttention", query, key, value, bias, mask, num_heads_i=heads)

    return ContribMultiHeadAttention


class RealRopeAttnProcessor:
    """QwenDoubleStreamAttnProcessor2_0 (diffusers 0.39) with RoPE given as real (cos, sin): the same
    projections, q/k RMS norms, joint [text, image] attention with the text padding masked, outputs.
    image_rotary_emb = ((img_cos, img_sin), (txt_cos, txt_sin)), each (tokens, head_dim / 2).
    fused_attention: export the attention as ORT's com.microsoft MultiHeadAttention (ORT engines only;
    TensorRT and other runtimes read the plain graph)."""

    def __init__(self, fused_attention: bool = False):
        self.fused_attention = fused_attention

    @staticmethod
    def rotate(x, cos, sin):
        # x (B, S, H, D): pairs (x[2i], x[2i+1]) are complex numbers rotated by angle_i; in float32 as diffusers.
        dtype = x.dtype
        pairs = x.float().unflatten(-1, (-1, 2))
        re, im = pairs[..., 0], pairs[..., 1]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        out = _torch().stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
        return out.to(dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        torch = _torch()
        seq_txt = encoder_hidden_states.shape[1]
        img_q, img_k, img_v = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        txt_q, txt_k, txt_v = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                               attn.add_v_proj(encoder_hidden_states))
        img_q, img_k, img_v, txt_q, txt_k, txt_v = (t.unflatten(-1, (attn.heads, -1))
                                                    for t in (img_q, img_k, img_v, txt_q, txt_k, txt_v))
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
        img_q, img_k = self.rotate(img_q, img_cos, img_sin), self.rotate(img_k, img_cos, img_sin)
        txt_q, txt_k = self.rotate(txt_q, txt_cos, txt_sin), self.rotate(txt_k, txt_cos, txt_sin)
        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)
        if self.fused_attention:
            text_mask = (encoder_hidden_states_mask if encoder_hidden_states_mask is not None else
                         torch.ones(encoder_hidden_states.shape[:2], dtype=torch.int64, device=hidden_states.device))
            joint_mask = torch.cat([text_mask.to(torch.int64),
                                    torch.ones(hidden_states.shape[:2], dtype=torch.int64, device=hidden_states.device)],
                                   dim=1)
            joint = _contrib_attention().apply(query.flatten(2, 3), key.flatten(2, 3), value.flatten(2, 3),
                                               joint_mask, attn.heads).to(query.dtype)
        else:
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
            mask = None
            if encoder_hidden_states_mask is not None:
                image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
                mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask], dim=1)[:, None, None, :]
            joint = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            joint = joint.transpose(1, 2).flatten(2, 3).to(query.dtype)
        img_out = attn.to_out[0](joint[:, seq_txt:].contiguous())
        txt_out = attn.to_add_out(joint[:, :seq_txt].contiguous())
        return img_out, txt_out


@contextlib.contextmanager
def real_rope(transformer, fused_attention: bool = False):
    """Swap every block's attention processor for RealRopeAttnProcessor, and back afterwards (the
    same module then serves as the complex-RoPE PyTorch reference)."""
    blocks = list(transformer.transformer_blocks)
    saved = [block.attn.processor for block in blocks]
    for block in blocks:
        block.attn.processor = RealRopeAttnProcessor(fused_attention)
    try:
        yield transformer
    finally:
        for block, processor in zip(blocks, saved):
            block.attn.processor = processor


@contextlib.contextmanager
def exportable_upsampling(vae):
    """The VAE upsamples by exactly 2 with "nearest-exact", which the TorchScript exporter cannot write
    at opset 18; at an integer factor of 2 it picks the same source pixels as "nearest" (floor((i + 0.5)
    / 2) == floor(i / 2)), which exports as Resize. Swapped for the export, restored after."""
    torch = _torch()
    swapped = [m for m in vae.modules() if isinstance(m, torch.nn.Upsample) and m.mode == "nearest-exact"
               and all(float(f) == 2.0 for f in (m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,)))]
    for module in swapped:
        module.mode = "nearest"
    try:
        yield vae
    finally:
        for module in swapped:
            module.mode = "nearest-exact"


def _module_base():
    return _torch().nn.Module


class TransformerForExport(_module_base()):
    """QwenImageTransformer2DModel.forward with host-computed real RoPE as inputs (call inside real_rope)."""

    def __init__(self, transformer):
        super().__init__()
        self.m = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask, img_rope, txt_rope):
        m = self.m
        hidden = m.img_in(hidden_states)
        t = timestep.to(hidden.dtype).expand(hidden.shape[0])
        text = m.txt_in(m.txt_norm(encoder_hidden_states))
        temb = m.time_text_embed(t, hidden)
        rope = ((img_rope[0], img_rope[1]), (txt_rope[0], txt_rope[1]))
        for block in m.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text,
                                 encoder_hidden_states_mask=encoder_hidden_states_mask, temb=temb,
                                 image_rotary_emb=rope)
        return m.proj_out(m.norm_out(hidden, temb))


class TextEncoderForExport(_module_base()):
    """Qwen2.5-VL's language model on text-only ids: causal, positions 0..L-1 on all three mRoPE axes."""

    def __init__(self, text_encoder):
        super().__init__()
        self.lm = text_encoder.model.language_model

    def forward(self, input_ids):
        torch = _torch()
        batch, length = input_ids.shape
        steps = torch.arange(length, device=input_ids.device)
        positions = steps.view(1, 1, -1).expand(3, batch, length)
        # The causal mask built here, as a 4-D additive mask (transformers uses a given 4-D mask as is):
        # its own mask builder traces the prompt length into the graph as a constant.
        dtype = self.lm.embed_tokens.weight.dtype
        blocked = (steps[None, :] > steps[:, None]).to(dtype) * torch.finfo(dtype).min
        mask = blocked[None, None].expand(batch, 1, length, length)
        return self.lm(input_ids=input_ids, position_ids=positions, attention_mask=mask, cache_position=steps,
                       use_cache=False, return_dict=True).last_hidden_state


class VaeDecoderForExport(_module_base()):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample[:, :, None], return_dict=False)[0][:, :, 0]


class VaeEncoderForExport(_module_base()):
    """Mean and log-variance (B, 2z, h, w) of one frame, as `vae.encode(x).latent_dist.parameters`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample[:, :, None]).latent_dist.parameters[:, :, 0]


WRAPPERS = {"text_encoder": ("text_encoder", TextEncoderForExport), "transformer": ("transformer", TransformerForExport),
            "vae_decoder": ("vae", VaeDecoderForExport), "vae_encoder": ("vae", VaeEncoderForExport)}


def wrapper(name: str, modules: dict):
    component, cls = WRAPPERS[name]
    return cls(modules[component]).eval()


def sample_feeds(spec: SubmodelSpec, dims: QwenImageDims, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """The spec's random inputs, made realistic where values carry meaning: token ids below the
    vocabulary, RoPE from QwenImage.rope at the sizes' H/W/T, a text mask with the second half of
    rows padded (1..T real tokens), a sigma in (0, 1]."""
    feeds = spec.sample_inputs(sizes, "fp32", seed=seed)
    if spec.name == "transformer":
        text = sizes["T"]
        img, txt = QWEN.rope(dims, sizes["H"], sizes["W"], text)
        feeds[QI.img_rope], feeds[QI.txt_rope] = img, txt
        rows = feeds[QI.encoder_hidden_states_mask].shape[0]
        lengths = [text if i < rows - rows // 2 else max(1, text // 2) for i in range(rows)]
        feeds[QI.encoder_hidden_states_mask] = (np.arange(text)[None] < np.array(lengths)[:, None]).astype(np.int64)
        feeds[QI.timestep] = np.array([0.7], dtype=np.float32)
    return feeds


def torch_reference(spec: SubmodelSpec, modules: dict, feeds: dict[str, np.ndarray], dims: QwenImageDims,
                    sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """The diffusers/transformers modules' own forward on the same inputs (complex RoPE for the
    transformer, the full Qwen2.5-VL model with an attention mask for the text encoder)."""
    torch = _torch()
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    with torch.no_grad():
        if spec.name == "transformer":
            batch = t[QI.hidden_states].shape[0]
            out = modules["transformer"](
                hidden_states=t[QI.hidden_states], timestep=t[QI.timestep].expand(batch),
                encoder_hidden_states=t[QI.encoder_hidden_states],
                encoder_hidden_states_mask=t[QI.encoder_hidden_states_mask],
                img_shapes=[[(1, sizes["H"] // dims.image_token_div, sizes["W"] // dims.image_token_div)]] * batch,
                return_dict=False)[0]
        elif spec.name == "text_encoder":
            ids = t[QI.input_ids]
            out = modules["text_encoder"](input_ids=ids, attention_mask=torch.ones_like(ids),
                                          output_hidden_states=True).hidden_states[-1]
        elif spec.name == "vae_decoder":
            out = modules["vae"].decode(t[QI.latent_sample][:, :, None], return_dict=False)[0][:, :, 0]
        else:
            out = modules["vae"].encode(t[QI.image][:, :, None]).latent_dist.parameters[:, :, 0]
    return {spec.output_names[0]: out.float().numpy()}


def export_onnx(modules: dict, dims: QwenImageDims, specs: dict[str, SubmodelSpec], out_dir, submodels,
                sizes: dict[str, int], opset: int = 18, fused_attention: bool = False) -> None:
    """torch.onnx (TorchScript exporter) of each submodel to out_dir/<name>/model.onnx with the spec's
    names and dynamic axes; weights past 2 GB go to one side file (the shaped transformer).
    fused_attention: the transformer's attention as ORT's com.microsoft MultiHeadAttention (ORT only)."""
    from pathlib import Path
    torch = _torch()
    transformer = modules["transformer"]
    for name in submodels:
        spec = specs[name]
        path = Path(out_dir) / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        feeds = sample_feeds(spec, dims, sizes)
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names)
        with real_rope(transformer, fused_attention), exportable_upsampling(modules["vae"]), torch.no_grad():
            torch.onnx.export(wrapper(name, modules), args, str(path), input_names=spec.input_names,
                              output_names=spec.output_names,
                              dynamic_axes={k: v for k, v in spec.dynamic_axes().items() if v},
                              opset_version=opset, do_constant_folding=True, dynamo=False,
                              custom_opsets={"com.microsoft": 1} if fused_attention else None)


class QwenImageExport:
    """How the Qwen-Image family is exported (export/onnx_export.py's export_pipeline asks this object):
    torch.onnx of the wrappers above, parity against the diffusers/transformers modules' own forward."""
    components = ("text_encoder", "transformer", "vae")

    def load(self, model_dir):
        import torch
        from diffusers import QwenImagePipeline
        pipeline = QwenImagePipeline.from_pretrained(str(model_dir), use_safetensors=True, torch_dtype=torch.float32)
        for component in self.components:
            getattr(pipeline, component).eval()
        return pipeline

    def export_raw(self, pipeline, dims, specs, out_dir, submodels, limits) -> None:
        modules = {c: getattr(pipeline, c) for c in self.components}
        # Traced at the limits' min sizes: the smallest graph work; every axis is dynamic anyway.
        export_onnx(modules, dims, specs, out_dir, submodels, limits.sizes("min"))

    def parity(self, specs, submodels, precision_dirs, modules, limits, dims):
        """Parity rows per precision at the limits' opt and min sizes, as for Stable Diffusion."""
        from toonark.export.parity import measure, ort_session
        rows = {precision: [] for precision in precision_dirs}
        for name in submodels:
            for level in ("opt", "min"):
                spec, sizes = specs[name], limits.sizes(level)
                feeds = sample_feeds(spec, dims, sizes)
                reference = torch_reference(spec, modules, feeds, dims, sizes)
                for precision, folder in precision_dirs.items():
                    session = ort_session(folder / name / "model.onnx")
                    rows[precision] += measure(spec, precision, level, sizes, session, feeds, reference)
                    del session
        return rows
