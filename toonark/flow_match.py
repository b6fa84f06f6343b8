"""Flow-matching Euler in numpy: the Qwen-Image family's sampler (toonark.family.QwenImage), matched
step by step to diffusers' `FlowMatchEulerDiscreteScheduler` as `QwenImagePipeline` drives it
(tests/test_qwen_image.py).

What the pipeline does, and so what this does:
- sigmas = linspace(1, 1/n, n) in float64, then float32;
- the resolution-dependent shift: mu = the line through (base_image_seq_len, base_shift) and
  (max_image_seq_len, max_shift) at the request's image token count (latent H/2 * W/2), and
  sigma' = e^mu / (e^mu + (1/sigma - 1)) ("exponential"; "linear" uses mu instead of e^mu);
  a config without dynamic shifting uses the fixed `shift` instead;
- optional `shift_terminal`: stretch so the last sigma is shift_terminal;
- append 0; the transformer sees timestep = sigma * 1000 / 1000 = sigma (pipeline divides by 1000);
- Euler: x_next = x + (sigma_next - sigma) * v, in float32 as diffusers computes it.

The same float32 operations in the same order as diffusers (numpy, then torch float32), so the
schedule agrees to the last bit and a step to float32 rounding. Like toonark.scheduler, the
scheduler holds no request state: `schedule(steps, image_seq_len)` and `initial_state` give a
request's own state, so one instance serves interleaved requests. Torch-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# Features of diffusers' scheduler toonark does not implement: accepted only when off.
_FEATURES_OFF = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "invert_sigmas": False, "stochastic_sampling": False}
_INERT_KEYS = frozenset({"_class_name", "_diffusers_version"})


@dataclass(frozen=True)
class FlowMatchConfig:
    """diffusers' FlowMatchEulerDiscreteScheduler keywords toonark implements (same names and defaults)."""
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler config time_shift_type={self.time_shift_type!r} is not supported; "
                             f"use 'exponential' or 'linear'")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError("scheduler config base_image_seq_len equals max_image_seq_len: the shift line is undefined")

    @classmethod
    def from_dict(cls, config: dict) -> "FlowMatchConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in known:
                kwargs[key] = value
            elif key in _FEATURES_OFF:
                if value != _FEATURES_OFF[key]:
                    raise ValueError(f"scheduler config {key}={value!r} is not supported by toonark's flow-matching "
                                     f"Euler; set it to {_FEATURES_OFF[key]!r} in scheduler_config.json")
            elif key not in _INERT_KEYS:
                raise ValueError(f"scheduler config key {key!r} is unknown to toonark's flow-matching Euler "
                                 f"(known: {', '.join(sorted(known | set(_FEATURES_OFF)))})")
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> "FlowMatchConfig":
        path = Path(path)
        if path.is_dir():
            path = path / SCHEDULER_CONFIG_NAME
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing; `make export` copies scheduler/ from the model") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FlowSchedule:
    timesteps: np.ndarray   # float32 (n,): sigma * num_train_timesteps, what diffusers' pipeline loops over
    sigmas: np.ndarray      # float32 (n + 1,), ending in 0
    mu: float | None

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class FlowState:
    schedule: FlowSchedule
    step_index: int = 0

    @property
    def timestep(self) -> float:
        return float(self.schedule.timesteps[self.step_index])

    @property
    def model_timestep(self) -> np.float32:
        """What the transformer gets: timestep / 1000 in float32, as the pipeline divides it."""
        return np.float32(self.schedule.timesteps[self.step_index]) / np.float32(1000)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.schedule)


def calculate_shift(image_seq_len: int, config: FlowMatchConfig) -> float:
    """QwenImagePipeline's calculate_shift: mu on the line (base_len, base_shift)-(max_len, max_shift)."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    b = config.base_shift - m * config.base_image_seq_len
    return image_seq_len * m + b


class FlowMatchEuler:
    """x_next = x + (sigma_next - sigma) * velocity over the (shifted) flow-matching schedule."""

    init_noise_sigma = 1.0

    def __init__(self, config: FlowMatchConfig):
        self.config = config

    @classmethod
    def from_file(cls, path: Path) -> "FlowMatchEuler":
        return cls(FlowMatchConfig.from_file(path))

    def schedule(self, num_inference_steps: int, image_seq_len: int) -> FlowSchedule:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"steps {num_inference_steps!r} must be a positive integer")
        config, n = self.config, int(num_inference_steps)
        if n == 1 and config.shift_terminal:
            # diffusers divides 0 by 0 here (1 - sigma is 0 at the only step) and samples NaN.
            raise ValueError(f"steps 1 is not possible with shift_terminal={config.shift_terminal}: the stretched "
                             f"schedule needs at least 2 steps")
        sigmas = np.linspace(1.0, 1 / n, n).astype(np.float32)
        mu = None
        if config.use_dynamic_shifting:
            mu = calculate_shift(image_seq_len, config)
            scale = math.exp(mu) if config.time_shift_type == "exponential" else mu
            sigmas = scale / (scale + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
        if config.shift_terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
        sigmas = sigmas.astype(np.float32)
        timesteps = sigmas * np.float32(config.num_train_timesteps)
        return FlowSchedule(timesteps=timesteps, sigmas=np.append(sigmas, np.float32(0)).astype(np.float32), mu=mu)

    def initial_state(self, schedule: FlowSchedule) -> FlowState:
        return FlowState(schedule)

    def step(self, velocity: np.ndarray, sample: np.ndarray, state: FlowState) -> tuple[np.ndarray, FlowState]:
        if state.done:
            raise ValueError(f"all {len(state.schedule)} steps are done; start a new state for another request")
        sigmas = state.schedule.sigmas
        dt = np.float32(sigmas[state.step_index + 1]) - np.float32(sigmas[state.step_index])
        out = sample.astype(np.float32, copy=False) + dt * velocity.astype(np.float32, copy=False)
        return out.astype(velocity.dtype, copy=False), FlowState(state.schedule, state.step_index + 1)


def true_cfg(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """QwenImagePipeline's true classifier-free guidance with its norm-preserving rescale:
    comb = uncond + scale * (cond - uncond), then comb * (|cond| / |comb|), norms over the channel
    (last) axis of the packed (B, tokens, channels) prediction. float32."""
    cond = cond.astype(np.float32, copy=False)
    uncond = uncond.astype(np.float32, copy=False)
    comb = uncond + np.float32(scale) * (cond - uncond)
    cond_norm = np.linalg.norm(cond, axis=-1, keepdims=True)
    comb_norm = np.linalg.norm(comb, axis=-1, keepdims=True)
    return comb * (cond_norm / comb_norm)
