"""Shipped filter (PYTHONPATH checkout) on the dev halves of batches FIRST..LAST of the r16 data: every reading
kept (pickle) for analysis. usage: oos_dev.py DATA_DIR FIRST LAST OUT.pkl"""
import pickle, sys
from pathlib import Path
from toonark.prompt_safety import evalset, evaluate

if __name__ == "__main__":
    data, first, last, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    ex = evalset.load(data / "safety_prompts.json")
    num = evaluate.batch_numbers(evaluate.batches(data / "safety_batches.json"))
    chosen = [e for e in ex if e.split == "dev" and first <= num.get(evalset.sha12(e.base), 0) <= last]
    print(len(chosen), flush=True)
    readings = evaluate.shipped_readings([e.text for e in chosen], workers=2)
    pickle.dump([(e, num[evalset.sha12(e.base)], r) for e, r in zip(chosen, readings)], open(out, "wb"))
