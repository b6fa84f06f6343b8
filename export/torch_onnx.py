"""The torch.onnx recipe for in-memory modules (TorchScript exporter, opset 18, the declarations' names
and axes): what optimum's exporter writes, without optimum or tokenizer files, for the GPU benchmark
images. `make export` goes through optimum (export/onnx_export.py); the benchmarks and the fusion
tests call this one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from toonark.files import atomic_dir

log = logging.getLogger(__name__)

OPSET = 18


def make_modules(kind: str, seed: int = 0):
    """The same random-weight modules `export.pipelines.build_pipeline(kind)` saves (same seeds),
    built in memory: no tokenizer files needed (the GPU image has no open_clip)."""
    from toonark.export.pipelines import build_modules
    modules = build_modules(kind, seed)
    for module in modules.values():
        module.eval().requires_grad_(False)
    return modules


def pipeline_dims(modules):
    from toonark.specs import PipelineDims
    text, unet, vae = modules["text_encoder"].config, modules["unet"].config, modules["vae"].config
    return PipelineDims(text_length=text.max_position_embeddings, text_hidden=text.hidden_size,
                        latent_channels=unet.in_channels, vae_scale=2 ** (len(vae.block_out_channels) - 1),
                        vae_scaling_factor=float(vae.scaling_factor), in_channels=vae.in_channels)


def export_onnx(modules, dims, out_dir: Path,
                submodels: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")) -> dict[str, Path]:
    """fp32 ONNX of the served submodels with the spec's names and axis names: what optimum's
    exporter does (TorchScript exporter, opset 18), written out directly so the GPU image needs
    neither optimum nor the tokenizer files. Skips a submodel whose file exists."""
    import torch

    from toonark.specs import submodel_specs

    specs = submodel_specs(dims)
    sizes = {"B": 1, "H": 8 * dims.vae_scale, "W": 8 * dims.vae_scale}

    class TextEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, return_dict=False)[0]

    class Unet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    wrappers = {"text_encoder": lambda: TextEncoder(modules["text_encoder"]), "unet": lambda: Unet(modules["unet"]),
                "vae_decoder": lambda: VaeDecoder(modules["vae"])}
    paths = {}
    for name in submodels:
        wrapper, spec = wrappers[name](), specs[name]
        path = Path(out_dir) / name / "model.onnx"
        paths[name] = path
        if path.is_file():   # only ever complete: written in a temporary sibling folder, renamed into place
            continue
        feeds = spec.sample_inputs(sizes, "fp32")
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names)
        started = time.perf_counter()
        with atomic_dir(path.parent) as folder, torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(wrapper, args, str(folder / path.name), input_names=spec.input_names,
                              output_names=spec.output_names,
                              dynamic_axes={k: v for k, v in spec.dynamic_axes().items() if v}, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        log.info("exported %s in %.1f s", name, time.perf_counter() - started)
    return paths
