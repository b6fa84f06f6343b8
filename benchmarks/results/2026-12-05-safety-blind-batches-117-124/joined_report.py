import pickle, sys
rows = pickle.load(open(sys.argv[1], "rb"))
def tally(sel, name):
    U = [r for e, b, r in sel if e.label != "safe"]; H = [r for e, b, r in sel if e.label == "safe"]
    out = {}
    for i, v in enumerate(["shipped (typed or split)", "typed rules + split", "split only"]):
        if i == 0: f = lambda r: r[0] or r[2]
        elif i == 1: f = lambda r: r[1] or r[2]
        else: f = lambda r: r[2]
        out[v] = (sum(1 for r in U if f(r)), sum(1 for r in H if f(r)))
    print(f"{name}: unsafe {len(U)} harmless {len(H)}", {k: f"caught {a} / refused {b}" for k, (a, b) in out.items()})
for name, lo, hi in (("batches 1-76", 1, 76), ("batches 77-124", 77, 124), ("batch 110", 110, 110), ("77-124 without 110", 77, 124)):
    sel = [x for x in rows if lo <= x[1] <= hi and (name != "77-124 without 110" or x[1] != 110)]
    tally(sel, name)
