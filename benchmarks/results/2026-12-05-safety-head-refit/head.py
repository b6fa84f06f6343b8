"""Head-only refit over round 13's encoder features: does a new linear head trained on dev halves of batches 1-140
read the floors' test halves (and blind batches) better than the shipped head? Classifier alone, fp32 heads on the
int8 graph's pooled features. usage: head.py FEATS_A.npz TEXTS_A.json [FEATS_B.npz TEXTS_B.json BATCHDIR]"""
import json, os, sys
from pathlib import Path
import numpy as np, torch
from safetensors.numpy import load_file
from toonark.prompt_safety import evalset, evaluate
from toonark.prompts import normalize

LABELS = json.load(open("toonark/data/safety_classifier.json"))["labels"]
SAFE = LABELS.index("safe")
data = Path(os.environ["ROUND_DATA"])   # toonark/data of a checkout with blind batches 77-148 merged
ex = evalset.load(data / "safety_prompts.json")
num = evaluate.batch_numbers(evaluate.batches(data / "safety_batches.json"))
A = np.load(sys.argv[1]); texts = json.load(open(sys.argv[2]))
row = {t: i for i, t in enumerate(texts)}
F = torch.tensor(A["feats"])
ad = load_file("toonark/data/safety_adapter.safetensors")
W0 = torch.tensor(ad["base_model.model.head.weight"].astype(np.float32)); b0 = torch.tensor(ad["base_model.model.head.bias"].astype(np.float32))

def idx(sel): return torch.tensor([row[normalize(e.text)] for e in sel])
def target(sel): return torch.tensor([LABELS.index(e.label) for e in sel])
def p_unsafe(W, b, ix): return (1 - torch.softmax(F[ix] @ W.T + b, -1)[:, SAFE]).numpy()

def fit(ix, y, lam, W_init=W0, b_init=b0, steps=60):
    W = W_init.clone().requires_grad_(True); b = b_init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")
    X = F[ix]
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W.T + b, y) + lam * ((W - W0) ** 2).sum()
        loss.backward(); return loss
    opt.step(closure)
    return W.detach(), b.detach()

def curve(p, unsafe, rates=(0.005, 0.01, 0.02, 0.03)):
    h = np.sort(p[~unsafe])[::-1]
    return {f"{100*r:g}": round(100 * float((p[unsafe] > h[int(r * len(h))]).mean()), 2) for r in rates}

dev = [e for e in ex if e.split == "dev" and num[evalset.sha12(e.base)] <= 140]
parts = {"test 1-38": [e for e in ex if e.split == "test" and num[evalset.sha12(e.base)] <= 38],
         "test 39-76": [e for e in ex if e.split == "test" and 39 <= num[evalset.sha12(e.base)] <= 76]}
if len(sys.argv) > 3:
    B = np.load(sys.argv[3]); tb = json.load(open(sys.argv[4]))
    base = len(texts); texts += tb; row.update({t: base + i for i, t in enumerate(tb)})
    F = torch.cat([F, torch.tensor(B["feats"])])
    folder = Path(sys.argv[5])
    numbers = [int(f.stem.split("-")[1]) for f in folder.glob("batch-*.json")]
    blind = [e for e in ex if min(numbers) <= num[evalset.sha12(e.base)] <= max(numbers)]   # merged: deduplicated
    parts["blind 141-148"] = blind
# shipped head's fp32 replica vs the graph's own int8 head (sanity)
ix = idx(parts["test 1-38"][:2000])
graph = 1 - A["probs"][ix.numpy(), SAFE]
print("fp32 head vs int8 graph, max |dP|", float(np.abs(p_unsafe(W0, b0, ix) - graph).max()))
res = {"shipped head": {k: curve(p_unsafe(W0, b0, idx(v)), np.array([e.unsafe for e in v])) for k, v in parts.items()}}
print("shipped head", res["shipped head"])
dix, dy = idx(dev), target(dev)
for lam in [float(x) for x in (sys.argv[6].split(",") if len(sys.argv) > 6 else ["0", "1e-4", "1e-3", "1e-2"])] if __name__ == "__main__" else []:
    W, b = fit(dix, dy, lam)
    res[f"refit lam {lam:g}"] = {k: curve(p_unsafe(W, b, idx(v)), np.array([e.unsafe for e in v])) for k, v in parts.items()}
    print(f"refit lam {lam:g}", res[f"refit lam {lam:g}"], flush=True)
if __name__ == "__main__":
    json.dump(res, open("head.json", "w"), indent=1)
