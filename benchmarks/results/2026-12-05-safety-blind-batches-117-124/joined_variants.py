"""Whole-prompt joined runs on dev halves: shipped (typed or split) vs typed rules only + split, vs split only.
usage: joined_variants.py DATA_DIR SPLIT OUT.pkl"""
import pickle, sys
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
from toonark.prompt_safety import evalset, evaluate

def _filter():
    from toonark.prompt_safety.layered import filter_for
    from toonark.prompts import PromptPolicy
    return filter_for(PromptPolicy.load()._rules)

def read(texts):
    flt = _filter()
    out = []
    for t in texts:
        split = flt.joined_words(t)
        if split is None:
            out.append(None); continue
        typed = flt._verdict(t)
        rules_typed = next((r for r, reading in flt.rule_hits(t) if not flt._excused(r, reading)), None) or flt.language_verdict(t)
        sv = flt._verdict(split)
        out.append(tuple(None if r is None else (r.layer, r.rule, r.category) for r in (typed, rules_typed, sv)) + (split,))
    return out

if __name__ == "__main__":
    data, split, outp = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    ex = evalset.load(data / "safety_prompts.json")
    num = evaluate.batch_numbers(evaluate.batches(data / "safety_batches.json"))
    chosen = [e for e in ex if e.split == split]
    flt = _filter()
    chosen = [e for e in chosen if flt.joined_words(e.text) is not None]
    print(len(chosen), flush=True)
    texts = [e.text for e in chosen]
    half = len(texts) // 2
    with ProcessPoolExecutor(2) as pool:
        parts = list(pool.map(read, [texts[:half], texts[half:]]))
    res = parts[0] + parts[1]
    pickle.dump([(e, num.get(evalset.sha12(e.base), 0), r) for e, r in zip(chosen, res)], open(outp, "wb"))
