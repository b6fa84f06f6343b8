"""The kids-animal prompt set: every animal x action x setting from prompt_parts.json, in the house style.

Deterministic and stable: the set is the full cross product, ordered by the SHA-256 of each prompt's
text (so the first N calibration prompts mix animals, actions and settings instead of being 32
pandas), and each prompt's part - calibration or evaluation - is decided by its own hash. Adding an
animal therefore never moves an existing prompt from one part to the other, and the two parts can
never overlap. Seeds are derived from the text too, so the reference and the INT8 run of an
evaluation prompt start from the same noise on every machine.
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
    text: str
    animal: str
    action: str
    setting: str

    @property
    def seed(self) -> int:
        """Sampler seed for this prompt: the same for the reference and the INT8 run, on any machine."""
        return int.from_bytes(_digest(self.text)[8:12], "little") & 0x7FFFFFFF

    @property
    def part(self) -> str:
        return "evaluation" if _digest(self.text)[0] % EVAL_EVERY == 0 else "calibration"


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
    for key in ("template", "style", "negative", "animals", "actions", "settings"):
        if key not in data:
            raise ValueError(f"calibration/{PARTS_FILE} lacks the key {key!r}")
    for key in ("animals", "actions", "settings"):
        if len(set(data[key])) != len(data[key]):
            raise ValueError(f"calibration/{PARTS_FILE}: {key} has duplicate entries")
    return data


@lru_cache(maxsize=1)
def prompt_set() -> PromptSet:
    parts = load_parts()
    prompts = [Prompt(parts["template"].format(animal=animal, action=action, setting=setting, style=parts["style"]),
                      animal, action, setting)
               for animal, action, setting in itertools.product(parts["animals"], parts["actions"], parts["settings"])]
    if len(prompts) < MIN_PROMPTS:
        raise ValueError(f"calibration/{PARTS_FILE} yields {len(prompts)} prompts; at least {MIN_PROMPTS} are needed "
                         f"for calibration + evaluation (add animals, actions or settings)")
    prompts.sort(key=lambda p: _digest(p.text))
    return PromptSet(calibration=tuple(p for p in prompts if p.part == "calibration"),
                     evaluation=tuple(p for p in prompts if p.part == "evaluation"),
                     negative=parts["negative"])
