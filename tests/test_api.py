"""The served API is declared once (toonark/api.py) and everything else reads it: the generated configs, the
preprocess defaults, the client's fields, the resolver's keywords, and no retyped tensor names in what Triton
loads or in the serving tools. Requests themselves are checked end to end in test_triton.py / test_reliability.py
and pinned by test_golden.py."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TEST_LIMITS

from toonark import api

ROOT = Path(__file__).resolve().parents[1]


def test_every_ensemble_input_is_a_resolver_keyword_and_a_client_field():
    from toonark.serving.client import GenerateOptions
    names = [port.name.lower() for port in api.ENSEMBLE_INPUTS]
    keywords = [p.name for p in inspect.signature(api.resolve_request).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keywords == names
    assert [f.name for f in dataclasses.fields(GenerateOptions)] == names


def test_generated_configs_carry_the_declared_api():
    from toonark.serving.repository import repo_configs
    from toonark.specs import BuildInfo, PipelineDims
    from toonark.triton_model_repo.runtime import model_parameters
    # SD-1.5's sizes with the tests' limits: no export needed (the session's tiny build is left to the stage
    # tests, whose torch thread settings it depends on).
    info = BuildInfo(PipelineDims(text_length=77, text_hidden=768, latent_channels=4, vae_scale=8,
                                  vae_scaling_factor=0.18215), TEST_LIMITS)
    configs = repo_configs(info)
    ensemble = configs[api.ENSEMBLE]
    for port in api.ENSEMBLE_INPUTS + api.ENSEMBLE_OUTPUTS:
        assert f'name: "{port.name}" data_type: TYPE_{port.triton_type}' in ensemble, port.name
    # The preprocess config's defaults are api.request_defaults, typed back by the runtime as declared.
    params = {k: {"string_value": v} for k, v in re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}',
                                                            configs["preprocess"])}
    typed = model_parameters({"name": "preprocess", "parameters": params})
    assert {k[len("default_"):]: v for k, v in typed.items() if k.startswith("default_")} == api.request_defaults(info)
    for port in api.DENOISE_INPUTS:
        assert f'name: "{port.name}" data_type: TYPE_{port.triton_type}' in configs["denoise"]
    for port in api.POSTPROCESS_INPUTS:
        assert f'name: "{port.name}" data_type: TYPE_{port.triton_type}' in configs["postprocess"]


def _string_constants(path: Path):
    """(line, value) of every string constant of a module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_served_name_is_retyped_outside_the_api():
    """Triton models and serving tools name API tensors through toonark.api, never as literals (a renamed
    input would otherwise leave a stale copy that only fails at serve time)."""
    public = {port.name for port in api.ENSEMBLE_INPUTS + api.ENSEMBLE_OUTPUTS + (api.NSFW_OUTPUT,)} | {api.ENSEMBLE}
    resolved = {port.name for port in api.RESOLVED}
    found = []
    for folder, names in (("triton_model_repo", public | resolved), ("serving", public)):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in _string_constants(path)
                      if value in names]
    assert not found, "served names retyped as literals (use toonark.api): " + ", ".join(found)


# What resolve_request reads of a BuildInfo: the limits (the tests' small profile, max batch 2).
_Info = SimpleNamespace(limits=TEST_LIMITS)


@pytest.fixture(scope="module")
def policy():
    from toonark.prompts import PromptPolicy
    return PromptPolicy.load()


def test_resolver_applies_the_declared_defaults(policy):
    resolved = api.resolve_request(_Info, policy, prompt="a happy otter")
    assert (resolved.seed, resolved.guidance, resolved.width, resolved.height, resolved.format, resolved.quality) == (
        api.DEFAULT_SEED, api.DEFAULT_GUIDANCE, _Info.limits.opt_image, _Info.limits.opt_image, api.DEFAULT_FORMAT,
        api.DEFAULT_QUALITY)
    assert resolved.steps == policy.presets[policy.default_preset]
    assert resolved.prompts == (policy.compose("a happy otter")[0],)
    assert resolved.negatives == (policy.negative_prompt,)
    tensors = resolved.tensors()
    assert list(tensors) == [port.name for port in api.RESOLVED]
    for port in api.RESOLVED:
        assert tensors[port.name].dtype == np.dtype(api.NUMPY_TYPES[port.triton_type]), port.name


def test_resolver_takes_python_values_and_triton_arrays_alike(policy):
    python = api.resolve_request(_Info, policy, prompt=["a cat"], negative_prompt="rain", seed=4, steps=3,
                                 guidance=2.5, width=64, height=128, format="WEBP", num_images=2, quality=50)
    arrays = api.resolve_request(_Info, policy, prompt=np.array([b"a cat"], dtype=object),
                                 negative_prompt=np.array([b"rain"], dtype=object), seed=np.array([4], np.int64),
                                 steps=np.array([3], np.int32), guidance=np.array([2.5], np.float32),
                                 width=np.array([64], np.int32), height=np.array([128], np.int32),
                                 format=np.array([b"WEBP"], dtype=object), num_images=np.array([2], np.int32),
                                 quality=np.array([50], np.int32))
    assert python == arrays
    assert python.image_seeds == (4, 5) and python.seeds == [4, 5] and python.batch == 2 and python.format == "webp"


@pytest.mark.parametrize("inputs, message", [
    (dict(prompt=None), "PROMPT is missing: send one prompt per image (a BYTES tensor of shape [B])"),
    (dict(guidance=30.5), "GUIDANCE 30.5 is out of range; use 0..30 (7.5 is typical)"),
    (dict(guidance=float("nan")), "GUIDANCE nan is out of range; use 0..30 (7.5 is typical)"),
    (dict(quality=0), "QUALITY 0 is out of range; use 1..100 (WebP only; PNG ignores it)"),
    (dict(num_images=5), "NUM_IMAGES 5 is out of range; use 1..4"),
    (dict(num_images=3), "NUM_IMAGES 3 is more than this build serves per request (2, its max batch)"),
    (dict(seed=2 ** 63 - 1, num_images=2), "SEED 9223372036854775807 is out of range; use 0..2**63-1 minus NUM_IMAGES-1 (1)"),
    (dict(format="gif"), "FORMAT 'gif' is not supported; use one of png, webp"),
    (dict(prompt="a kid with a gun"), "prompt refused (weapons)"),
])
def test_resolver_refuses_with_the_served_messages(policy, inputs, message):
    with pytest.raises(api.RequestError) as caught:
        api.resolve_request(_Info, policy, **{"prompt": "a happy otter", **inputs})
    assert str(caught.value).startswith(message)
