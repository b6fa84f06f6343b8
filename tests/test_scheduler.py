"""Golden tests: toonark's numpy DPM-Solver++ against diffusers' DPMSolverMultistepScheduler,
step by step, on a deterministic fake model whose output depends on the sample (so the
solver's history matters)."""
from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest

from toonark.scheduler import DPMSolverConfig, DPMSolverMultistep

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SD-1.5's scheduler, as export/pipelines.py writes it.
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
            timestep_spacing="leading", steps_offset=1)

MAX_REL_ERROR = 1e-5
SHAPE = (2, 4, 8, 8)


def fake_model(sample: np.ndarray, timestep: int) -> np.ndarray:
    """A fixed function of (sample, t): linear in the sample plus a fixed pattern scaled by t."""
    pattern = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    return (0.6 * sample + (0.3 + timestep / 2000.0) * pattern).astype(np.float32)


def start_latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def run_diffusers(config: dict, steps: int, latents: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    scheduler = diffusers.DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(latents.copy())
    samples = []
    for t in scheduler.timesteps:
        output = torch.from_numpy(fake_model(sample.numpy(), int(t)))
        sample = scheduler.step(output, t, sample).prev_sample
        samples.append(sample.numpy().copy())
    return scheduler.timesteps.numpy(), samples


def run_toonark(scheduler: DPMSolverMultistep, steps: int, latents: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    schedule = scheduler.schedule(steps)
    state = scheduler.initial_state(schedule)
    sample, samples = latents * scheduler.init_noise_sigma, []
    while not state.done:
        output = fake_model(scheduler.scale_model_input(sample, state), state.timestep)
        sample, state = scheduler.step(output, sample, state)
        samples.append(sample)
    return schedule.timesteps, samples


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


CONFIGS = [dict(SD15, use_karras_sigmas=karras, timestep_spacing=spacing, prediction_type=prediction)
           for karras, spacing, prediction in itertools.product(
               (False, True), ("leading", "trailing"), ("epsilon", "v_prediction"))]
CONFIGS += [dict(SD15, timestep_spacing="linspace"), dict(SD15, solver_order=1),
            dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0)]


def _config_id(config: dict) -> str:
    return "-".join(str(config[k]) for k in ("timestep_spacing", "prediction_type", "beta_schedule")) + \
        f"-o{config['solver_order']}" + ("-karras" if config.get("use_karras_sigmas") else "")


@pytest.mark.parametrize("steps", (10, 15, 20, 30))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matches_diffusers_step_by_step(config, steps):
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict(config))
    latents = start_latents()
    ref_timesteps, ref_samples = run_diffusers(config, steps, latents)
    timesteps, samples = run_toonark(scheduler, steps, latents)

    np.testing.assert_array_equal(timesteps, ref_timesteps)
    assert timesteps.dtype == np.int64
    assert len(samples) == len(ref_samples) == steps
    for index, (ours, ref) in enumerate(zip(samples, ref_samples)):
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert np.isfinite(ours).all(), f"step {index}: NaN/inf"
        error = rel_error(ours, ref)
        assert error <= MAX_REL_ERROR, f"step {index} (t={timesteps[index]}): max rel error {error:.2e}"


def test_interleaved_requests_match_sequential():
    """One scheduler instance, two requests with different step counts stepped alternately."""
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict(SD15))
    _, alone_a = run_toonark(scheduler, 20, start_latents(1))
    _, alone_b = run_toonark(scheduler, 12, start_latents(2))

    state_a = scheduler.initial_state(scheduler.schedule(20))
    state_b = scheduler.initial_state(scheduler.schedule(12))
    sample_a, sample_b, got_a, got_b = start_latents(1), start_latents(2), [], []
    while not (state_a.done and state_b.done):
        if not state_a.done:
            sample_a, state_a = scheduler.step(fake_model(sample_a, state_a.timestep), sample_a, state_a)
            got_a.append(sample_a)
        if not state_b.done:
            sample_b, state_b = scheduler.step(fake_model(sample_b, state_b.timestep), sample_b, state_b)
            got_b.append(sample_b)
    for got, alone in ((got_a, alone_a), (got_b, alone_b)):
        assert len(got) == len(alone)
        for ours, ref in zip(got, alone):
            np.testing.assert_array_equal(ours, ref)


def test_state_is_not_mutated():
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict(SD15))
    state = scheduler.initial_state(scheduler.schedule(10))
    sample = start_latents()
    first, next_state = scheduler.step(fake_model(sample, state.timestep), sample, state)
    again, _ = scheduler.step(fake_model(sample, state.timestep), sample, state)
    np.testing.assert_array_equal(first, again)
    assert state.step_index == 0 and state.model_outputs == ()
    assert next_state.step_index == 1 and len(next_state.model_outputs) == 1


def test_step_past_the_end_raises():
    scheduler = DPMSolverMultistep(DPMSolverConfig())
    state = scheduler.initial_state(scheduler.schedule(1))
    sample = start_latents()
    sample, state = scheduler.step(fake_model(sample, state.timestep), sample, state)
    assert state.done
    with pytest.raises(ValueError, match="after all 1 steps"):
        scheduler.step(sample, sample, state)


def test_config_roundtrip_through_diffusers(tmp_path):
    """diffusers' save_config output (every keyword it knows) loads back to the same config."""
    config = dict(SD15, use_karras_sigmas=True, prediction_type="v_prediction")
    diffusers.DPMSolverMultistepScheduler(**config).save_config(tmp_path)
    loaded = DPMSolverConfig.from_file(tmp_path)   # the folder, or its scheduler_config.json
    assert loaded == DPMSolverConfig.from_file(tmp_path / "scheduler_config.json")
    assert loaded == DPMSolverConfig(**config)
    assert loaded.lambda_min_clipped == -math.inf
    rebuilt = diffusers.DPMSolverMultistepScheduler(**loaded.to_dict())
    assert {k: rebuilt.config[k] for k in loaded.to_dict()} == loaded.to_dict()


def test_sd15_pndm_config_is_accepted(tmp_path):
    """SD-1.5 checkpoints ship a PNDM config; its extra keys do not change DPM-Solver++'s math."""
    pndm = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(pndm))
    config = DPMSolverConfig.from_file(tmp_path)
    assert config.beta_schedule == "scaled_linear" and config.steps_offset == 1


@pytest.mark.parametrize("key, value, message", [
    ("algorithm_type", "sde-dpmsolver++",
     "scheduler config algorithm_type='sde-dpmsolver++' is not supported; toonark's DPM-Solver++ implements "
     "algorithm_type 'dpmsolver++' only (set it in scheduler_config.json)"),
    ("solver_type", "heun",
     "scheduler config solver_type='heun' is not supported; toonark's DPM-Solver++ implements "
     "solver_type 'midpoint' only (set it in scheduler_config.json)"),
    ("solver_order", 3,
     "scheduler config solver_order=3 is not supported; toonark's DPM-Solver++ implements "
     "solver_order 1 or 2 only (set it in scheduler_config.json)"),
    ("final_sigmas_type", "sigma_min",
     "scheduler config final_sigmas_type='sigma_min' is not supported; toonark's DPM-Solver++ implements "
     "final_sigmas_type 'zero' only (set it in scheduler_config.json)"),
    ("prediction_type", "sample",
     "scheduler config prediction_type='sample' is not supported; toonark's DPM-Solver++ implements "
     "prediction_type 'epsilon' or 'v_prediction' only (set it in scheduler_config.json)"),
    ("thresholding", True,
     "scheduler config thresholding=True is not supported; toonark's DPM-Solver++ implements "
     "thresholding False only (set it in scheduler_config.json)"),
    ("use_lu_lambdas", True,
     "scheduler config use_lu_lambdas=True is not supported; toonark's DPM-Solver++ implements "
     "use_lu_lambdas False only (set it in scheduler_config.json)"),
    ("timestep_spacing", "karras",
     "scheduler config timestep_spacing='karras' is not supported; toonark's DPM-Solver++ implements "
     "timestep_spacing 'leading' or 'linspace' or 'trailing' only (set it in scheduler_config.json)"),
    ("shift", 3.0,
     "scheduler config key 'shift' (value 3.0) is not a DPMSolverMultistepScheduler keyword toonark knows; "
     "remove it from scheduler_config.json or add it to toonark.scheduler if it changes the math"),
])
def test_unsupported_config_raises(tmp_path, key, value, message):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(SD15, **{key: value})))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DPMSolverConfig.from_file(tmp_path / "scheduler_config.json")


@pytest.mark.parametrize("steps", (0, -3, 1000, 2.5, True))
def test_bad_step_count_raises(steps):
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict(SD15))
    with pytest.raises(ValueError, match=re.escape(f"num_inference_steps={steps!r} must be an integer in 1..999")):
        scheduler.schedule(steps)


# ---- host update vs the coefficient form the device step graph runs ---------------------------

SOLVER_GRID = [dict(prediction_type=prediction, solver_order=order, use_karras_sigmas=karras, timestep_spacing=spacing)
               for prediction in ("epsilon", "v_prediction") for order in (1, 2) for karras in (False, True)
               for spacing in ("leading", "trailing")]


@pytest.mark.parametrize("options", SOLVER_GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_coefficient_form_equals_host_step(options):
    """DPMSolverMultistep.step_coefficients (what engines/ort_loop.py's step graph multiplies) gives the
    host `step`'s next sample at every step, in float64, for each prediction type, order, Karras on/off."""
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict({**SD15, **options}))
    steps, guidance = 7, 5.0
    schedule = scheduler.schedule(steps)
    rng = np.random.default_rng(3)
    x_host = rng.standard_normal((1, 4, 8, 8))
    x_coef, m_prev, state = x_host.copy(), np.zeros_like(x_host), scheduler.initial_state(schedule)
    for i in range(steps):
        noise = rng.standard_normal((2, 4, 8, 8))
        guided = noise[:1] + guidance * (noise[1:] - noise[:1])
        x_host, state = scheduler.step(guided, x_host, state)
        g, k1, k2, a, b, c = scheduler.step_coefficients(schedule, i, guidance).astype(np.float64)
        assert g == guidance
        m0 = k1 * x_coef - k2 * (noise[:1] + g * (noise[1:] - noise[:1]))
        x_coef, m_prev = a * x_coef + b * m0 + c * m_prev, m0
        # float32 coefficients: relative agreement to float32 rounding of the six numbers
        np.testing.assert_allclose(x_coef, x_host, rtol=2e-5, atol=2e-5 * np.abs(x_host).max())


def test_coefficient_form_refuses_what_it_cannot_express():
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict(SD15))
    from toonark.scheduler import step_coefficients
    with pytest.raises(ValueError, match="prediction_type 'sample' has no linear step form"):
        step_coefficients(scheduler.schedule(4), 0, 7.5, prediction_type="sample")


@pytest.mark.parametrize("prediction_type, solver_order", [("epsilon", 2), ("epsilon", 1), ("v_prediction", 2)])
def test_step_graph_matches_host_sampler(tmp_path, prediction_type, solver_order):
    """CFG + DPM-Solver++ as the ONNX step graph on ORT CPU == toonark.scheduler.DPMSolverMultistep.step."""
    from toonark.engines.ort_loop import step_model
    from toonark.ort_session import ort_session
    scheduler = DPMSolverMultistep(DPMSolverConfig.from_dict({**SD15, "prediction_type": prediction_type,
                                                              "solver_order": solver_order}))
    steps, guidance = 6, 7.5
    schedule = scheduler.schedule(steps)
    session = ort_session(step_model(tmp_path / "step.onnx"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x_ref, state, m_prev = x.copy(), scheduler.initial_state(schedule), np.zeros_like(x)
    for i in range(steps):
        noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        eps = noise[:1] + guidance * (noise[1:] - noise[:1])
        x_ref, state = scheduler.step(eps, x_ref, state)
        x, m_prev, sample = session.run(None, {"noise_pred": noise, "x": x, "m_prev": m_prev,
                                                "coef": scheduler.step_coefficients(schedule, i, guidance)})
        np.testing.assert_allclose(x, x_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(sample, np.concatenate([x, x]))
