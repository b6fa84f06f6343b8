"""export/safety_checker.py without a server: the ONNX export against PyTorch, the numpy decision
against diffusers' StableDiffusionSafetyChecker.forward, the CLIP preprocessing against
transformers' CLIPImageProcessor, and white blanking."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toonark.export.safety_checker import (METADATA_FILE, ClipPreprocess, SafetyChecker, Thresholds, checker_spec,
                                           export_safety_checker, safety_flags)


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    from toonark.export.pipelines import build_pipeline
    return build_pipeline(tmp_path_factory.mktemp("sc") / "pipeline", kind="tiny", seed=0, with_safety_checker=True)


@pytest.fixture(scope="module")
def exported(checker_folder, tmp_path_factory):
    return export_safety_checker(checker_folder, tmp_path_factory.mktemp("sc-build"))


@pytest.fixture(scope="module")
def torch_checker(checker_folder):
    from toonark.export.safety_checker import _load
    return _load(checker_folder)


def test_default_pipeline_has_no_checker(tiny_model, tmp_path):
    from toonark.export.safety_checker import has_safety_checker
    assert not has_safety_checker(tiny_model)
    assert export_safety_checker(tiny_model, tmp_path) is None


def test_export_without_checker_removes_a_previous_models_checker(tiny_model, tmp_path):
    from toonark.export.safety_checker import checker_dir
    stale = checker_dir(tmp_path)
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"previous model's checker")
    (stale / METADATA_FILE).write_text("{}")
    assert export_safety_checker(tiny_model, tmp_path) is None
    assert not stale.exists()


def test_export_matches_pytorch_and_the_spec(exported, torch_checker):
    import onnx
    meta = json.loads((exported / METADATA_FILE).read_text())
    assert max(row["max_abs_error"] for row in meta["parity"]) < 1e-4
    assert len(meta["thresholds"]["concept"]) == 17 and len(meta["thresholds"]["special_care"]) == 3
    model = onnx.load(str(exported / "model.onnx"))
    spec = checker_spec(224)
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"


def diffusers_flags(torch_checker, clip_input: np.ndarray) -> list[bool]:
    import torch
    images = np.zeros((len(clip_input), 8, 8, 3), np.float32)
    _, flags = torch_checker(torch.from_numpy(clip_input), images)
    return [bool(f) for f in flags]


@pytest.mark.parametrize("setting", ["shipped", "low concept", "special care", "mixed"])
def test_decision_equals_diffusers_forward(exported, torch_checker, setting):
    import torch
    rng = np.random.default_rng(0)
    clip_input = rng.standard_normal((6, 3, 224, 224)).astype(np.float32)
    checker = SafetyChecker(exported)
    special, concept = checker.session.run(None, {"clip_input": clip_input})
    with torch.no_grad():
        if setting == "low concept":
            torch_checker.concept_embeds_weights.fill_(-2.0)
        elif setting == "special care":      # special care trips, its +0.01 pushes concepts just over
            torch_checker.special_care_embeds_weights.fill_(-2.0)
            torch_checker.concept_embeds_weights.copy_(torch.from_numpy(concept.max(axis=0) + 0.005))
        elif setting == "mixed":             # thresholds at the batch median: some images flagged, some not
            torch_checker.concept_embeds_weights.copy_(torch.from_numpy(np.median(concept, axis=0)))
    thresholds = Thresholds(tuple(torch_checker.special_care_embeds_weights.tolist()),
                            tuple(torch_checker.concept_embeds_weights.tolist()))
    try:
        expected = diffusers_flags(torch_checker, clip_input)
        assert safety_flags(special, concept, thresholds).tolist() == expected
        if setting == "shipped":
            assert not any(expected)         # thresholds 1.0: a cosine never exceeds them
        elif setting == "low concept":
            assert all(expected)
    finally:
        with torch.no_grad():
            torch_checker.concept_embeds_weights.fill_(1.0)
            torch_checker.special_care_embeds_weights.fill_(1.0)


@pytest.mark.parametrize("height, width", [(64, 128), (256, 64), (96, 96)])
def test_clip_preprocessing_equals_clip_image_processor(checker_folder, height, width):
    from transformers import CLIPImageProcessor
    config = json.loads((checker_folder / "feature_extractor" / "preprocessor_config.json").read_text())
    images = np.random.default_rng(1).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    ours = ClipPreprocess.from_config(config)(images)
    theirs = CLIPImageProcessor.from_pretrained(checker_folder / "feature_extractor")(
        list(images), return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    assert np.abs(ours - theirs).max() < 1e-4


def test_flagged_images_turn_white_others_pass(exported):
    from toonark import pipeline as offline
    decoded = np.random.default_rng(2).uniform(-1, 1, (3, 3, 64, 64)).astype(np.float32)
    keep = SafetyChecker(exported)
    checked, flags = keep(decoded)
    assert flags.tolist() == [False] * 3 and np.array_equal(checked, decoded)
    meta = json.loads((exported / METADATA_FILE).read_text())["thresholds"]
    strict = SafetyChecker(exported, Thresholds(tuple(meta["special_care"]), (-2.0,) * 17))
    checked, flags = strict(decoded)
    assert flags.tolist() == [True] * 3
    assert (offline.to_uint8_hwc(checked) == 255).all()
    with pytest.raises(ValueError, match="17 concepts but 3 / 2 thresholds"):
        safety_flags(np.zeros((1, 3)), np.zeros((1, 17)), Thresholds((1.0,) * 3, (1.0, 1.0)))


def test_reexport_is_skipped_when_up_to_date(checker_folder, exported):
    from toonark.export.safety_checker import is_up_to_date
    build = exported.parent
    assert is_up_to_date(checker_folder, build)
    before = (exported / "model.onnx").stat().st_mtime_ns
    assert export_safety_checker(checker_folder, build) == exported
    assert (exported / "model.onnx").stat().st_mtime_ns == before
