"""Phrase and relation rules, idiom allow-rules and negative-prompt rules (toonark/data/safety_phrases.json).

A word list refuses "gun" but not "a man hitting a small child with a belt": no single word there is
unsafe, the relation is (a harm verb with a child as its object). These rules are regular expressions
over the normalised text with word classes ({harm}, {child}, {body}, ...) expanded from data, so a
new verb or noun is one more entry, not one more rule. Stdlib only (the Triton preprocess imports it).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from toonark.prompt_safety.spelling import rule_words
from toonark.prompts import PolicyFileError

DATA_NAME = "safety_phrases.json"
SCHEMA_VERSION = 1
_CLASS_RE = re.compile(r"\{([a-z_]+)\}")
_SUFFIX = "(?:s|es|d|ed|ing|ings|er|ers)?"


def _inflect(entry: str) -> str:
    """Regex for one class entry with its simple endings: a doubled last consonant (stab ->
    stabbing), a dropped final e (strangle -> strangling), y -> ies/ied (bully -> bullied).
    Phrases ("run over") are taken literally: their forms are listed in the data."""
    if " " in entry:
        return re.escape(entry)
    forms = [re.escape(entry) + f"(?:{re.escape(entry[-1])})?" + _SUFFIX]
    if entry.endswith("e") and len(entry) > 3:
        forms.append(re.escape(entry[:-1]) + "(?:ing|ings|ed|er|ers|es)")
    if entry.endswith("y") and len(entry) > 3:
        forms.append(re.escape(entry[:-1]) + "i(?:es|ed|er|ers)")
    return "(?:" + "|".join(forms) + ")"


@dataclass(frozen=True)
class PhraseRule:
    id: str
    category: str
    pattern: re.Pattern
    raw: bool = False          # match the casefolded text rather than the normalised words
    why: str = ""


@dataclass(frozen=True)
class AllowRule:
    id: str
    overrides: frozenset[str]  # phrase rule ids, or "word:<term>" for a safety_rules.json term
    pattern: re.Pattern


@dataclass(frozen=True)
class PhraseRules:
    rules: tuple[PhraseRule, ...]
    allow: tuple[AllowRule, ...]
    negative: tuple[PhraseRule, ...]
    vocabulary: frozenset[str] = frozenset()   # the words the rules spell out (spelling correction targets)

    @property
    def categories(self) -> frozenset[str]:
        return frozenset(r.category for r in self.rules + self.negative)

    def excused(self, rule_id: str, span: tuple[int, int], text: str) -> str | None:
        """The id of an allow-rule that overrides `rule_id` and whose match covers `span`."""
        start, end = span
        for allow in self.allow:
            if rule_id not in allow.overrides:
                continue
            for m in allow.pattern.finditer(text):
                if m.start() <= start and end <= m.end():
                    return allow.id
        return None

    def find(self, variants: set[str], raw: str, rules: tuple[PhraseRule, ...] | None = None,
             only: frozenset[str] | None = None) -> tuple[PhraseRule, str, frozenset[str]] | None:
        """(rule, matched text, the readings it matched in) of the first rule (file order) that matches and is
        not excused. The variants are readings of one text (see toonark.prompts._variants, plus spelling
        corrections); as in the word layer, a rule is excused when some reading matches it only inside an
        allow-rule ("a boy getitng a flu shot" read as "getting" is the allowed idiom). A raw rule reads `raw`
        and names no reading."""
        for rule in self.rules if rules is None else rules:
            if only is not None and rule.category not in only:
                continue
            hit, excused, found_in = None, False, set()
            for text in ([raw] if rule.raw else sorted(variants)):
                matches = list(rule.pattern.finditer(text))
                open_ = [m for m in matches if self.excused(rule.id, m.span(), text) is None]
                if matches and not open_:
                    excused = True
                elif open_:
                    hit = hit or open_[0].group(0)
                    found_in.add(text)
            if hit is not None and not excused:
                return rule, hit, frozenset() if rule.raw else frozenset(found_in)
        return None


def _compile(pattern: str, classes: dict[str, str], where: str) -> re.Pattern:
    def expand(m: re.Match) -> str:
        if m.group(1) not in classes:
            raise PolicyFileError(f'{where}: unknown word class "{{{m.group(1)}}}"; defined: {", ".join(classes)}')
        return classes[m.group(1)]

    body = _CLASS_RE.sub(expand, pattern)
    try:
        return re.compile(rf"(?<!\w)(?:{body})(?!\w)")
    except re.error as exc:
        raise PolicyFileError(f"{where}: not a valid regular expression: {exc}") from None


def load(path: str | Path | None = None) -> PhraseRules:
    """Read and validate safety_phrases.json (None: the packaged copy)."""
    if path is None:
        source = f"toonark/data/{DATA_NAME}"
        text = (resources.files("toonark") / "data" / DATA_NAME).read_text(encoding="utf-8")
    else:
        source, text = str(path), Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyFileError(f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if data.get("version") != SCHEMA_VERSION:
        raise PolicyFileError(f"{source}: version: expected {SCHEMA_VERSION}, got {data.get('version')!r}")
    for key in ("classes", "rules", "allow", "negative"):
        if key not in data:
            raise PolicyFileError(f'{source}: missing key "{key}"')
    classes: dict[str, str] = {}
    entries_seen: list[str] = []
    for name, entries in data["classes"].items():
        exact = isinstance(entries, dict)
        words = entries.get("exact") if exact else entries
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise PolicyFileError(f'{source}: classes.{name}: must be a list of words or {{"exact": [...]}}')
        # Longest first, so "little girl" wins over "girl" and the match spans the whole phrase.
        ordered = sorted(set(words), key=lambda w: (-len(w), w))
        if name != "clothing":   # negative-prompt words are no correction targets for subjects
            entries_seen.extend(ordered)
        classes[name] = "(?:" + "|".join(re.escape(w) if exact else _inflect(w) for w in ordered) + ")"

    def rule_list(key: str, need_why: bool) -> tuple[PhraseRule, ...]:
        out, seen = [], set()
        for i, item in enumerate(data[key]):
            where = f"{source}: {key}[{i}]"
            for field in ("id", "category", "pattern") + (("why",) if need_why else ()):
                if not isinstance(item.get(field), str) or not item[field]:
                    raise PolicyFileError(f'{where}: missing or empty "{field}"')
            if item["id"] in seen:
                raise PolicyFileError(f'{where}: id "{item["id"]}" is used twice; ids name the rule in refusals')
            seen.add(item["id"])
            out.append(PhraseRule(item["id"], item["category"], _compile(item["pattern"], classes, where),
                                  item.get("on", "normalised") == "raw", item.get("why", "")))
        return tuple(out)

    rules, negative = rule_list("rules", False), rule_list("negative", True)
    allow = []
    for i, item in enumerate(data["allow"]):
        where = f"{source}: allow[{i}]"
        overrides = item.get("overrides")
        if not isinstance(overrides, list) or not overrides:
            raise PolicyFileError(f'{where}: "overrides" must list the rules it excuses (a rule id or word:<term>)')
        ids = {r.id for r in rules}
        for name in overrides:
            if not name.startswith("word:") and name not in ids:
                raise PolicyFileError(f'{where}: overrides "{name}", which is no rule id; ids: {", ".join(sorted(ids))}')
        allow.append(AllowRule(item["id"], frozenset(overrides), _compile(item["pattern"], classes, where)))
    patterns = [item["pattern"] for item in data["rules"] + data["allow"] if item.get("on") != "raw"]
    return PhraseRules(rules, tuple(allow), negative, frozenset(rule_words([], entries_seen, patterns)))
