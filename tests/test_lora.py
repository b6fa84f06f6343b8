"""LoRA styles (issue 14): reading diffusers/PEFT and kohya files, parity with diffusers' fuse_lora, exact
A->B->A switching on ORT engines (also against an engine built from a LoRA-merged export), the weight map on
the CUDA-fused graph (packed QKV/KV, NHWC), and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toonark.lora import LoraError, check_lora_request, merged_weight, read_lora

STYLES = ("storybook", "crayon", "clay")


@pytest.fixture(scope="session")
def lora_dir(tiny_model, tmp_path_factory) -> Path:
    from toonark.export.loras import write_random_loras
    folder = tmp_path_factory.mktemp("loras")
    write_random_loras(tiny_model, folder)
    return folder


@pytest.fixture(scope="session")
def bases(tiny_build):
    from toonark.engines.lora import lora_bases
    return lora_bases(tiny_build)


@pytest.fixture(scope="session")
def loras(lora_dir, bases):
    from toonark.engines.lora import load_loras
    return load_loras(lora_dir, bases)


def _engine(tiny_engines, bases, loras, submodel, **options):
    from toonark.engines.lora import LoraOrtEngine
    from toonark.specs import BuildInfo
    folder = tiny_engines / "engines" / "ort-cpu-fp32" / submodel
    metadata = json.loads((folder / "engine.json").read_text())
    return LoraOrtEngine(folder / "model.onnx", BuildInfo.read(tiny_engines).specs[submodel], metadata,
                         bases[submodel], loras, threads=1, **options)


def test_formats_are_read_with_their_alphas(loras):
    assert loras.names == sorted(STYLES)
    story, crayon, clay = (loras.layers[n] for n in STYLES)
    assert {sub for sub, _ in story} == {"unet", "text_encoder"}                      # diffusers/PEFT, both
    assert {sub for sub, _ in crayon} == {"unet", "text_encoder"}                     # kohya, both
    assert {sub for sub, _ in clay} == {"unet"}
    assert ("unet", "down_blocks.0.attentions.0.proj_in") in crayon                   # kohya underscores resolved
    assert all(layer.alpha_over_rank == 0.5 for layer in crayon.values())             # .alpha = rank / 2
    assert all(layer.alpha_over_rank == 2.0 for layer in clay.values())               # lora_adapter_metadata
    assert all(layer.alpha is None for layer in story.values())                       # alpha = rank


def test_bad_files_are_refused_naming_the_key(tmp_path, bases):
    from safetensors.numpy import save_file
    shapes = {sub: base.shapes for sub, base in bases.items()}
    with pytest.raises(LoraError, match="only .safetensors"):
        read_lora(tmp_path / "style.bin")
    a, b = np.zeros((4, 32), np.float32), np.zeros((32, 4), np.float32)
    save_file({"unet.down_blocks.0.nothing.lora_A.weight": a, "unet.down_blocks.0.nothing.lora_B.weight": b},
              str(tmp_path / "nomatch.safetensors"))
    with pytest.raises(LoraError, match=r"key 'unet.down_blocks.0.nothing' matches no layer of the unet"):
        read_lora(tmp_path / "nomatch.safetensors").bind(shapes)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"unet.{module}.lora_A.weight": np.zeros((4, 40), np.float32),
               f"unet.{module}.lora_B.weight": b}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraError, match=r"does not fit unet layer .*to_q.* of shape \[32, 32\]"):
        read_lora(tmp_path / "shape.safetensors").bind(shapes)
    save_file({"model.diffusion_model.input_blocks.1.weight": a}, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(LoraError, match="key 'model.diffusion_model.input_blocks.1.weight' is not a LoRA key"):
        read_lora(tmp_path / "ldm.safetensors")


def test_request_checks_list_known_names():
    assert check_lora_request("", 1.0, ["crayon"]) == ("", 1.0)
    with pytest.raises(ValueError, match="LORA 'glitter' is not registered; known: clay, crayon"):
        check_lora_request("glitter", 1.0, ["crayon", "clay"])
    with pytest.raises(ValueError, match=r"LORA_SCALE 2.5 is out of range; use 0..2"):
        check_lora_request("crayon", 2.5, ["crayon"])


@pytest.mark.parametrize("style", STYLES)
def test_parity_with_diffusers_fuse_lora(style, tiny_model, tiny_engines, lora_dir, bases, loras):
    """diffusers' load_lora_weights + fuse_lora on the same folder: same merged weights, same UNet/CLIP outputs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32, safety_checker=None)
    pipe.load_lora_weights(str(lora_dir), weight_name=f"{style}.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    modules = {"unet": dict(pipe.unet.named_modules()), "text_encoder": dict(pipe.text_encoder.named_modules())}
    worst = 0.0
    for (sub, module), layer in loras.layers[style].items():
        ours = merged_weight(bases[sub].weights[module], layer, 0.7)
        theirs = modules[sub][module].base_layer.weight if hasattr(modules[sub][module], "base_layer") else \
            modules[sub][module].weight
        theirs = theirs.detach().numpy()
        worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
    assert worst < 1e-6, worst
    rng = np.random.default_rng(1)
    unet = _engine(tiny_engines, bases, loras, "unet")
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    ours = unet.run(feeds, lora=style, scale=0.7)["out_sample"]
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(feeds["sample"]), torch.tensor(500.0),
                           torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()
    base = unet.run(feeds, lora="")["out_sample"]
    assert np.abs(ours - base).max() > 1e-3                      # the LoRA does change the output
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
    te = _engine(tiny_engines, bases, loras, "text_encoder")
    ids = rng.integers(0, 49407, size=(2, 77)).astype(np.int64)
    ours = te.run({"input_ids": ids}, lora=style, scale=0.7)["last_hidden_state"]
    with torch.no_grad():
        theirs = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5


def _unet_feeds():
    rng = np.random.default_rng(2)
    return {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array([321.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}


@pytest.mark.parametrize("strategy", ["inplace", "recreate"])
def test_a_b_a_gives_the_bytes_of_a(strategy, tiny_engines, bases, loras, tmp_path):
    feeds = _unet_feeds()
    fresh = _engine(tiny_engines, bases, loras, "unet", strategy=strategy)
    want = fresh.run(feeds, lora="crayon", scale=0.8)["out_sample"]
    want_weights = fresh.weights()
    engine = _engine(tiny_engines, bases, loras, "unet", strategy=strategy, cache_size=1)
    for name, scale in [("crayon", 0.8), ("storybook", 1.3), ("clay", 1.0), ("", 1.0), ("storybook", 0.5),
                        ("crayon", 0.8)]:
        got = engine.run(feeds, lora=name, scale=scale)["out_sample"]
    assert np.array_equal(got, want)
    assert all(np.array_equal(engine.weights()[k], v) for k, v in want_weights.items())
    assert engine.stats.switches == 6 and engine.stats.cache_misses == 5 and engine.stats.cache_hits == 1
    assert engine.strategy == strategy                       # in place: ORT reads the buffers (verified once)

    # A fresh engine built (ORT-optimized) from an export whose weights were merged with crayon at 0.8.
    import onnx
    from onnx import numpy_helper
    from toonark.engines.ort import build_ort_engine, ort_build_settings
    from toonark.layout import BuildLayout
    source = BuildLayout(tiny_engines).onnx_model("fp32", "unet")
    model = onnx.load(str(source))
    layers = loras.for_submodel("crayon", "unet")
    inits = {t.name: t for t in model.graph.initializer}
    for module, layer in layers.items():
        name, transposed = bases["unet"].sources[module]
        merged = merged_weight(bases["unet"].weights[module], layer, 0.8)
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(merged.T if transposed else merged), name))
    merged_path = tmp_path / "merged" / "model.onnx"
    merged_path.parent.mkdir()
    onnx.save(model, str(merged_path))
    settings = ort_build_settings("ort-cpu", threads=1)
    (tmp_path / "engine").mkdir()
    build_ort_engine(merged_path, tmp_path / "engine", settings)
    from toonark.engines.ort import make_session
    session = make_session(tmp_path / "engine" / "model.onnx", settings, level=settings["load_optimization_level"])
    assert np.array_equal(session.run(["out_sample"], feeds)[0], want)


def test_fused_graph_map_packed_qkv_and_nhwc(lora_dir, tmp_path):
    """On ORT's CUDA fusions (packed QKV/KV, NhwcConv, fp16) of the benchmark's export (the one whose attention
    fuses on the tiny model): the merged set equals, byte for byte, the fused graph of a LoRA-merged export."""
    import onnx
    from onnx import numpy_helper
    from toonark.engines.fusions import fuse_for_cuda, heads_from_config
    from toonark.engines.lora import EngineWeightMap, LoraBase, load_loras
    from toonark.export.torch_onnx import export_onnx, make_modules, pipeline_dims
    modules = make_modules("tiny", seed=0)
    source = export_onnx(modules, pipeline_dims(modules), tmp_path / "src")["unet"]
    heads = heads_from_config(dict(modules["unet"].config))

    def fuse(src, dst):
        report = fuse_for_cuda(src, dst, "unet", num_heads=heads, fp16=True, respect_kernel_limits=False)
        assert report.fused["MultiHeadAttention"] == 8

    fuse(source, tmp_path / "base" / "model.onnx")
    base = LoraBase.from_onnx(source, "unet")
    text_base = LoraBase.from_onnx(export_onnx(modules, pipeline_dims(modules), tmp_path / "src")["text_encoder"],
                                   "text_encoder")
    layers = load_loras(lora_dir, {"unet": base, "text_encoder": text_base}).for_submodel("crayon", "unet")
    _save_merged_export(source, base, layers, tmp_path / "merged.onnx")
    fuse(tmp_path / "merged.onnx", tmp_path / "fused" / "model.onnx")
    fused = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "fused" / "model.onnx")).graph.initializer}
    mapping = EngineWeightMap(tmp_path / "base" / "model.onnx", base, set(layers))
    forms = {p.form for ps in mapping.placements.values() for p in ps}
    assert {"packed", "nhwc"} <= forms, forms
    values = mapping.weight_set(base, layers, 1.5)
    assert values and all(v.dtype == np.float16 for v in values.values())
    for name, value in values.items():
        assert np.array_equal(fused[name], value), name


# A weight nonzero below fp16's smallest subnormal: ORT's fp16 conversion stores it as +-5.96e-8, numpy's cast as 0.
TINY = np.array([1e-8, -1e-8, 2.9e-8, -3e-9], np.float32)



def test_fp16_cast_is_onnxruntimes():
    """The engine-side cast gives the bytes ORT's fp16 conversion writes (tiny -> +-5.96e-8, huge -> +-65504)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16
    from toonark.engines.lora import cast
    edges = [0.0, -0.0, 1e-8, -1e-8, 2.9e-8, 2.98023e-8, 3e-8, 5.9e-8, 5.97e-8, 1e-4, 65504.0, 65519.0, 65520.0,
             -7e4, 1e9, np.inf, -np.inf]
    value = np.concatenate([np.array(edges, np.float32), np.random.default_rng(0).standard_normal(1003).astype(
        np.float32) * 1e-6]).reshape(-1, 17)
    assert cast(value, np.float16).view(np.uint16).tobytes() == convert_np_to_float16(value).view(np.uint16).tobytes()
    assert cast(value, np.float32) is not value and np.array_equal(cast(value, np.float32), value)

def test_fused_graph_map_at_sd_widths(tmp_path):
    """A 320-wide UNet (SD-1.5's first block width: the GEGLU projection is 320 -> 2560, which BiasSplitGelu's
    CUDA kernel accepts, so `make engine BACKEND=ort-cuda PRECISION=fp16`'s fusions keep it), with weights below
    fp16's subnormal range in row 0 of adapted layers (SD-1.5's ~2 M-weight layers have some): the weight map
    finds every layer (plain, packed QKV/KV, NHWC), the merged set equals the fused graph of a LoRA-merged export
    byte for byte, the base set equals the base engine's, and A -> B -> A gives A's bytes."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper
    from safetensors.numpy import save_file
    from toonark.engines.fusions import fuse_for_cuda
    from toonark.engines.lora import EngineWeightMap, LoraBase, LoraSet
    from toonark.export.loras import random_lora_tensors
    from toonark.export.torch_onnx import export_onnx, make_modules, pipeline_dims
    modules = make_modules("tiny", seed=0)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",)).eval().requires_grad_(False)
    block = "down_blocks.0.attentions.0"
    tiny_rows = [f"{block}.proj_in", f"{block}.transformer_blocks.0.attn1.to_q",
                 f"{block}.transformer_blocks.0.attn2.to_k", f"{block}.transformer_blocks.0.ff.net.0.proj"]
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for module in tiny_rows:
            params[f"{module}.weight"].reshape(params[f"{module}.weight"].shape[0], -1)[0, :4] = torch.from_numpy(TINY)
    modules["unet"] = unet
    source = export_onnx(modules, pipeline_dims(modules), tmp_path / "src", submodels=("unet",))["unet"]

    def fuse(src, dst):
        report = fuse_for_cuda(src, dst, "unet", num_heads=8, fp16=True)   # kernel limits respected, as make engine
        assert not report.disabled and report.fused["BiasSplitGelu"] == 4 and report.fused["MultiHeadAttention"] == 8
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}

    fused_base = fuse(source, tmp_path / "base" / "model.onnx")
    base = LoraBase.from_onnx(source, "unet")
    # Two LoRAs on attention, proj_in/out and feed-forward; row 0 of `up` is zero in A, so A keeps the tiny weights.
    pattern = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2))$"
    for index, name in enumerate(("a", "b")):
        tensors = {}
        rng = np.random.default_rng(index)
        for module, (down, up) in random_lora_tensors(base.shapes, pattern, 4, rng, 0.5).items():
            if name == "a":
                up[0] = 0
            tensors[f"unet.{module}.lora_A.weight"], tensors[f"unet.{module}.lora_B.weight"] = down, up
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    loras = LoraSet.from_folder(tmp_path, {"unet": base.shapes})
    layers = loras.for_submodel("a", "unet")
    assert set(tiny_rows) <= set(layers)
    _save_merged_export(source, base, layers, tmp_path / "merged.onnx")
    fused_merged = fuse(tmp_path / "merged.onnx", tmp_path / "fused" / "model.onnx")

    mapping = EngineWeightMap(tmp_path / "base" / "model.onnx", base, loras.modules("unet"))
    forms = {p.form for ps in mapping.placements.values() for p in ps}
    assert {"same", "packed", "nhwc"} <= forms, forms
    touched = set(mapping.initializers)
    base_set = mapping.weight_set(base, {}, 1.0, only=touched)
    assert all(np.array_equal(fused_base[k], v) for k, v in base_set.items())
    sets = [{**base_set, **mapping.weight_set(base, loras.for_submodel(n, "unet"), s)}
            for n, s in [("a", 1.5), ("b", 0.7), ("", 1.0), ("a", 1.5)]]
    for name, value in sets[0].items():
        assert value.dtype == np.float16 and np.array_equal(fused_merged[name], value), name
    assert all(sets[3][k].tobytes() == v.tobytes() for k, v in sets[0].items())
    assert any(not np.array_equal(sets[1][k], v) for k, v in sets[0].items())
    # the tiny weights are there, as ORT's fp16 conversion stores them (not 0)
    qkv = next(p for p in mapping.placements[tiny_rows[1]] if p.form == "packed").initializer
    assert np.count_nonzero(np.abs(sets[0][qkv].astype(np.float32)) == np.float32(np.float16(5.96e-8))) >= 4


def test_lru_keeps_cache_size_sets(tiny_engines, bases, loras):
    engine = _engine(tiny_engines, bases, loras, "text_encoder", cache_size=2)
    ids = np.zeros((2, 77), np.int64)
    for name in ["storybook", "crayon", "storybook", "crayon", "clay", "storybook"]:
        engine.run({"input_ids": ids}, lora=name, scale=1.0)
    # clay adapts no text-encoder layer: selecting it changes nothing there and is no switch... except back to base
    assert len(engine.cache) <= 2
    assert engine.stats.cache_hits == 2 and engine.stats.cache_misses >= 2
    with pytest.raises(LoraError, match="not registered; known: clay, crayon, storybook"):
        engine.run({"input_ids": ids}, lora="glitter", scale=1.0)


# --- served ------------------------------------------------------------------------------------

SUBJECT = "a happy otter"


@pytest.fixture(scope="module")
def lora_server(tiny_engines, lora_dir, tmp_path_factory):
    from toonark.serving.launcher import TritonServer
    from toonark.serving.repository import write_repo
    repo = write_repo(tiny_engines, backend="ort-cpu", precision="fp32", layout="python", intra_op_threads=1,
                      out=tmp_path_factory.mktemp("lora-repo") / "repo", loras=lora_dir, lora_cache_size=2)
    server = TritonServer(repo, log_path=tmp_path_factory.mktemp("lora-log") / "tritonserver.log")
    try:
        server.start()
        server.wait_ready(300)
        yield server
    finally:
        server.stop()
        server.remove_shm()


def _pixels(data: bytes) -> np.ndarray:
    import io
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_served_refusals_list_known_names(lora_server):
    from toonark.serving.client import GenerateOptions, ServerError, generate
    with pytest.raises(ServerError, match=r"LORA 'glitter' is not registered; known: clay, crayon, storybook"):
        generate(lora_server.http_url, GenerateOptions(SUBJECT, steps=1, width=64, height=64, lora="glitter"))
    with pytest.raises(ServerError, match=r"LORA_SCALE 2.5 is out of range; use 0..2"):
        generate(lora_server.grpc_url, GenerateOptions(SUBJECT, steps=1, width=64, height=64, lora="crayon",
                                                       lora_scale=2.5), "grpc")


def test_interleaved_served_loras_never_mix(lora_server, tiny_engines, bases, loras):
    """Concurrent requests with different LoRAs (same prompt: the prompt-embedding cache of preprocess is keyed with
    the LoRA, so it is hit only by requests of the same style and scale): each image equals the offline pipeline's
    with that LoRA alone; metrics count the switches."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from toonark.engines.pipeline import load_pipeline
    from toonark.serving.client import GenerateOptions, generate
    requests = [("", 1.0), ("storybook", 1.0), ("crayon", 0.6), ("clay", 1.0), ("storybook", 1.5)]
    offline = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")
    te, unet = (_engine(tiny_engines, bases, loras, sub) for sub in ("text_encoder", "unet"))
    offline.engines.update(text_encoder=te, unet=unet)
    expected = {}
    for name, scale in requests:
        te.select(name, scale)
        unet.select(name, scale)
        expected[(name, scale)] = offline.generate(prompt=SUBJECT, seed=5, steps=2, width=64, height=64).images[0]
    assert len({e.tobytes() for e in expected.values()}) == len(requests)     # every style draws another image

    def one(item):
        (name, scale), protocol = item
        url = lora_server.http_url if protocol == "http" else lora_server.grpc_url
        result = generate(url, GenerateOptions(SUBJECT, seed=5, steps=2, width=64, height=64, lora=name,
                                               lora_scale=scale), protocol)
        return (name, scale), _pixels(result.images[0])

    work = [(r, p) for p in ("http", "grpc") for r in requests] + [(r, "http") for r in reversed(requests)]
    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(one, work))
    for key, pixels in results:
        diff = np.abs(pixels.astype(np.int16) - expected[key].astype(np.int16)).max()
        assert diff <= 1, (key, diff)
    text = urllib.request.urlopen(lora_server.metrics_url, timeout=10).read().decode()
    switches = [line for line in text.splitlines() if line.startswith("toonark_lora_switches_total")]
    assert any('stage="unet"' in line and float(line.split()[-1]) > 0 for line in switches), switches
    assert any(line.startswith("toonark_lora_switch_seconds_total") for line in text.splitlines())


def test_prompt_cache_is_keyed_with_the_lora(lora_server, tiny_engines, bases, loras):
    """toonark's prompt-embedding cache (the text_encoder step) holds one embedding per (prompt, text-encoder LoRA,
    scale): the base model's embedding of a prompt is never served to a style that changes the text encoder, a
    repeat of the same style and scale is a hit that does not run text_encoder's engine, and the base model is one key whatever
    LORA_SCALE says (no LoRA: the scale is not applied)."""
    import urllib.request
    from toonark.engines.pipeline import load_pipeline
    from toonark.serving.client import GenerateOptions, generate
    prompt = "a happy otter with a red kite"   # a prompt of its own: no other test cached it

    def counters():
        text = urllib.request.urlopen(lora_server.metrics_url, timeout=10).read().decode()
        return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(("toonark_prompt_cache_hits_total", "toonark_prompt_cache_misses_total",
                                    'toonark_stage_duration_seconds_count{stage="text_encoder"'))}

    before = counters()
    served = {}
    for name, scale in [("", 1.0), ("storybook", 1.0), ("storybook", 1.0), ("storybook", 1.5), ("", 0.5),
                        ("crayon", 1.0)]:
        result = generate(lora_server.http_url, GenerateOptions(prompt, seed=3, steps=2, width=64, height=64,
                                                                lora=name, lora_scale=scale))
        served.setdefault((name, scale), []).append(_pixels(result.images[0]))
    after = counters()
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    assert moved["toonark_prompt_cache_misses_total"] == 4 and moved["toonark_prompt_cache_hits_total"] == 2, moved
    assert moved['toonark_stage_duration_seconds_count{stage="text_encoder"}'] == 4, moved
    first, again = served[("storybook", 1.0)]
    assert np.array_equal(first, again)
    assert np.array_equal(served[("", 1.0)][0], served[("", 0.5)][0])
    # The storybook request came after the base model's embedding of the same prompt was cached: it must be the
    # image of the storybook text encoder (the offline pipeline with that LoRA), not of the base embedding.
    offline = load_pipeline(tiny_engines, backend="ort-cpu", precision="fp32")
    te, unet = (_engine(tiny_engines, bases, loras, sub) for sub in ("text_encoder", "unet"))
    offline.engines.update(text_encoder=te, unet=unet)
    te.select("storybook", 1.0)
    unet.select("storybook", 1.0)
    expected = offline.generate(prompt=prompt, seed=3, steps=2, width=64, height=64).images[0]
    te.select("", 1.0)   # the base text encoder with the storybook UNet: what a cache keyed without the LoRA serves
    wrong = offline.generate(prompt=prompt, seed=3, steps=2, width=64, height=64).images[0]
    assert np.abs(wrong.astype(np.int16) - expected.astype(np.int16)).max() > 1   # the key matters here
    assert np.abs(first.astype(np.int16) - expected.astype(np.int16)).max() <= 1


# --- TensorRT refit, up to the boundary (TensorRT is not installable here) ----------------------

class RecordingTrt:
    """A recording stand-in for the `tensorrt` module (NOT TensorRT): it only logs the calls TrtEngine makes, so
    the order (sync before refit, every weight set, async refit then sync) and the error paths can be checked."""

    def __init__(self, log, weights=("w_q", "w_k", "w_out"), parser_ok=True, missing=()):
        self.log, self.all, self.parser_ok, self.missing = log, list(weights), parser_ok, list(missing)
        outer = self

        class Refitter:
            def __init__(self, engine, logger):
                outer.log.append("Refitter")

            def get_all_weights(self):
                return outer.all

            def set_named_weights(self, name, weights):
                outer.log.append(f"set {name}={weights.value.reshape(-1)[0]:g}")
                return True

            def get_missing_weights(self):
                return outer.missing

            def refit_cuda_engine_async(self, stream):
                outer.log.append("refit_async")
                return True

        class OnnxParserRefitter:
            num_errors = 0 if parser_ok else 1

            def __init__(self, refitter, logger):
                pass

            def refit_from_file(self, path):
                return outer.parser_ok

            def get_error(self, i):
                return "initializer 'w_q' has a different shape"

        class Weights:
            def __init__(self, value):
                self.value = value

        self.Refitter, self.OnnxParserRefitter, self.Weights = Refitter, OnnxParserRefitter, Weights


def _trt_engine(log, refittable=True, **trt):
    from types import SimpleNamespace
    from toonark.engines.tensorrt import TrtEngine
    engine = object.__new__(TrtEngine)
    stream = SimpleNamespace(synchronize=lambda: log.append("stream.sync"), cuda_stream=7)
    torch = SimpleNamespace(cuda=SimpleNamespace(current_stream=lambda device: SimpleNamespace(
        synchronize=lambda: log.append("torch.sync"))))
    engine.__dict__.update(engine=SimpleNamespace(refittable=refittable), _trt=RecordingTrt(log, **trt), _logger=None,
                           stream=stream, _torch=torch, device="cuda:0", plan_path=Path("unet/model.plan"))
    return engine


def test_trt_refit_order_and_errors():
    log: list[str] = []
    engine = _trt_engine(log)
    base = {"w_q": np.zeros((2, 2), np.float32), "w_k": np.zeros((2, 2), np.float32)}
    a = {"w_q": np.full((2, 2), 1, np.float32), "w_k": np.full((2, 2), 2, np.float32)}
    b = {"w_out": np.full((2, 2), 3, np.float32)}
    engine.refit_weights(a)
    assert log == ["stream.sync", "torch.sync", "Refitter", "set w_q=1", "set w_k=2", "refit_async", "stream.sync"]
    log.clear()
    # A -> B: what A touched and B does not goes back to base (no blend of A and B)
    assert engine.refit_weights(b, previous=base) == 3
    assert sorted(x for x in log if x.startswith("set")) == ["set w_k=0", "set w_out=3", "set w_q=0"]
    with pytest.raises(RuntimeError, match=r"weights \['w_v'\] are not refittable in this plan"):
        engine.refit_weights({"w_v": np.zeros(1, np.float32)})
    log.clear()
    with pytest.raises(RuntimeError, match="built without refit, so its weights cannot be swapped.*--refit"):
        _trt_engine(log, refittable=False).refit_weights(a)
    assert "Refitter" not in log                          # refused before TensorRT's constructor
    with pytest.raises(RuntimeError, match="could not read refit weights from x.onnx: initializer 'w_q' has a "
                                           "different shape"):
        _trt_engine([], parser_ok=False).refit_from_onnx(Path("x.onnx"))
    with pytest.raises(RuntimeError, match=r"also needs weights \['w_bias'\]"):
        _trt_engine([], missing=["w_bias"]).refit_weights(a)


def test_trt_plan_refits_only_lora_targets(tiny_build):
    from conftest import TEST_LIMITS
    from toonark.engines.tensorrt import TrtBuildPlan, trt_build_plan
    from toonark.specs import BuildInfo
    unet = BuildInfo.read(tiny_build).specs["unet"]
    plan = trt_build_plan(unet, TEST_LIMITS, "fp16", {"refit_weights": ["onnx::MatMul_2", "onnx::MatMul_1"]})
    assert plan.refit and "REFIT_INDIVIDUAL" in plan.builder_flags and "REFIT" not in plan.builder_flags
    assert TrtBuildPlan.from_json(plan.to_json()) == plan
    assert plan.refit_weights == ("onnx::MatMul_1", "onnx::MatMul_2")


def _save_merged_export(source, base, layers, out):
    """The exported graph with every LoRA layer merged at scale 1.5 into its initializer (what a LoRA-merged
    export would hold), saved to `out`: the reference the fused engine's switched weights must equal."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(source))
    inits = {t.name: t for t in model.graph.initializer}
    for module, layer in layers.items():
        name, transposed = base.sources[module]
        merged = merged_weight(base.weights[module], layer, 1.5)
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(merged.T if transposed else merged), name))
    onnx.save(model, str(out))
