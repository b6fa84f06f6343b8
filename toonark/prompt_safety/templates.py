"""Templated training examples for the prompt classifier (toonark/data/safety_templates.json).

TRAINING DATA ONLY: `train.build` adds these to the dev part; the evaluation set never contains them.
Each unsafe template has harmless twins over the same subjects, objects and settings ("a man hitting a
small child" / "a man hugging a small child"), so the n-gram classifier is pushed towards the relation
and the harm words rather than the nouns around them; the word classes of safety_phrases.json fill the
object slots, so a new class entry reaches the classifier too. Deterministic (seeded by the template
text), stdlib only.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from importlib import resources
from pathlib import Path

from toonark.prompt_safety import evalset

DATA_NAME = "safety_templates.json"
_SLOT = re.compile(r"\{([a-z_]+)\}")


def data_path() -> Path:
    return Path(str(resources.files("toonark") / "data" / DATA_NAME))


def _phrase_classes() -> dict[str, list[str]]:
    data = json.loads((resources.files("toonark") / "data" / "safety_phrases.json").read_text(encoding="utf-8"))
    return {name: sorted(v["exact"] if isinstance(v, dict) else v) for name, v in data["classes"].items()}


def generate(path: Path | None = None) -> list[tuple[str, str]]:
    """(text, label) pairs: label is an unsafe category or evalset.SAFE. Each template gives
    `per_template` examples, every other one with a perturbation of evalset.KINDS."""
    data = json.loads(Path(path or data_path()).read_text(encoding="utf-8"))
    if data.get("version") != 1:
        raise ValueError(f"{path or data_path()}: version: expected 1, got {data.get('version')!r}")
    slots = {**_phrase_classes(), **{k: list(v) for k, v in data["lists"].items()}}
    n = int(data["per_template"])
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, (unsafe, harmless) in data["templates"].items():
        category = key.split(":")[0]
        for label, templates in ((category, unsafe), (evalset.SAFE, harmless)):
            for template in templates:
                missing = [s for s in _SLOT.findall(template) if s not in slots]
                if missing:
                    raise ValueError(f"{DATA_NAME}: templates.{key}: unknown slot {{{missing[0]}}}")
                rng = random.Random(hashlib.sha256(f"{key}\0{label}\0{template}".encode()).hexdigest())
                for i in range(n):
                    text = _SLOT.sub(lambda m: rng.choice(slots[m.group(1)]), template)
                    text = " ".join(text.split())
                    if i % 2:
                        text = evalset.perturb(text, evalset.KINDS[i // 2 % len(evalset.KINDS)])
                    if text not in seen:
                        seen.add(text)
                        out.append((text, label))
    return out
