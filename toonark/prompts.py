"""Kid-safe prompts: the style template, the default negative prompt, step presets and the
word-list safety check that runs before any GPU work.

Pure stdlib on purpose: the Triton `preprocess` Python model imports this module, and it must
load in milliseconds without torch. The rules are data (toonark/data/safety_rules.json), the
template and presets are data (toonark/data/prompt_policy.json); this module only interprets
them.

How matching works (see `normalize` and `_SafetyRules`):
  * the text is normalised (NFKC, accents stripped, casefolded, look-alike letters and common
    leet swaps such as 0->o, 3->e, $->s mapped, separators collapsed, l.e.t.t.e.r.s joined);
  * every blocked term must match on word boundaries, so "grass", "skills", "therapist" pass;
    simple endings (-s, -es, -d, -ed, -ing, -ings, -er, -ers; torture -> torturing) and
    stretched letters ("guuun") still match; the few `inside_words` terms match anywhere,
    even inside longer words;
  * a match that lies entirely inside an allow-list phrase ("killer whale", "blood orange")
    is excused; anything else in the same prompt is still checked.
`PromptPolicy.check` delegates to the layered filter of toonark.prompt_safety (these word rules,
then phrase and relation rules, a language check and a small ONNX classifier). A request's own
negative words name bad things on purpose ("gore, blood"), so they get only that package's
negative-prompt rules (what would undo safety, e.g. naming clothing).
"""
from __future__ import annotations

import json
import operator
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

__all__ = ["PromptPolicy", "PromptRefused", "PolicyFileError", "normalize"]

SCHEMA_VERSION = 1
_SUBJECT = "{subject}"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class PromptRefused(ValueError):
    """The subject names something that must not be drawn for children.

    `category` is one of `PromptPolicy.reasons` (a stable metrics label); `term` is the rule
    that matched, in its normal form (never the user's obfuscated spelling, so logs and
    replies do not repeat it verbatim)."""

    def __init__(self, category: str, term: str, message: str | None = None):
        self.category = category
        self.term = term
        self.message = message or f'prompt refused ({category}): "{term}" is not allowed in kids\' pictures'
        super().__init__(self.message)

    def __reduce__(self):  # keep category/term across pickling (multiprocessing, Triton stubs)
        return (PromptRefused, (self.category, self.term, self.message))


class PolicyFileError(ValueError):
    """prompt_policy.json or safety_rules.json is malformed; the message names the file and key."""


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

# Look-alike letters from other scripts that NFKC leaves alone ("gսn" with Armenian u,
# "ѕех" in Cyrillic). Applied after casefold, so lowercase forms suffice.
_HOMOGLYPHS = str.maketrans({
    "а": "a", "е": "e", "і": "i", "ј": "j", "о": "o", "р": "p", "с": "c", "ѕ": "s", "у": "y",
    "х": "x", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "к": "k", "ո": "n", "ս": "u",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x",
    "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŧ": "t", "æ": "ae", "œ": "oe", "ɡ": "g",
})
# Apostrophes vanish rather than split ("gun's" -> "guns", "I'm" -> "im"), so they neither
# hide a word nor create stray one-letter tokens that the letter-joining below would glue.
_APOSTROPHES = str.maketrans("", "", "'\u2019\u2018\u02bc`\u00b4")
# Leet swaps apply only inside tokens that also hold a letter: "k1ll" -> "kill" but the
# "3" in "3 little pigs" stays a number. "1" is ambiguous (k1ll, s1ut), so both readings run.
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
_LEET_SYMBOLS = "@$!"
_TOKEN_RE = re.compile(r"[\w@$!]+")


def _fold(text: str) -> str:
    """NFKC, casefold, strip accents and zero-width/format characters, map look-alikes."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = unicodedata.normalize("NFKD", text)
    # Mn/Me: combining accents (gún -> gun); Cf: zero-width joiners, soft hyphens, bidi marks,
    # which are invisible and so are removed rather than turned into separators ("g\u200bun").
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Me", "Cf"))
    return text.translate(_HOMOGLYPHS).translate(_APOSTROPHES).replace("_", " ")


def _leet(token: str, one: str | None) -> str:
    if one is None:  # the literal reading, for model numbers such as "ar15" or "mp3"
        return token
    return "".join(one if ch == "1" else _LEET.get(ch, ch) for ch in token)


def _tokens(text: str) -> list[tuple[str, Any]]:
    """Tokens of folded text: ("w", word) or ("r", [single characters]) for a spaced-out run."""
    out: list[tuple[str, Any]] = []
    run: list[str] = []

    def flush():
        # Two or more one-character tokens with at least one letter are one spelled-out word
        # ("g u n", "k.i.l.l", "s-3-x"). A lone "a" or "3" between real words is left alone.
        if len(run) >= 2 and any(ch.isalpha() for ch in run):
            out.append(("r", list(run)))
        else:
            out.extend(("w", ch) for ch in run)
        run.clear()

    for raw in _TOKEN_RE.findall(text):
        token = raw.strip("!")  # "gun!!!" is "gun", not "guniii"
        if not any(ch.isalpha() for ch in token):
            token = "".join(ch for ch in token if ch not in _LEET_SYMBOLS)
        if not token:
            continue
        if len(token) == 1 and (token.isalpha() or token in _LEET):
            run.append(token)
            continue
        flush()
        out.append(("w", token))
    flush()
    return out


def _render(tokens: list[tuple[str, Any]], one: str | None, split_article: bool) -> str:
    words = []
    for kind, value in tokens:
        if kind == "r":
            joined = _leet("".join(value), one)
            # "a g u n" joins to "agun"; the other reading keeps the article apart ("a gun").
            if split_article and len(value) >= 3 and joined[0] in "ai":
                joined = joined[0] + " " + joined[1:]
            words.append(joined)
        elif any(ch.isalpha() for ch in value):
            words.append(_leet(value, one))
        else:
            words.append(value)
    return " ".join(words)


def normalize(text: str) -> str:
    """The form the safety rules are matched against: lowercase words separated by single
    spaces, accents and look-alikes folded, leet swaps undone, spelled-out letters joined.

    >>> normalize("  Big  G.U.N!!  for  Gún-Fights ")
    'big gun for gun fights'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize() needs a str, got {type(text).__name__}")
    return _render(_tokens(_fold(text)), "i", False)


def _variants(text: str) -> set[str]:
    """Every reading of the text worth checking: 1 as i or as l; digits left as digits when a
    word mixes letters and digits ("ar15" is a rifle, not "aris"); an article split off a run."""
    tokens = _tokens(_fold(text))
    words = [v if k == "w" else "".join(v) for k, v in tokens]
    ones: tuple[str | None, ...] = ("i", "l") if any("1" in w for w in words) else ("i",)
    if any(any(ch.isdigit() for ch in w) and any(ch.isalpha() for ch in w) for w in words):
        ones += (None,)
    splits = (False, True) if any(k == "r" and v[0] in "ai" and len(v) >= 3 for k, v in tokens) else (False,)
    return {_render(tokens, one, split) for one in ones for split in splits}


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

# Endings a blocked word may carry and still be the same word (gun/guns, kill/killing/killer).
# Doubled consonants need no rule: every letter may repeat ("stabbing", "guuun").
_SUFFIX = r"(?:s|es|d|ed|ing|ings|er|ers)?"


def _term_regex(term: str, *, boundary: bool) -> re.Pattern:
    """Pattern for a normalised term. Each letter may be stretched but never shortened
    ("ass" needs two s, so "as" never matches); words of a phrase may be written apart or
    together ("self harm", "selfharm")."""
    def stretchy(word: str) -> str:
        return "".join(re.escape(m.group(1)) + ("+" if len(m.group(0)) == 1 else "{%d,}" % len(m.group(0)))
                       for m in re.finditer(r"(.)\1*", word))

    parts = []
    for word in term.split(" "):
        piece = stretchy(word)
        if boundary:
            piece += _SUFFIX
            if len(word) > 3 and word.endswith("e") and word[-2] != "e":
                # torture -> torturing: the e drops before -ing. The letter before it is not
                # stretched here, so "rape" never reaches "rapping".
                piece = f"(?:{piece}|{stretchy(word[:-2])}{re.escape(word[-2])}ings?)"
        parts.append(piece)
    body = " ?".join(parts)
    return re.compile(rf"(?<!\w){body}(?!\w)" if boundary else body)


@dataclass(frozen=True)
class _Rule:
    category: str
    term: str
    pattern: re.Pattern
    # The letter a whole-word term starts with, at a word start; "" for an inside_words term (matches anywhere).
    opens: str = ""


# Each character that starts a word (the position a whole-word rule's "(?<!\w)" accepts).
_WORD_START_RE = re.compile(r"(?<!\w).", re.S)


@dataclass(frozen=True)
class _SafetyRules:
    categories: tuple[str, ...]
    rules: tuple[_Rule, ...]
    allow: tuple[re.Pattern, ...]

    def candidates(self, variant: str) -> list[_Rule]:
        """The rules that can match `variant`, in file order: a whole-word term must begin where a word of the
        variant begins, so only terms opening with one of those letters are scanned (the same matches as
        trying all ~240 patterns, at about a quarter of the regex scans; the word layer reads each prompt in
        several readings)."""
        starts = set(_WORD_START_RE.findall(variant))
        starts.add("")
        return [rule for rule in self.rules if rule.opens in starts]

    def find(self, text: str) -> tuple[str, str] | None:
        """(category, term) of the first blocked term in `text`, or None. When several match,
        the earliest and then the longest wins, so "kill myself" reports self-harm rather than
        the "kill" inside it."""
        best = None
        for variant in _variants(text):
            allowed = [m.span() for p in self.allow for m in p.finditer(variant)]
            for rule in self.candidates(variant):
                for m in rule.pattern.finditer(variant):
                    start, end = m.span()
                    if any(a <= start and end <= b for a, b in allowed):
                        continue
                    key = (start, start - end)
                    if best is None or key < best[0]:
                        best = (key, rule.category, rule.term)
                    break
        return None if best is None else (best[1], best[2])


# ---------------------------------------------------------------------------------------------
# Loading and validating the JSON data files
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path | None, default_name: str) -> tuple[dict, str]:
    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise PolicyFileError(f'{source}: key "{key}" appears twice in one object; keep one')
            seen[key] = value
        return seen

    if path is None:
        source = f"toonark/data/{default_name}"
        text = (resources.files("toonark") / "data" / default_name).read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyFileError(f"{source}: file not found; pass an existing path or None for the "
                                  f"packaged {default_name}") from None
    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise PolicyFileError(f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise PolicyFileError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    return data, source


def _check_keys(obj: Mapping, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    required, optional = tuple(required), tuple(optional)
    # Keys starting with "_" are comments: JSON has none, and the files explain themselves.
    unknown = [k for k in obj if not k.startswith("_") and k not in required + optional]
    if unknown:
        raise PolicyFileError(f'{where}: unknown key "{unknown[0]}"; allowed keys: {", ".join(required + optional)}')
    for key in required:
        if key not in obj:
            raise PolicyFileError(f'{where}: missing key "{key}"')


def _whole(value: Any, where: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise PolicyFileError(f"{where}: must be a whole number {span}, got {value!r}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyFileError(f"{where}: must be a non-empty string, got {value!r}")
    return value


def _parse_rules(data: dict, source: str) -> _SafetyRules:
    _check_keys(data, source, ("version", "categories", "allow"))
    if data["version"] != SCHEMA_VERSION:
        raise PolicyFileError(f"{source}: version: expected {SCHEMA_VERSION}, got {data['version']!r}")
    cats = data["categories"]
    if not isinstance(cats, dict) or not [c for c in cats if not c.startswith("_")]:
        raise PolicyFileError(f"{source}: categories: must be an object mapping category names to word lists")

    owner: dict[str, str] = {}  # normalised term -> where it was first listed
    rules: list[_Rule] = []
    names: list[str] = []
    for name, body in cats.items():
        if name.startswith("_"):
            continue
        where = f"{source}: categories.{name}"
        if not _NAME_RE.match(name):
            raise PolicyFileError(f"{where}: category names are metrics labels: use lowercase letters, "
                                  f"digits, - or _ (e.g. \"self-harm\")")
        if not isinstance(body, dict):
            raise PolicyFileError(f'{where}: must be an object like {{"terms": [...], "inside_words": [...]}}')
        _check_keys(body, where, ("terms",), ("inside_words",))
        names.append(name)
        for key, boundary, min_len in (("terms", True, 2), ("inside_words", False, 4)):
            items = body.get(key, [])
            if not isinstance(items, list):
                raise PolicyFileError(f"{where}.{key}: must be a list of strings")
            for i, raw in enumerate(items):
                here = f"{where}.{key}[{i}]"
                term = normalize(_text(raw, here))
                # Shorter terms would match inside ordinary text (a one-letter "x", or an
                # inside_words "ass" that would refuse "class" and "grass").
                if sum(ch.isalpha() for ch in term) < min_len:
                    raise PolicyFileError(f"{here}: {raw!r} is too short (needs {min_len}+ letters) to match safely")
                if term in owner:
                    raise PolicyFileError(f'{here}: "{term}" is already listed at {owner[term]}; keep one entry')
                owner[term] = here
                rules.append(_Rule(name, term, _term_regex(term, boundary=boundary), term[0] if boundary else ""))

    allow_raw = data["allow"]
    if not isinstance(allow_raw, list):
        raise PolicyFileError(f"{source}: allow: must be a list of harmless phrases")
    allow = []
    partial = _SafetyRules(tuple(names), tuple(rules), ())
    for i, raw in enumerate(allow_raw):
        here = f"{source}: allow[{i}]"
        phrase = normalize(_text(raw, here))
        # An allow phrase without a blocked word in it does nothing; it is almost always a typo
        # ("killer wale") that leaves the real phrase refused.
        if partial.find(phrase) is None:
            raise PolicyFileError(f"{here}: {raw!r} contains no blocked term, so it has no effect; fix or remove it")
        allow.append(_term_regex(phrase, boundary=True))
    return _SafetyRules(tuple(names), tuple(rules), tuple(allow))


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------

def _is_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    np = sys.modules.get("numpy")  # numpy bools from Triton tensors, without importing numpy here
    return np is not None and isinstance(value, np.bool_)


@dataclass(frozen=True)
class PromptPolicy:
    """Template, default negative prompt, step presets and safety rules, loaded from data."""

    template: str
    negative_prompt: str
    presets: Mapping[str, int]
    default_preset: str
    max_steps: int
    max_subject_chars: int
    max_negative_chars: int
    _rules: _SafetyRules = field(repr=False)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, rules_path: str | Path | None = None) -> "PromptPolicy":
        """Read prompt_policy.json (`path`) and safety_rules.json (`rules_path`); None means the
        copy shipped in toonark/data/. Raises PolicyFileError naming the file and bad key."""
        policy, policy_src = _read_json(Path(path) if path is not None else None, "prompt_policy.json")
        rules, rules_src = _read_json(Path(rules_path) if rules_path is not None else None, "safety_rules.json")
        return cls.from_dicts(policy, rules, policy_source=policy_src, rules_source=rules_src)

    @classmethod
    def from_dicts(cls, policy: dict, rules: dict, *, policy_source: str = "prompt_policy",
                   rules_source: str = "safety_rules") -> "PromptPolicy":
        """Build from already-parsed JSON objects (same validation as `load`)."""
        src = policy_source
        _check_keys(policy, src, ("version", "template", "negative_prompt", "presets", "default_preset",
                                  "max_steps", "max_subject_chars", "max_negative_chars"))
        if policy["version"] != SCHEMA_VERSION:
            raise PolicyFileError(f"{src}: version: expected {SCHEMA_VERSION}, got {policy['version']!r}")
        template = _text(policy["template"], f"{src}: template")
        # Exactly one {subject} and no other braces: a typo like "{subjct}" must fail here, at
        # load time, not produce prompts that silently lack the child's subject.
        if template.count(_SUBJECT) != 1 or "{" in template.replace(_SUBJECT, "") or "}" in template.replace(_SUBJECT, ""):
            raise PolicyFileError(f"{src}: template: must contain {_SUBJECT} exactly once and no other braces, "
                                  f"got {template!r}")
        negative = _text(policy["negative_prompt"], f"{src}: negative_prompt")
        max_steps = _whole(policy["max_steps"], f"{src}: max_steps", 1)
        presets_raw = policy["presets"]
        if not isinstance(presets_raw, dict) or not presets_raw:
            raise PolicyFileError(f'{src}: presets: must be an object like {{"fast": 15, "standard": 20}}')
        presets = {}
        for name, steps in presets_raw.items():
            if not _NAME_RE.match(name):
                raise PolicyFileError(f'{src}: presets.{name}: preset names use lowercase letters, digits, - or _')
            presets[name] = _whole(steps, f"{src}: presets.{name}", 1, max_steps)
        default = policy["default_preset"]
        if default not in presets:
            raise PolicyFileError(f"{src}: default_preset: {default!r} is not one of the presets "
                                  f"({', '.join(presets)})")
        return cls(
            template=template,
            negative_prompt=negative.strip(),
            presets=MappingProxyType(presets),
            default_preset=default,
            max_steps=max_steps,
            max_subject_chars=_whole(policy["max_subject_chars"], f"{src}: max_subject_chars", 1),
            max_negative_chars=_whole(policy["max_negative_chars"], f"{src}: max_negative_chars", 1),
            _rules=_parse_rules(rules, rules_source),
        )

    # -- queries -------------------------------------------------------------------------------

    @property
    def reasons(self) -> tuple[str, ...]:
        """Refusal categories in rules-file order, then "language": the label values for refusal metrics."""
        return self._rules.categories + ("language",)

    @property
    def refusal_labels(self) -> tuple[tuple[str, str], ...]:
        """(reason, layer) pairs of the refusal metric: each category with each layer that can refuse it."""
        from toonark.prompt_safety import refusal_labels
        return refusal_labels(self.reasons)

    def check(self, text: str) -> None:
        """Raise PromptRefused (a toonark.prompt_safety.SafetyRefused naming the layer) if `text` must
        not be drawn; else return None. The layered filter reuses this policy's word rules."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        from toonark.prompt_safety import filter_for   # lazy: onnxruntime loads on the first check
        filter_for(self._rules).check(text)

    def compose(self, subject: str, negative: str | None = None, use_template: bool = True) -> tuple[str, str]:
        """(prompt, negative_prompt) for the pipeline. The subject is checked first.

        `use_template=False` (a real bool; strings like "false" are refused) sends the subject
        as the whole prompt. `negative` adds terms after the default negative prompt; it never
        replaces it, and it is checked only for what would undo safety (e.g. naming clothing)."""
        if not _is_bool(use_template):
            raise TypeError(f"use_template must be True or False, got {use_template!r}")
        subject = self._clean(subject, "subject", self.max_subject_chars)
        if not subject:
            raise ValueError('subject is empty; describe what to draw, e.g. "a happy otter with a kite"')
        self.check(subject)
        if use_template:
            before, after = self.template.split(_SUBJECT)
            prompt = before + subject + after  # plain concatenation: braces in the subject stay text
        else:
            prompt = subject
        negative_prompt = self.negative_prompt
        if negative is not None:
            extra = self._clean(negative, "negative", self.max_negative_chars)
            if extra:
                from toonark.prompt_safety import filter_for
                filter_for(self._rules).check_negative(extra)   # its own rules: e.g. naming clothing
                negative_prompt = f"{negative_prompt}, {extra}"
        return prompt, negative_prompt

    def steps_for(self, preset: str | None = None, steps: int | None = None) -> int:
        """Denoising steps: `steps` if given, else the preset's (default preset when None or "").
        A named preset is validated even when `steps` overrides it, so typos never pass."""
        if preset is None:
            name = self.default_preset
        elif isinstance(preset, str):
            name = preset.strip().lower() or self.default_preset
        else:
            raise TypeError(f"preset must be a name like {self.default_preset!r}, got {preset!r}")
        if name not in self.presets:
            choices = ", ".join(f"{n} ({s} steps)" for n, s in self.presets.items())
            raise ValueError(f"unknown preset {preset!r}; choose one of: {choices}")
        if steps is None:
            return self.presets[name]
        try:
            if _is_bool(steps):
                raise TypeError
            value = operator.index(steps)  # ints and numpy integers; not 20.5, not "20"
        except TypeError:
            raise ValueError(f"steps must be a whole number between 1 and {self.max_steps}, got {steps!r}") from None
        if not 1 <= value <= self.max_steps:
            raise ValueError(f"steps must be between 1 and {self.max_steps}, got {value}; "
                             f"or leave it out to use a preset")
        return value

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _clean(text: Any, what: str, limit: int) -> str:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a str, got {type(text).__name__}")
        # Newlines, tabs and control characters become single spaces; trailing separators go so
        # the template does not produce "a cat,, cute cartoon style".
        text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
        text = " ".join(text.split()).strip(" ,;.")
        if len(text) > limit:
            raise ValueError(f"{what} is {len(text)} characters long; keep it to {limit} or fewer "
                             f"(the text encoder reads only ~77 tokens, and the style words come after it)")
        return text
