"""Serving features of the `toonark` ensemble over a real tritonserver (issue 6): the prompt-embedding
cache, toonark's Prometheus metrics, NUM_IMAGES / QUALITY, and the safety checker.

One server for this module, on a copy of the shared tiny build plus a tiny random safety checker
(build_pipeline(with_safety_checker=True) has the same text encoder / UNet / VAE weights as the
shared tiny pipeline, checked by hash, so only the checker is exported here). The prompt-embedding cache is
toonark's own, in preprocess (tests/test_recovery.py tests it against faults).
"""
from __future__ import annotations

import io
import json
import re
import shutil
import urllib.request
import uuid

import numpy as np
import pytest

from toonark.serving.client import GenerateOptions, ServerError, generate

pytestmark = pytest.mark.server

SIZE, STEPS = 64, 2
SUBJECT = "a happy otter with a kite"


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checker_model(tmp_path_factory, tiny_model):
    from toonark.export.onnx_export import source_hash
    from toonark.export.pipelines import build_pipeline
    folder = build_pipeline(tmp_path_factory.mktemp("tiny-sc") / "pipeline", kind="tiny", seed=0,
                            with_safety_checker=True)
    assert source_hash(folder) == source_hash(tiny_model), "text encoder / UNet / VAE must equal the shared tiny's"
    return folder


@pytest.fixture(scope="module")
def checker_build(checker_model, tiny_engines, tmp_path_factory):
    from toonark.export.safety_checker import export_safety_checker
    build = tmp_path_factory.mktemp("tiny-sc-build") / "build"
    shutil.copytree(tiny_engines, build, ignore=shutil.ignore_patterns("triton_model_repo"))
    assert export_safety_checker(checker_model, build) is not None
    return build


@pytest.fixture(scope="module")
def server(checker_build, tmp_path_factory):
    from toonark.serving.repository import write_repo
    from toonark.serving.launcher import TritonServer
    repo = write_repo(checker_build, backend="ort-cpu", precision="fp32", layout="python", intra_op_threads=1,
                      safety_checker=True)
    log = tmp_path_factory.mktemp("triton-sc-log") / "tritonserver.log"
    triton = TritonServer(repo, log_path=log)
    try:
        triton.start()
        print(f"\ntritonserver (with safety checker) ready in {triton.wait_ready(300):.1f} s; log {log}")
        yield triton
    finally:
        triton.stop()
        assert not triton.remove_shm()


def decode(data: bytes):
    from PIL import Image
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data).convert("RGB")).astype(np.int16)


def run(server, protocol="http", **options):
    options = {"prompt": SUBJECT, "steps": STEPS, "width": SIZE, "height": SIZE, **options}
    url = server.http_url if protocol == "http" else server.grpc_url
    return generate(url, GenerateOptions(**options), protocol)


def stats(server, model: str) -> dict:
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    entry = client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
    return {key: (int(value.get("count", 0)), int(value.get("ns", 0))) for key, value in entry.items()}


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, frozenset(labels)): value}."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        match = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$', line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            out[(match.group(1), labels)] = float(match.group(3))
    return out


def value(metrics, name, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in metrics, f"{name}{labels} not exported; have {sorted(k for k in metrics if k[0] == name)}"
    return metrics[key]


# --- 1. prompt-embedding cache ------------------------------------------------------------------------

def test_repeated_prompt_hits_the_text_encoder_cache(server):
    """Behaviour from counters (never wall time, which 2 busy cores make noisy): a repeated prompt is answered
    from toonark's prompt-embedding cache in the text_encoder step without running its engine, the cache
    key is the whole token input (a new negative prompt misses), and a cached embedding draws the same picture."""
    before, metrics_before = stats(server, "text_encoder"), scrape(server)
    prompts = [f"a happy otter number {uuid.uuid4().hex[:6]}" for _ in range(3)]
    first = [run(server, prompt=p, seed=1).images[0] for p in prompts]     # 3 misses
    again = [run(server, prompt=p, seed=1).images[0] for p in prompts]     # 3 hits
    other_seed = run(server, prompt=prompts[0], seed=2).images[0]         # 1 hit
    other_negative = run(server, prompt=prompts[0], seed=1, negative_prompt="rain").images[0]   # 1 miss
    after, metrics_after = stats(server, "text_encoder"), scrape(server)
    delta = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}

    def moved(name):
        return value(metrics_after, name) - metrics_before.get((name, frozenset()), 0.0)

    def moved_stage(stage):   # toonark_stage_duration_seconds{stage="text_encoder"} times engine runs only
        labels = frozenset({"stage": stage}.items())
        return (value(metrics_after, "toonark_stage_duration_seconds_count", stage=stage)
                - metrics_before.get(("toonark_stage_duration_seconds_count", labels), 0.0))

    assert moved("toonark_prompt_cache_misses_total") == 4 and moved("toonark_prompt_cache_hits_total") == 4
    assert delta["success"][0] == 8, "every request passes the text_encoder ensemble step"
    assert moved_stage("text_encoder") == 4, "a hit must not run the text encoder's engine"
    assert first == again, "the cached embeddings must give the same picture"
    assert other_seed != first[0]
    assert other_negative != first[0], "a new negative prompt must be encoded, not served from the cache"


def test_no_model_uses_tritons_response_cache(server):
    """Triton 2.51's response cache replays failures (recipe gotcha 6): no model may enable it."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    caching = {name for name in server.models
               if client.get_model_config(name).get("response_cache", {}).get("enable")}
    assert caching == set()


# --- 2. metrics -----------------------------------------------------------------------------------------

def test_metrics_families_labels_and_increments(server):
    before = scrape(server)
    prompt = f"a friendly fox {uuid.uuid4().hex[:6]}"
    run(server, prompt=prompt, seed=1, steps=2)                                  # text_encoder miss
    run(server, prompt=prompt, seed=2, steps=3, format="webp", num_images=2)     # miss (2 images: other ids)
    run(server, prompt=prompt, seed=3, steps=1)                                  # hit
    with pytest.raises(ServerError, match="weapons"):
        run(server, prompt="a kid with a gun")
    after = scrape(server)

    def moved(name, **labels):
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    from toonark.prompts import PromptPolicy
    for reason, layer in PromptPolicy.load().refusal_labels:   # every pair is a label value, one moved
        want = 1 if (reason, layer) == ("weapons", "word") else 0
        assert moved("toonark_prompt_refusals_total", reason=reason, layer=layer) == want, (reason, layer)
    assert moved("toonark_steps_total") == 2 + 3 + 1
    assert moved("toonark_images_total", format="png") == 2
    assert moved("toonark_images_total", format="webp") == 2
    assert moved("toonark_nsfw_images_total") == 0
    # text_encoder: engine runs (cache misses); unet: the loop denoise owns, once per request (in_process)
    expected = {"preprocess": 4, "text_encoder": 2, "denoise": 3, "unet": 3, "vae_decoder": 3, "safety_checker": 3,
                "postprocess": 3}
    for stage, count in expected.items():
        assert moved("toonark_stage_duration_seconds_count", stage=stage) == count, stage
        assert moved("toonark_stage_duration_seconds_sum", stage=stage) > 0, stage
        assert moved("toonark_stage_duration_seconds_bucket", stage=stage, le="+Inf") == count, stage
    assert moved("toonark_prompt_cache_hits_total") == 1
    assert moved("toonark_prompt_cache_misses_total") == 2
    print("\n" + "\n".join(f"{name}{dict(labels)} {v:g}" for (name, labels), v in sorted(after.items(), key=str)
                           if name.startswith("toonark_") and not name.endswith("_bucket")))


def _classifier_refused_prompt() -> str:
    """The first dev prompt of the labelled set that only the shipped classifier refuses (so the test
    follows a retrained model instead of pinning one of its scores)."""
    from toonark.prompt_safety import evalset, filter_for
    from toonark.prompts import PromptPolicy
    flt = filter_for(PromptPolicy.load()._rules)
    for e in evalset.load():
        if e.split == "dev" and e.kind == "base":
            refusal = flt.verdict(e.text)
            if refusal is not None and refusal.layer == "classifier":
                return e.text
    raise AssertionError("the shipped classifier refuses no dev prompt the rules let through")


def test_refusal_metric_carries_the_layer_that_refused(server):
    """One refused request per layer of the kid-safety filter: each is a 400 naming its category and layer,
    and moves exactly its (reason, layer) series of toonark_prompt_refusals_total; none reaches the text encoder."""
    from toonark.prompt_safety import filter_for
    from toonark.prompts import PromptPolicy
    policy = PromptPolicy.load()
    classifier_prompt = _classifier_refused_prompt()
    cases = [(dict(prompt="a gun"), "weapons", "word"),
             (dict(prompt="a man hitting a small child"), "child-harm", "phrase"),
             (dict(prompt="一只可爱的猫"), "language", "language"),
             (dict(prompt=classifier_prompt), filter_for(policy._rules).verdict(classifier_prompt).category, "classifier"),
             (dict(negative_prompt="clothes"), "sexual", "negative")]
    encoded = stats(server, "text_encoder")["success"][0]
    for options, reason, layer in cases:
        before = scrape(server)
        with pytest.raises(ServerError, match=rf"prompt refused \({reason}\): .*\(layer: {layer}"):
            run(server, **options)
        after = scrape(server)
        for pair in policy.refusal_labels:
            name, labels = "toonark_prompt_refusals_total", dict(zip(("reason", "layer"), pair))
            moved = value(after, name, **labels) - value(before, name, **labels)
            assert moved == (1 if pair == (reason, layer) else 0), (options, pair)
    assert stats(server, "text_encoder")["success"][0] == encoded, "a refused request must run no model"


# --- 3. NUM_IMAGES and QUALITY ----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_num_images_gives_one_image_per_derived_seed(server, protocol):
    batch = run(server, protocol, seed=5, num_images=2)
    assert len(batch.images) == 2 and batch.nsfw == [False, False]
    singles = [run(server, protocol, seed=seed).images[0] for seed in (5, 6)]
    for got, want in zip(batch.images, singles):
        assert decode(got).size == (SIZE, SIZE)
        assert np.abs(pixels(got) - pixels(want)).max() <= 1   # batched vs single ONNX Runtime runs
    assert batch.images[0] != batch.images[1]


@pytest.mark.parametrize("options, message", [
    (dict(num_images=3), r"NUM_IMAGES 3 is more than this build serves per request \(2"),
    (dict(num_images=5), r"NUM_IMAGES 5 is out of range; use 1..4"),
    (dict(num_images=0), r"NUM_IMAGES 0 is out of range"),
    (dict(prompt=[SUBJECT, "a cat"], num_images=2), "NUM_IMAGES repeats one prompt"),
    (dict(quality=0), r"QUALITY 0 is out of range; use 1..100"),
    (dict(quality=101, format="webp"), "QUALITY 101"),
])
def test_batch_and_quality_limits_are_clear_errors(server, options, message):
    with pytest.raises(ServerError, match=message):
        run(server, **options)


def test_webp_quality_is_honoured_and_png_ignores_it(server):
    low = run(server, seed=4, format="webp", quality=5).images[0]
    high = run(server, seed=4, format="webp", quality=100).images[0]
    default = run(server, seed=4, format="webp").images[0]
    assert decode(low).format == decode(high).format == "WEBP"
    assert len(low) < len(default) < len(high), (len(low), len(default), len(high))
    assert np.abs(pixels(high) - pixels(default)).mean() <= np.abs(pixels(low) - pixels(default)).mean()
    png = run(server, seed=4).images[0]
    assert run(server, seed=4, quality=5).images[0] == png


def test_generate_cli_num_images_and_quality(server, tmp_path, capsys):
    from toonark.scripts.generate import main
    out = tmp_path / "fox.webp"
    assert main(["--url", server.http_url, "--prompt", SUBJECT, "--seed", "3", "--steps", "1", "--width", "64",
                 "--height", "64", "--num-images", "2", "--quality", "40", "--out", str(out)]) == 0
    second = tmp_path / "fox-2.webp"
    assert decode(out.read_bytes()).format == decode(second.read_bytes()).format == "WEBP"
    assert out.read_bytes() != second.read_bytes()
    assert "2 image(s)" in capsys.readouterr().out


# --- 4. safety checker ---------------------------------------------------------------------------------

def test_safety_checker_passes_unflagged_images_through(server, checker_build):
    from toonark.engines.pipeline import load_pipeline
    from toonark.prompts import PromptPolicy
    result = run(server, "grpc", seed=9, steps=3)
    assert result.nsfw == [False]
    prompt, negative = PromptPolicy.load().compose(SUBJECT)
    offline = load_pipeline(checker_build, backend="ort-cpu", precision="fp32")
    expected = offline(prompt, negative, seed=9, steps=3, guidance=7.5, width=SIZE, height=SIZE).images[0]
    assert np.abs(pixels(result.images[0]) - expected.astype(np.int16)).max() <= 1
    assert (pixels(result.images[0]) != 255).any()


def reload_checker(server, **params):
    """Reload `safety_checker` with some config parameters overridden (Triton's load API)."""
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    config = client.get_model_config("safety_checker")
    for key, text in params.items():
        config["parameters"][key] = {"string_value": text}
    from toonark.serving.launcher import ADMIN_HEADER   # the model-control API is restricted
    client.load_model("safety_checker", config=json.dumps(config), headers={ADMIN_HEADER: server.admin_key})
    assert client.is_model_ready("safety_checker") and client.is_model_ready("toonark")
    return config


def test_flagged_images_are_blank_white_with_the_flag(server):
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    original = client.get_model_config("safety_checker")["parameters"]
    count = len(original["concept_thresholds"]["string_value"].split(","))
    before = scrape(server)
    try:
        # Every concept threshold at -2: cosine - (-2) > 0 for any image, so everything is flagged.
        reload_checker(server, concept_thresholds=",".join(["-2.0"] * count))
        for protocol, fmt in (("http", "png"), ("grpc", "webp")):
            result = run(server, protocol, seed=5, num_images=2, format=fmt)
            assert result.nsfw == [True, True]
            for image in result.images:
                assert decode(image).format == fmt.upper() and decode(image).size == (SIZE, SIZE)
                assert (pixels(image) == 255).all(), "a flagged image must be blank white"
        after = scrape(server)
        assert value(after, "toonark_nsfw_images_total") - before[("toonark_nsfw_images_total", frozenset())] == 4
    finally:
        reload_checker(server, **{k: v["string_value"] for k, v in original.items()})
    assert run(server, seed=5).nsfw == [False]


def test_respond_each_answers_every_request_with_its_own_error_code():
    """runtime.respond_each (every Python model's execute): one response per request, in order."""
    from types import SimpleNamespace

    from toonark.triton_model_repo import runtime

    class TritonError:
        INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

        def __init__(self, message, code=INTERNAL):
            self.message, self.code = message, code

    pb = SimpleNamespace(TritonError=TritonError,
                         InferenceResponse=lambda output_tensors=None, error=None: (output_tensors, error))

    def handle(request):
        if request == "bad":
            raise runtime.RequestError("WIDTH 100 must be a multiple of 64")
        if request == "shape":
            raise ValueError("input sample has shape [1]")
        if request == "unet":
            raise runtime.UpstreamError("unet is not ready", TritonError.UNAVAILABLE)
        if request == "crash":
            raise KeyError("boom")
        return [request]

    responses = runtime.respond_each(["ok", "bad", "shape", "unet", "crash", "ok2"], handle, pb)
    assert [r[0] for r in responses] == [["ok"], None, None, None, None, ["ok2"]]
    codes = [(e.code, e.message) for _, e in responses if e is not None]
    assert codes == [("INVALID_ARG", "WIDTH 100 must be a multiple of 64"), ("INVALID_ARG", "input sample has shape [1]"),
                     ("UNAVAILABLE", "unet is not ready"), ("INTERNAL", "KeyError: 'boom'")]
