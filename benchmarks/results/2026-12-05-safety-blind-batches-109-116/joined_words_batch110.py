"""Batch 110 bases read by the shipped filter as written, with letter runs split (wordninja), and either.
usage: PYTHONPATH=<checkout>:<wordninja> python joined_words_batch110.py BATCH.json MIN_LETTERS DEDUPE_SET (8; a safety_prompts.json)"""
import json, re, sys, time
import numpy as np
import wordninja
from toonark.prompt_safety import evalset
from toonark.prompt_safety.layered import filter_for
from toonark.prompt_safety.spelling import load_known_words
from toonark.prompts import PromptPolicy
known = load_known_words()
flt = filter_for(PromptPolicy.load()._rules)
TOKEN = re.compile(r"[A-Za-z]{%d,}" % int(sys.argv[2]))
def segment(text):
    return TOKEN.sub(lambda m: m.group(0) if m.group(0).lower() in known else " ".join(wordninja.split(m.group(0))), text)
new = evalset.read_batch(__import__("pathlib").Path(sys.argv[1]))
ex = evalset.batch_examples(new, __import__("pathlib").Path(sys.argv[3]))
ex = [e for e in ex if e.kind == "base"]
rows = []
for e in ex:
    s = segment(e.text)
    a = flt.verdict(e.text) is not None
    b = flt.verdict(s) is not None if s != e.text else a
    rows.append((e.unsafe, a, b, s != e.text))
r = np.array(rows)
u = r[:, 0]
for name, col in (("original", r[:, 1]), ("segmented", r[:, 2]), ("either", r[:, 1] | r[:, 2])):
    print(f"{name:10s} recall {col[u].mean():.4f} harmless refused {col[~u].mean():.4f}")
print("segmented changed", r[:, 3].mean())
