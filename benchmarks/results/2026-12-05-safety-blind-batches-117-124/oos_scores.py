"""Shipped classifier's P(unsafe) of normalize(text), one prompt at a time (as served), plus train.rule_readings,
on the dev halves of batches FIRST..LAST (or the floors' test halves with 'floors'). usage: oos_scores.py DATA_DIR FIRST LAST OUT.npz"""
import sys
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
import numpy as np
from toonark.prompt_safety import evalset, evaluate, train
from toonark.prompts import normalize

def scores(texts):
    from toonark.prompt_safety.layered import _default_classifier
    clf = _default_classifier()
    return [clf.score(t).unsafe for t in texts]

if __name__ == "__main__":
    data, first, last, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ex = evalset.load(data / "safety_prompts.json")
    num = evaluate.batch_numbers(evaluate.batches(data / "safety_batches.json"))
    split = sys.argv[5] if len(sys.argv) > 5 else "dev"
    chosen = [e for e in ex if e.split == split and first <= num.get(evalset.sha12(e.base), 0) <= last]
    texts = [normalize(e.text) for e in chosen]
    uniq = sorted(set(texts))
    print(len(chosen), len(uniq), flush=True)
    k = (len(uniq) + 1) // 2
    with ProcessPoolExecutor(2) as pool:
        parts = list(pool.map(scores, [uniq[:k], uniq[k:]]))
    by = dict(zip(uniq, parts[0] + parts[1]))
    rr = train.rule_readings(chosen)
    np.savez(out, score=np.array([by[t] for t in texts]), batch=np.array([num[evalset.sha12(e.base)] for e in chosen]),
             **rr)
