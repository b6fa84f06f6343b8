"""The layered kid-safety filter that `PromptPolicy.check` delegates to.

Layers (each refusal names its layer and its rule or score):
  word      safety_rules.json terms on the normalised text (toonark.prompts), excused by its allow
            list or by an idiom allow-rule that names the term;
  phrase    relation and phrase rules of safety_phrases.json (harm verb + child, self-harm action +
            body part, compounds), excused by an idiom allow-rule naming that rule or by the classifier's
            phrase veto; when a word and a phrase rule both fire, the phrase rule (more specific) names
            the refusal;
  language  a prompt in a script the text encoder does not read (Chinese, Cyrillic ...), or in Latin
            letters but mostly in another language (language.latin_language);
  classifier the shipped fine-tuned sentence encoder (toonark/data/safety_classifier.onnx, built by
            `make setup` from the tracked adapter; classifier.py), refusing when P(unsafe) reaches the
            threshold chosen on the dev part of the labelled set; it also excuses a word- or phrase-rule
            hit when P(unsafe) is under that layer's veto (the rule word in a harmless context: "a
            palette knife spreading buttercream on a cake"; in a prompt too short to set a context only
            at near-certainty: "a cherry bomb lollipop").
The word and phrase layers read every normaliser reading of the text plus each with misspelt rule
words corrected (spelling.py). Negative prompts get their own rules (`check_negative`): they name
bad things on purpose, so only what would undo safety is refused (naming clothing steers towards
nudity).

Layers whose category is not among the word rules' categories are skipped, so a custom rules file
(PromptPolicy.load(rules_path=...)) keeps exactly its own labels.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from toonark.prompts import PromptRefused, _fold, _SafetyRules, _variants, normalize
from toonark.prompt_safety import language
from toonark.prompt_safety.phrases import PhraseRules
from toonark.prompt_safety.phrases import load as load_phrases
from toonark.prompt_safety.spelling import Speller, load_known_words, rule_words

log = logging.getLogger(__name__)

LANGUAGE = "language"
# The shortest prompt typed as one run of letters that is also read split into words (LayeredFilter.joined_words).
JOINED_MIN_LETTERS = 10
LAYERS = ("word", "phrase", LANGUAGE, "classifier", "negative")
# The classifier reads prompts of at least `min_words` normalised words and excuses a rule hit under its
# `vetoes` in prompts of at least `veto_min_words`, under its near-certain `short_vetoes` in shorter ones: all
# from its sidecar (classifier.OperatingPoint), chosen out of fold on dev with the threshold
# (train.choose_operating_point). The n-gram classifier before it needed 5 and 7 ("50% {off" scored 0.99 gore,
# "a dead body in the park" 0.18).
_DESCRIBE = {
    "violence": "violence", "child-harm": "harm to a child", "weapons": "weapons", "gore": "gore",
    "sexual": "sexual content", "drugs": "drugs or alcohol", "self-harm": "self-harm", "hate": "hate",
    "profanity": "swearing", "scary": "horror",
}


class SafetyRefused(PromptRefused):
    """A PromptRefused that also says which layer refused and by which rule (or classifier score).

    `layer` is one of LAYERS (a metrics label); `rule` the rule id or term; `score` the classifier's
    P(unsafe) when the classifier refused."""

    def __init__(self, category: str, term: str, message: str, layer: str, rule: str, score: float | None = None):
        super().__init__(category, term, message)
        self.layer, self.rule, self.score = layer, rule, score

    def __reduce__(self):
        return (SafetyRefused, (self.category, self.term, self.message, self.layer, self.rule, self.score))


@dataclass(frozen=True)
class LayeredFilter:
    words: _SafetyRules
    phrases: PhraseRules
    classifier: object | None        # SafetyClassifier; None disables the layer
    categories: frozenset[str]
    speller: Speller | None = None

    @classmethod
    def build(cls, words: _SafetyRules, phrases_path: str | Path | None = None,
              classifier: object | None = "default") -> "LayeredFilter":
        if classifier == "default":
            classifier = _default_classifier()
        phrases = load_phrases(phrases_path)
        vocabulary = phrases.vocabulary | rule_words([r.term for r in words.rules], [], [p.pattern for p in words.allow])
        speller = Speller(set(vocabulary), load_known_words())
        return cls(words, phrases, classifier, frozenset(words.categories), speller)

    # -- layers --------------------------------------------------------------------------------

    def _word(self, variants: set[str]) -> tuple[SafetyRefused, frozenset[str]] | None:
        """The earliest, then longest, blocked term, and the readings it was found in. The variants are
        alternative readings of the same text (1 as i or l or a digit, leet undone or not, an article split
        off a spelled-out run); a term counts only when no reading excuses it, so "a $qu1r7 gun" (squirt
        gun once leet is undone) passes while "ar15" (a rifle only when read literally) is still refused."""
        excused_somewhere: set[str] = set()
        hits: dict[str, tuple] = {}
        found_in: dict[str, set[str]] = {}
        for variant in variants:
            allowed = [m.span() for p in self.words.allow for m in p.finditer(variant)]
            for rule in self.words.candidates(variant):
                matches = [m.span() for m in rule.pattern.finditer(variant)]
                if not matches:
                    continue
                open_ = [(s, e) for s, e in matches
                         if not any(a <= s and e <= b for a, b in allowed)
                         and not self.phrases.excused(f"word:{rule.term}", (s, e), variant)]
                if not open_:
                    excused_somewhere.add(rule.term)
                    continue
                found_in.setdefault(rule.term, set()).add(variant)
                start, end = open_[0]
                key = (start, start - end)
                if rule.term not in hits or key < hits[rule.term][0]:
                    hits[rule.term] = (key, rule.category, rule.term)
        live = [hit for term, hit in hits.items() if term not in excused_somewhere]
        if not live:
            return None
        _, category, term = min(live)
        return SafetyRefused(category, term, f'prompt refused ({category}): "{term}" is not allowed in kids\' '
                                             f'pictures (layer: word rule)', "word", term), frozenset(found_in[term])

    def _phrase(self, variants: set[str], raw: str) -> tuple[SafetyRefused, frozenset[str]] | None:
        hit = self.phrases.find(variants, raw, only=self.categories)
        if hit is None:
            return None
        rule, matched, found_in = hit
        what = _DESCRIBE.get(rule.category, rule.category)
        return SafetyRefused(rule.category, rule.id, f'prompt refused ({rule.category}): "{matched}" describes '
                                                     f'{what}, which is not allowed in kids\' pictures '
                                                     f'(layer: phrase rule {rule.id})', "phrase", rule.id), found_in

    def _language(self, folded: str) -> SafetyRefused | None:
        script = language.foreign_script(folded)
        if script is not None:
            return SafetyRefused(LANGUAGE, script, f"prompt refused ({LANGUAGE}): the prompt is written in {script} "
                                                   f"script; write it in English (the text encoder reads English only, "
                                                   f"so other scripts give a random picture and cannot be "
                                                   f"safety-checked) (layer: language)", LANGUAGE, script)
        spoken = language.latin_language(folded, self.speller.known) if self.speller is not None else None
        if spoken is None:
            return None
        return SafetyRefused(LANGUAGE, spoken, f"prompt refused ({LANGUAGE}): the prompt is written mostly in {spoken}; "
                                               f"write it in English (the text encoder and the safety checks read "
                                               f"English only, so another language gives a near-random picture and "
                                               f"cannot be safety-checked) (layer: language)", LANGUAGE, spoken)

    def _score(self, reading: str):
        """The classifier's Score for a normalised reading, or None (no classifier, or too short to read)."""
        if self.classifier is None or len(reading.split()) < self.classifier.point.min_words:
            return None
        return self.classifier.score(reading)

    def _excused(self, refusal: SafetyRefused, reading: str) -> bool:
        """A rule hit the classifier reads as clearly harmless (under its layer's veto: the short veto in a
        prompt under veto_min_words words), in a prompt long enough to read and of a category the classifier
        knows (a custom rules file keeps its own hits). `reading` is the text the rule matched in, so the
        classifier judges the word in its context: a spelled-out "a puppy with a g u n" is normalised to "a
        puppy with agun", which reads as harmless (0.001), while the rule matched "a puppy with a gun" (0.98).
        A phrase hit beside an allowed idiom is never excused (beside_idiom); a word hit beside one only when the
        reading without the idiom reads as harmless too (idiom_free)."""
        if self.classifier is None or refusal.category not in self.classifier.labels:
            return False
        veto = self.classifier.point.veto(refusal.layer, len(reading.split()))
        # nothing a score could excuse (no veto, or a phrase hit beside an idiom): the ~11 ms read is skipped
        if veto <= 0.0 or self.beside_idiom(refusal, reading):
            return False
        read = self._score(reading)
        if read is None or read.unsafe >= veto:
            return False
        alone = self.idiom_free(refusal, reading)
        return alone is None or self.classifier.score(alone).unsafe < veto

    def _classifier(self, score) -> SafetyRefused | None:
        if score is None or not score.refused or score.category not in self.categories:
            return None
        what = _DESCRIBE.get(score.category, score.category)
        return SafetyRefused(score.category, "classifier", f"prompt refused ({score.category}): this reads as {what}, "
                             f"which is not allowed in kids' pictures (layer: classifier, score {score.unsafe:.2f} >= "
                             f"{score.threshold:.2f})", "classifier", "classifier", round(score.unsafe, 4))

    # -- public --------------------------------------------------------------------------------

    def verdict(self, text: str) -> SafetyRefused | None:
        """The refusal for a subject, or None when it may be drawn. A prompt typed as one run of letters is read
        twice, as typed and split into words (joined_words), and refused when either reading is."""
        refusal = self._verdict(text)
        if refusal is None and (split := self.joined_words(text)) is not None:
            refusal = self._verdict(split)
        return refusal

    def joined_words(self, text: str) -> str | None:
        """A prompt that normalises to one run of JOINED_MIN_LETTERS+ letters that is not a known word, split into
        words by wordninja (a unigram model of English Wikipedia): "bigknifeinhishand" -> "big knife in his
        hand"; else None. Every layer reads such a prompt as one word, so 41 % of blind batch 110's unsafe prompts
        passed; the split reading catches them. Only whole-prompt runs and only as a second reading: splitting
        inside longer prompts, or reading the split text instead, refused more harmless dev prompts and caught
        fewer unsafe ones (docs/prompt-safety.md, "Batches 109-116")."""
        if self.speller is None:
            return None
        joined = normalize(text)
        if (len(joined) < JOINED_MIN_LETTERS or not (joined.isalpha() and joined.isascii())
                or joined in self.speller.known):
            return None
        import wordninja
        return " ".join(wordninja.split(joined))

    def _verdict(self, text: str) -> SafetyRefused | None:
        # A rule hit in a context the classifier reads as clearly harmless is excused (the layer's veto,
        # chosen with the threshold out of fold on dev: see train.choose_operating_point). The classifier
        # (~10 ms on one CPU thread) runs only when its score can change the verdict and remembers what it read.
        for refusal, reading in self.rule_hits(text):
            if self._excused(refusal, reading):
                log.debug("classifier excused %s rule %s in %r", refusal.layer, refusal.rule, reading)
                continue
            return refusal
        return self.language_verdict(text) or self._classifier(self._score(normalize(text)))

    def language_verdict(self, text: str) -> SafetyRefused | None:
        """The language layer alone: the refusal for a prompt written in a script the text encoder does not read, or
        mostly in another language than English."""
        return self._language(_fold(text))

    def rule_hits(self, text: str):
        """The rule layers' hits on `text`, in the order verdict() weighs them, each with the reading a veto
        scores: (refusal, reading). A relation rule is more specific than a single word ("kidnapping a little
        girl" is harm to a child, not just the violence of "kidnap"), so the phrase hit comes first. The reading
        is the text the rule matched in: the primary one, `normalize(text)` (what the classifier was trained
        on), when the rule matched there, else another reading (a corrected misspelling, a split-off article)."""
        variants = self._readings(text)
        primary = normalize(text)
        for found in (self._phrase(variants, _fold(text)), self._word(variants)):
            if found is not None:
                refusal, found_in = found
                yield refusal, primary if primary in found_in or not found_in else min(found_in)

    def beside_idiom(self, refusal: SafetyRefused, reading: str) -> bool:
        """Whether `refusal` is a phrase-rule hit lying wholly outside every match of a word-list allow-rule (an
        idiom such as "killer workout") in `reading`, where one matched. No veto excuses such a hit: the classifier
        reads the idiom as harmless and lets it vouch for the clause beside it ("a killer workout then she kills her
        mom" read 0.024, and the phrase veto, 0.05, excused "kills her mom"). A hit overlapping the idiom ("a killer
        whale mom nuzzling her baby", "take a stab at it, a kid guessing") keeps its veto, and word hits beside an
        idiom are read without it instead (idiom_free): on dev, taking the veto from every hit beside an idiom
        refused 95 more harmless prompts and caught no unsafe one; from these alone, 17 ("a blood orange sliced in
        half", "a drill making a hole": allow-rules fruit-in-half and making-a-hole since; docs/prompt-safety.md,
        "Round 17")."""
        if refusal.layer != "phrase":
            return False
        rule = next((r for r in self.phrases.rules if r.id == refusal.rule and not r.raw), None)
        return rule is not None and self._outside_idioms(rule.pattern, rule.id, reading, word=False) is not None

    def idiom_free(self, refusal: SafetyRefused, reading: str) -> str | None:
        """For a word-rule hit lying wholly outside every word-list allow-rule match (an idiom) in `reading`: the
        reading with those idioms left out, which a veto must read as harmless too; else None. The idiom vouches for
        the clause beside it (round 16 read "a killer workout then he kills his trainer" 0.041, under its word veto
        0.3, and "kill" was excused; round 18 reads "a killer workout and he kills the coach with a dumbbell" 0.007);
        without it the clause reads as itself ("a then he kills his trainer" 0.996, "a and he kills the coach with a
        dumbbell" 0.83). Measured with round 16: taking the veto from such hits outright would refuse all 43
        harmless such dev prompts; reading both refuses 3 (one base, "a hot glue gun for crafts not a real gun": a
        denial read without its idiom, as "a water gun fight, no real guns" is too). The 22 unsafe such dev prompts
        were refused already, and on the blind batches 173-196 (20 such prompts) nothing changes
        (docs/prompt-safety.md, "The idiom's clause")."""
        if refusal.layer != "word":
            return None
        rule = next((r for r in self.words.candidates(reading) if r.term == refusal.rule), None)
        idioms = None if rule is None else self._outside_idioms(rule.pattern, f"word:{rule.term}", reading, word=True)
        if not idioms:
            return None
        for start, end in sorted(idioms, reverse=True):
            reading = reading[:start] + " " + reading[end:]
        return " ".join(reading.split())

    def _outside_idioms(self, pattern, rule_id: str, reading: str, word: bool) -> list[tuple[int, int]] | None:
        """The spans of the word-list allow-rules (idioms) matched in `reading` when the first match of `pattern`
        that no allow-rule excuses lies wholly outside all of them; else None. The idioms excuse only word rules
        (a `word` match inside one never fired); a phrase pattern runs again here because PhraseRules.find returns
        the matched text, not its span."""
        idioms = [m.span() for allow in self.words.allow for m in allow.finditer(reading)]
        if not idioms:
            return None
        hit = next((m.span() for m in pattern.finditer(reading)
                    if not (word and any(a <= m.start() and m.end() <= b for a, b in idioms))
                    and self.phrases.excused(rule_id, m.span(), reading) is None), None)
        return idioms if hit is not None and all(hit[1] <= a or b <= hit[0] for a, b in idioms) else None

    def _readings(self, text: str) -> set[str]:
        """The normaliser's readings of `text`, plus each with misspelt rule words corrected."""
        variants = _variants(text)
        if self.speller is not None:
            variants |= {v for v in map(self.speller.variant, variants) if v is not None}
        return variants

    def check(self, text: str) -> None:
        refusal = self.verdict(text)
        if refusal is not None:
            log.info("refused a prompt: layer=%s category=%s rule=%s", refusal.layer, refusal.category, refusal.rule)
            raise refusal

    def negative_verdict(self, text: str) -> SafetyRefused | None:
        """The refusal for a request's extra negative prompt (own rules, no classifier)."""
        folded = _fold(text)
        hit = self.phrases.find(_variants(text), folded, rules=self.phrases.negative, only=self.categories)
        if hit is not None:
            rule, matched, _ = hit
            return SafetyRefused(rule.category, rule.id, f'prompt refused ({rule.category}): the negative prompt names '
                                 f'"{matched}"; {rule.why} (layer: negative rule {rule.id})', "negative", rule.id)
        return self._language(folded)

    def check_negative(self, text: str) -> None:
        refusal = self.negative_verdict(text)
        if refusal is not None:
            raise refusal


@functools.lru_cache(maxsize=1)
def _default_classifier():
    """The shipped classifier, loaded once per process and shared by every policy."""
    from toonark.prompt_safety.classifier import SafetyClassifier
    return SafetyClassifier()


def refusal_labels(reasons: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Every (reason, layer) pair a refusal can carry: the refusal metric's label values. A script
    refusal is always (language, language); every other category can come from any other layer."""
    rule_layers = tuple(layer for layer in LAYERS if layer != LANGUAGE)
    return tuple((reason, layer) for reason in reasons
                 for layer in ((LANGUAGE,) if reason == LANGUAGE else rule_layers))


_CACHE: dict[int, tuple[_SafetyRules, LayeredFilter]] = {}


def filter_for(words: _SafetyRules) -> LayeredFilter:
    """The layered filter around a policy's word rules, built once (the classifier session is reused)."""
    entry = _CACHE.get(id(words))
    if entry is None or entry[0] is not words:
        entry = (words, LayeredFilter.build(words))
        _CACHE[id(words)] = entry
    return entry[1]
