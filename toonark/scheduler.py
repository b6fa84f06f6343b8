"""DPM-Solver++ multistep in numpy: the sampler every toonark path (offline pipeline, Triton
model, calibration capture, GPU bench) runs, so all of them take exactly the same steps.

Written after diffusers' `scheduling_dpmsolver_multistep.py` and checked step by step against
`DPMSolverMultistepScheduler` (tests/test_scheduler.py), but only the part SD-1.5 serving uses:
algorithm_type "dpmsolver++", solver_type "midpoint", solver_order 1 or 2, final_sigmas_type
"zero", epsilon / v_prediction models, leading / linspace / trailing spacing, optional Karras
sigmas. Paper: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", https://arxiv.org/abs/2211.01095 (multistep second order: Algorithm 2).

Unlike diffusers, the scheduler holds no per-request history: `schedule(n)` gives a request's
timesteps and sigmas, `initial_state(schedule)` its empty history, and `step(...)` returns the
next sample together with the next state, so one instance (one Triton model instance) can
serve interleaved requests with different step counts. All math runs in float64; samples come
back in the dtype they came in (float32 latents stay float32).

No torch: the Triton Python-backend models import this module.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# diffusers keywords that exist only to switch on features toonark does not implement: each
# is accepted only at the value that leaves the math unchanged (diffusers' default).
_FEATURES_OFF = {
    "trained_betas": None,
    "thresholding": False,
    "variance_type": None,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}

# Keys that do not change DPM-Solver++'s math here: bookkeeping, parameters of the switched-off
# features above (read only when their feature is on), and the keys SD checkpoints' PNDM/DDIM
# scheduler configs carry (diffusers' `from_config` drops those when switching to DPM-Solver).
_INERT_KEYS = frozenset({
    "_class_name", "_diffusers_version",
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type",
    "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps",
})

_CHOICES = {
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "final_sigmas_type": ("zero",),
    "solver_order": (1, 2),
    "prediction_type": ("epsilon", "v_prediction"),
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
}


def _unsupported(key: str, value, allowed) -> ValueError:
    allowed_text = " or ".join(repr(a) for a in allowed)
    return ValueError(f"scheduler config {key}={value!r} is not supported; toonark's DPM-Solver++ implements "
                      f"{key} {allowed_text} only (set it in scheduler_config.json)")


@dataclass(frozen=True)
class DPMSolverConfig:
    """diffusers' `DPMSolverMultistepScheduler` keywords (same names, same defaults) that toonark
    implements. `DPMSolverMultistepScheduler(**config.to_dict())` is the reference it matches.

    num_train_timesteps, beta_start, beta_end, beta_schedule: the training noise schedule
        ("linear", "scaled_linear" as SD-1.5, or "squaredcos_cap_v2").
    solver_order: 2 is DPM-Solver++(2M); 1 is DPM-Solver++(1), i.e. DDIM.
    prediction_type: what the UNet predicts, "epsilon" (SD-1.5) or "v_prediction" (SD-2.x 768).
    algorithm_type, solver_type, final_sigmas_type: fixed to "dpmsolver++", "midpoint", "zero";
        kept as fields so configs name them as diffusers does.
    lower_order_final, euler_at_final: diffusers' stabilisers for the last steps. With
        final_sigmas_type "zero" the last step is first order anyway, and with orders <= 2 the
        second-to-last rule (which only lowers order 3) never applies.
    use_karras_sigmas: Karras et al. (2022) rho=7 sigma spacing instead of the trained sigmas.
    lambda_min_clipped: the smallest log-SNR a timestep may have (for cosine schedules).
    timestep_spacing, steps_offset: how inference timesteps are picked (Table 2 of arXiv 2305.08891);
        steps_offset is added under "leading" only, as in diffusers.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self):
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise _unsupported(key, getattr(self, key), allowed)
        if self.num_train_timesteps < 2:
            raise ValueError(f"scheduler config num_train_timesteps={self.num_train_timesteps} must be at least 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"scheduler config needs 0 < beta_start < beta_end < 1, got beta_start={self.beta_start}, "
                             f"beta_end={self.beta_end}")

    @classmethod
    def from_dict(cls, config: dict) -> "DPMSolverConfig":
        """From diffusers' config keywords (a scheduler_config.json's content)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in names:
                kwargs[key] = value
            elif key in _FEATURES_OFF:
                if value != _FEATURES_OFF[key]:
                    raise _unsupported(key, value, (_FEATURES_OFF[key],))
            elif key not in _INERT_KEYS:
                raise ValueError(f"scheduler config key {key!r} (value {value!r}) is not a DPMSolverMultistepScheduler "
                                 f"keyword toonark knows; remove it from scheduler_config.json or add it to toonark."
                                 f"scheduler if it changes the math")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> "DPMSolverConfig":
        """From a scheduler_config.json, or the scheduler/ folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / SCHEDULER_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"scheduler config {path} does not exist; point at the scheduler/ folder of a "
                                    f"diffusers pipeline (OUT/pipeline/scheduler after `make export`)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(config)

    def to_dict(self) -> dict:
        """diffusers keywords: `DPMSolverMultistepScheduler(**config.to_dict())` builds the reference."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, eq=False)
class Schedule:
    """One request's discretisation: `timesteps[i]` is what the UNet sees at step i, which moves the
    sample from noise level `sigmas[i]` to `sigmas[i + 1]` (`sigmas[-1]` is 0: the clean sample).
    alpha_t, sigma_t, lambda_t are the VP coefficients of `sigmas` (length steps + 1, float64)."""
    timesteps: np.ndarray   # int64 (steps,)
    sigmas: np.ndarray      # float64 (steps + 1,)
    alpha_t: np.ndarray
    sigma_t: np.ndarray
    lambda_t: np.ndarray    # log(alpha_t / sigma_t); +inf at the final sigma 0

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True, eq=False)
class SolverState:
    """A request's progress: the next step's index and the data predictions (x0_pred) of the
    previous steps, most recent last (at most solver_order of them). Immutable; `step` returns
    a new one."""
    schedule: Schedule
    step_index: int = 0
    model_outputs: tuple[np.ndarray, ...] = field(default_factory=tuple)

    @property
    def timestep(self) -> int:
        """The timestep the UNet must be run at for the next step."""
        if self.done:
            raise ValueError(f"all {len(self.schedule)} steps of this schedule are done; start a new state "
                             f"with initial_state(schedule)")
        return int(self.schedule.timesteps[self.step_index])

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.schedule)


# Copied in spirit from diffusers.schedulers.scheduling_ddpm.betas_for_alpha_bar (cosine), in float64.
def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
                         max_beta) for i in range(num_diffusion_timesteps)], dtype=np.float64)


class DPMSolverMultistep:
    """DPM-Solver++ (multistep, midpoint, order <= 2) over a VP noise schedule.

    >>> scheduler = DPMSolverMultistep.from_file("OUT/pipeline/scheduler")
    >>> state = scheduler.initial_state(scheduler.schedule(20))
    >>> while not state.done:
    ...     eps = unet(latents, state.timestep)
    ...     latents, state = scheduler.step(eps, latents, state)
    """

    # DPM-Solver++ works on x_t = alpha_t x0 + sigma_t eps with x_T ~ N(0, I): no input scaling.
    init_noise_sigma = 1.0

    def __init__(self, config: DPMSolverConfig):
        self.config = config
        # Fixed tables in derivation order, float64, built once per scheduler.
        if config.beta_schedule == "linear":
            betas = np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=np.float64)
        elif config.beta_schedule == "scaled_linear":
            # Latent-diffusion schedule: linear in sqrt(beta).
            betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                                dtype=np.float64) ** 2
        else:  # squaredcos_cap_v2 (validated by DPMSolverConfig)
            betas = _betas_for_alpha_bar(config.num_train_timesteps)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1.0 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = self.sigma_t / self.alpha_t   # sqrt((1 - abar) / abar): the VE noise level per train step
        self.log_sigmas = np.log(self.sigmas)       # for mapping Karras sigmas back to train timesteps

    @classmethod
    def from_file(cls, path: Path) -> "DPMSolverMultistep":
        return cls(DPMSolverConfig.from_file(path))

    # ---- per request -------------------------------------------------------------------------

    def schedule(self, num_inference_steps: int) -> Schedule:
        """Timesteps and sigmas for `num_inference_steps` steps (diffusers' `set_timesteps`)."""
        config = self.config
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n < config.num_train_timesteps:
            raise ValueError(f"num_inference_steps={n!r} must be an integer in 1..{config.num_train_timesteps - 1}")
        n = int(n)
        # Timesteps whose log-SNR is below lambda_min_clipped are never used (matters for cosine schedules).
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], config.lambda_min_clipped))
        last_timestep = config.num_train_timesteps - clipped_idx
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif config.timestep_spacing == "leading":
            # diffusers' DPM-Solver divides by n + 1 here (other schedulers use n); kept for parity.
            step_ratio = last_timestep // (n + 1)
            if step_ratio < 1:
                raise ValueError(f"num_inference_steps={n} is too many for leading spacing over {last_timestep} "
                                 f"train steps; use at most {last_timestep - 1} or timestep_spacing 'trailing'")
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
        else:  # trailing
            step_ratio = config.num_train_timesteps / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().astype(np.int64) - 1

        if config.use_karras_sigmas:
            sigmas = self._karras_sigmas(n)
            timesteps = np.array([self._sigma_to_t(sigma) for sigma in sigmas])
            if config.beta_schedule != "squaredcos_cap_v2":   # diffusers keeps fractional t for cosine
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = self.sigmas[timesteps]
        # final_sigmas_type "zero": the last step lands on the clean sample.
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float64)
        alpha_t = 1.0 / np.sqrt(sigmas ** 2 + 1.0)
        sigma_t = sigmas * alpha_t
        with np.errstate(divide="ignore"):
            # sigma 0 gives lambda +inf, so the last step's exp(-h) is exactly 0 and it returns x0_pred.
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        for array in (timesteps, sigmas, alpha_t, sigma_t, lambda_t):
            array.setflags(write=False)
        return Schedule(timesteps=timesteps, sigmas=sigmas, alpha_t=alpha_t, sigma_t=sigma_t, lambda_t=lambda_t)

    def initial_state(self, schedule: Schedule, start: int = 0) -> SolverState:
        """start > 0: begin at that step with no solver history (image-to-image's strength: diffusers'
        set_begin_index, whose first step is first order)."""
        if not 0 <= start < len(schedule):
            raise ValueError(f"start step {start} is outside the schedule's 0..{len(schedule) - 1}")
        return SolverState(schedule=schedule, step_index=start)

    def scale_model_input(self, sample: np.ndarray, state: SolverState | None = None) -> np.ndarray:
        """Identity for DPM-Solver++ (kept so the loop reads like any diffusers sampler)."""
        return sample

    def step(self, model_output: np.ndarray, sample: np.ndarray, state: SolverState) -> tuple[np.ndarray, SolverState]:
        """One solver step from `sample` at `state.timestep`, given the UNet's `model_output` there.
        Returns the sample at the next timestep (in `sample`'s dtype) and the new state."""
        if state.done:
            raise ValueError(f"step called after all {len(state.schedule)} steps of the schedule; start a new "
                             f"request with initial_state(schedule)")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}; "
                             f"pass the guided noise prediction for exactly these latents")
        i, schedule = state.step_index, state.schedule
        # The last step jumps to sigma 0; a first-order step there is exact for the data prediction
        # (diffusers' lower_order_final / final_sigmas_type "zero" rule).
        lower_order_final = i == len(schedule) - 1
        x0_pred = self.convert_model_output(model_output, sample, schedule, i)
        model_outputs = (state.model_outputs + (x0_pred,))[-self.config.solver_order:]
        previous = len(state.model_outputs)   # diffusers' lower_order_nums
        x = sample.astype(np.float64)
        if self.config.solver_order == 1 or previous < 1 or lower_order_final:
            prev_sample = self._first_order_update(x0_pred, x, schedule, i)
        else:
            prev_sample = self._second_order_update(model_outputs, x, schedule, i)
        return prev_sample.astype(sample.dtype), SolverState(schedule, i + 1, model_outputs)

    # ---- solver ------------------------------------------------------------------------------

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray, schedule: Schedule,
                             step_index: int) -> np.ndarray:
        """The data prediction x0_pred that DPM-Solver++ integrates, from the UNet's eps or v output."""
        alpha_t, sigma_t = schedule.alpha_t[step_index], schedule.sigma_t[step_index]
        model_output = model_output.astype(np.float64)
        sample = sample.astype(np.float64)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output   # v_prediction

    @staticmethod
    def _first_order_update(x0_pred: np.ndarray, sample: np.ndarray, schedule: Schedule, i: int) -> np.ndarray:
        """DPM-Solver++(1) from s = step i to t = step i + 1 (eq. 5 of arXiv 2211.01095; DDIM)."""
        alpha_t, sigma_t, sigma_s = schedule.alpha_t[i + 1], schedule.sigma_t[i + 1], schedule.sigma_t[i]
        h = schedule.lambda_t[i + 1] - schedule.lambda_t[i]
        return (sigma_t / sigma_s) * sample - (alpha_t * np.expm1(-h)) * x0_pred

    @staticmethod
    def _second_order_update(model_outputs: tuple[np.ndarray, ...], sample: np.ndarray, schedule: Schedule,
                             i: int) -> np.ndarray:
        """Multistep DPM-Solver++(2M), midpoint form (Algorithm 2 of arXiv 2211.01095): s1 = step i-1,
        s0 = step i, t = step i + 1; D1 is the backward difference of the data predictions."""
        alpha_t, sigma_t, sigma_s0 = schedule.alpha_t[i + 1], schedule.sigma_t[i + 1], schedule.sigma_t[i]
        lambda_t, lambda_s0, lambda_s1 = schedule.lambda_t[i + 1], schedule.lambda_t[i], schedule.lambda_t[i - 1]
        m0, m1 = model_outputs[-1], model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        return ((sigma_t / sigma_s0) * sample
                - (alpha_t * np.expm1(-h)) * D0
                - 0.5 * (alpha_t * np.expm1(-h)) * D1)

    # ---- the same step as coefficients (the device loop's step graph) ----------------------

    def step_coefficients(self, schedule: Schedule, i: int, guidance: float, out_scale: float = 1.0) -> np.ndarray:
        """Step i of `step` as float32 [guidance, k1, k2, a, b, c] for the on-device step graph
        (toonark.engines.ort_loop): eps = uncond + guidance * (cond - uncond), m0 = k1 * x - k2 * eps
        (the data prediction of convert_model_output), x_next = out_scale * (a * x + b * m0 + c * m_prev).
        tests/test_scheduler.py checks it against `step` for every prediction type, order and spacing."""
        return step_coefficients(schedule, i, guidance, out_scale=out_scale, solver_order=self.config.solver_order,
                                 prediction_type=self.config.prediction_type)

    # ---- Karras sigmas ----------------------------------------------------------------------

    def _karras_sigmas(self, n: int) -> np.ndarray:
        """Karras et al. (2022), arXiv 2206.00364 eq. 5: rho = 7 spacing between the trained sigma range."""
        rho = 7.0
        sigma_min, sigma_max = self.sigmas[0], self.sigmas[-1]
        ramp = np.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _sigma_to_t(self, sigma: float) -> float:
        """The (fractional) train timestep of `sigma`: linear interpolation in log-sigma."""
        log_sigmas = self.log_sigmas
        log_sigma = np.log(max(sigma, 1e-10))
        dists = log_sigma - log_sigmas
        low_idx = min(int(np.cumsum(dists >= 0).argmax()), len(log_sigmas) - 2)
        low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
        w = float(np.clip((low - log_sigma) / (low - high), 0, 1))
        return (1 - w) * low_idx + w * (low_idx + 1)


def step_coefficients(schedule: Schedule, i: int, guidance: float, out_scale: float = 1.0, solver_order: int = 2,
                      prediction_type: str = "epsilon") -> np.ndarray:
    """DPMSolverMultistep.step in linear form (see the method of that name): the first-order update at
    the first step (no previous data prediction) and at the last (lower_order_final), 2M midpoint
    otherwise; the same schedule arrays as _first_order_update / _second_order_update."""
    alpha_s, sigma_s = schedule.alpha_t[i], schedule.sigma_t[i]
    alpha_t, sigma_t = schedule.alpha_t[i + 1], schedule.sigma_t[i + 1]
    if prediction_type == "epsilon":      # x0 = (x - sigma_s * eps) / alpha_s
        k1, k2 = 1.0 / alpha_s, sigma_s / alpha_s
    elif prediction_type == "v_prediction":   # x0 = alpha_s * x - sigma_s * v
        k1, k2 = alpha_s, sigma_s
    else:
        raise ValueError(f"prediction_type {prediction_type!r} has no linear step form; use epsilon or v_prediction")
    h = schedule.lambda_t[i + 1] - schedule.lambda_t[i]
    em1 = np.expm1(-h)
    a, b, c = sigma_t / sigma_s, -alpha_t * em1, 0.0
    if solver_order >= 2 and 0 < i < len(schedule) - 1:
        r0 = (schedule.lambda_t[i] - schedule.lambda_t[i - 1]) / h
        b, c = -alpha_t * em1 * (1.0 + 0.5 / r0), alpha_t * em1 * 0.5 / r0
    return np.array([guidance, k1, k2, a * out_scale, b * out_scale, c * out_scale], dtype=np.float32)
