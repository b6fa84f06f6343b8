"""Export stage: ONNX I/O equals the spec, parity vs PyTorch, idempotence, clear errors, CLI."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import TEST_LIMITS
from toonark.export.graph import check_against_spec
from toonark.export.onnx_export import export_pipeline
from toonark.export.parity import Parity, compare, ort_session, raise_on_failure
from toonark.specs import Axis, BuildInfo, PipelineDims, submodel_specs
from toonark.files import sha256_tree
from toonark.layout import BuildLayout

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16")


@pytest.fixture(scope="module")
def specs(tiny_model):
    return submodel_specs(PipelineDims.from_folder(tiny_model))


def _io(value_infos) -> list[tuple[str, int, list]]:
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]) for v in value_infos]


def _spec_io(tensors) -> list[tuple[str, int, list]]:
    # "float" I/O is float32 in every precision (fp16 graphs keep float32 I/O).
    elem = {"float": onnx.TensorProto.FLOAT, "float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    return [(t.name, elem[t.dtype], [d.name if isinstance(d, Axis) else d for d in t.dims]) for t in tensors]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_onnx_io_equals_spec(tiny_build, specs, precision):
    layout = BuildLayout(tiny_build)
    assert sorted(specs) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name, spec in specs.items():
        model = onnx.load(str(layout.onnx_model(precision, name)))
        assert _io(model.graph.input) == _spec_io(spec.inputs), name
        assert _io(model.graph.output) == _spec_io(spec.outputs), name
        check_against_spec(model, spec)
    # The tiny pipeline's concrete numbers, so a spec that drifted with the export would still fail here.
    unet = onnx.load(str(layout.onnx_model(precision, "unet")))
    assert _io(unet.graph.input)[0][2] == ["2B", 4, "H/8", "W/8"]
    text = onnx.load(str(layout.onnx_model(precision, "text_encoder")))
    assert [o.name for o in text.graph.output] == ["last_hidden_state"]  # pooler_output pruned
    assert _io(text.graph.output)[0][2] == ["2B", 77, 32]


def test_fp16_graph_has_fp16_weights(tiny_build):
    model = onnx.load(str(BuildLayout(tiny_build).onnx_model("fp16", "unet")))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}  # weight matrices / kernels
    assert types == {onnx.TensorProto.FLOAT16}


def test_check_against_spec_names_the_mismatch(tiny_build, specs):
    model = onnx.load(str(BuildLayout(tiny_build).onnx_model("fp32", "unet")))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(ValueError, match=re.escape("unet: input 'sample' axis 2 is 'height', the spec declares 'H/8'")):
        check_against_spec(model, specs["unet"])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H/8"
    check_against_spec(model, specs["unet"])
    model.graph.output[0].name = "noise"
    with pytest.raises(ValueError, match=re.escape("unet: ONNX outputs are ['noise'], the spec declares ['out_sample']")):
        check_against_spec(model, specs["unet"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_report_under_thresholds(tiny_build, specs, precision):
    report = json.loads(BuildLayout(tiny_build).export_report(precision).read_text())
    rows = report["parity"]
    assert {(r["submodel"], r["level"]) for r in rows} == {(n, lvl) for n in specs for lvl in ("opt", "min")}
    for r in rows:
        spec = specs[r["submodel"]]
        assert r["max_rel"] <= spec.max_rel_error[precision], r
        assert r["cosine"] >= spec.min_cosine[precision], r
        assert r["ok"] is True
    # fp16 is really lower precision than fp32 (the graphs differ, the report is not a copy).
    if precision == "fp16":
        assert max(r["max_abs"] for r in rows) > 1e-5


def test_parity_numbers_are_reproducible(tiny_model, tiny_build, specs):
    """Recompute one report row independently: ORT on the exported UNet vs diffusers loaded afresh."""
    import torch
    from diffusers import UNet2DConditionModel
    spec, sizes = specs["unet"], TEST_LIMITS.sizes("min")
    feeds = spec.sample_inputs(sizes, "fp32", seed=0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet", use_safetensors=True).eval()
    with torch.inference_mode():
        reference = unet(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).sample.numpy()
    actual = ort_session(BuildLayout(tiny_build).onnx_model("fp32", "unet")).run(None, feeds)[0]
    max_abs, _, _ = compare(reference, actual)
    row = next(r for r in json.loads(BuildLayout(tiny_build).export_report("fp32").read_text())["parity"]
               if r["submodel"] == "unet" and r["level"] == "min")
    # fp32 vs fp32: max_abs is reduction-order noise (~1e-6), and torch's thread count (set by whichever test
    # imported torch first) changes that order; so the recomputation agrees in size, not to the last digit.
    # A report that stored another quantity (max_rel, another level's row, the fp16 error) is off by orders.
    assert max_abs == pytest.approx(row["max_abs"], rel=0.5)
    assert row["max_rel"] == pytest.approx(row["max_abs"] / float(np.abs(reference).max()), rel=1e-3)


def test_parity_failure_message():
    row = Parity("unet", "fp16", "opt", {"B": 1, "H": 128, "W": 128}, "out_sample", 0.5, 0.25, 0.9, 2e-2, 0.999)
    with pytest.raises(ValueError, match=re.escape(
            "unet fp16 parity vs PyTorch failed at opt sizes {'B': 1, 'H': 128, 'W': 128} on 'out_sample': "
            "max_rel 2.500e-01 (limit 2.0e-02), cosine 0.9000000 (limit 0.999), max_abs 5.000e-01")):
        raise_on_failure([row])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_onnx_runs_at_two_sizes(tiny_build, specs, precision):
    layout = BuildLayout(tiny_build)
    for name in ("unet", "vae_decoder"):
        spec = specs[name]
        session = ort_session(layout.onnx_model(precision, name))
        for level in ("min", "max"):
            sizes = TEST_LIMITS.sizes(level)
            outputs = session.run(spec.output_names, spec.sample_inputs(sizes, "fp32", seed=1))
            for out, tensor in zip(outputs, spec.outputs):
                assert out.shape == tensor.shape(sizes) and out.dtype == np.float32, (name, level)
                assert np.isfinite(out).all()


def test_pipeline_folder(tiny_model, tiny_build):
    layout = BuildLayout(tiny_build)
    info = BuildInfo.read(tiny_build)
    assert info.limits == TEST_LIMITS and info.dims == PipelineDims.from_folder(tiny_model)
    assert (layout.pipeline / "tokenizer" / "vocab.json").read_bytes() == (tiny_model / "tokenizer" / "vocab.json").read_bytes()
    assert (layout.pipeline / "scheduler" / "scheduler_config.json").is_file()
    assert (layout.pipeline / "model_index.json").is_file()


def _drain(caplog) -> str:
    """The export's status lines logged since the last call (toonark.export.onnx_export logs them)."""
    text = caplog.text
    caplog.clear()
    return text


def test_reexport_is_skipped_and_byte_identical(tiny_model, tiny_build, caplog):
    caplog.set_level("INFO", logger="toonark.export.onnx_export")
    before = sha256_tree(tiny_build / "onnx")
    report = export_pipeline(tiny_model, tiny_build, precisions=PRECISIONS, limits=TEST_LIMITS)
    out = _drain(caplog)
    assert "onnx/fp32: up to date" in out and "onnx/fp16: up to date" in out
    assert sha256_tree(tiny_build / "onnx") == before
    assert set(report) == set(PRECISIONS)


def test_changed_weights_invalidate_the_export(tiny_model, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="toonark.export.onnx_export")
    from safetensors.numpy import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "build"
    kwargs = dict(precisions=("fp32",), limits=TEST_LIMITS, submodels=("text_encoder",))
    export_pipeline(model, out, **kwargs)
    onnx_path = BuildLayout(out).onnx_model("fp32", "text_encoder")
    first = onnx_path.read_bytes()
    caplog.clear()

    weights_path = model / "text_encoder" / "model.safetensors"
    weights = load_file(weights_path)
    name = next(k for k in sorted(weights) if k.endswith("final_layer_norm.bias"))
    weights[name] = weights[name] + 0.5
    save_file(weights, weights_path, metadata={"format": "pt"})

    # Interrupted while the new precision folder is being written: the old folder stays whole,
    # no scratch folder is left, and the next run does not trust the old files for the new weights.
    import toonark.export.onnx_export as onnx_export
    report_before = BuildLayout(out).export_report("fp32").read_bytes()

    def interrupted(folder):
        raise KeyboardInterrupt("simulated Ctrl-C")
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "_files_hashes", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_pipeline(model, out, **kwargs)
    assert BuildLayout(out).export_report("fp32").read_bytes() == report_before
    assert onnx_path.read_bytes() == first
    assert sorted(p.name for p in out.rglob(".*")) == []
    caplog.clear()
    export_pipeline(model, out, **kwargs)
    assert "up to date" not in _drain(caplog)
    assert onnx_path.read_bytes() != first

    # A tampered output file is not trusted either.
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    export_pipeline(model, out, **kwargs)
    assert "up to date" not in _drain(caplog)
    export_pipeline(model, out, **kwargs)
    assert "onnx/fp32: up to date" in _drain(caplog)


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"model folder not found: {missing}. Pass a diffusers folder saved by save_pretrained "
            f"(make tiny MODEL={missing} writes a random-weight one)")):
        export_pipeline(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_unet_config_error(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{model} is not a diffusers text-to-image folder: unet/config.json is missing")):
        export_pipeline(model, tmp_path / "out")


def test_pickle_only_weights_are_refused(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    pickle = weights.with_suffix(".bin")
    weights.rename(pickle)
    with pytest.raises(ValueError, match=re.escape(
            f"{pickle} is a pickle checkpoint; only safetensors weights are read (pickles can run code on load). "
            f"Convert it with `save_pretrained(..., safe_serialization=True)`")):
        export_pipeline(model, tmp_path / "out")


def test_unknown_precision_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=re.escape("precision 'int8' cannot be exported; choose from fp32, fp16")):
        export_pipeline(tiny_model, tmp_path / "out", precisions=("int8",))


def test_cli_missing_folder_prints_one_error_line(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--model", str(missing),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model folder not found: {missing}. Pass a diffusers folder saved by save_pretrained "
                      f"(make tiny MODEL={missing} writes a random-weight one)"]


def test_models_past_the_protobuf_limit_use_one_external_data_file(tiny_model, tmp_path, monkeypatch):
    """The SD-1.5 path (fp32 UNet 3.4 GB), exercised on the tiny UNet by lowering the limit."""
    import toonark.export.graph as graph
    monkeypatch.setattr(graph, "PROTOBUF_LIMIT_BYTES", 100_000)
    out = tmp_path / "build"
    report = export_pipeline(tiny_model, out, precisions=("fp32", "fp16"), limits=TEST_LIMITS, submodels=("unet",))
    for precision in ("fp32", "fp16"):
        folder = BuildLayout(out).onnx_model(precision, "unet").parent
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
        assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
        header = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"model.onnx.data"}
        assert all(r["ok"] for r in report[precision]["parity"])


def test_image_step_must_be_positive():
    from toonark.specs import ShapeLimits
    for step in (0, -64):
        with pytest.raises(ValueError, match=f"image step must be a positive number of pixels, got {step}"):
            ShapeLimits(min_image=64, opt_image=64, max_image=64, image_step=step)


def test_image_step_off_the_vae_scale_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    from toonark.specs import ShapeLimits
    import toonark.export.onnx_export as onnx_export
    scale = PipelineDims.from_folder(tiny_model).vae_scale
    assert scale > 1
    step = scale + 1 if scale > 2 else 3
    limits = ShapeLimits(min_image=step, opt_image=step * 2, max_image=step * 2, image_step=step)
    monkeypatch.setattr(onnx_export, "load_pipeline", lambda *a: pytest.fail("export started"))
    with pytest.raises(ValueError, match=r"do not fit text_encoder|do not fit unet|is not a multiple of"):
        export_pipeline(tiny_model, tmp_path / "out", precisions=("fp32",), limits=limits)
    assert not (tmp_path / "out").exists()


def test_check_request_names_the_bound_and_the_fix():
    from toonark.specs import ShapeLimits
    limits = ShapeLimits(min_batch=2, opt_batch=2, max_batch=3, min_image=64, opt_image=128, max_image=256)
    cases = [
        ((4, 64, 64), "batch 4 is outside the built range 2..3 (above max_batch); to serve it re-export with "
                      "`scripts/export.py --max-batch 4`, then `make engine`"),
        ((1, 64, 64), "batch 1 is outside the built range 2..3 (below min_batch); to serve it re-export with "
                      "`scripts/export.py --min-batch 1`, then `make engine`"),
        ((2, 512, 64), "height 512 must be a multiple of 64 in 64..256 (the built engine profile): above max_image; "
                       "to serve it re-export with `scripts/export.py --max-image 512`, then `make engine`"),
        ((2, 64, 0), "width 0 must be a multiple of 64 in 64..256 (the built engine profile): below min_image; "
                     "to serve it re-export with `scripts/export.py --min-image 0`, then `make engine`"),
        ((2, 64, 100), "width 100 must be a multiple of 64 in 64..256 (the built engine profile): not a multiple "
                       "of image_step 64; to serve it re-export with `scripts/export.py --image-step <a divisor of "
                       "it>`, then `make engine`"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            limits.check_request(*args)
        assert str(err.value) == message


def test_pipeline_folder_and_build_info_are_swapped_together(tiny_model, tmp_path, monkeypatch):
    import toonark.export.onnx_export as onnx_export
    from toonark.export.onnx_export import write_pipeline_folder
    dims = PipelineDims.from_folder(tiny_model)

    def broken(path, data):
        raise OSError("disk full")
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "write_json", broken)
        with pytest.raises(OSError):
            write_pipeline_folder(tiny_model, tmp_path, dims, TEST_LIMITS)
    assert not BuildLayout(tmp_path).pipeline.exists()
    write_pipeline_folder(tiny_model, tmp_path, dims, TEST_LIMITS)
    assert BuildInfo.read(tmp_path) == BuildInfo(dims, TEST_LIMITS)


def test_subset_export_keeps_the_other_submodels(tiny_model, tiny_build, tmp_path, caplog):
    caplog.set_level("INFO", logger="toonark.export.onnx_export")
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    layout = BuildLayout(build)
    others = ("text_encoder", "vae_decoder", "vae_encoder")
    before = {name: sha256_tree(layout.onnx_dir("fp32") / name) for name in others}
    report = export_pipeline(tiny_model, build, precisions=("fp32",), limits=TEST_LIMITS, submodels=("unet",),
                             force=True)["fp32"]
    for name in others:
        assert sha256_tree(layout.onnx_dir("fp32") / name) == before[name]
    assert layout.onnx_model("fp32", "unet").is_file()
    assert report["key"]["submodels"] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert {r["submodel"] for r in report["parity"]} == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert set(report["passes"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert any(name.startswith("unet/") for name in report["files"])
    assert any(name.startswith("text_encoder/") for name in report["files"])
    caplog.clear()
    # Everything now matches a full export: not exported again.
    export_pipeline(tiny_model, build, precisions=("fp32",), limits=TEST_LIMITS)
    assert "onnx/fp32: up to date" in _drain(caplog)


def test_subset_export_refuses_to_mix_with_another_models_submodels(tiny_model, tiny_build, tmp_path, monkeypatch):
    import toonark.export.onnx_export as onnx_export
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    report_path = BuildLayout(build).export_report("fp32")
    report = json.loads(report_path.read_text())
    report["key"]["source_sha256"] = "another model"
    report_path.write_text(json.dumps(report))
    monkeypatch.setattr(onnx_export, "load_pipeline", lambda *a: pytest.fail("export started"))
    with pytest.raises(ValueError) as err:
        export_pipeline(tiny_model, build, precisions=("fp32",), limits=TEST_LIMITS, submodels=("unet",))
    assert str(err.value) == (
        f"exporting only unet would leave text_encoder, vae_decoder, vae_encoder in {BuildLayout(build).onnx_dir('fp32')} "
        f"from another export (source_sha256 differ); export every submodel (omit the submodel selection) to "
        f"replace them")
