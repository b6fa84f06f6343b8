"""Pooled features (the head's input) of the shipped int8 graph, one normalised text at a time as served.
usage: features.py TEXTS.json OUT.npy  (run with the shipped checkout on PYTHONPATH)"""
import json, sys, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np

POOLED = "/inner/Div_output_0"

def _session():
    import onnx, onnxruntime as ort
    from toonark.prompt_safety.classifier import default_paths
    m = onnx.load(str(default_paths()[0]))
    m.graph.output.append(onnx.helper.make_tensor_value_info(POOLED, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

def run(texts):
    from toonark.prompt_safety.classifier import encode
    from toonark.prompt_safety.layered import _default_classifier
    clf = _default_classifier(); clf.score("warm up"); tok = clf._tokenizer
    s = _session()
    out = np.zeros((len(texts), 768), np.float32); probs = []
    for i, t in enumerate(texts):
        ids, mask = encode(tok, [t])
        p, f = s.run(["probabilities", POOLED], {"input_ids": ids, "attention_mask": mask})
        out[i] = f[0]; probs.append(p[0])
    return out, np.array(probs, np.float32)

if __name__ == "__main__":
    texts = json.load(open(sys.argv[1]))
    k = (len(texts) + 1) // 2
    t0 = time.time()
    with ProcessPoolExecutor(2) as pool:
        parts = list(pool.map(run, [texts[:k], texts[k:]]))
    np.savez(sys.argv[2], feats=np.concatenate([p[0] for p in parts]), probs=np.concatenate([p[1] for p in parts]))
    print(len(texts), round(time.time() - t0, 1), "s")
