"""Would more hand-written data reach the issue's targets? The prompt classifier's learning curve on dev.

Fold 1 of train.py's folds is held out (the same quarter of dev at every size) and the product's recipe fits on
nested fractions of the other three quarters' base prompts (a base's perturbations come with it; the templated
twins are added whole at every size, as in the product), one fit per (fraction, seed). Each fit scores the held-out
quarter; the whole training set is the product's own fold-1 fits (their own scores in `gpu_session.sh safety-fits`'
safety_oof.npz). Read:
the classifier alone's misses at 0.5 / 1 / 2 % harmless refused and the whole filter's fewest blind misses within
1 / 2 / 3 / 5 % (train.operating_grid), against the number of training bases, with a power law fitted through the
misses to say how many bases the targets would need at this rate. No test prompt is read.

    # device, after the safety-model kit's carrying calls (benchmarks/NOTES.md), with the data carried:
    CURVE_DATA=.stage/curve/safety_prompts.json bash benchmarks/gpu_session.sh safety-curve
    # here, in a checkout whose toonark/data holds that data (the rules read its batches file)
    .venv/bin/python benchmarks/safety_learning_curve.py report DIR --full FITS_DIR --json benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's toonark (on the GPU: not installed)

FOLD = 0                                          # train.py's first fold (0-based), held out at every size
# (fraction, seed, order), at once on one GPU; CURVE_RUNS="0.75:0:random 0.5:0:batches" overrides in gpu_session.sh
RUNS = ((1 / 16, 0, "random"), (1 / 8, 0, "random"), (1 / 4, 0, "random"), (1 / 2, 0, "random"),
        (1 / 4, 1, "random"), (1 / 2, 1, "random"))
ORDERS = ("random", "batches")
HARMLESS_REFUSED = (0.005, 0.01, 0.02)
BUDGETS = (0.01, 0.02, 0.03, 0.05)


def _fit_file(folder: Path, fraction: float, seed: int, order: str) -> Path:
    return folder / f"curve.{'' if order == 'random' else order + '.'}f{fraction:.4f}.seed{seed}.npz"


def _dev(data: Path | None) -> tuple[list, list[str]]:
    """(the dev examples, every label of the set, as train.build takes them)."""
    from toonark.prompt_safety import evalset
    examples = evalset.load(data)
    return [e for e in examples if e.split == "dev"], sorted({e.label for e in examples})


def training_bases(dev, train_idx, fraction: float, order: str = "random", batches: Path | None = None) -> set[str]:
    """The first `fraction` of the training quarters' base prompts: in sha256 order ("random": nested, a smaller
    fraction's bases are in every larger one's, the same on every machine) or in writing order ("batches": the
    earliest batches first, sha256 order within one; what the set was at that size as it was written)."""
    from toonark.prompt_safety import evaluate, evalset
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: use one of {', '.join(ORDERS)}")
    batch_of = evaluate.batch_numbers(evaluate.batches(batches)) if order == "batches" else {}

    def key(base: str):
        digest = hashlib.sha256(base.encode("utf-8")).hexdigest()
        return (batch_of[evalset.sha12(base)], digest) if batch_of else (0, digest)
    bases = sorted({dev[i].base for i in train_idx}, key=key)
    return set(bases[:math.ceil(fraction * len(bases))])


def fit(fraction: float, seed: int, order: str, out: Path, data: Path | None, batches: Path | None) -> None:
    """One fit on `fraction` of fold FOLD's training bases; its held-out scores go to _fit_file(out, ...)."""
    import numpy as np

    from toonark.prompt_safety import encoder, evalset, templates, train
    from toonark.prompts import normalize
    dev, labels = _dev(data)
    train_idx, held_idx = train.fold_splits(dev)[FOLD]
    keep = training_bases(dev, train_idx, fraction, order, batches)
    chosen = [i for i in train_idx if dev[i].base in keep]
    generated = templates.generate()
    texts = [normalize(dev[i].text) for i in chosen] + [normalize(t) for t, _ in generated]
    targets = [dev[i].label for i in chosen] + [label for _, label in generated]
    model = encoder.fit(texts, targets, labels, encoder.SHIPPED, progress=f"{order} f{fraction:g} seed {seed} ", seed=seed,
                        init_seed=0)
    held = 1.0 - model.probabilities([normalize(dev[i].text) for i in held_idx])[:, labels.index(evalset.SAFE)]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(_fit_file(out, fraction, seed, order), held=held, fraction=fraction, seed=seed, order=order, bases=len(keep),
             prompts=len(chosen), data_sha256=evalset.data_sha256(data))


def _read(scores, readings) -> dict:
    from benchmarks.safety_seeds import recall_curves
    alone, best, grid = recall_curves(scores, readings, HARMLESS_REFUSED, BUDGETS)

    def misses(recalls: dict) -> dict:
        return {k: None if r is None else round(100 - r, 2) for k, r in recalls.items()}
    return {"classifier_alone_misses_pct_at_harmless_refused_pct": misses(alone),
            "whole_filter_fewest_blind_misses_pct_within_pct": misses(best),
            "whole_filter_fewest_harmless_refused_pct": round(100 * min(w for _, w, _ in grid), 2)}


def _fit_seconds(folder: Path, fraction: float, seed: int, order: str) -> int | None:
    """The "rc 0 after N s" gpu_session.sh's safety-curve ends a fit's log with (its log: [order-]f<fraction>-s<seed>)."""
    import re
    for name in (f"{order}-f{fraction:g}-s{seed}.log", f"f{fraction:g}-s{seed}.log"):
        if (folder / name).exists() and (found := re.findall(r"^rc 0 after (\d+) s$", (folder / name).read_text(), re.M)):
            return int(found[-1])
    return None


def _power_law(points: list[tuple[int, float]]) -> dict | None:
    """misses = a * bases^-b through (bases, misses %) by least squares in log-log; None under two sizes."""
    if len({n for n, _ in points}) < 2 or any(m <= 0 for _, m in points):
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(m) for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"a": math.exp(my - slope * mx), "b": -slope}


def _bases_for(law: dict | None, misses_pct: float) -> float | None:
    return None if law is None or law["b"] <= 0 else (law["a"] / misses_pct) ** (1 / law["b"])


def report(folder: Path, full: Path | None, json_path: Path | None, data: Path | None) -> dict:
    import numpy as np

    from toonark.prompt_safety import evalset, train
    dev, _ = _dev(data)
    train_idx, held_idx = train.fold_splits(dev)[FOLD]
    readings = train.rule_readings([dev[i] for i in held_idx])
    sha = evalset.data_sha256(data)
    runs = []
    for path in sorted(folder.glob("curve.*.seed*.npz")):
        stored = np.load(path)
        if str(stored["data_sha256"]) != sha:
            raise SystemExit(f"{path}: fitted on other data ({str(stored['data_sha256'])[:12]}…, this checkout's "
                             f"{sha[:12]}…); read it in a checkout holding the data it was fitted on")
        order = str(stored["order"]) if "order" in stored else "random"
        runs.append({"fraction": float(stored["fraction"]), "seed": int(stored["seed"]), "order": order,
                     "bases": int(stored["bases"]), "prompts": int(stored["prompts"]),
                     "fit_seconds": _fit_seconds(folder, float(stored["fraction"]), int(stored["seed"]), order),
                     **_read(stored["held"], readings)})
    if full is not None:        # the product's fold-1 fits on every training base: each fit's own held-out scores
        stored = np.load(full / "safety_oof.npz")
        if not stored["done"][FOLD]:
            raise SystemExit(f"{full / 'safety_oof.npz'}: fold {FOLD + 1} not scored (a finished safety-fits run's cache)")
        everything = len({dev[i].base for i in train_idx})
        for row, seed in enumerate(stored["seeds"]):
            runs.append({"fraction": 1.0, "seed": int(seed), "order": "all", "bases": everything, "prompts": len(train_idx),
                         **_read(stored["oof_seeds"][row][held_idx], readings)})
    if not runs:
        raise SystemExit(f"{folder}: no curve.f*.seed*.npz (the files `gpu_session.sh safety-curve` writes)")
    runs.sort(key=lambda r: (r["fraction"], r["order"] != "random", r["order"], r["seed"]))
    random = [r for r in runs if r["order"] in ("random", "all")]     # the power laws: nested random subsets
    laws, needed = {}, {}
    for rate in HARMLESS_REFUSED:
        key = f"{100 * rate:g}"
        law = _power_law([(r["bases"], r["classifier_alone_misses_pct_at_harmless_refused_pct"][key]) for r in random])
        laws[f"classifier_alone_at_{key}"] = law
        needed[f"classifier_alone_1pct_misses_at_{key}pct_harmless_refused"] = _bases_for(law, 1.0)
    for budget in BUDGETS:
        key = f"{100 * budget:g}"
        points = [(r["bases"], r["whole_filter_fewest_blind_misses_pct_within_pct"][key]) for r in random
                  if r["whole_filter_fewest_blind_misses_pct_within_pct"][key] is not None]
        law = _power_law(points)
        laws[f"whole_filter_within_{key}"] = law
        needed[f"whole_filter_1pct_misses_within_{key}pct"] = _bases_for(law, 1.0)
    unsafe = readings["unsafe"]
    result = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "fold": FOLD + 1, "data_sha256": sha,
              "held_out": {"prompts": len(held_idx), "unsafe": int(unsafe.sum()), "harmless": int((~unsafe).sum()),
                           "blind_unsafe": int((unsafe & readings["blind"]).sum())},
              "dev_bases_written": len({e.base for e in dev}), "runs": runs, "power_laws": laws,
              "training_bases_for_1pct_misses": {k: (round(v) if v else None) for k, v in needed.items()}}
    print(f"fold {FOLD + 1} held out: {result['held_out']}")
    print("| training bases (fraction, seed, order) | classifier alone: misses % at 0.5 / 1 / 2 % harmless refused "
          "| whole filter: fewest blind misses % within 1 / 2 / 3 / 5 % | whole filter: fewest harmless refused % |")
    print("|---|---|---|---|")
    for r in runs:
        a = r["classifier_alone_misses_pct_at_harmless_refused_pct"]
        w = r["whole_filter_fewest_blind_misses_pct_within_pct"]
        print(f"| {r['bases']} ({r['fraction']:g}, {r['seed']}, {r['order']}) | {' / '.join(str(v) for v in a.values())} | "
              f"{' / '.join('–' if v is None else str(v) for v in w.values())} | {r['whole_filter_fewest_harmless_refused_pct']} |")
    for name, law in laws.items():
        if law:
            print(f"{name}: misses % = {law['a']:.3g} * bases^-{law['b']:.3f}")
    print("training bases for 1 % misses:", result["training_bases_for_1pct_misses"])
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fit", help="one fit on a fraction of fold 1's training bases (on the GPU machine)")
    one.add_argument("--fraction", type=float, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--order", choices=ORDERS, default="random", help="which bases a fraction takes (training_bases)")
    one.add_argument("--data", type=Path, help="the labelled set (default: the checkout's)")
    one.add_argument("--batches", type=Path, help="its writing batches, for --order batches (default: the checkout's)")
    rep = sub.add_parser("report", help="the curve, the power laws and what they say the targets need, here")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--full", type=Path, help="the product's fits folder on the same data (its safety_oof.npz)")
    rep.add_argument("--json", type=Path)
    rep.add_argument("--data", type=Path, help="the labelled set the fits read (default: the checkout's)")
    args = parser.parse_args()
    if args.command == "fit":
        if not 0 < args.fraction < 1:
            parser.error(f"--fraction {args.fraction}: a fraction of the training bases, between 0 and 1 "
                         f"(the whole set is the product's own fold-1 fit: report --full)")
        fit(args.fraction, args.seed, args.order, args.out, args.data, args.batches)
    else:
        report(args.folder, args.full, args.json, args.data)


if __name__ == "__main__":
    main()
