"""The fp32 reference model (the shipped adapter merged into MPNet, as a build reads parity rows) on every 120th of
the first 120,000 prompts, data order vs classifier.by_length: time and the largest difference.
usage: PYTHONPATH=<checkout> python fp32_order.py"""
import time, json
from toonark.prompt_safety import evalset, encoder, train
from toonark.prompt_safety.classifier import by_length, default_paths
from toonark.prompts import normalize
side = json.loads(default_paths()[1].read_text())
blob = (default_paths()[0].parent / "safety_adapter.safetensors").read_bytes()
ref = train.reference_model(blob, side["labels"], encoder.SHIPPED)
texts = [normalize(e.text) for e in evalset.load()[:120000:120]]
t = time.perf_counter(); a = ref.probabilities(texts); t1 = time.perf_counter() - t
t = time.perf_counter()
b = by_length(encoder._tokenizer(encoder.SHIPPED), texts, ref.probabilities)
t2 = time.perf_counter() - t
print(len(texts), f"fp32 data order {t1:.1f} s, by length {t2:.1f} s, max diff {abs(a - b).max():.2e}")
