"""The Qwen-Image family (issue 17) on the tiny random folder: `make tiny KIND=qwen-image`, the family's
numpy pieces (tokenizer, text conditioning, 2x2 packing, RoPE, flow-matching Euler, true CFG) matched
to diffusers' QwenImagePipeline / FlowMatchEulerDiscreteScheduler, export parity and pipeline parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toonark.family import FAMILIES, QwenImage, family_for_folder
from toonark.specs import QI, QwenImageDims, ShapeLimits

from conftest import QWEN_LIMITS

QWEN = FAMILIES[QwenImage.name]
@pytest.fixture(scope="session")
def qwen_pipe(qwen_model):
    import torch
    from diffusers import QwenImagePipeline
    return QwenImagePipeline.from_pretrained(str(qwen_model), torch_dtype=torch.float32)


@pytest.fixture(scope="session")
def qwen_dims(qwen_model) -> QwenImageDims:
    return QWEN.dims_from_folder(qwen_model)


# --- make tiny KIND=qwen-image ---------------------------------------------------------------------

def test_tiny_folder_is_a_qwen_image_pipeline(qwen_model, qwen_dims):
    index = json.loads((qwen_model / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert family_for_folder(qwen_model) is QWEN
    assert (qwen_dims.heads, qwen_dims.head_dim, qwen_dims.text_hidden, qwen_dims.vae_scale) == (3, 16, 16, 8)
    assert all(any((qwen_model / part).glob("*.safetensors")) for part in ("transformer", "vae", "text_encoder"))


def test_make_tiny_cli_writes_the_kind(tmp_path):
    from toonark.scripts import tiny
    assert tiny.main(["--out", str(tmp_path / "q"), "--kind", "qwen-image"]) == 0
    assert family_for_folder(tmp_path / "q") is QWEN
    with pytest.raises(SystemExit):
        tiny.parse_args(["--out", str(tmp_path / "x"), "--kind", "qwen-imag"])


def test_offline_tokenizer_matches_transformers_and_drops_exactly_the_template(qwen_model, qwen_pipe, qwen_dims):
    """The trained BPE: transformers' fast and slow Qwen2 tokenizers and toonark's torch-free one give
    the same ids; the template's system/user prefix is exactly the 34 tokens the pipeline drops."""
    from transformers import Qwen2Tokenizer
    tokenizer = QWEN.load_tokenizer(qwen_model.parent / qwen_model.name)
    slow = Qwen2Tokenizer.from_pretrained(str(qwen_model / "tokenizer"))
    texts = ["a happy otter flying a kite", "Ünïcode & émoji 🦦, numbers 1234!", "  spaces\n\nand lines  "]
    for text in texts:
        templated = QWEN.prompt_template.format(text)
        ours = tokenizer.backend.encode(templated, add_special_tokens=False).ids
        assert ours == qwen_pipe.tokenizer(templated).input_ids == slow(templated).input_ids
    prefix = QWEN.prompt_template.split("{}")[0]
    assert len(qwen_pipe.tokenizer(prefix).input_ids) == qwen_dims.template_drop == 34
    assert qwen_pipe.prompt_template_encode == QWEN.prompt_template
    assert qwen_pipe.prompt_template_encode_start_idx == qwen_dims.template_drop


# --- the family's numpy pieces vs diffusers ----------------------------------------------------------

def test_pack_unpack_match_the_pipeline(qwen_pipe):
    import torch
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 12, 8)).astype(np.float32)
    packed = QWEN.pack_latents(latents)
    ref = qwen_pipe._pack_latents(torch.from_numpy(latents)[:, None].reshape(2, 4, 12, 8), 2, 4, 12, 8).numpy()
    assert np.array_equal(packed, ref)
    unpacked = qwen_pipe._unpack_latents(torch.from_numpy(packed), 96, 64, 8).numpy()[:, :, 0]
    assert np.array_equal(QWEN.unpack_latents(packed, 12, 8), unpacked)
    assert np.array_equal(QWEN.unpack_latents(packed, 12, 8), latents)


@pytest.mark.parametrize("height,width,text", [(64, 64, 5), (96, 128, 17), (128, 80, 1)])
def test_real_rope_equals_diffusers_complex_rope(qwen_pipe, qwen_dims, height, width, text):
    img, txt = QWEN.rope(qwen_dims, height, width, text)
    vid_freqs, txt_freqs = qwen_pipe.transformer.pos_embed([(1, height // 16, width // 16)], max_txt_seq_len=text,
                                                          device="cpu")
    np.testing.assert_allclose(img[0], vid_freqs.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(img[1], vid_freqs.imag.numpy(), atol=2e-6)
    np.testing.assert_allclose(txt[0], txt_freqs.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(txt[1], txt_freqs.imag.numpy(), atol=2e-6)


@pytest.mark.parametrize("steps", [2, 3, 10, 30, 50])
@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096])
def test_flow_match_euler_matches_diffusers_step_by_step(qwen_model, steps, image_seq_len):
    """Schedule (with the pipeline's resolution-dependent mu) and every Euler step vs diffusers."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    ours = QWEN.sampler(qwen_model)
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(str(qwen_model / "scheduler"))
    cfg = reference.config
    mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    reference.set_begin_index(0)
    schedule = ours.schedule(steps, image_seq_len)
    assert schedule.mu == pytest.approx(mu, rel=1e-12)
    assert np.array_equal(schedule.timesteps, reference.timesteps.numpy())
    assert np.array_equal(schedule.sigmas, reference.sigmas.numpy())
    rng = np.random.default_rng(steps)
    sample = rng.standard_normal((1, 16, 16)).astype(np.float32)
    state, ref_sample = ours.initial_state(schedule), torch.from_numpy(sample.copy())
    worst = 0.0
    for t in reference.timesteps:
        velocity = rng.standard_normal(sample.shape).astype(np.float32)
        assert np.float32(t) / np.float32(1000) == state.model_timestep
        ref_sample = reference.step(torch.from_numpy(velocity), t, ref_sample, return_dict=False)[0]
        sample, state = ours.step(velocity, sample, state)
        worst = max(worst, float(np.abs(sample - ref_sample.numpy()).max()))
    assert state.done and worst == 0.0


def test_flow_match_refuses_what_it_does_not_implement(tmp_path):
    from toonark.flow_match import FlowMatchConfig, FlowMatchEuler
    with pytest.raises(ValueError, match="use_karras_sigmas=True is not supported.*set it to False"):
        FlowMatchConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="key 'mystery' is unknown"):
        FlowMatchConfig.from_dict({"mystery": 1})
    with pytest.raises(ValueError, match="steps 1 is not possible with shift_terminal=0.02"):
        FlowMatchEuler(FlowMatchConfig(shift_terminal=0.02)).schedule(1, 256)
    assert len(FlowMatchEuler(FlowMatchConfig()).schedule(1, 256)) == 1
    with pytest.raises(FileNotFoundError, match="scheduler_config.json is missing"):
        FlowMatchConfig.from_file(tmp_path)


def test_true_cfg_with_norm_rescale_matches_the_pipeline_formula():
    import torch
    from toonark.flow_match import true_cfg
    rng = np.random.default_rng(1)
    cond, uncond = (rng.standard_normal((2, 16, 16)).astype(np.float32) for _ in range(2))
    tc, tu = torch.from_numpy(cond), torch.from_numpy(uncond)
    comb = tu + 4.0 * (tc - tu)
    ref = comb * (torch.norm(tc, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    ours = true_cfg(cond, uncond, 4.0)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=2e-6, atol=1e-6)
    assert np.allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(cond, axis=-1), rtol=1e-5)


def test_text_conditioning_matches_the_pipeline_prompt_embeds(qwen_model, qwen_pipe, qwen_dims):
    """Template, right padding, the drop of 34 tokens and zero padding to the longest row, vs
    QwenImagePipeline._get_qwen_prompt_embeds on the PyTorch text encoder."""
    import torch
    tokenizer = QWEN.load_tokenizer(qwen_model)
    prompts, negatives = ["a happy otter flying a kite over the sea", "a cat"], ["scary", " "]
    ids, too_long = QWEN.encode_prompts(tokenizer, prompts, negatives, qwen_dims)
    assert ids.shape[0] == 4 and too_long == [False] * 4
    lengths = QWEN.token_lengths(ids, tokenizer.pad_id)
    with torch.no_grad():
        hidden = qwen_pipe.text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
            (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)), output_hidden_states=True).hidden_states[-1]
        ref, ref_mask = qwen_pipe._get_qwen_prompt_embeds(negatives + prompts, device="cpu")
    embeds, mask = QWEN.text_conditioning(hidden.numpy(), lengths, qwen_dims)
    assert np.array_equal(mask, ref_mask.numpy())
    np.testing.assert_allclose(embeds, ref.numpy(), atol=1e-6)


def test_family_limits_and_specs(qwen_dims):
    limits = QWEN.default_limits(ShapeLimits(min_image=64, opt_image=128, max_image=256, image_step=16), qwen_dims)
    assert (limits.min_text, limits.opt_text, limits.max_text) == (1, 64, 512)
    specs = QWEN.specs(qwen_dims)
    assert list(specs) == ["text_encoder", "transformer", "vae_decoder", "vae_encoder"]
    transformer = specs["transformer"]
    assert transformer.profile(limits)[QI.hidden_states] == ((2, 16, 16), (2, 64, 16), (8, 256, 16))
    assert specs["text_encoder"].profile(limits)[QI.input_ids] == ((2, 35), (2, 98), (8, 546))
    assert transformer.dynamic_axes()[QI.img_rope] == {1: "HW/256"}
    assert ShapeLimits().to_json() == dict(min_batch=1, opt_batch=1, max_batch=4, min_image=256, opt_image=512,
                                           max_image=768, image_step=64)   # SD's toonark.json unchanged


# --- export ---------------------------------------------------------------------------------------

def test_export_writes_every_submodel_with_parity_and_dynamic_axes(qwen_build):
    import onnx
    from toonark.files import read_json
    from toonark.layout import BuildLayout
    from toonark.specs import BuildInfo
    layout = BuildLayout(qwen_build)
    info = BuildInfo.read(qwen_build)
    assert isinstance(info.dims, QwenImageDims) and info.limits == QWEN_LIMITS
    assert list(info.specs) == ["text_encoder", "transformer", "vae_decoder", "vae_encoder"]
    worst = {}
    for precision in ("fp32", "fp16"):
        report = read_json(layout.export_report(precision), "export report", "")
        rows = report["parity"]
        assert {r["submodel"] for r in rows} == set(info.specs) and all(r["ok"] for r in rows)
        for r in rows:
            key = (r["submodel"], precision)
            worst[key] = max(worst.get(key, 0.0), r["max_rel"])
    # fp32 is the same math (real vs complex RoPE, one frame of the 3-D VAE): float32 rounding only.
    assert all(v < 2e-5 for (name, p), v in worst.items() if p == "fp32"), worst
    model = onnx.load(str(layout.onnx_dir("fp32") / "transformer" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims[QI.hidden_states] == ["2B", "HW/256", 16]
    assert dims[QI.encoder_hidden_states] == ["2B", "T", 16]
    assert dims[QI.txt_rope] == [2, "T", 8]
    assert not any(n.op_type.startswith("Complex") for n in model.graph.node)
    text = onnx.load(str(layout.onnx_dir("fp32") / "text_encoder" / "model.onnx"), load_external_data=False)
    assert [d.dim_param for d in text.graph.input[0].type.tensor_type.shape.dim] == ["2B", "T+34"]


# --- offline pipeline -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def qwen_offline(qwen_engines):
    from toonark.engines.pipeline import load_pipeline
    return load_pipeline(qwen_engines, "ort-cpu", "fp32")


@pytest.mark.parametrize("prompt,negative,guidance,width,height,steps", [
    (["a happy otter flying a kite"], ["scary, dark"], 4.0, 96, 64, 4),                     # true CFG + rescale
    (["a cat", "a fluffy bunny in the snow with a red hat"], ["", "blurry"], 1.0, 64, 128, 3),   # no CFG, B=2
])
def test_offline_pipeline_matches_diffusers_qwen_image_pipeline(qwen_offline, qwen_pipe, prompt, negative, guidance,
                                                                width, height, steps):
    """Same prompts, starting latents, steps, guidance: pixels within 5e-6 of QwenImagePipeline's (in 0..1)."""
    import torch
    from toonark.qwen_pipeline import QwenImageText2ImagePipeline
    assert isinstance(qwen_offline, QwenImageText2ImagePipeline)
    batch = len(prompt)
    latents = QWEN.initial_latents(3, batch, qwen_offline.dims, height, width)
    ours = qwen_offline(prompt, negative, steps=steps, guidance=guidance, width=width, height=height, batch=batch,
                        latents=latents)
    reference = qwen_pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=guidance, width=width, height=height,
                          num_inference_steps=steps, latents=torch.from_numpy(latents), output_type="np").images
    pixels = np.clip(ours.decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert pixels.shape == reference.shape == (batch, height, width, 3)
    assert np.abs(pixels - reference).max() < 5e-6
    assert np.abs(ours.images.astype(int) - np.round(reference * 255).astype(int)).max() <= 1
    assert len(ours.timings["transformer_ms"]) == steps


def test_offline_generate_resolves_and_refuses_like_the_server(qwen_offline):
    from toonark.api import RequestError
    result = qwen_offline.generate(prompt="a happy otter", seed=5, steps=2, width=64, height=64)
    assert result.images.shape == (1, 64, 64, 3)
    again = qwen_offline.generate(prompt="a happy otter", seed=5, steps=2, width=64, height=64)
    assert np.array_equal(result.images, again.images)
    two = qwen_offline.generate(prompt="a happy otter", seed=5, steps=2, width=64, height=64, num_images=2)
    assert np.array_equal(two.images[0], result.images[0])     # image i is seed + i alone
    with pytest.raises(RequestError, match=r'prompt refused \(weapons\)'):
        qwen_offline.generate(prompt="a bunny with a gun", steps=2)
    with pytest.raises(RequestError, match="width 72 must be a multiple of 16 in 64..128"):
        qwen_offline.generate(prompt="a cat", steps=2, width=72, height=64)
    with pytest.raises(RequestError, match="PROMPT is too long: .* the text encoder reads 96; shorten"):
        qwen_offline.generate(prompt="a cat counting " + "7" * 150, steps=2)


def test_qwen_builds_refuse_the_device_loop(qwen_engines):
    from toonark.engines.pipeline import load_pipeline
    from toonark.qwen_pipeline import QwenImageText2ImagePipeline
    with pytest.raises(ValueError, match="Qwen-Image runs on the host loop"):
        QwenImageText2ImagePipeline({}, None, None, None, device_loop=object())
    from toonark.engines.ort_loop import check_scheduler
    from toonark.engines.pipeline import use_device_loop
    sampler = QWEN.sampler(qwen_engines / "pipeline")
    with pytest.raises(ValueError, match="the device loop implements DPM-Solver.*use the host loop"):
        check_scheduler(sampler)
    assert use_device_loop("ort-cuda", None, sampler) is False     # ort-cuda builds fall back to the host loop
    assert isinstance(load_pipeline(qwen_engines, "ort-cpu", "fp32"), QwenImageText2ImagePipeline)


# --- TensorRT / INT8 boundary -----------------------------------------------------------------------

def test_tensorrt_plan_and_trtexec_lines_come_from_the_declaration(qwen_engines):
    from toonark.engines.commands import build_dir_commands
    from toonark.engines.tensorrt import trt_build_plan
    from toonark.specs import BuildInfo
    info = BuildInfo.read(qwen_engines)
    spec = info.specs["transformer"]
    plan = trt_build_plan(spec, info.limits, "fp16")
    assert plan.builder_flags == ("FP16",)
    profile = {name: (low, opt, high) for name, low, opt, high in plan.profile}
    assert profile[QI.hidden_states] == ((2, 16, 16), (2, 36, 16), (4, 64, 16))
    assert profile[QI.txt_rope] == ((2, 1, 8), (2, 24, 8), (2, 96, 8))
    text = "\n".join(" ".join(c.build) for c in build_dir_commands(qwen_engines))
    assert ("--minShapes=hidden_states:2x16x16,encoder_hidden_states:2x1x16,encoder_hidden_states_mask:2x1,"
            "img_rope:2x16x8,txt_rope:2x1x8") in text
    assert "--minShapes=input_ids:2x35 --optShapes=input_ids:2x58 --maxShapes=input_ids:4x130" in text
    assert "--minShapes=latent_sample:1x4x8x8 --optShapes=latent_sample:1x4x12x12" in text


def test_calibration_captures_the_transformer_inputs(qwen_engines):
    """make calibrate's capture on a Qwen-Image build: the kids prompt set through the flow-matching
    sampler, one shard per step with the transformer's declared inputs (the mask stays int64)."""
    from toonark.calibration.capture import CaptureConfig, capture, source_unet
    from toonark.engines.pipeline import load_pipeline
    from toonark.specs import BuildInfo
    assert source_unet(qwen_engines).parent.name == "transformer"
    config = CaptureConfig(prompts=2, steps=2, size=64)
    result = capture(qwen_engines, config, progress=False, load_pipeline=load_pipeline)
    assert len(result.shards) == 4 and not result.cached
    spec = BuildInfo.read(qwen_engines).specs["transformer"]
    with np.load(result.shards[0]) as shard:
        assert sorted(shard.files) == sorted(spec.input_names)
        assert shard[QI.encoder_hidden_states_mask].dtype == np.int64
        assert shard[QI.hidden_states].shape == (2, 16, 16)
        assert shard[QI.timestep].shape == (1,) and 0 < float(shard[QI.timestep][0]) <= 1
    assert capture(qwen_engines, config, progress=False, load_pipeline=load_pipeline).cached


def test_transformer_with_ort_fused_attention_matches_pytorch(qwen_pipe, qwen_dims, tmp_path):
    """The ORT engine variant: attention exported as com.microsoft MultiHeadAttention (ORT's optimizer
    cannot pattern-match Qwen's attention), same outputs as the diffusers module."""
    import onnx
    import onnxruntime as ort
    from toonark.export import qwen_export
    specs = QWEN.specs(qwen_dims)
    modules = {"transformer": qwen_pipe.transformer, "vae": qwen_pipe.vae}
    qwen_export.export_onnx(modules, qwen_dims, specs, tmp_path, ["transformer"], {"B": 1, "H": 64, "W": 64, "T": 5},
                            fused_attention=True)
    path = tmp_path / "transformer" / "model.onnx"
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sizes in ({"B": 1, "H": 64, "W": 96, "T": 7}, {"B": 2, "H": 96, "W": 64, "T": 12}):
        feeds = qwen_export.sample_feeds(specs["transformer"], qwen_dims, sizes, seed=1)
        reference = qwen_export.torch_reference(specs["transformer"], modules, feeds, qwen_dims, sizes)[QI.noise_pred]
        out = session.run(None, feeds)[0]
        assert np.abs(out - reference).max() / np.abs(reference).max() < 1e-5


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_qwen.py --tiny: the H200 script's code path (eager, per block, ORT with the fused
    attention) on the CPU; speed is not asserted."""
    from toonark.benchmarks import gpu_qwen
    assert gpu_qwen.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "qwen_gpu.json").read_text())
    ort_row = result["variants"]["ORT CPU fp32"]
    assert ort_row["ops"]["MultiHeadAttention"] == 2 and ort_row["rel_l2_vs_torch_eager"] < 1e-5
    eager = result["variants"]["torch eager fp32"]
    assert eager["full_depth_ms"] == pytest.approx(eager["rest_ms"] + 60 * eager["block_ms"], abs=0.2)


def test_ort_fusion_recipe_applies_to_the_transformer(qwen_build):
    """`make engine BACKEND=ort-cuda PRECISION=fp16` fuses the fp32 export first (engines/fusions.py): the
    transformer gets the mmdit recipe; its CPU-safe subset keeps the output."""
    import onnxruntime as ort
    from toonark.engines.fusions import fuse_model
    from toonark.export import qwen_export
    from toonark.layout import BuildLayout
    from toonark.specs import BuildInfo
    info = BuildInfo.read(qwen_build)
    source = BuildLayout(qwen_build).onnx_model("fp32", "transformer")
    optimized, report = fuse_model(source, "transformer", fp16=False, cpu_safe=True)
    assert report.model_type == "mmdit" and report.fused.get("SimplifiedLayerNormalization", 0) > 0
    spec = info.specs["transformer"]
    sizes = info.limits.sizes("opt")
    feeds = qwen_export.sample_feeds(spec, info.dims, sizes)
    fused = ort.InferenceSession(optimized.model.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    a, b = fused.run(None, feeds)[0], plain.run(None, feeds)[0]
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


def test_int8_transformer_calibrates_passes_the_gate_and_builds(qwen_engines):
    """`make calibrate` on a Qwen-Image build: capture through the flow-matching sampler, QDQ INT8 of the
    transformer (its input/output projections, time embedding and norms kept in float: the MMDiT's
    conv_in/conv_out), the PSNR / latent-cosine gate against fp16; then `make engine PRECISION=int8`
    builds the transformer from that model and the pipeline draws with it."""
    from toonark.calibration.capture import CaptureConfig
    from toonark.calibration.gate import GateConfig
    from toonark.calibration.quantize import QuantConfig
    from toonark.calibration.run import calibrate
    from toonark.engines.build import build_engines
    from toonark.engines.pipeline import load_pipeline
    report = calibrate(qwen_engines, CaptureConfig(prompts=3, steps=3, size=64), QuantConfig(method="minmax"),
                       GateConfig(prompts=2, steps=3, size=64), progress=False, load_pipeline=load_pipeline)
    assert report["passed"] and report["source_onnx"] == "onnx/fp32/transformer/model.onnx"
    assert report["quantize"]["summary"]["quantized_by_type"].get("MatMul", 0) > 0
    assert {"conv_in", "conv_out", "time_embedding"} <= set(report["quantize"]["kept_float"])
    results = build_engines(qwen_engines, "ort-cpu", "int8", submodels=["transformer"])
    assert results["transformer"]["source_onnx"].endswith("calibration/int8/unet/model.onnx")
    pipe = load_pipeline(qwen_engines, "ort-cpu", {"text_encoder": "fp32", "transformer": "int8", "vae_decoder": "fp32"})
    image = pipe.generate(prompt="a happy otter", seed=2, steps=2, width=64, height=64).images
    assert image.shape == (1, 64, 64, 3)
