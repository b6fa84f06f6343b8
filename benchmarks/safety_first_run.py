"""First (blind) run of writing batches not merged yet on the filter of the checkout on PYTHONPATH: each batch's
both halves with perturbations, its prompts already in DEDUPE_SET skipped; totals per batch into OUT.json under
LABEL (written after every batch, temp file then rename).
usage: PYTHONPATH=<checkout> python benchmarks/safety_first_run.py OUT.json LABEL DEDUPE_SET BATCH_DIR N [N ...]
(BATCH_DIR holds batch-N.json in scripts/safety_add_batch.py's schema; DEDUPE_SET: a safety_prompts.json)"""
import json
import sys
import time
from pathlib import Path

from toonark.files import atomic_file
from toonark.prompt_safety import evalset, evaluate


def main():
    out, label, dedupe, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    result = json.loads(out.read_text()) if out.exists() else {}
    runs = result.setdefault(label, {"batches": {}})
    for n in [int(n) for n in sys.argv[5:]]:
        new = evalset.read_batch(folder / f"batch-{n}.json")
        start = time.perf_counter()
        report = evaluate.evaluate_shipped(evalset.batch_examples(new, dedupe), "all")
        row = evaluate.totals(report) | {"style": new["style"], "seconds": round(time.perf_counter() - start, 1)}
        runs["batches"][str(n)] = row
        print(n, label, row["recall"], row["harmless_refused"], row["seconds"], flush=True)
        with atomic_file(out, "w") as fh:
            fh.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
