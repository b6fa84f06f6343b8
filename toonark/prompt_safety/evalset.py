"""The labelled prompt set (toonark/data/safety_prompts.json): evaluation set and training data.

Each hand-written base prompt gets two systematic perturbations (`perturb`), and the split into
`dev` and `test` is made per base (`split_of`), so a perturbation never lands on the other side of its base
(which would leak the test part into tuning). Stdlib only: the tests and the served side can
read it without scikit-learn.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SAFE = "safe"
DATA_NAME = "safety_prompts.json"
# Each base gets two neighbouring kinds, picked by the base's sha256 (not its position, so adding a
# prompt changes no other prompt's perturbations).
KINDS = ("misspell", "spaced", "lookalike", "leet", "mixed-case")
_LOOKALIKE = {"a": "а", "e": "е", "o": "о", "c": "с", "p": "р", "i": "і", "x": "х", "y": "у", "s": "ѕ"}
_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "$", "t": "7"}


@dataclass(frozen=True)
class Example:
    text: str
    label: str      # SAFE or an unsafe category
    group: str      # the category, or the harmless group ("animals", "idioms", ...)
    base: str       # the hand-written prompt this one comes from (itself for a base)
    kind: str       # "base" or one of KINDS
    split: str      # "dev" or "test"

    @property
    def unsafe(self) -> bool:
        return self.label != SAFE


def data_path() -> Path:
    return Path(str(resources.files("toonark") / "data" / DATA_NAME))


def data_sha256(path: Path | None = None) -> str:
    return hashlib.sha256((path or data_path()).read_bytes()).hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _target_word(words: list[str], rng: random.Random) -> int:
    """Index of the word to perturb: a random word of 4+ letters (the longest if none)."""
    long = [i for i, w in enumerate(words) if sum(ch.isalpha() for ch in w) >= 4]
    if not long:
        return max(range(len(words)), key=lambda i: len(words[i]))
    return rng.choice(long)


def perturb(text: str, kind: str) -> str:
    """A deterministic variant of `text` as people type it (seeded by the text and the kind)."""
    rng = random.Random(_digest(f"{kind}\0{text}"))
    words = text.split(" ")
    i = _target_word(words, rng)
    word = words[i]
    letters = [j for j, ch in enumerate(word) if ch.isalpha()]
    if kind == "mixed-case":
        return "".join(ch.upper() if rng.random() < 0.5 else ch.lower() for ch in text)
    if kind == "spaced":
        words[i] = rng.choice((" ", ".", "-", "  ")).join(word)
    elif kind == "lookalike":
        swap = [j for j in letters if word[j] in _LOOKALIKE]
        chosen = set(rng.sample(swap, min(2, len(swap))))
        words[i] = "".join(_LOOKALIKE[ch] if j in chosen else ch for j, ch in enumerate(word))
    elif kind == "leet":
        words[i] = "".join(_LEET.get(ch, ch) for ch in word)
    elif kind == "misspell":
        if len(letters) >= 4:
            j = rng.choice(letters[1:-1])
            op = rng.choice(("drop", "double", "swap"))
            if op == "drop":
                word = word[:j] + word[j + 1:]
            elif op == "double":
                word = word[:j] + word[j] + word[j:]
            elif word[j + 1].isalpha() and word[j + 1] != word[j]:
                word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
            else:
                word = word[:j] + word[j + 1:]
        words[i] = word
    else:
        raise ValueError(f"unknown perturbation {kind!r}; use one of {', '.join(KINDS)}")
    return " ".join(words)


def split_of(base: str) -> str:
    """"dev" or "test" for a base prompt, from its sha256 alone: adding or removing other prompts never
    moves a prompt across the split (so what tuning has read stays in dev)."""
    return "test" if int(_digest(base)[:8], 16) % 2 else "dev"


def _read_set(path: Path | None) -> dict:
    """The labelled set's JSON as stored (the shipped file when `path` is None)."""
    return json.loads(Path(path or data_path()).read_text(encoding="utf-8"))


def load(path: Path | None = None) -> list[Example]:
    """Every example (bases and perturbations), both splits, in file order."""
    path = path or data_path()
    data = _read_set(path)
    if data.get("version") != 1:
        raise ValueError(f"{path}: version: expected 1, got {data.get('version')!r}")
    out: list[Example] = []
    seen: dict[str, str] = {}
    for section, is_unsafe in (("unsafe", True), ("harmless", False)):
        groups = {g: v for g, v in data[section].items() if not g.startswith("_")}
        for group, bases in groups.items():
            label = group if is_unsafe else SAFE
            for base in bases:
                if base in seen:
                    raise ValueError(f"{path}: {section}.{group}: {base!r} is already listed under {seen[base]}")
                seen[base] = f"{section}.{group}"
                out += _examples_of(base, label, group)
    return out


def _examples_of(base: str, label: str, group: str) -> list[Example]:
    """A base prompt and its two perturbations."""
    out = [Example(base, label, group, base, "base", split_of(base))]
    first = int(_digest(base)[8:16], 16) % len(KINDS)
    for kind in (KINDS[first], KINDS[(first + 1) % len(KINDS)]):
        variant = perturb(base, kind)
        if variant != base:
            out.append(Example(variant, label, group, base, kind, split_of(base)))
    return out


def read_batch(path: Path) -> dict:
    """A writing batch file (add_batch's schema), refused with the line and column when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def batch_examples(new: dict, path: Path | None = None) -> list[Example]:
    """The examples a writing batch would add (add_batch's schema and duplicate rule), without merging it:
    a blind batch's first run (`scripts/safety_eval.py --batch-file`) reads these, both splits."""
    prompts, _ = _new_prompts(new, _read_set(path))
    return [ex for section, group, prompt in prompts for ex in
            _examples_of(prompt, group if section == "unsafe" else SAFE, group)]


def _new_prompts(new: dict, data: dict) -> tuple[list[tuple[str, str, str]], int]:
    """((section, group, prompt) of each prompt of `new` not in the set yet (case-insensitively, nor earlier
    in `new`), whitespace folded; the number skipped), against the labelled set `data`. An unknown category or
    group is refused, naming the known ones."""
    seen = {b.casefold() for section in ("unsafe", "harmless") for g, v in data[section].items()
            if not g.startswith("_") for b in v}
    out, duplicates = [], 0
    for section in ("unsafe", "harmless"):
        for group, prompts in (new.get(section) or {}).items():
            if group not in data[section]:
                known = ", ".join(g for g in data[section] if not g.startswith("_"))
                raise ValueError(f"{section}.{group}: no such {'category' if section == 'unsafe' else 'group'}; "
                                 f"use one of {known}")
            for prompt in prompts:
                prompt = " ".join(str(prompt).split())
                if not prompt or prompt.casefold() in seen:
                    duplicates += 1
                    continue
                seen.add(prompt.casefold())
                out.append((section, group, prompt))
    return out, duplicates


def categories(path: Path | None = None) -> tuple[str, ...]:
    return tuple(g for g in _read_set(path)["unsafe"] if not g.startswith("_"))


def sha12(text: str) -> str:
    """The first 12 hex digits of a base prompt's sha256: its name in safety_batches.json."""
    return _digest(text)[:12]


def add_batch(new: dict, written: str, path: Path | None = None, batches_path: Path | None = None,
              number: int | None = None) -> dict:
    """Merge a file of new labelled base prompts ({"author": ..., "unsafe": {category: [...]}, "harmless":
    {group: [...]}}) into the labelled set as one new writing batch; returns {"batch", "added",
    "duplicates"}. A prompt already in the set (case-insensitively, or twice in `new`) is skipped; an
    unknown category or group is refused, naming the known ones. "{style}" in `written` stands for the file's
    style. The batch takes `number` (the number it was written under, when batches written later were merged
    first or are kept out to stay blind; one already in the set is refused) or the next after the highest. Both
    files are rewritten whole (temp file, then rename). The batch's commit is left as "pending": the commit that
    adds it is named afterwards."""
    path = Path(path or data_path())
    batches_path = Path(batches_path or path.with_name("safety_batches.json"))
    data = _read_set(path)
    prompts, duplicates = _new_prompts(new, data)
    batches = json.loads(batches_path.read_text(encoding="utf-8"))
    used = {b["batch"] for b in batches["batches"]}
    if number is not None and (number in used or number < 1):
        raise ValueError(f"batch {number} is {'in the set already' if number in used else 'no batch number'}; "
                         f"give a number no batch has (the highest is {max(used)}) or none for the next")
    for section, group, prompt in prompts:
        data[section][group].append(prompt)
    added = [p for _, _, p in prompts]
    number = number or max(used) + 1
    # dev_used_for_rules: false until a rule is written from the batch's dev half; while false, that half
    # is where the classifier's operating point is chosen (train.choose_operating_point).
    batches["batches"].append({"batch": number, "commit": "pending", "author": str(new.get("author", "unknown")),
                               "written": written.replace("{style}", str(new.get("style", "style not stated"))),
                               "dev_used_for_rules": False,
                               "bases": sorted(sha12(p) for p in added)})
    for target, content, indent in ((path, data, 2), (batches_path, batches, 1)):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(content, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(target)
    return {"batch": number, "added": len(added), "duplicates": duplicates}
