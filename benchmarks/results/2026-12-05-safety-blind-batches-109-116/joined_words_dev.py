"""Dev reading of joined-word splitting: only prompts whose text a splitter changes are read again (old vs new).
usage: PYTHONPATH=<checkout>:<wordninja> python joined_words_dev.py dev|floor1|floor2 a|c (the variant set)"""
import json, re, sys, time
import numpy as np
import wordninja
from toonark.prompt_safety import evalset, evaluate
from toonark.prompt_safety.spelling import load_known_words
known = load_known_words()
def main():
    which = sys.argv[1]                      # dev | floor1 | floor2
    def splitter(min_letters, min_piece, min_pieces=2, known_pieces=False):
        tok = re.compile(r"[A-Za-z]{%d,}" % min_letters)
        def one(m):
            w = m.group(0)
            if w.lower() in known:
                return w
            pieces = wordninja.split(w)
            if len(pieces) < min_pieces or any(len(p) < min_piece or (known_pieces and p.lower() not in known)
                                           for p in pieces):
                return w
            return " ".join(pieces)
        return lambda text: tok.sub(one, text)
    variants = {"a": {"A8": splitter(8, 2, known_pieces=True), "A8p3": splitter(8, 3, known_pieces=True),
                      "B10": splitter(10, 2, known_pieces=True), "A6p3": splitter(6, 3, known_pieces=True)},
                "c": {"C10n3": splitter(10, 1, 3), "C12n3": splitter(12, 1, 3), "C8n3": splitter(8, 1, 3),
                      "C14n4": splitter(14, 1, 4)}}[sys.argv[2]]
    ex = evalset.load()
    if which == "dev":
        part = [e for e in ex if e.split == "dev"]
    elif which == "floor1":
        part = evaluate.FLOOR.part(ex)
    else:
        part = evaluate.LATER_FLOOR.part(ex)
    out = {}
    texts_new = {}
    for name, f in variants.items():
        changed = [(i, f(e.text)) for i, e in enumerate(part) if f(e.text) != e.text]
        texts_new[name] = changed
    allidx = sorted({i for ch in texts_new.values() for i, _ in ch})
    t0 = time.time()
    old = evaluate.shipped_readings([part[i].text for i in allidx])
    oldmap = dict(zip(allidx, old))
    print("old read", len(allidx), round(time.time() - t0), flush=True)
    u_all = np.array([e.unsafe for e in part]); n_u, n_h = u_all.sum(), (~u_all).sum()
    for name, changed in texts_new.items():
        new = evaluate.shipped_readings([t for _, t in changed])
        d_rec = sum((n is not None) - (oldmap[i] is not None) for (i, _), n in zip(changed, new) if part[i].unsafe)
        d_har = sum((n is not None) - (oldmap[i] is not None) for (i, _), n in zip(changed, new) if not part[i].unsafe)
        out[name] = {"changed": len(changed), "recall_delta_prompts": d_rec, "harmless_refused_delta_prompts": d_har,
                     "recall_delta_pct": round(100 * d_rec / n_u, 3), "harmless_delta_pct": round(100 * d_har / n_h, 3)}
        print(name, out[name], flush=True)
    json.dump(out, open(f"joined_words_{which}_{sys.argv[2]}.json", "w"), indent=1)

if __name__ == '__main__':
    main()
