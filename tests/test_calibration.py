"""INT8 calibration (make calibrate): prompt set, per-step capture, QDQ placement, quality gate,
staleness. Runs the real stage on the tiny pipeline at 64 px with 6 sampler steps and 2 prompts,
so the whole module stays within a couple of minutes on 2 cores."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from toonark.calibration import prompts as prompts_module
from toonark.calibration import run as run_module
from toonark.calibration.capture import (MANIFEST, CaptureConfig, build_capture_key, capture_dir, read_capture,
                                         source_unet)
from toonark.calibration.gate import (DEFAULT_THRESHOLDS, GateConfig, compare_runs, cosine, failures, psnr_db,
                                      summarize, worst)
from toonark.calibration.prompts import MIN_PROMPTS, prompt_set
from toonark.calibration.quantize import QuantConfig, qdq_summary, sensitive_nodes
from toonark.calibration.run import GateFailed, calibrate, invalidate_stale, report_path
from toonark.engines.pipeline import load_pipeline
from toonark.files import read_json, sha256_onnx
from toonark.layout import BuildLayout

SMALL_CAPTURE = CaptureConfig(prompts=2, size=64, steps=6)
SMALL_GATE = GateConfig(prompts=2, size=64, steps=6, latency_runs=2)
REPORT_KEYS = {"passed", "source_onnx_sha256", "int8_onnx_sha256", "metrics", "thresholds", "advice"}
QUANTIZED_OPS = {"Conv", "MatMul", "Gemm"}


# -- prompt set ---------------------------------------------------------------------------------

def test_prompt_set_is_large_disjoint_and_stable():
    first = prompt_set()
    prompts_module.prompt_set.cache_clear()
    second = prompt_set()
    assert first is not second and first == second                       # deterministic rebuild
    texts = [p.text for p in first.calibration + first.evaluation]
    assert len(texts) >= MIN_PROMPTS and len(set(texts)) == len(texts)
    assert not {p.text for p in first.calibration} & {p.text for p in first.evaluation}
    assert len(first.evaluation) >= 16 and len(first.calibration) >= 200
    for part in (first.calibration, first.evaluation):                    # stable order: by subject hash
        keys = [prompts_module._digest(p.subject) for p in part]
        assert keys == sorted(keys)
    assert all(p.part == "calibration" for p in first.calibration)
    assert len({p.animal for p in first.take("calibration", 8)}) >= 4     # the first N mix animals
    assert first.evaluation[0].seed == second.evaluation[0].seed
    with pytest.raises(ValueError, match=r"asked for 100000 evaluation prompts; the prompt set has \d+"):
        first.take("evaluation", 100000)


def test_calibration_prompts_are_what_the_server_sends(tiny_build):
    """Each calibration / evaluation prompt, sent to the server as PROMPT=<subject>, resolves (toonark.api,
    what preprocess runs) to the same conditional and unconditional texts and the same token ids the
    calibration sampler feeds the text encoder: no second template or negative prompt."""
    from toonark.api import resolve_request
    from toonark.family import family_for_folder
    from toonark.prompts import PromptPolicy
    from toonark.specs import BuildInfo
    info, pipeline_dir = BuildInfo.read(tiny_build), BuildLayout(tiny_build).pipeline
    family = family_for_folder(pipeline_dir)
    tokenizer, policy, prompts = family.load_tokenizer(pipeline_dir), PromptPolicy.load(), prompt_set()
    for prompt in prompts.calibration[:24] + prompts.evaluation[:8]:
        served = resolve_request(info, policy, prompt=prompt.subject)
        assert list(served.prompts) == [prompt.text] and list(served.negatives) == [prompts.negative]
        ours, _ = family.encode_prompts(tokenizer, [prompt.text], [prompts.negative], info.dims)
        np.testing.assert_array_equal(ours, served.input_ids(tokenizer, family, info.dims))


def test_capture_holds_the_served_text_embeddings(calibrated, build):
    """The captured UNet inputs carry the text encoder's output for the served token ids of the prompt."""
    from toonark.api import resolve_request
    from toonark.engines import load_engine
    from toonark.family import family_for_folder
    from toonark.prompts import PromptPolicy
    from toonark.specs import BuildInfo
    info, pipeline_dir = BuildInfo.read(build), BuildLayout(build).pipeline
    family = family_for_folder(pipeline_dir)
    first = prompt_set().take("calibration", 1)[0]
    ids = resolve_request(info, PromptPolicy.load(), prompt=first.subject).input_ids(
        family.load_tokenizer(pipeline_dir), family, info.dims)
    want = load_engine(build, "ort-cpu", "fp32", "text_encoder").run({"input_ids": ids})["last_hidden_state"]
    with np.load(read_capture(build).shards[0]) as shard:
        np.testing.assert_allclose(shard["encoder_hidden_states"], want, rtol=0, atol=1e-6)


def test_quant_config_errors_name_the_value():
    with pytest.raises(ValueError, match="calibration method 'avg' is unknown"):
        QuantConfig(method="avg")
    with pytest.raises(ValueError, match="unknown keep-float group.*conv_middle"):
        QuantConfig(keep_float=("conv_in", "conv_middle"))
    with pytest.raises(RuntimeError, match="neural-compressor"):
        QuantConfig(smooth_quant=True).check_available()


# -- the stage on the tiny pipeline ------------------------------------------------------------

@pytest.fixture(scope="module")
def build(tiny_engines, tmp_path_factory) -> Path:
    """A private copy of the tiny build (ONNX, pipeline, fp32 ORT CPU engines): calibration writes
    into OUT/calibration and one test edits the UNet ONNX."""
    out = tmp_path_factory.mktemp("calib") / "tiny"
    shutil.copytree(tiny_engines, out, ignore=shutil.ignore_patterns("calibration", "triton_model_repo"))
    return out


@pytest.fixture(scope="module")
def calibrated(build) -> dict:
    return calibrate(build, SMALL_CAPTURE, QuantConfig(), SMALL_GATE, progress=False, log=lambda *_: None,
              load_pipeline=load_pipeline)


def test_capture_writes_one_bounded_shard_per_step(build, calibrated):
    captured = read_capture(build)
    manifest = read_json(capture_dir(build) / MANIFEST, "manifest", "")
    assert len(captured.shards) == SMALL_CAPTURE.prompts * SMALL_CAPTURE.steps
    assert manifest["source_onnx_sha256"] == sha256_onnx(source_unet(build)) == calibrated["source_onnx_sha256"]
    latent = SMALL_CAPTURE.size // 8
    one_step_bytes = 4 * (2 * 4 * latent * latent + 1 + 2 * 77 * 32)     # sample + timestep + text, float32
    timesteps = []
    for shard in captured.shards:
        with np.load(shard) as data:
            assert set(data.files) == {"sample", "timestep", "encoder_hidden_states"}
            assert data["sample"].shape == (2, 4, latent, latent)             # the CFG batch of one step
            assert data["encoder_hidden_states"].shape == (2, 77, 32)
            assert data["timestep"].shape == (1,)
            timesteps.append(float(data["timestep"][0]))
        assert shard.stat().st_size <= one_step_bytes + 2048                  # one step per shard, nothing more
    assert captured.max_shard_bytes <= one_step_bytes + 2048
    assert len(set(timesteps[:SMALL_CAPTURE.steps])) == SMALL_CAPTURE.steps   # every timestep of a run
    assert timesteps[:SMALL_CAPTURE.steps] == sorted(timesteps[:SMALL_CAPTURE.steps], reverse=True)


def test_int8_model_is_trt_style_qdq(build, calibrated):
    path = BuildLayout(build).int8_unet
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    summary = qdq_summary(model, tuple(QUANTIZED_OPS))
    assert summary["quantize_linear"] > 0 and summary["quantized_nodes"] > 0
    assert set(summary["dq_consumers"]) <= QUANTIZED_OPS                 # Q/DQ only feed the quantized op inputs
    producers = {out: node for node in model.graph.node for out in node.output}
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        zero_point = next(i for i in model.graph.initializer if i.name == q.input[2])
        assert not onnx.numpy_helper.to_array(zero_point).any()          # symmetric
        assert onnx.numpy_helper.to_array(zero_point).dtype == np.int8
        parent = producers.get(q.input[0])
        if parent is not None and parent.op_type in QUANTIZED_OPS:       # only as another quantized op's input
            readers = [n for n in model.graph.node if q.output[0] in n.input]
            assert all(r.op_type == "DequantizeLinear" for r in readers)
    found = sensitive_nodes(model, ("conv_in", "conv_out"))
    by_name = {n.name: n for n in model.graph.node}
    for name in found["conv_in"] + found["conv_out"]:
        assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                       for i in by_name[name].input), f"{name} is quantized"
    weights_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and next((i for i in model.graph.initializer if i.name == n.input[1]), None) is not None
                  and onnx.numpy_helper.to_array(next(i for i in model.graph.initializer
                                                       if i.name == n.input[1])).size > 1]
    assert weights_dq, "weights are not per-channel"


def test_gate_passes_with_defaults_and_reports(build, calibrated):
    report = read_json(report_path(build), "report", "")
    assert REPORT_KEYS <= set(report)
    assert report["passed"] is True and report["advice"] == ""
    assert report["thresholds"] == DEFAULT_THRESHOLDS
    assert report["int8_onnx_sha256"] == sha256_onnx(BuildLayout(build).int8_unet)
    assert report["metrics"]["psnr_db"] >= DEFAULT_THRESHOLDS["psnr_db"]
    assert report["metrics"]["latent_cosine"] >= DEFAULT_THRESHOLDS["latent_cosine"]
    # The gate's numbers are the worst prompt's (min), never the mean: one bad prompt fails the gate.
    per_prompt = report["per_prompt"]
    assert report["metrics"]["psnr_db"] == min(p["psnr_db"] for p in per_prompt) <= report["metrics"]["psnr_db_mean"]
    assert report["metrics"]["latent_cosine"] == min(p["latent_cosine"] for p in per_prompt)
    assert all(p["latent_cosine"] == min(p["latent_cosine_per_step"]) for p in per_prompt)
    assert len(report["per_prompt"]) == SMALL_GATE.prompts
    assert all(len(p["latent_cosine_per_step"]) == SMALL_GATE.steps for p in report["per_prompt"])
    assert report["reference"]["precision"] in ("fp16", "fp32")
    assert report["config"]["quantize"]["method"] == "percentile"
    assert report["latency"]["fp32_ms"] > 0 and report["latency"]["int8_ms"] > 0
    for sheet in report["sheets"].values():
        assert (BuildLayout(build).calibration / sheet).stat().st_size > 0
    # The engines stage accepts it.
    from toonark.engines.build import check_int8_calibration
    assert check_int8_calibration(build)["passed"] is True


def test_gate_fails_with_impossible_thresholds_and_the_script_says_why(build, calibrated, capsys):
    from toonark.scripts.calibrate import main
    args = ["--out", str(build), "--calib-prompts", "2", "--eval-prompts", "2", "--size", "64", "--steps", "6",
            "--min-psnr", "99", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: INT8 UNet failed the quality gate: psnr_db ")
    assert "< 99 (thresholds psnr_db >= 99.0, latent_cosine >= 0.993). Advice: " in err[0]
    report = read_json(report_path(build), "report", "")
    assert report["passed"] is False and report["failing"][0].startswith("psnr_db ")
    assert "--calib-prompts" in report["advice"]
    with pytest.raises(SystemExit) as usage:                                   # argparse: usage + exit 2
        main(["--out", str(build), "--method", "avg"])
    assert usage.value.code == 2


def test_gate_fails_a_broken_quantization(build, calibrated):
    broken = QuantConfig(method="minmax", op_types=("all",), keep_float=(), output_quantization=True)
    with pytest.raises(GateFailed) as failed:
        calibrate(build, SMALL_CAPTURE, broken, SMALL_GATE, progress=False, log=lambda *_: None,
              load_pipeline=load_pipeline)
    message = str(failed.value)
    assert message.startswith("INT8 UNet failed the quality gate: ")
    assert "latent_cosine 0.9" in message and "thresholds psnr_db >= 32.0, latent_cosine >= 0.993" in message
    report = failed.value.report
    assert report["passed"] is False
    assert "drop --output-quantization" in report["advice"] and "--method percentile" in report["advice"]
    assert read_json(report_path(build), "report", "")["passed"] is False
    calibrate(build, SMALL_CAPTURE, QuantConfig(), SMALL_GATE, progress=False, log=lambda *_: None,
              load_pipeline=load_pipeline)  # restore


def test_changed_source_onnx_invalidates_capture_and_int8(build, calibrated, tmp_path):
    out = tmp_path / "edited"
    shutil.copytree(build, out)
    layout = BuildLayout(out)
    assert read_capture(out) is not None and layout.int8_unet.is_file()
    assert invalidate_stale(out, sha256_onnx(source_unet(out))) == []      # unchanged: nothing removed
    model = onnx.load(str(source_unet(out)))
    onnx.helper.set_model_props(model, {"edited": "yes"})                  # a re-export with other bytes
    onnx.save(model, str(source_unet(out)))
    removed = invalidate_stale(out, sha256_onnx(source_unet(out)))
    assert sorted(Path(p).name for p in removed) == ["capture", "report.json", "unet"]
    assert read_capture(out) is None and not layout.int8_unet.exists()
    assert not report_path(out).exists()


# -- review fixes ---------------------------------------------------------------------------------

def test_a_crash_after_quantizing_leaves_no_passing_report(build, calibrated, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    shutil.copytree(build, out)
    assert read_json(report_path(out), "report", "")["passed"] is True

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash between quantize and gate")
    monkeypatch.setattr(run_module, "choose_reference", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        calibrate(out, SMALL_CAPTURE, QuantConfig(), SMALL_GATE, progress=False, log=lambda *_: None,
              load_pipeline=load_pipeline)
    assert not report_path(out).exists()                   # no passed=true beside an unscored INT8 model
    assert BuildLayout(out).int8_unet.is_file()


def test_non_finite_latents_fail_the_gate():
    good = np.ones((1, 4, 8, 8), np.float32)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    assert math.isnan(cosine(good, bad)) and math.isnan(cosine(bad, good))
    assert math.isnan(cosine(good, np.full_like(good, np.inf)))
    assert math.isnan(psnr_db(good, bad))
    assert math.isnan(worst([1.0, math.nan, 0.999]))      # min() would have kept 0.999 or 1.0
    per_prompt = [{"psnr_db": 40.0, "latent_cosine": 0.999}, {"psnr_db": 40.0, "latent_cosine": math.nan}]
    metrics = summarize(per_prompt)
    assert math.isnan(metrics["latent_cosine"])
    failing = failures(metrics, DEFAULT_THRESHOLDS)
    assert len(failing) == 1 and failing[0].startswith("latent_cosine nan < ")
    assert failures({"psnr_db": math.nan, "latent_cosine": 1.0}, DEFAULT_THRESHOLDS)[0].startswith("psnr_db nan")
    assert failures({"psnr_db": 40.0, "latent_cosine": 0.999}, DEFAULT_THRESHOLDS) == []


class _FakeDecoder:
    def run(self, feeds):
        return {"sample": np.zeros((1, 3, 8, 8), np.float32)}


class _FakePipeline:
    """Steps latents 1, 2, ... (the callback sees each step's input, as toonark.pipeline's does) and
    decodes the last; engines["last"] is applied in the final step, so two pipelines can differ there only."""

    def __init__(self, engines, tokenizer=None, scheduler=None, dims=None, limits=None, family=None):
        self.engines, self.tokenizer, self.scheduler, self.limits, self.family = engines, tokenizer, scheduler, limits, family
        self.dims = dims or SimpleNamespace(vae_scaling_factor=0.5)

    def __call__(self, prompt, step_callback=None, steps=3, **_kwargs):
        latents = np.ones((1, 4, 2, 2), np.float32)
        for i in range(steps):
            step_callback(i, 999 - i, {}, latents)
            latents = latents + 1.0
            if i == steps - 1:
                latents = self.engines["last"](latents)
        decoded = self.engines["vae_decoder"].run({"latent_sample": latents / np.float32(self.dims.vae_scaling_factor)})
        return SimpleNamespace(images=np.zeros((1, 8, 8, 3), np.uint8), decoded=decoded["sample"])


def test_gate_compares_every_steps_result_not_the_starting_noise():
    config = GateConfig(prompts=1, steps=3, size=64)
    prompts = [SimpleNamespace(text="a cat", seed=1)]
    reference = _FakePipeline({"vae_decoder": _FakeDecoder(), "last": lambda x: x})
    flipped = _FakePipeline({"vae_decoder": _FakeDecoder(), "last": lambda x: -x})      # only the last step differs
    _, metrics, _, _ = next(compare_runs(reference, flipped, prompts, "", config, progress=False))
    per_step = metrics["latent_cosine_per_step"]
    assert len(per_step) == config.steps                   # one per step's result, none for the shared noise
    assert per_step[:-1] == [1.0, 1.0] and per_step[-1] == -1.0
    assert metrics["latent_cosine"] == -1.0
    nan_last = _FakePipeline({"vae_decoder": _FakeDecoder(), "last": lambda x: x * np.nan})
    _, metrics, _, _ = next(compare_runs(reference, nan_last, prompts, "", config, progress=False))
    assert math.isnan(metrics["latent_cosine"]) and failures(summarize([metrics]), DEFAULT_THRESHOLDS)


def test_capture_key_covers_scheduler_text_encoder_and_negative_prompt(build, calibrated, tmp_path, monkeypatch):
    out = tmp_path / "rescheduled"
    shutil.copytree(build, out)
    assert build_capture_key(out, SMALL_CAPTURE) == read_capture(out).key       # what the capture was keyed by
    config_file = BuildLayout(out).pipeline / "scheduler" / "scheduler_config.json"
    original = config_file.read_text()
    changed = {**json.loads(original), "timestep_spacing": "trailing"}
    config_file.write_text(json.dumps(changed))
    assert build_capture_key(out, SMALL_CAPTURE) != read_capture(out).key       # stale: a new capture is taken
    config_file.write_text(original)
    assert build_capture_key(out, SMALL_CAPTURE) == read_capture(out).key

    encoder = BuildLayout(out).onnx_model("fp32", "text_encoder")
    model = onnx.load(str(encoder))
    onnx.helper.set_model_props(model, {"edited": "yes"})
    onnx.save(model, str(encoder))
    assert build_capture_key(out, SMALL_CAPTURE) != read_capture(out).key
    shutil.copy(BuildLayout(build).onnx_model("fp32", "text_encoder"), encoder)
    assert build_capture_key(out, SMALL_CAPTURE) == read_capture(out).key

    real = prompt_set()
    monkeypatch.setattr("toonark.calibration.capture.prompt_set",
                        lambda: SimpleNamespace(take=real.take, negative=real.negative + ", blurry"))
    assert build_capture_key(out, SMALL_CAPTURE) != read_capture(out).key
