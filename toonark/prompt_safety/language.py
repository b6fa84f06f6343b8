"""Which prompts the text encoder can read: Latin-script text only.

The CLIP tokenizer is byte-level BPE trained on English captions: Chinese, Japanese, Korean, Cyrillic,
Arabic ... text still becomes tokens (UTF-8 byte pieces), so nothing fails, but the text encoder has
learnt almost nothing about them and the picture is close to random. The safety rules and the
classifier read English too, so such a prompt could not be checked either. Refusing with a clear
message is the safe and honest answer. Look-alike letters (Cyrillic "а" in "gаn") are folded to Latin
by the normaliser first, so they are checked as the English word they imitate, not refused here.
"""
from __future__ import annotations

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
