"""Spelling correction towards the rules' own vocabulary, so "strangeling", "chldren" or "melitng"
meet the rule they misspell.

A token is corrected only when it is not a known English word (toonark/data/safety_known_words.txt:
the whole-word tokens of the CLIP BPE vocabulary, the same text encoder the prompt goes to) and it is
one edit (insertion, deletion, substitution, adjacent swap) from a rule word. Short words are left
alone, because one edit turns too many of them into other words ("booby" is one letter from a
blocked word): a swap needs 4+ letters, a missing letter a rule word of 5+, a wrong letter 6+, an extra
letter 5+ unless it doubles its neighbour ("arrms"). The corrected text is
one more reading checked by the word and phrase layers, next to the normaliser's readings.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

KNOWN_WORDS_NAME = "safety_known_words.txt"
_WORD = re.compile(r"[a-z]+")


def forms(word: str) -> set[str]:
    """A word with its common endings (hit -> hits, hitting; shake -> shaking)."""
    # No -er forms: "gunner" as a target would turn the plant "gunnera" into a weapon.
    out = {word, word + "s", word + "es", word + "ed", word + "d", word + "ing"}
    out |= {word + word[-1] + end for end in ("ing", "ed")}
    if word.endswith("e"):
        out |= {word[:-1] + end for end in ("ing", "ed")}
    if word.endswith("y"):
        out |= {word[:-1] + end for end in ("ies", "ied")}
    return out


@functools.lru_cache(maxsize=1)
def load_known_words() -> frozenset[str]:
    text = (resources.files("toonark") / "data" / KNOWN_WORDS_NAME).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


class Speller:
    def __init__(self, targets: set[str], known: frozenset[str]):
        self.rule_words = frozenset(targets)
        self.targets = frozenset(t for t in targets if len(t) >= 4 and t.isalpha())
        self.known = known
        self._deletions: dict[str, set[str]] = {}
        for t in self.targets:
            for i in range(len(t)):
                self._deletions.setdefault(t[:i] + t[i + 1:], set()).add(t)

    def is_known(self, token: str) -> bool:
        """A known word, or one with a known stem: the CLIP vocabulary lists "salute" but not
        "saluting", which one dropped letter away from a blocked word would otherwise be "corrected";
        likewise "whiskery" (whisker + y, not "whiskey"). Stems of 3 letters are not read: "hiting" would
        pass as "hite" + ing and never meet "hitting"."""
        if token in self.known:
            return True
        for end in ("ing", "ed", "es", "s", "er", "ers", "ly", "est", "y"):
            stem = token[: -len(end)]
            if not token.endswith(end) or len(stem) < 4:
                continue
            if stem in self.known or stem + "e" in self.known or (stem[-1:] == stem[-2:-1] and stem[:-1] in self.known):
                return True
            if stem.endswith("i") and stem[:-1] + "y" in self.known:
                return True
        return False

    def correct(self, token: str) -> str | None:
        """The rule word `token` misspells, or None (known word, rule word, too short, or no match)."""
        if len(token) < 4 or not token.isalpha() or token in self.targets or self.is_known(token):
            return None
        # Most likely edit first (typing studies: swapped letters, then a missing or doubled letter,
        # then a wrong one); alphabetical within a kind, so the answer never depends on set order.
        swaps, missing, extra, wrong = set(), set(), set(), set()
        for i in range(len(token) - 1):             # adjacent swap: "melitng" -> "melting"
            swapped = token[:i] + token[i + 1] + token[i] + token[i + 2:]
            if swapped in self.targets:
                swaps.add(swapped)
        missing |= {t for t in self._deletions.get(token, ()) if len(t) >= 5}   # "chldren" -> "children"
        for i in range(len(token)):
            shorter = token[:i] + token[i + 1:]
            doubled = i > 0 and token[i] == token[i - 1]
            # A letter too many: a doubled one ("arrms", "babby") or, for longer words, any one.
            if shorter in self.targets and (len(shorter) >= 5 or doubled):
                extra.add(shorter)
            for t in self._deletions.get(shorter, ()):           # one letter wrong: "pistel"
                # 6+ letters: at 5 a wrong last letter is often another ending ("booby" / "boobs").
                if len(t) == len(token) >= 6 and t[:i] == token[:i] and t[i + 1:] == token[i + 1:]:
                    wrong.add(t)
        best = next((min(found) for found in (swaps, missing, extra, wrong) if found), None)
        if best is not None and self._near_known(token):
            return None   # as likely a typo of an ordinary word: "gorwing" is "growing", not "goring"
        return best

    def _near_known(self, token: str) -> bool:
        """One swap away from a known word (the commonest typo; cheap: no index of the vocabulary)."""
        def innocent(word: str) -> bool:   # a known word that no rule names ("sex" is no excuse for "seyx")
            return word not in self.rule_words and word in self.known

        return any(innocent(token[:i] + token[i + 1] + token[i] + token[i + 2:]) for i in range(len(token) - 1))

    def variant(self, text: str) -> str | None:
        """`text` (normalised) with every misspelt rule word corrected, or None when nothing changed."""
        changed = False

        def fix(m: re.Match) -> str:
            nonlocal changed
            fixed = self.correct(m.group(0))
            if fixed is None:
                return m.group(0)
            changed = True
            return fixed

        out = _WORD.sub(fix, text)
        return out if changed else None


def rule_words(terms: list[str], class_entries: list[str], patterns: list[str]) -> set[str]:
    """Every word the rules spell out, with its endings: terms, class entries, and the literal words
    of the phrase patterns ({class} placeholders and regex syntax skipped)."""
    words: set[str] = set()
    for text in terms + class_entries:
        for w in _WORD.findall(text):
            words |= forms(w)
    for pattern in patterns:
        literal = re.sub(r"\{[a-z_]+\}|\\[a-zA-Z]|\(\?[:!=<]+", " ", pattern)
        for w in _WORD.findall(literal):
            if len(w) >= 4:
                words |= forms(w)
    return words
