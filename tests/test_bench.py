"""`make bench` on the CPU with the tiny pipeline: checks the table and the JSON's structure
(not speed). The step graph's cross-check against the host sampler is in tests/test_scheduler.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    from toonark.benchmarks.bench import main
    root = tmp_path_factory.mktemp("bench")
    results = main(["--tiny", "--work", str(root / "work"), "--results", str(root / "results"), "--tag", "test"])
    return results, root


def test_bench_writes_table_and_json(tiny_bench, capsys):
    results, root = tiny_bench
    files = list((root / "results").glob("*-test.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    for key in ("device", "date", "versions", "settings", "backends", "ratios", "targets", "timings"):
        assert key in data, key
    assert data["settings"]["kind"] == "tiny" and data["settings"]["device"] == "cpu"
    backends = data["backends"]
    for name in ("torch-eager", "ort"):
        res = backends[name]
        assert set(res["stages"]) == {"text_encoder_b2", "unet_step_b2", "vae_decode_b1"}
        assert all(t["median_ms"] > 0 for t in res["stages"].values())
        assert res["image"]["median_ms"] > 0
        assert {"1", "2"} <= set(res["throughput"])
    for name in ("torch-compile", "ort-graph", "ort-unfused"):
        assert "skipped" in backends[name]
    # fp32 on the CPU: the engines compute what diffusers computes, whole image included.
    assert backends["ort"]["parity"]["unet_rel_l2_vs_torch"] < 1e-4
    assert backends["ort"]["parity"]["image_rel_l2_vs_torch"] < 1e-4
    assert data["ratios"]["vs_torch-eager"]["ort"]["unet_step_b2"] > 0
    assert not any(k.startswith("_") for res in backends.values() for k in res)


def test_table_lists_every_backend(tiny_bench):
    from toonark.benchmarks.bench import table
    text = table(tiny_bench[0])
    assert "UNet step b2" in text and "img/s b2" in text
    for name in ("torch-eager", "torch-compile", "ort", "ort-graph", "ort-unfused"):
        assert name in text


def test_interrupted_export_and_fusion_leave_nothing_to_trust(tmp_path, monkeypatch):
    """A run killed mid-write must not leave a model.onnx that the next run skips over."""
    import torch
    import toonark.engines.fusions as fusions
    from toonark.benchmarks.bench import export_onnx, make_modules, pipeline_dims, prepare_engines

    class Killed(Exception):
        pass

    def half_export(model, args, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise Killed

    modules = make_modules("tiny")
    dims = pipeline_dims(modules)
    with monkeypatch.context() as patch:
        patch.setattr(torch.onnx, "export", half_export)
        with pytest.raises(Killed):
            export_onnx(modules, dims, tmp_path / "onnx", submodels=("vae_decoder",))
    assert not (tmp_path / "onnx" / "vae_decoder" / "model.onnx").exists()
    paths = export_onnx(modules, dims, tmp_path / "onnx", submodels=("vae_decoder",))
    assert paths["vae_decoder"].stat().st_size > 1000

    def half_fuse(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"partial")
        raise Killed
    monkeypatch.setattr(fusions, "fuse_for_cuda", half_fuse)
    with pytest.raises(Killed):
        prepare_engines(paths, tmp_path / "work", modules, "cuda", set())
    assert not (tmp_path / "work" / "fused-fp16" / "vae_decoder").exists()


def _triton_gpu_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "triton_gpu", Path(__file__).resolve().parents[1] / "benchmarks" / "triton_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(unet_calls: int, unet_infer_ns: int, vae_calls: int) -> dict:
    """Triton's statistics extension as tritonclient's HTTP client returns it (the JSON of the API)."""
    def model(name, calls, infer_ns):
        return {"name": name, "version": "1", "inference_stats": {
            "success": {"count": calls, "ns": infer_ns + 10 * calls}, "queue": {"count": calls, "ns": 5 * calls},
            "compute_input": {"count": calls, "ns": 0}, "compute_infer": {"count": calls, "ns": infer_ns},
            "compute_output": {"count": calls, "ns": 0}}}
    return {"model_stats": [model("unet", unet_calls, unet_infer_ns), model("vae_decoder", vae_calls, 3_000_000 * vae_calls),
                            model("idle", 4, 400)]}


def test_triton_bench_stage_table_is_per_call_and_per_request_deltas():
    """The per-stage numbers of benchmarks/triton_gpu.py: only the calls between the two snapshots count,
    per call and per timed request; a model not called in between is left out."""
    module = _triton_gpu_module()

    class Client:
        def __init__(self, stats):
            self.stats = stats

        def get_inference_statistics(self, **kwargs):
            return self.stats

    before = module.full_stats(Client(_stats(unet_calls=20, unet_infer_ns=20_000_000, vae_calls=1)), "http")
    after = module.full_stats(Client(_stats(unet_calls=60, unet_infer_ns=100_000_000, vae_calls=3)), "http")
    table = module.stage_table(before, after, requests=2)
    assert set(table) == {"unet", "vae_decoder"}
    unet = table["unet"]
    assert unet["calls"] == 40 and unet["calls_per_request"] == 20.0
    assert unet["compute_infer_ms_per_call"] == 2.0 and unet["compute_infer_ms_per_request"] == 40.0
    assert table["vae_decoder"]["compute_infer_ms_per_call"] == 3.0


def test_triton_bench_refuses_bad_counts(tmp_path):
    module = _triton_gpu_module()
    for argv in (["--reps", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit):
            module.main([str(tmp_path / "repo"), *argv])
