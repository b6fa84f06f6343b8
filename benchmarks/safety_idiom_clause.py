"""Word-rule hits beside an allowed idiom, and what reading the idiom-free text too changes (LayeredFilter.idiom_free).

For every prompt whose first rule hit is a word hit lying wholly outside every word-list allow-rule match ("kills"
in "a killer workout then he kills his trainer"): the shipped classifier's score of the reading the rule matched in
and of that reading without the idioms, the word veto there, and whether the veto excused it before (the reading
alone under the veto) and now (both under it). Dev prompts and, optionally, writing batches not merged yet (both
halves, with perturbations, prompts already in DEDUPE_SET skipped).

    .venv/bin/python benchmarks/safety_idiom_clause.py OUT.json [--blind DIR DEDUPE_SET N ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toonark.files import atomic_file  # noqa: E402
from toonark.prompt_safety import evalset  # noqa: E402
from toonark.prompt_safety.layered import LayeredFilter  # noqa: E402
from toonark.prompts import PromptPolicy  # noqa: E402


def word_hits_beside_idioms(layered: LayeredFilter, examples) -> list[dict]:
    """One row per example whose first rule hit is a word hit beside an idiom (see the module docstring)."""
    rows = []
    for e in examples:
        hit = next(layered.rule_hits(e.text), None)
        alone = layered.idiom_free(*hit) if hit is not None else None
        if alone is None:
            continue
        refusal, reading = hit
        veto = layered.classifier.point.veto(refusal.layer, len(reading.split()))
        whole = round(layered.classifier.score(reading).unsafe, 4)
        before = whole < veto
        rows.append({"text": e.text, "unsafe": e.unsafe, "split": e.split, "reading": reading, "idiom_free": alone,
                     "score": whole, "idiom_free_score": round(layered.classifier.score(alone).unsafe, 4),
                     "veto": veto, "excused_before": before, "refused_now": layered.verdict(e.text) is not None})
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for name, unsafe in (("unsafe", True), ("harmless", False)):
        part = [r for r in rows if r["unsafe"] == unsafe]
        out[name] = {"prompts": len(part), "excused_before": sum(r["excused_before"] for r in part),
                     "newly_refused": sum(r["excused_before"] and r["refused_now"] for r in part)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--blind", nargs="+", metavar="DIR DEDUPE_SET N",
                        help="a folder of batch-N.json files, the labelled set to skip duplicates of, batch numbers")
    args = parser.parse_args()
    layered = LayeredFilter.build(PromptPolicy.load()._rules)
    parts = {"dev": [e for e in evalset.load() if e.split == "dev"]}
    if args.blind:
        folder, dedupe, numbers = Path(args.blind[0]), Path(args.blind[1]), args.blind[2:]
        parts["blind"] = [e for n in numbers
                          for e in evalset.batch_examples(evalset.read_batch(folder / f"batch-{n}.json"), dedupe)]
    result = {"what": __doc__.split("\n\n")[1].replace("\n", " ")}
    for name, examples in parts.items():
        rows = word_hits_beside_idioms(layered, examples)
        result[name] = {"prompts": len(examples), "beside_idiom": summary(rows), "rows": rows}
        print(name, len(examples), "prompts:", json.dumps(result[name]["beside_idiom"]))
        for r in rows:
            if r["excused_before"] and r["refused_now"]:
                print(f"  newly refused ({'unsafe' if r['unsafe'] else 'harmless'}): {r['text']!r} "
                      f"{r['score']} / {r['idiom_free_score']} ({r['idiom_free']!r})")
    with atomic_file(args.out, "w") as fh:
        fh.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
