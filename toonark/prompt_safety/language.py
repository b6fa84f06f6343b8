"""Which prompts the text encoder can read: English in Latin script.

The CLIP tokenizer is byte-level BPE trained on English captions: Chinese, Japanese, Korean, Cyrillic,
Arabic ... text still becomes tokens (UTF-8 byte pieces), so nothing fails, but the text encoder has
learnt almost nothing about them and the picture is close to random. The safety rules and the
classifier read English too, so such a prompt could not be checked either. Refusing with a clear
message is the safe and honest answer. Look-alike letters (Cyrillic "а" in "gаn") are folded to Latin
by the normaliser first, so they are checked as the English word they imitate, not refused here.

Latin-script prompts written mostly in another language ("tatay sinusuntok ang anak", "huevos ahogados en
salsa roja") are the same case with Latin letters: the rules and the classifier read English, so they would pass
unread. `latin_language` names such a prompt's language with langid.py (Lui and Baldwin's naive Bayes model over
byte n-grams, 97 languages, ~0.5 ms a prompt) when it is sure and most of the words are not English words;
English with a few foreign words ("the Teufelsbrücke in the Schöllenen gorge") is read as English. langid.py, not
its faster fork py3langid: the fork requires numpy 2, and the Triton bundle's Python stub needs numpy < 2.
"""
from __future__ import annotations

import functools
import re
import unicodedata

# Unicode name prefix -> the script as people call it (for the message).
_SCRIPTS = {
    "CJK": "Chinese", "HIRAGANA": "Japanese", "KATAKANA": "Japanese", "HANGUL": "Korean",
    "CYRILLIC": "Cyrillic", "ARABIC": "Arabic", "HEBREW": "Hebrew", "DEVANAGARI": "Devanagari",
    "THAI": "Thai", "GREEK": "Greek", "BENGALI": "Bengali", "TAMIL": "Tamil", "ARMENIAN": "Armenian",
    "GEORGIAN": "Georgian", "ETHIOPIC": "Ethiopic",
}


def foreign_script(folded: str) -> str | None:
    """The first script other than Latin among the letters of `folded` (text after the normaliser's
    look-alike folding), e.g. "Chinese"; None when every letter is Latin."""
    for ch in folded:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        if name.startswith("LATIN"):
            continue
        return _SCRIPTS.get(name.split(" ")[0], name.split(" ")[0].title() or "unknown")
    return None


# A Latin-script prompt is "mostly another language" when it has at least LATIN_MIN_WORDS words of 3+ letters
# (language identifiers guess on short text: py3langid read "tearjerker" as Frisian, "liquorice" as Latin), at
# most LATIN_MAX_ENGLISH_SHARE of them known English words (the spelling layer's list), and langid's top language
# is not English at a normalised probability of at least LATIN_MIN_PROBABILITY (its probabilities saturate: at
# 0.99 it refused "tacos de cabeza, lengua y cachete at the taquería, cartoon style"). Chosen on the dev part of
# batches 1-76 (23,601 hand-written bases, no test prompt read): 3 of 11,826 harmless prompts refused (0.025 %,
# written in Tagalog, Italian and Spanish) and 13 of 11,775 unsafe ones; at 0.999, 5 and 14; at 0.99, 8 and 22;
# 3 words instead of 4 changes none of these.
LATIN_MIN_PROBABILITY = 0.9999
LATIN_MIN_WORDS = 4
LATIN_MAX_ENGLISH_SHARE = 0.5
_WORD = re.compile(r"[^\W\d_]{3,}")

# langid's codes -> the names people use (the message names the language; unlisted codes are shown as the code).
_LANGUAGES = {
    "af": "Afrikaans", "an": "Aragonese", "az": "Azerbaijani", "br": "Breton", "bs": "Bosnian", "ca": "Catalan",
    "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "eo": "Esperanto", "es": "Spanish",
    "et": "Estonian", "eu": "Basque", "fi": "Finnish", "fr": "French", "fy": "Frisian", "ga": "Irish",
    "gd": "Scottish Gaelic", "gl": "Galician", "ha": "Hausa", "hr": "Croatian", "ht": "Haitian Creole",
    "hu": "Hungarian", "id": "Indonesian", "ig": "Igbo", "is": "Icelandic", "it": "Italian", "jv": "Javanese",
    "ku": "Kurdish", "la": "Latin", "lb": "Luxembourgish", "lg": "Ganda", "ln": "Lingala", "lt": "Lithuanian",
    "lv": "Latvian", "mg": "Malagasy", "ms": "Malay", "mt": "Maltese", "nl": "Dutch", "nn": "Norwegian",
    "no": "Norwegian", "oc": "Occitan", "om": "Oromo", "pl": "Polish", "pt": "Portuguese", "qu": "Quechua",
    "ro": "Romanian", "rw": "Kinyarwanda", "sk": "Slovak", "sl": "Slovenian", "sn": "Shona", "so": "Somali",
    "sq": "Albanian", "st": "Sotho", "sv": "Swedish", "sw": "Swahili", "tk": "Turkmen", "tl": "Tagalog",
    "tr": "Turkish", "uz": "Uzbek", "vi": "Vietnamese", "wa": "Walloon", "xh": "Xhosa", "yo": "Yoruba",
    "zu": "Zulu", "bcl": "Bikol", "ace": "Acehnese", "vec": "Venetian", "lij": "Ligurian", "pcm": "Nigerian Pidgin",
}


@functools.lru_cache(maxsize=1)
def _identifier():
    """langid's model with normalised probabilities, loaded once per process and only when a prompt gets past the
    English-words test (~1.5 s: the model is a string inside the module)."""
    from langid.langid import LanguageIdentifier, model
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def latin_language(folded: str, english_words: frozenset[str]) -> str | None:
    """The language a Latin-script prompt (`folded`, after the normaliser's folding) is mostly written in, when
    that is not English by the rule above, e.g. "Tagalog"; None for English."""
    words = _WORD.findall(folded.lower())
    if len(words) < LATIN_MIN_WORDS:
        return None
    if sum(w in english_words for w in words) > LATIN_MAX_ENGLISH_SHARE * len(words):
        return None
    code, probability = _identifier().classify(folded)
    if code == "en" or probability < LATIN_MIN_PROBABILITY:
        return None
    return _LANGUAGES.get(code, f"the language with code {code!r}")
