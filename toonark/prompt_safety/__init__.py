"""Kid-safe prompt checking beyond a word list: phrase and relation rules, idiom allow-rules, a
language check, a small shipped ONNX classifier, negative-prompt rules, and the labelled evaluation
set that measures them (see README "Kid-safe prompts"). `toonark.prompts.PromptPolicy.check`
delegates here; nothing in this package imports torch, and numpy/onnxruntime load on first use.
"""
from toonark.prompt_safety.layered import LANGUAGE, LAYERS, LayeredFilter, SafetyRefused, filter_for, refusal_labels

__all__ = ["LANGUAGE", "LAYERS", "LayeredFilter", "SafetyRefused", "filter_for", "refusal_labels"]
