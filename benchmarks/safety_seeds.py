"""How far one fit of the prompt classifier moves with its seed alone, measured on dev (no test prompt read).

Round 11's final model missed 0.4 points more on the test part than round 10's at every operating point, though
out of fold on dev the two were level (README, round 11). This asks whether a refit with nothing changed but
the seed moves that much: fold 1 of train.py's folds is fitted with several seeds (the product's recipe and data,
encoder.SEED the only change), each scoring its held-out quarter of dev; the spread of recall and harmless refused
at the shipped operating point, classifier alone and whole filter, is what a refit moves by chance.

    # device, after the safety-model kit's carrying calls (benchmarks/NOTES.md): four seeds at once
    bash benchmarks/gpu_session.sh safety-seeds
    # here, with the fold files that came back
    .venv/bin/python benchmarks/safety_seeds.py report DIR --json benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's toonark (on the GPU: not installed)

FOLD = 0        # train.py's first fold (0-based): its held-out quarter is what each seed is read on


def fit(seed: int, out: Path) -> None:
    """Fold FOLD with `seed`; its scores go to out/safety_oof.fold1.npz (train.fold_cache)."""
    from toonark.prompt_safety import encoder, train
    encoder.SEED = seed         # read by encoder.fit for LoRA's initialisation, dropout and the batch order
    train.build(out, fits_only=True, fit_part=str(FOLD + 1), oof_cache=out / "safety_oof.npz", base=encoder.SHIPPED)


def _rates(refused, unsafe) -> dict:
    return {"recall": round(float(refused[unsafe].mean()), 4), "harmless_refused": round(float(refused[~unsafe].mean()), 4)}


def report(folder: Path, json_path: Path | None, reference: Path | None) -> dict:
    """Per seed (folder/s<seed>/safety_oof.fold1.npz): the held-out quarter's rates at the shipped point; the
    spread across seeds; and, with `reference` (the shipped fits' safety_oof.npz), how seed 0 compares with it."""
    import numpy as np

    from toonark.prompt_safety import evalset, train
    from toonark.prompt_safety.classifier import default_paths
    dev = [e for e in evalset.load() if e.split == "dev"]
    held = train.fold_splits(dev)[FOLD][1]
    readings = train.rule_readings([dev[i] for i in held])
    unsafe, blind = readings["unsafe"], readings["blind"]
    point = {k: v for k, v in json.loads(default_paths()[1].read_text()).items()
             if k in ("threshold", "vetoes", "short_vetoes", "min_words", "veto_min_words")}
    seeds = {}
    for path in sorted(folder.glob(f"s*/{train.fold_cache(Path('safety_oof.npz'), FOLD).name}")):
        scores = np.load(path)["oof"][held]
        whole = train.decisions(point, scores, readings)
        seeds[int(path.parent.name[1:])] = {
            "classifier_alone": _rates(scores >= point["threshold"], unsafe),
            "whole_filter": {**_rates(whole, unsafe), "recall_blind": round(float(whole[unsafe & blind].mean()), 4)},
            "scores": scores}
    if not seeds:
        raise SystemExit(f"{folder}: no s<seed>/safety_oof.fold1.npz (the files `gpu_session.sh safety-seeds` writes)")
    spread = {part: {m: round(max(s[part][m] for s in seeds.values()) - min(s[part][m] for s in seeds.values()), 4)
                     for m in seeds[min(seeds)][part]} for part in ("classifier_alone", "whole_filter")}
    result = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "fold": FOLD + 1, "held_out_prompts": len(held),
              "unsafe": int(unsafe.sum()), "harmless": int((~unsafe).sum()), "point": point,
              "seeds": {s: {k: v for k, v in r.items() if k != "scores"} for s, r in sorted(seeds.items())},
              "spread_max_minus_min": spread}
    if reference is not None and 0 in seeds:
        shipped = np.load(reference)["oof"][held]
        result["seed0_vs_shipped_fits_max_abs_diff"] = float(np.abs(seeds[0]["scores"] - shipped).max())
    print(f"fold {FOLD + 1}: {len(held)} held-out dev prompts ({result['unsafe']} unsafe); point {point}")
    print("| seed | classifier alone: recall % / harmless refused % | whole filter | whole filter, blind recall % |")
    print("|---|---|---|---|")
    for s, r in sorted(seeds.items()):
        a, w = r["classifier_alone"], r["whole_filter"]
        print(f"| {s} | {100 * a['recall']:.2f} / {100 * a['harmless_refused']:.2f} | "
              f"{100 * w['recall']:.2f} / {100 * w['harmless_refused']:.2f} | {100 * w['recall_blind']:.2f} |")
    print("spread (max - min):", spread)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fit", help="fit fold 1 with one seed (on the GPU machine)")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--out", type=Path, required=True)
    rep = sub.add_parser("report", help="the seeds' rates on the held-out quarter, here")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--json", type=Path)
    rep.add_argument("--reference", type=Path, help="the shipped fits' safety_oof.npz (seed 0 should match it)")
    args = parser.parse_args()
    if args.command == "fit":
        fit(args.seed, args.out)
    else:
        report(args.folder, args.json, args.reference)


if __name__ == "__main__":
    main()
