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
    import toonark.export.fusions as fusions
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


def test_triton_bench_takes_the_image_size_from_a_timed_request(tmp_path, monkeypatch):
    """--warmup 0 used to raise NameError (the byte count came from the last warm-up request)."""
    import importlib.util
    import sys
    import types
    from toonark.serving import client as client_module
    from toonark.serving import launcher as server as server_module
    spec = importlib.util.spec_from_file_location(
        "triton_gpu", Path(__file__).resolve().parents[1] / "benchmarks" / "triton_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Server:
        http_url, grpc_url = "localhost:1", "localhost:2"

        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            pass

        def wait_ready(self, timeout):
            return 0.1

        def stop(self):
            pass

    class Client:
        def get_inference_statistics(self, **kwargs):
            return {}

        def close(self):
            pass

    calls = []

    def generate(url, options, protocol):
        calls.append(protocol)
        return types.SimpleNamespace(seconds=0.01, images=[b"\x89PNG" + b"x" * 96])

    monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
    monkeypatch.setattr(server_module, "TritonServer", Server)
    monkeypatch.setattr(client_module, "generate", generate)
    monkeypatch.setattr(client_module, "connect", lambda url, protocol: Client())
    result = module.main([str(tmp_path / "repo"), "--warmup", "0", "--reps", "2", "--out", str(tmp_path / "out")])
    assert result["image_png_bytes"] == 100 and calls == ["http", "http", "grpc", "grpc"]
    assert json.loads((tmp_path / "out" / "triton.json").read_text())["http"]["median_ms"] == 10.0
    with pytest.raises(SystemExit):
        module.main([str(tmp_path / "repo"), "--reps", "0"])
