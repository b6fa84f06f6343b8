"""ORT's diffusion fusions applied to toonark's export (engines/fusions.py), on the tiny pipeline."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from toonark.engines.fusions import CUDA_ONLY_OPS, fuse_for_cuda, heads_from_config, kernel_refusals, op_counts


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """fp32 ONNX of the tiny pipeline, exported the way the benchmark exports it (TorchScript, opset 18)."""
    from toonark.export.torch_onnx import export_onnx, make_modules, pipeline_dims
    modules = make_modules("tiny", seed=0)
    dims = pipeline_dims(modules)
    paths = export_onnx(modules, dims, tmp_path_factory.mktemp("fusion-src"))
    return {"paths": paths, "modules": modules, "dims": dims}


def _numpy2_int_of_array_is_an_error():
    """NumPy 2.x raises where 1.26 only warns: int() of a 1-element array (the upstream bug)."""
    warnings.filterwarnings("error", message=".*ndim > 0 to a scalar.*")


def test_upstream_unet_fusion_fails_under_numpy2_rules(tiny_onnx):
    from onnxruntime.transformers.optimizer import optimize_model
    from toonark.engines.fusions import fusion_options
    with warnings.catch_warnings():
        _numpy2_int_of_array_is_an_error()
        # NumPy 1.25-2.3: the DeprecationWarning (made an error above); NumPy 2.4+: a TypeError.
        with pytest.raises((DeprecationWarning, TypeError)):
            optimize_model(str(tiny_onnx["paths"]["unet"]), model_type="unet", num_heads=0, hidden_size=0,
                           opt_level=0, optimization_options=fusion_options("unet"), use_gpu=True)


def test_unet_fusions_apply(tiny_onnx, tmp_path):
    src = onnx.load(str(tiny_onnx["paths"]["unet"]))
    before = op_counts(src)
    with warnings.catch_warnings():
        _numpy2_int_of_array_is_an_error()   # our pass must not depend on NumPy 1.x leniency
        # Kernel limits off: this test is about the patterns matching our export (the tiny widths
        # are below what some CUDA kernels take; test_kernel_limits_switch_fusions_off covers that).
        report = fuse_for_cuda(tiny_onnx["paths"]["unet"], tmp_path / "unet" / "model.onnx", "unet",
                               num_heads=heads_from_config(dict(tiny_onnx["modules"]["unet"].config)),
                               respect_kernel_limits=False)
    fused = report.fused
    # One fused attention per softmax (self + cross per transformer block), one GEGLU per Erf,
    # every InstanceNorm-based GroupNorm and every Conv.
    assert fused["MultiHeadAttention"] == before["Softmax"] == 8
    assert fused["BiasSplitGelu"] == before["Erf"] == 4
    assert fused["GroupNorm"] + fused["SkipGroupNorm"] == before["InstanceNormalization"]
    assert fused["NhwcConv"] == before["Conv"]
    assert fused["BiasAdd"] >= 1
    after = op_counts(onnx.load(str(tmp_path / "unet" / "model.onnx")))
    assert after["MultiHeadAttention"] == 8 and "Softmax" not in after and "InstanceNormalization" not in after
    assert report.nodes_after < report.nodes_before / 2
    # fp16 inside, fp32 at the edges (keep_io_types): the spec's I/O is unchanged.
    model = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
        "sample": onnx.TensorProto.FLOAT, "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_vae_and_text_encoder_fusions_apply(tiny_onnx, tmp_path):
    vae_before = op_counts(onnx.load(str(tiny_onnx["paths"]["vae_decoder"])))
    vae = fuse_for_cuda(tiny_onnx["paths"]["vae_decoder"], tmp_path / "vae" / "model.onnx", "vae_decoder",
                        respect_kernel_limits=False)
    # Every GroupNorm but the mid-block attention's (its output feeds a reshape, not SiLU/Add: no pattern).
    assert vae.fused["GroupNorm"] + vae.fused["SkipGroupNorm"] == vae_before["InstanceNormalization"] - \
        vae_before["Softmax"]
    assert vae.fused["NhwcConv"] == vae_before["Conv"]
    text = fuse_for_cuda(tiny_onnx["paths"]["text_encoder"], tmp_path / "text" / "model.onnx", "text_encoder")
    assert text.fused["SkipLayerNormalization"] >= 2 and text.fused["QuickGelu"] == 2


def test_kernel_limits_switch_fusions_off(tiny_onnx, tmp_path):
    """The tiny widths are below what ORT's CUDA kernels take (BiasSplitGelu hidden 2560/5120/10240,
    GroupNorm an even channel count per group): by default those fusions are switched off, with
    the reason in the report, so the engine runs instead of failing at its first call."""
    unet = fuse_for_cuda(tiny_onnx["paths"]["unet"], tmp_path / "unet" / "model.onnx", "unet")
    assert set(unet.disabled) == {"BiasSplitGelu"}
    assert "hidden size 256 (the CUDA kernel takes 2560, 5120, 10240)" in unet.disabled["BiasSplitGelu"]
    assert "BiasSplitGelu" not in unet.fused and unet.fused["MultiHeadAttention"] == 8 and unet.fused["GroupNorm"]
    vae = fuse_for_cuda(tiny_onnx["paths"]["vae_decoder"], tmp_path / "vae" / "model.onnx", "vae_decoder")
    assert set(vae.disabled) <= {"GroupNorm", "SkipGroupNorm"} and vae.disabled
    assert "8 channels in 8 groups (the CUDA kernel needs an even number of channels per group)" in \
        " ".join(vae.disabled.values())
    assert not {"GroupNorm", "SkipGroupNorm"} & set(vae.fused) and vae.fused["NhwcConv"]
    for path in (tmp_path / "unet" / "model.onnx", tmp_path / "vae" / "model.onnx"):
        assert kernel_refusals(onnx.load(str(path))) == {}


def test_cpu_safe_fusion_matches_unfused(tiny_onnx, tmp_path):
    """Attention / LayerNorm fusions have CPU kernels: fused fp32 == unfused fp32 on the CPU EP."""
    import onnxruntime as ort
    from toonark.specs import submodel_specs
    report = fuse_for_cuda(tiny_onnx["paths"]["unet"], tmp_path / "unet" / "model.onnx", "unet", fp16=False,
                           cpu_safe=True)
    assert report.fused.get("MultiHeadAttention", 0) + report.fused.get("Attention", 0) == 8
    assert not set(report.ops_after) & set(CUDA_ONLY_OPS)
    spec = submodel_specs(tiny_onnx["dims"])["unet"]
    feeds = spec.sample_inputs({"B": 1, "H": 64, "W": 64}, "fp32", seed=3)
    ref = ort.InferenceSession(str(tiny_onnx["paths"]["unet"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(out - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)


def test_heads_from_config():
    assert heads_from_config({"attention_head_dim": 8}) == 8            # SD-1.5 stores the head count here
    assert heads_from_config({"num_attention_heads": 5, "attention_head_dim": 64}) == 5
    assert heads_from_config({"attention_head_dim": [5, 10, 20, 20]}) == 0   # varies: read from the graph


@pytest.mark.gpu
def test_fused_fp16_matches_fp32_on_cuda(tiny_onnx, tmp_path):
    import onnxruntime as ort
    from toonark.specs import submodel_specs
    fuse_for_cuda(tiny_onnx["paths"]["unet"], tmp_path / "unet" / "model.onnx", "unet", fp16=True)
    spec = submodel_specs(tiny_onnx["dims"])["unet"]
    feeds = spec.sample_inputs({"B": 1, "H": 64, "W": 64}, "fp32", seed=4)
    ref = ort.InferenceSession(str(tiny_onnx["paths"]["unet"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"),
                               providers=["CUDAExecutionProvider"]).run(None, feeds)[0]
    rel = np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 1e-2


def test_fused_models_past_the_protobuf_limit_use_one_external_data_file(tiny_onnx, tmp_path, monkeypatch):
    """fuse_for_cuda saves through export.graph.save_model: past the limit, one model.onnx.data beside it."""
    import onnxruntime as ort
    from toonark.export import graph
    monkeypatch.setattr(graph, "PROTOBUF_LIMIT_BYTES", 10_000)
    target = tmp_path / "text" / "model.onnx"
    fuse_for_cuda(tiny_onnx["paths"]["text_encoder"], target, "text_encoder", fp16=False, cpu_safe=True)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", graph.EXTERNAL_DATA_NAME]
    model = onnx.load(str(target), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    ids = np.zeros((2, tiny_onnx["dims"].text_length), np.int64)
    assert session.run(None, {"input_ids": ids})[0].shape[0] == 2
