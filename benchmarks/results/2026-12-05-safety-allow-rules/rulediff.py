import json, sys, time
from toonark.prompt_safety import evalset, evaluate
from toonark.prompt_safety.layered import LayeredFilter
from toonark.prompts import PromptPolicy
def first(f, t):
    h = next(f.rule_hits(t), None)
    return None if h is None else (h[0].layer, h[0].rule)
if __name__ == "__main__":
    old = LayeredFilter.build(PromptPolicy.load(rules_path="/tmp/old_rules.json")._rules, "/tmp/old_phrases.json", classifier=None)
    new = LayeredFilter.build(PromptPolicy.load()._rules, classifier=None)
    ex = evalset.load()
    if len(sys.argv) > 1:
        from pathlib import Path
        ex = [e for n in sys.argv[1:] for e in evalset.batch_examples(evalset.read_batch(Path(n)), Path(__import__("os").environ.get("DEDUPE_SET", "toonark/data/safety_prompts.json")))]
    t0 = time.time()
    changed = [(e, first(old, e.text), first(new, e.text)) for e in ex]
    changed = [c for c in changed if c[1] != c[2]]
    print("rules read", len(ex), round(time.time() - t0), "s; changed", len(changed), flush=True)
    readings = evaluate.shipped_readings([e.text for e, _, _ in changed])
    rows = [{"split": e.split, "unsafe": e.unsafe, "text": e.text, "old": o, "new": n, "now": None if r is None else (r.layer, r.rule)} for (e, o, n), r in zip(changed, readings)]
    from collections import Counter
    print(Counter((r["split"], "unsafe" if r["unsafe"] else "harmless", "refused" if r["now"] else "passes") for r in rows))
    for r in rows:
        if r["unsafe"] and r["now"] is None: print("  UNSAFE PASSES:", r["split"], r["text"][:120], r["old"])
    json.dump(rows, open("rulediff" + ("-blind" if len(sys.argv) > 1 else "") + ".json", "w"), indent=0, ensure_ascii=False)
