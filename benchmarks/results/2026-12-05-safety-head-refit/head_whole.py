"""Whole filter (train.operating_grid over rule readings) with the shipped head vs the head refitted at LAM:
fewest misses within harmless-refused budgets, per part. Same args as head.py plus LAM."""
import sys, json
import numpy as np
sys.argv, lam = sys.argv[:-1], float(sys.argv[-1])
import head as H          # runs head.py's setup and its lambda loop on the default list: keep it short
from toonark.prompt_safety import train
from toonark.prompts import normalize
W, b = H.fit(H.dix, H.dy, lam)
out = {}
for name, sel in H.parts.items():
    rr = train.rule_readings(sel)
    unsafe = rr["unsafe"]; blind = np.ones(len(sel), bool)
    res = {}
    for label, (w_, b_) in (("shipped head", (H.W0, H.b0)), (f"refit lam {lam:g}", (W, b))):
        p = H.p_unsafe(w_, b_, H.idx(sel))
        grid = train.operating_grid(p, rr["words"], rr["layers"], unsafe, blind)
        res[label] = {f"{100*bud:g}": max((round(100 * r, 2) for r, w, _ in grid if w <= bud), default=None) for bud in (0.015, 0.02, 0.025, 0.03)}
        res[label]["fewest_harmless_refused"] = round(100 * min(w for r, w, _ in grid), 2)
    out[name] = res
    print(name, res, flush=True)
json.dump(out, open("head_whole.json", "w"), indent=1)
