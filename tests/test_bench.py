"""`make bench` on the CPU with the tiny pipeline: checks the table and the JSON's structure
(not speed), and the on-device DPM-Solver++ step graph against toonark.scheduler."""
from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    from toonark.bench import main
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
    from toonark.bench import table
    text = table(tiny_bench[0])
    assert "UNet step b2" in text and "img/s b2" in text
    for name in ("torch-eager", "torch-compile", "ort", "ort-graph", "ort-unfused"):
        assert name in text


def test_step_graph_matches_scheduler(tmp_path):
    """CFG + DPM-Solver++(2M) as an ONNX graph == toonark.scheduler.DPMSolverMultistep.step."""
    import onnxruntime as ort
    from toonark.bench import dpm_schedule, step_coefficients, step_model
    from toonark.export.pipelines import SCHEDULER_CONFIG
    from toonark.scheduler import DPMSolverConfig, DPMSolverMultistep
    keys = set(DPMSolverConfig.__dataclass_fields__)
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict({k: v for k, v in SCHEDULER_CONFIG.items() if k in keys}))
    steps, guidance = 6, 7.5
    schedule = dpm_schedule(steps)
    session = ort.InferenceSession(str(step_model(tmp_path / "step.onnx")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x_ref, state, m_prev = x.copy(), scheduler.initial_state(scheduler.schedule(steps)), np.zeros_like(x)
    for i in range(steps):
        noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        eps = noise[:1] + guidance * (noise[1:] - noise[:1])
        x_ref, state = scheduler.step(eps, x_ref, state)
        x, m_prev, sample = session.run(None, {"noise_pred": noise, "x": x, "m_prev": m_prev,
                                                "coef": step_coefficients(schedule, i, guidance)})
        np.testing.assert_allclose(x, x_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(sample, np.concatenate([x, x]))
