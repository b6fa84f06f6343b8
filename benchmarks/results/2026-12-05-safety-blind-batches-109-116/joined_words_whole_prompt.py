"""Whole-prompt joined words: a prompt that is one letter run of MIN+ letters (not a known word) is also read split
(wordninja); refused if either reading refuses. Deltas against the shipped filter on the tracked set and blind batches."""
import json, re, sys
from collections import Counter
from pathlib import Path
import wordninja
from toonark.prompt_safety import evalset, evaluate
from toonark.prompt_safety.spelling import load_known_words
from toonark.prompts import normalize
MIN = int(sys.argv[1])
def split_whole(text, known):
    n = normalize(text)
    if " " in n or len(n) < MIN or not n.isalpha() or n in known:
        return None
    return " ".join(wordninja.split(n))
if __name__ == "__main__":
    known = load_known_words()
    sets = {"tracked": evalset.load()}
    if len(sys.argv) > 2:
        sets["blind"] = [e for f in sys.argv[2:] for e in evalset.batch_examples(evalset.read_batch(Path(f)), Path(__import__("os").environ["DEDUPE_SET"]))]
    for name, ex in sets.items():
        cand = [(e, s) for e in ex if (s := split_whole(e.text, known)) is not None]
        old = evaluate.shipped_readings([e.text for e, _ in cand])
        new = evaluate.shipped_readings([s for _, s in cand])
        c = Counter((e.split, "unsafe" if e.unsafe else "harmless", o is not None, (o is not None) or (n is not None)) for (e, _), o, n in zip(cand, old, new))
        print(name, len(ex), "candidates", len(cand), dict(c), flush=True)
        for (e, s), o, n in zip(cand, old, new):
            if o is None and n is not None and not e.unsafe and e.kind == "base":
                print("   harmless now refused:", e.text, "->", s)
