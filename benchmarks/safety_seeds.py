"""How far one fit of the prompt classifier moves with its seed alone, measured on dev (no test prompt read).

Round 11's final model missed 0.4 points more on the test part than round 10's at every operating point, though
out of fold on dev the two were level (docs/prompt-safety.md, round 11). This asks whether a refit with nothing changed but
the seed moves that much: fold 1 of train.py's folds is fitted with several seeds (the product's recipe and data,
the seed the only change; one fit each, no soup), each scoring its held-out quarter of dev; the spread of recall and harmless refused
at the shipped operating point, classifier alone and whole filter, is what a refit moves by chance.

    # device, after the safety-model kit's carrying calls (benchmarks/NOTES.md): four seeds at once
    bash benchmarks/gpu_session.sh safety-seeds
    # here, with the fold files that came back
    .venv/bin/python benchmarks/safety_seeds.py report DIR --json benchmarks/results/X.json

`fit --batch N --lr-scale X` changes the recipe for a speed trial: a fit is ~82 ms a step at batch 32 on the H200
whatever the batch's few thousand tokens (launch-bound), so a larger batch with its learning rates scaled is the
cheap way to fit more data in a session's device time; whether it reads as well is what `report` shows (one
folder per variant, `SEED_RECIPES` in gpu_session.sh: "32:1 128:2" runs fold 1 with seed 0 at each at once):

    SEED_RECIPES="32:1 64:1.41 128:2 256:2.83" bash benchmarks/gpu_session.sh safety-seeds
    SEED_RECIPES="128:2 128:2:bf16" ...   # a third field "bf16": the forward pass under bf16 autocast
    SEED_RECIPES="256:1:rank=64,epochs=5 256:1:seed=1" ...   # LoRA rank 64 (alpha scaled), five epochs; seed 1
    SEED_DATA=PATH ...   # fit on that safety_prompts.json (another branch's data, carried as a file)

`recipes` reads the recipe trial's fits (rank, epochs; their fold-1 scores) against the shipped fold model:

    .venv/bin/python benchmarks/safety_seeds.py recipes benchmarks/results/2026-12-06-nvidia-h100-safety-recipe-trial \\
        --reference benchmarks/results/2026-12-06-nvidia-h100-safety-round16-fit/safety_oof.npz --json OUT.json

`soups` compares, out of fold on dev, each fit of a soup (encoder.SEEDS; `gpu_session.sh safety-fits` leaves their
own scores in safety_oof.npz, `oof_seeds`) with their scores averaged and with the soup itself (`oof`):

    .venv/bin/python benchmarks/safety_seeds.py soups NAME=FIT_DIR... --json benchmarks/results/X.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's toonark (on the GPU: not installed)

FOLD = 0        # train.py's first fold (0-based): its held-out quarter is what each seed is read on


def _fit_file(folder: Path, seed: int) -> Path:
    from toonark.prompt_safety import train
    return train.part_file(folder / "safety_oof.npz", str(FOLD + 1), seed)


def fit(seed: int, out: Path, batch: int | None = None, lr_scale: float = 1.0, data: Path | None = None,
        bf16: bool = False, rank: int | None = None, epochs: int | None = None) -> None:
    """Fold FOLD fitted once with `seed` (and `batch` examples a step, the base's learning rates times `lr_scale`:
    the recipe's own unless given) on `data` (a safety_prompts.json; default the checkout's); its adapter and
    held-out scores go to _fit_file(out, seed), the recipe to out/recipe.json. `bf16`: the forward pass under
    bf16 autocast (encoder.AUTOCAST_BF16). `rank`: LoRA's rank, its alpha scaled with it (alpha / rank, the
    update's scale, stays the recipe's); `epochs`: passes over the data (default encoder.EPOCHS)."""
    from toonark.prompt_safety import encoder, train
    encoder.BATCH = batch or encoder.BATCH
    encoder.AUTOCAST_BF16 = bf16
    if rank:
        encoder.LORA_ALPHA, encoder.LORA_RANK = encoder.LORA_ALPHA * rank // encoder.LORA_RANK, rank
    epochs = epochs or encoder.EPOCHS
    base = encoder.SHIPPED
    base.learning_rate, base.head_learning_rate = base.learning_rate * lr_scale, base.head_learning_rate * lr_scale
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps({"seed": seed, "batch": encoder.BATCH, "lr_scale": lr_scale,
                                                 "bf16": bf16, "lora_rank": encoder.LORA_RANK,
                                                 "lora_alpha": encoder.LORA_ALPHA, "epochs": epochs,
                                                 "learning_rate": base.learning_rate,
                                                 "head_learning_rate": base.head_learning_rate}) + "\n")
    train.build(out, data_path=data, fits_only=True, fit_part=str(FOLD + 1), oof_cache=out / "safety_oof.npz",
                base=encoder.SHIPPED, seeds=(seed,), seed=seed, epochs=epochs)


def _paragraph(start: str) -> str:
    """The paragraph of this module's docstring that begins with `start`, on one line (a result's "what")."""
    return next(p for p in __doc__.split("\n\n") if p.startswith(start)).replace("\n", " ")


def _rates(refused, unsafe) -> dict:
    return {"recall": round(float(refused[unsafe].mean()), 4), "harmless_refused": round(float(refused[~unsafe].mean()), 4)}


def _held_quarter() -> tuple:
    """(indices into dev, train.rule_readings of those prompts, the sidecar's operating point) of FOLD's held-out
    quarter: what every fit of this benchmark is read on."""
    from toonark.prompt_safety import evalset, train
    from toonark.prompt_safety.classifier import default_paths
    dev = [e for e in evalset.load() if e.split == "dev"]
    held = train.fold_splits(dev)[FOLD][1]
    point = {k: v for k, v in json.loads(default_paths()[1].read_text()).items()
             if k in ("threshold", "vetoes", "short_vetoes", "min_words", "veto_min_words")}
    return held, train.rule_readings([dev[i] for i in held]), point


def report(folder: Path, json_path: Path | None, reference: Path | None) -> dict:
    """Per fit (folder/s<seed>/ or a recipe's folder/b<batch>/, the fit() files): the held-out quarter's rates at
    the shipped point and the fit's seconds (its fit.log); the spread across fits; and, with `reference` (the
    shipped fits' safety_oof.npz), how seed 0 compares with it."""
    import numpy as np

    from toonark.prompt_safety import train
    held, readings, point = _held_quarter()
    unsafe, blind = readings["unsafe"], readings["blind"]
    seeds = {}
    for path in sorted(p for p in folder.glob("*") if p.is_dir()):
        recipe = json.loads((path / "recipe.json").read_text()) if (path / "recipe.json").exists() else {}
        seed = recipe.get("seed", int(path.name[1:]) if path.name[1:].isdigit() else 0)
        if not _fit_file(path, seed).exists():
            continue
        scores = np.load(_fit_file(path, seed))["held"]
        whole = train.decisions(point, scores, readings)
        log = (path / "fit.log").read_text() if (path / "fit.log").exists() else ""
        seeds[path.name] = {"recipe": recipe, "fit_seconds": _seconds(log),
            "classifier_alone": _rates(scores >= point["threshold"], unsafe),
            "whole_filter": {**_rates(whole, unsafe), "recall_blind": round(float(whole[unsafe & blind].mean()), 4)},
            "classifier_alone_recall_at_harmless_refused_pct": recall_curves(scores, readings, HARMLESS_REFUSED, ())[0],
            "scores": scores}
    if not seeds:
        raise SystemExit(f"{folder}: no s<seed>/ or b<batch>/ folder with "
                         f"{_fit_file(Path('.'), 0).name.replace('seed0', 'seed<seed>')} (the files `gpu_session.sh "
                         f"safety-seeds` writes)")
    spread = {part: {m: round(max(s[part][m] for s in seeds.values()) - min(s[part][m] for s in seeds.values()), 4)
                     for m in seeds[min(seeds)][part]} for part in ("classifier_alone", "whole_filter",
                                                                    "classifier_alone_recall_at_harmless_refused_pct")}
    result = {"what": _paragraph("Round 11's final model") + (" " + _paragraph("`fit --batch N") if any(
                  r["recipe"] for r in seeds.values()) else ""), "fold": FOLD + 1, "held_out_prompts": len(held),
              "unsafe": int(unsafe.sum()), "harmless": int((~unsafe).sum()), "point": point,
              "seeds": {s: {k: v for k, v in r.items() if k != "scores"} for s, r in sorted(seeds.items())},
              "spread_max_minus_min": spread}
    if reference is not None and "s0" in seeds:
        shipped = np.load(reference)["oof"][held]
        result["seed0_vs_shipped_fits_max_abs_diff"] = float(np.abs(seeds["s0"]["scores"] - shipped).max())
    print(f"fold {FOLD + 1}: {len(held)} held-out dev prompts ({result['unsafe']} unsafe); point {point}")
    print("| fit | seconds | classifier alone: recall % / harmless refused % | its recall % at 1 / 2 % harmless "
          "refused | whole filter | whole filter, blind recall % |")
    print("|---|---|---|---|---|---|")
    for s, r in sorted(seeds.items()):
        a, w, c = r["classifier_alone"], r["whole_filter"], r["classifier_alone_recall_at_harmless_refused_pct"]
        print(f"| {s} | {r['fit_seconds']} | {100 * a['recall']:.2f} / {100 * a['harmless_refused']:.2f} | {c['1']} / {c['2']} | "
              f"{100 * w['recall']:.2f} / {100 * w['harmless_refused']:.2f} | {100 * w['recall_blind']:.2f} |")
    print("spread (max - min):", spread)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


HARMLESS_REFUSED = (0.005, 0.01, 0.02, 0.03, 0.05)       # the classifier alone, read at these rates
BUDGETS = (0.02, 0.025, 0.03, 0.035, 0.04, 0.05)           # the whole filter's best recall within these


def _seconds(log: str) -> int | None:
    """A fit's seconds from the "rc 0 after N s" line gpu_session.sh's fits end their logs with (None: no such line)."""
    import re
    found = re.findall(r"^rc 0 after (\d+) s$", log, re.M)
    return int(found[-1]) if found else None


def _fit_seconds(logs: Path) -> dict:
    """{part log: seconds} of a tar of fit logs (_seconds)."""
    import tarfile
    if not logs.exists():
        return {}
    with tarfile.open(logs) as archive:
        texts = {m.name: archive.extractfile(m).read().decode("utf-8", "replace") for m in archive.getmembers() if m.isfile()}
    return {name.removesuffix(".log"): seconds for name, text in sorted(texts.items())
            if (seconds := _seconds(text)) is not None}


def recall_curves(scores, readings: dict, rates, budgets) -> tuple[dict, dict, list]:
    """Of out-of-fold scores and train.rule_readings: the classifier alone's recall % at each harmless-refused rate,
    the whole filter's best blind recall % within each budget (None: no grid point refuses that few harmless
    prompts), and the grid (train.operating_grid) they come from."""
    import numpy as np

    from toonark.prompt_safety import train
    unsafe = readings["unsafe"]
    harmless = np.sort(scores[~unsafe])[::-1]
    alone = {f"{100 * rate:g}": round(100 * float((scores[unsafe] > harmless[int(rate * len(harmless))]).mean()), 2)
             for rate in rates}
    grid = train.operating_grid(scores, readings["words"], readings["layers"], unsafe, readings["blind"])
    best = {f"{100 * b:g}": max((round(100 * r, 2) for r, w, _ in grid if w <= b), default=None) for b in budgets}
    return alone, best, grid


RECALL_LEVELS = (0.985, 0.99, 0.9925)     # the whole filter's fewest harmless refused at these blind recalls


def recipes(folder: Path, reference: Path, json_path: Path | None) -> dict:
    """The recipe trial, here: each NAME.npz in `folder` (fold 1's held-out scores, `held`, of one fit: what a
    safety-seeds run's part files hold) and the shipped fits' fold-1 scores (`reference`, their safety_oof.npz),
    read on fold 1's held-out quarter with the rules as they are: the classifier alone's recall at
    HARMLESS_REFUSED, the whole filter at the sidecar's point, its fewest harmless refused at each of RECALL_LEVELS
    (train.operating_grid) and the point train.choose_operating_point picks on this quarter alone."""
    import numpy as np

    from toonark.prompt_safety import train
    held, readings, point = _held_quarter()
    unsafe, blind = readings["unsafe"], readings["blind"]
    runs = {"shipped": np.load(reference)["oof"][held]} | {f.stem: np.load(f)["held"] for f in sorted(folder.glob("*.npz"))}
    result = {"what": recipes.__doc__.replace("\n    ", " "), "fold": FOLD + 1, "held_out_prompts": len(held),
              "blind_unsafe": int((unsafe & blind).sum()), "harmless": int((~unsafe).sum()), "point": point, "runs": {}}
    for name, scores in runs.items():
        alone, _, grid = recall_curves(scores, readings, HARMLESS_REFUSED, ())
        whole = train.decisions(point, scores, readings)
        fewest = {f"{100 * level:g}": min((round(100 * w, 3) for r, w, _ in grid if r >= level), default=None)
                  for level in RECALL_LEVELS}
        chosen, metrics = train.choose_operating_point(scores, readings["words"], readings["layers"], unsafe, blind,
                                                       readings["beside_idiom"])
        result["runs"][name] = {
            "classifier_alone_recall_at_harmless_refused_pct": alone,
            "whole_filter_at_point_pct": {"recall_blind": round(100 * float(whole[unsafe & blind].mean()), 2),
                                          "harmless_refused": round(100 * float(whole[~unsafe].mean()), 3)},
            "whole_filter_fewest_harmless_refused_pct_at_blind_recall": fewest,
            "chosen_on_this_quarter": {**metrics, "point": chosen}}
        print(f"{name:20s} alone {alone}  at the point {result['runs'][name]['whole_filter_at_point_pct']}  "
              f"fewest harmless {fewest}  chosen {metrics['recall_on_prompts_the_rules_were_not_written_from']} / "
              f"{metrics['harmless_refused_all_dev']} (threshold {chosen['threshold']})")
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def soups(runs: dict[str, Path], json_path: Path | None) -> dict:
    """Per run (a fits folder with safety_oof.npz of a soup): for each fit alone, the fits' scores averaged and the
    soup, the classifier alone's recall at HARMLESS_REFUSED, the whole filter's best blind recall within each of
    BUDGETS (train.operating_grid) and the point train.choose_operating_point picks at tolerance 0 and 1."""
    import numpy as np

    from toonark.prompt_safety import evalset, train
    dev = [e for e in evalset.load() if e.split == "dev"]
    readings = train.rule_readings(dev)
    unsafe, blind = readings["unsafe"], readings["blind"]
    result = {"what": _paragraph("`soups` compares"), "dev_prompts": len(dev),
              "blind_unsafe": int((unsafe & blind).sum()), "harmless": int((~unsafe).sum()), "runs": {}}
    for name, folder in runs.items():
        stored = np.load(folder / "safety_oof.npz")
        scores = {f"seed {s} alone": stored["oof_seeds"][i] for i, s in enumerate(stored["seeds"])}
        scores |= {"scores averaged": stored["oof_seeds"].mean(0), "soup": stored["oof"]}
        rows = {}
        for label, oof in scores.items():
            alone, frontier, _ = recall_curves(oof, readings, HARMLESS_REFUSED, BUDGETS)
            chosen = {}
            for tolerance in (0.0, 1.0):
                train.RECALL_TOLERANCE_SE, kept = tolerance, train.RECALL_TOLERANCE_SE
                try:
                    point, metrics = train.choose_operating_point(oof, readings["words"], readings["layers"], unsafe, blind)
                finally:
                    train.RECALL_TOLERANCE_SE = kept
                chosen[f"{tolerance:g}"] = {"recall_blind": metrics["recall_on_prompts_the_rules_were_not_written_from"],
                                            "harmless_refused": metrics["harmless_refused_all_dev"], "point": point}
            rows[label] = {"classifier_alone_recall_at_harmless_refused_pct": alone,
                           "whole_filter_best_blind_recall_within_budget_pct": frontier,
                           "median_p_unsafe_of_harmless": round(float(np.median(oof[~unsafe])), 6),
                           "chosen_at_tolerance_se": chosen}
            print(f"{name:12s} {label:16s} alone {alone}  whole {frontier}  "
                  f"tol 1: {chosen['1']['recall_blind']:.4f} / {chosen['1']['harmless_refused']:.4f}")
        result["runs"][name] = {"folder": str(folder), "seeds": [int(s) for s in stored["seeds"]],
                                "soup_adapter_sha256": json.loads((folder / "safety_fit.json").read_text())["adapter"]["sha256"],
                                "fit_seconds": _fit_seconds(folder / "logs.tgz"), "scores": rows}
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fit", help="fit fold 1 with one seed (on the GPU machine)")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--batch", type=int, help="examples a step (default: the recipe's, encoder.BATCH)")
    one.add_argument("--lr-scale", type=float, default=1.0, help="the base's learning rates times this")
    one.add_argument("--bf16", action="store_true", help="the forward pass under bf16 autocast")
    one.add_argument("--data", type=Path, help="the labelled set to fit on (default: the checkout's; a trial on "
                                               "another branch's data carries it as a file)")
    one.add_argument("--rank", type=int, help="LoRA's rank, alpha scaled with it (default: encoder.LORA_RANK)")
    one.add_argument("--epochs", type=int, help="passes over the data (default: encoder.EPOCHS)")
    rep = sub.add_parser("report", help="the seeds' rates on the held-out quarter, here")
    rep.add_argument("folder", type=Path)
    rep.add_argument("--json", type=Path)
    rep.add_argument("--reference", type=Path, help="the shipped fits' safety_oof.npz (seed 0 should match it)")
    trial = sub.add_parser("recipes", help="the recipe trial's fits vs the shipped fold model on fold 1, here")
    trial.add_argument("folder", type=Path, help="NAME.npz files holding fold 1's held-out scores (`held`)")
    trial.add_argument("--reference", type=Path, required=True, help="the shipped fits' safety_oof.npz")
    trial.add_argument("--json", type=Path)
    many = sub.add_parser("soups", help="each fit of a soup vs their scores averaged vs the soup, on dev, here")
    many.add_argument("runs", nargs="+", help="NAME=FOLDER (a fits folder holding safety_oof.npz)")
    many.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "fit":
        fit(args.seed, args.out, args.batch, args.lr_scale, args.data, args.bf16, args.rank, args.epochs)
    elif args.command == "recipes":
        recipes(args.folder, args.reference, args.json)
    elif args.command == "soups":
        soups({name: Path(folder) for name, folder in (run.split("=", 1) for run in args.runs)}, args.json)
    else:
        report(args.folder, args.json, args.reference)


if __name__ == "__main__":
    main()
