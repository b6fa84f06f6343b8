"""The kids-animal prompt set: every animal x action x setting from prompt_parts.json, as subjects that
go through the served prompt policy (toonark.prompts: the kid-style template and the default negative
prompt), exactly as the server's preprocess composes a request's PROMPT. So the INT8 UNet is calibrated
on the conditional and unconditional branches the server sends (tests/test_calibration.py checks the
texts and token ids against toonark.api.resolve_request).

Deterministic and stable: the set is the full cross product, ordered by the SHA-256 of each subject
(so the first N calibration prompts mix animals, actions and settings instead of being 32 pandas),
and each prompt's part - calibration or evaluation - is decided by its own hash. Adding an animal
therefore never moves an existing prompt from one part to the other, and the two parts can never
overlap. Seeds are derived from the subject too, so the reference and the INT8 run of an evaluation
prompt start from the same noise on every machine.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

PARTS_FILE = "prompt_parts.json"
# One prompt in EVAL_EVERY goes to the evaluation part (about 64 of the 512).
EVAL_EVERY = 8
MIN_PROMPTS = 256


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class Prompt:
    subject: str      # what a client would send as PROMPT
    animal: str
    action: str
    setting: str
    text: str         # the prompt the server's policy composes from it (template)
    negative: str     # the negative prompt the server sends with it (the policy's default)

    @property
    def seed(self) -> int:
        """Sampler seed for this prompt: the same for the reference and the INT8 run, on any machine."""
        return int.from_bytes(_digest(self.subject)[8:12], "little") & 0x7FFFFFFF

    @property
    def part(self) -> str:
        return "evaluation" if _digest(self.subject)[0] % EVAL_EVERY == 0 else "calibration"


@dataclass(frozen=True)
class PromptSet:
    calibration: tuple[Prompt, ...]
    evaluation: tuple[Prompt, ...]
    negative: str

    def take(self, part: str, count: int) -> tuple[Prompt, ...]:
        """The first `count` prompts of a part, in the stable order."""
        prompts = getattr(self, part)
        if not 1 <= count <= len(prompts):
            raise ValueError(f"asked for {count} {part} prompts; the prompt set has {len(prompts)} "
                             f"(choose 1..{len(prompts)} or add animals/actions/settings to calibration/{PARTS_FILE})")
        return prompts[:count]


def load_parts() -> dict:
    data = json.loads(resources.files("toonark.calibration").joinpath(PARTS_FILE).read_text("utf-8"))
    for key in ("subject", "animals", "actions", "settings"):
        if key not in data:
            raise ValueError(f"calibration/{PARTS_FILE} lacks the key {key!r}")
    for key in ("animals", "actions", "settings"):
        if len(set(data[key])) != len(data[key]):
            raise ValueError(f"calibration/{PARTS_FILE}: {key} has duplicate entries")
    return data


@lru_cache(maxsize=1)
def prompt_set() -> PromptSet:
    """The set under the served prompt policy (the one toonark/data/prompt_policy.json the server loads)."""
    from toonark.prompts import PromptPolicy
    policy = PromptPolicy.load()
    parts = load_parts()
    prompts = []
    for animal, action, setting in itertools.product(parts["animals"], parts["actions"], parts["settings"]):
        subject = parts["subject"].format(animal=animal, action=action, setting=setting)
        text, negative = policy.compose(subject)   # what preprocess sends for PROMPT=subject, no NEGATIVE_PROMPT
        prompts.append(Prompt(subject, animal, action, setting, text, negative))
    if len(prompts) < MIN_PROMPTS:
        raise ValueError(f"calibration/{PARTS_FILE} yields {len(prompts)} prompts; at least {MIN_PROMPTS} are needed "
                         f"for calibration + evaluation (add animals, actions or settings)")
    prompts.sort(key=lambda p: _digest(p.subject))
    negatives = {p.negative for p in prompts}
    if len(negatives) != 1:   # the policy's negative prompt does not depend on the subject
        raise ValueError(f"the prompt policy composed {len(negatives)} different negative prompts for the set")
    return PromptSet(calibration=tuple(p for p in prompts if p.part == "calibration"),
                     evaluation=tuple(p for p in prompts if p.part == "evaluation"),
                     negative=negatives.pop())
