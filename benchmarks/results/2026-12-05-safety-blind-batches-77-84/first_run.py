"""First (blind) run of writing batches on the filter of the checkout on PYTHONPATH.
usage: PYTHONPATH=<checkout> python first_run.py OUT.json LABEL DEDUPE_SET N [N ...]
(the batch files beside this script; DEDUPE_SET: a safety_prompts.json whose prompts are skipped)"""
import json, sys, time
from pathlib import Path
from toonark.prompt_safety import evalset, evaluate

def main():
    out, label, dedupe, numbers = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), [int(n) for n in sys.argv[4:]]
    result = json.loads(out.read_text()) if out.exists() else {}
    runs = result.setdefault(label, {"batches": {}})
    for n in numbers:
        new = evalset.read_batch(Path(__file__).parent / f"batch-{n}.json")
        examples = evalset.batch_examples(new, dedupe)
        start = time.perf_counter()
        report = evaluate.evaluate_shipped(examples, "all")
        row = evaluate.totals(report)
        row["style"] = new["style"]
        row["seconds"] = round(time.perf_counter() - start, 1)
        runs["batches"][str(n)] = row
        print(n, label, row.get("recall"), row.get("harmless_refused"), row["seconds"], flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)


if __name__ == "__main__":
    main()
