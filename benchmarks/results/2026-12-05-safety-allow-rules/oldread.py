import json, sys
from toonark.prompt_safety import evaluate
if __name__ == "__main__":
    rows = json.load(open(sys.argv[1]))
    old = evaluate.shipped_readings([r["text"] for r in rows])
    for r, o in zip(rows, old):
        r["was"] = None if o is None else [o.layer, o.rule]
    json.dump(rows, open(sys.argv[1], "w"), indent=0, ensure_ascii=False)
    from collections import Counter
    print(Counter((r["split"], "unsafe" if r["unsafe"] else "harmless", "was refused" if r["was"] else "was passing", "refused" if r["now"] else "passes") for r in rows))
