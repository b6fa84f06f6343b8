"""The shipped text classifier: character and word n-gram TF-IDF + logistic regression, trained by
`make safety-model` (toonark.prompt_safety.train) and run here with onnxruntime only.

The model reads the normalised text (toonark.prompts.normalize), so obfuscations the normaliser
undoes never reach it; its character n-grams are what carries it past misspellings and paraphrases
the rules do not list. onnxruntime (and numpy with it) are imported on first use, so importing the
prompt policy stays light.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "safety_classifier.onnx"
SIDECAR_NAME = "safety_classifier.json"
INPUT_NAME = "text"


class ClassifierFileError(ValueError):
    """The .onnx file and its sidecar do not belong together (or one is missing)."""


def default_paths() -> tuple[Path, Path]:
    data = resources.files("toonark") / "data"
    return Path(str(data / MODEL_NAME)), Path(str(data / SIDECAR_NAME))


@dataclass(frozen=True)
class Score:
    category: str        # the most likely unsafe category
    unsafe: float        # 1 - P(safe)
    threshold: float
    vetoes: tuple[tuple[str, float], ...] = ()   # (rule layer, score under which its hit is excused)

    @property
    def refused(self) -> bool:
        return self.unsafe >= self.threshold

    def excuses(self, layer: str) -> bool:
        """True when the classifier reads the prompt as clearly harmless for a hit of that rule layer
        ("a palette knife spreading buttercream": the word rule fires, the context is a cake)."""
        return any(layer == name and self.unsafe < veto for name, veto in self.vetoes)


class SafetyClassifier:
    """Scores one normalised prompt. Labels, threshold, the rule vetoes and the model's sha256 come from
    the sidecar JSON written beside the .onnx; a model that does not match its sidecar is refused at load."""

    def __init__(self, model_path: Path | None = None, sidecar_path: Path | None = None):
        default_model, default_sidecar = default_paths()
        self.model_path = Path(model_path or default_model)
        self.sidecar_path = Path(sidecar_path or default_sidecar)
        try:
            self.info = json.loads(self.sidecar_path.read_text(encoding="utf-8"))
            blob = self.model_path.read_bytes()
        except FileNotFoundError as exc:
            raise ClassifierFileError(f"{exc.filename}: missing; rebuild the classifier with `make safety-model`") from None
        digest = hashlib.sha256(blob).hexdigest()
        if digest != self.info.get("onnx_sha256"):
            raise ClassifierFileError(f"{self.model_path}: sha256 {digest[:12]}... does not match its sidecar "
                                      f"{self.sidecar_path.name} ({str(self.info.get('onnx_sha256'))[:12]}...); "
                                      f"rebuild both with `make safety-model`")
        self.labels: list[str] = list(self.info["labels"])
        self.safe_label: str = self.info["safe_label"]
        self.threshold = float(self.info["threshold"])
        # Sidecars before version 2 have no vetoes: every rule hit stands.
        self.vetoes = tuple((layer, float(v)) for layer, v in sorted(self.info.get("vetoes", {}).items()))
        self._blob = blob
        self._session = None

    def _run(self, texts: list[str]):
        import numpy as np
        if self._session is None:
            import onnxruntime as ort
            options = ort.SessionOptions()
            # One prompt is microseconds of work: threads would only add wake-up latency, and the
            # Triton preprocess shares the host with the other models.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self._blob, options, providers=["CPUExecutionProvider"])
        feed = {INPUT_NAME: np.array(texts, dtype=object).reshape(-1, 1)}
        return self._session.run(["probabilities"], feed)[0]

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text: label -> probability (normalised texts in, as the model was trained)."""
        rows = self._run(list(texts))
        return [{label: float(p) for label, p in zip(self.labels, row)} for row in rows]

    def scores(self, texts: list[str]) -> list[Score]:
        out = []
        for probs in self.probabilities(texts):
            unsafe = {k: v for k, v in probs.items() if k != self.safe_label}
            category = max(unsafe, key=unsafe.get)
            out.append(Score(category, 1.0 - probs[self.safe_label], self.threshold, self.vetoes))
        return out

    def score(self, text: str) -> Score:
        return self.scores([text])[0]
