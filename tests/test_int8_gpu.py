"""benchmarks/int8_gpu.py (INT8 QDQ vs fp16 UNet on ORT's CUDA EP) on the CPU with the tiny UNet:
checks the JSON and the table, not speed. The GPU run is benchmarks/int8_gpu.sh."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("int8_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8gpu")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = _module().main(["--kind", "tiny", "--device", "cpu", "--image", "64", "--calib", "4", "--eval",
                                  "2", "--reps", "3", "--warmup", "1", "--threads", "1", "--work", str(root / "work"),
                                  "--results", str(root / "results")])
    return results, root, printed.getvalue()


def test_json_and_table(tiny_int8):
    results, root, printed = tiny_int8
    files = list((root / "results").glob("*-int8.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    for key in ("device", "date", "settings", "versions", "unet", "export", "fp16", "quantize", "inputs",
                "variants", "ratios", "timings"):
        assert key in data, key
    variants = data["variants"]
    for name in ("fp32-ref", "fp16", "int8-qdq", "int8-qdq-folded"):
        res = variants[name]
        assert res["unet_step_b2"]["median_ms"] > 0 and res["unet_step_b2"]["reps"] == 3, name
        assert res["error_vs_fp32"]["finite"] and res["error_vs_fp32"]["sets"] == 2, name
        assert "CPUExecutionProvider" in res["placement"], name
    assert "skipped" in variants["fp16-fused"]          # fused graphs run on CUDA only
    assert variants["fp16"]["error_vs_fp32"]["rel_l2_mean"] < 2e-2
    # int8: worse than fp16 but the same function (tiny UNet, MinMax, 4 calibration inputs)
    int8 = variants["int8-qdq"]["error_vs_fp32"]
    assert variants["fp16"]["error_vs_fp32"]["rel_l2_mean"] < int8["rel_l2_mean"] < 0.2
    assert int8["cosine_min"] > 0.98
    assert variants["int8-qdq"]["error_vs_fp16"]["rel_l2_mean"] > 0
    # the folded session keeps only the activations' DequantizeLinear nodes
    dq = {n: variants[n]["placement"]["CPUExecutionProvider"]["ops"].get("DequantizeLinear", 0)
          for n in ("int8-qdq", "int8-qdq-folded")}
    assert 0 < dq["int8-qdq-folded"] < dq["int8-qdq"]
    q = data["quantize"]
    assert q["summary"]["quantized_nodes"] > 0 and set(q["summary"]["dq_consumers"]) <= {"Conv", "MatMul", "Gemm"}
    assert q["calibration_providers"] == ["CPUExecutionProvider"] and q["calibration_sets"] == 4
    assert {"conv_in", "conv_out", "norm"} <= set(q["excluded"])
    # ratios are the variants' medians over fp16's (>1: slower), for every timed variant
    fp16_ms = variants["fp16"]["unet_step_b2"]["median_ms"]
    for name in ("fp32-ref", "int8-qdq", "int8-qdq-folded"):
        want = round(variants[name]["unet_step_b2"]["median_ms"] / fp16_ms, 3)
        assert data["ratios"]["time_vs_fp16"][name] == want, name
    # int8 vs fp16 and int8 vs fp32 are two different references: their errors are not the same number
    assert variants["int8-qdq"]["error_vs_fp16"]["rel_l2_mean"] != int8["rel_l2_mean"]
    assert data["inputs"]["shapes"]["sample"] == [2, 4, 8, 8]
    assert not any(k.startswith("_") for k in data) and not any(k.startswith("_") for r in variants.values() for k in r)
    out = printed.strip().splitlines()
    assert out[-1].startswith("JSON: ") and out[-2].startswith("int8: ")
    assert any(line.startswith("int8-qdq ") for line in out)


def test_calibration_providers_reach_quantize_static(tiny_int8, monkeypatch, tmp_path):
    """quantize_unet hands its calibration_providers to quantize_static (the script calibrates the
    SD-1.5 UNet on CUDA); the default stays the CPU."""
    import numpy as np
    import onnxruntime.quantization as oq
    from toonark.calibration.quantize import QuantConfig, quantize_unet
    from toonark.specs import PipelineDims
    _, root, _ = tiny_int8
    source = root / "work" / "fp32" / "model.onnx"
    dims = PipelineDims(text_length=77, text_hidden=32, latent_channels=4, vae_scale=8, vae_scaling_factor=0.18215)
    shard = tmp_path / "shard.npz"
    np.savez(shard, **_module().sampler_inputs(dims, 64, 1, seed=0)[0])
    seen = []

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen.append(kwargs.get("calibration_providers"))
        raise Stop

    monkeypatch.setattr(oq, "quantize_static", fake)
    for extra in ({"calibration_providers": ("CUDAExecutionProvider", "CPUExecutionProvider")}, {}):
        with pytest.raises(Stop):
            quantize_unet(source, [shard], tmp_path / "int8" / "model.onnx", QuantConfig(method="minmax"),
                          force=True, **extra)
    assert seen == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]


def test_sampler_inputs_follow_the_schedule():
    module = _module()
    from toonark.benchmarks.bench import dpm_schedule
    from toonark.specs import PipelineDims
    dims = PipelineDims(text_length=77, text_hidden=32, latent_channels=4, vae_scale=8, vae_scaling_factor=0.18215)
    feeds = module.sampler_inputs(dims, 64, 3, seed=1)
    steps = dpm_schedule(20).timesteps
    assert [int(f["timestep"][0]) for f in feeds] == [steps[0], steps[10], steps[19]]
    for f in feeds:
        assert f["sample"].shape == (2, 4, 8, 8) and f["encoder_hidden_states"].shape == (2, 77, 32)
        assert (f["sample"][0] == f["sample"][1]).all()                # CFG batch: the same latents twice
    assert (feeds[0]["encoder_hidden_states"][0] == feeds[1]["encoder_hidden_states"][0]).all()  # fixed uncond
    assert not (feeds[0]["encoder_hidden_states"][1] == feeds[1]["encoder_hidden_states"][1]).all()


def test_quantize_cache_is_keyed_by_the_calibration_inputs(tiny_int8):
    """A second run at another --image (same work folder, same --calib) must not reuse the INT8 model
    calibrated on the first run's latents."""
    _, root, _ = tiny_int8
    with contextlib.redirect_stdout(io.StringIO()):
        results = _module().main(["--kind", "tiny", "--device", "cpu", "--image", "128", "--calib", "4", "--eval",
                                  "1", "--reps", "1", "--warmup", "1", "--threads", "1", "--skip", "fp16-fused",
                                  "--work", str(root / "work"), "--results", ""])
    assert results["quantize"]["cached"] is False, results["quantize"]
