"""The shipped int8 graph read in batches of 64 (train._onnx_probabilities, as a build reads ~213 k prompts for round
16) in data order vs sorted by token count: time and how far the scores move, since onnxruntime's dynamic
quantisation scales activations per batch. Every 30th prompt of the first 120,000 of the checkout's data.
usage: PYTHONPATH=<checkout> python batch_order.py OUT.json"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from toonark.prompt_safety import encoder, evalset
from toonark.prompt_safety.classifier import default_paths, run_graph
from toonark.prompts import normalize

if __name__ == "__main__":
    ex = evalset.load()[:120000:30]
    texts = [normalize(e.text) for e in ex]
    tok = Tokenizer.from_str(encoder.SHIPPED.tokenizer_json().decode())
    tok.enable_truncation(encoder.MAX_TOKENS)
    session = ort.InferenceSession(str(default_paths()[0]), providers=["CPUExecutionProvider"])
    threshold = json.loads(default_paths()[1].read_text())["threshold"]
    start = time.perf_counter(); in_order = run_graph(session, tok, texts); t_order = time.perf_counter() - start
    order = sorted(range(len(texts)), key=lambda i: len(tok.encode(texts[i]).ids))
    start = time.perf_counter(); by_length = run_graph(session, tok, [texts[i] for i in order])
    t_sorted = time.perf_counter() - start
    sorted_back = np.empty_like(by_length); sorted_back[order] = by_length
    single = run_graph(session, tok, texts[:1000], batch=1)     # as served: one prompt a call
    unsafe = lambda p: 1.0 - p[:, list(json.loads(default_paths()[1].read_text())["labels"]).index(evalset.SAFE)]
    a, b, s = unsafe(in_order), unsafe(sorted_back), unsafe(single)
    result = {"prompts": len(texts), "seconds_data_order": round(t_order, 1),
              "seconds_sorted_by_length": round(t_sorted, 1),
              "p_unsafe_max_abs_diff_sorted_vs_data_order": round(float(np.abs(a - b).max()), 4),
              "share_moved_over_0.05": round(float((np.abs(a - b) > 0.05).mean()), 4),
              "verdicts_flipped_at_threshold": int(((a >= threshold) != (b >= threshold)).sum()),
              "first_1000_vs_one_a_call": {"data_order_max_abs_diff": round(float(np.abs(a[:1000] - s).max()), 4),
                                           "data_order_flips": int(((a[:1000] >= threshold) != (s >= threshold)).sum()),
                                           "sorted_max_abs_diff": round(float(np.abs(b[:1000] - s).max()), 4),
                                           "sorted_flips": int(((b[:1000] >= threshold) != (s >= threshold)).sum())},
              "threshold": threshold}
    print(json.dumps(result, indent=1))
    with open(sys.argv[1], "w") as fh:
        fh.write(json.dumps(result, indent=1) + "\n")
