import sys, json
import numpy as np
from toonark.prompt_safety import train
d = np.load(sys.argv[1])
score, layers, words, unsafe, blind = d["score"], d["layers"], d["words"], d["unsafe"], d["blind"]
shipped = json.load(open("toonark/data/safety_classifier.json"))
point = {k: shipped[k] for k in ("threshold", "vetoes", "short_vetoes", "min_words", "veto_min_words")}
ref = train.decisions(point, score, {"words": words, "layers": layers})
print("blind share", blind.mean(), "n", len(score))
print("shipped point on this set (simulated):", round(100 * ref[unsafe].mean(), 2), round(100 * ref[~unsafe].mean(), 2))
grid = train.operating_grid(score, words, layers, unsafe, blind)
r0, w0 = ref[unsafe].mean(), ref[~unsafe].mean()
print("points at >= shipped recall with fewer harmless refused:")
better = sorted([g for g in grid if g[0] >= r0 - 1e-12 and g[1] < w0], key=lambda g: g[1])[:10]
for r, w, p in better: print(round(100*r, 2), round(100*w, 2), p)
print("chosen by the project's rule (tolerance 0):", train.choose_operating_point(score, words, layers, unsafe, blind))
train.RECALL_TOLERANCE_SE = 1.0
print("chosen at 1 SE:", train.choose_operating_point(score, words, layers, unsafe, blind))
