"""The shipped text classifier: a sentence encoder (the sidecar names it: all-mpnet-base-v2 since 2026-12-02)
fine-tuned on the project's labelled prompts (LoRA adapter + head, toonark.prompt_safety.encoder), run here
with onnxruntime and the `tokenizers` library only.

Files (toonark/data): safety_classifier.json (tracked sidecar: labels, threshold, vetoes, the adapter's and
the reference build's sha256, metrics), safety_adapter.safetensors (tracked: the project's trained numbers),
and, built from those two by `make setup` (scripts/safety_model.py --build-onnx; ignored by git),
safety_classifier.onnx (int8 graph: token ids -> label probabilities) and safety_tokenizer.json (the base's
tokenizer). The model reads the normalised text (toonark.prompts.normalize), so obfuscations the
normaliser undoes never reach it. onnxruntime and tokenizers are imported on first use, so importing the
prompt policy stays light.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "safety_classifier.onnx"
SIDECAR_NAME = "safety_classifier.json"
ADAPTER_NAME = "safety_adapter.safetensors"
TOKENIZER_NAME = "safety_tokenizer.json"
SCORE_CACHE_PROMPTS = 4096      # scores kept per process (a few hundred bytes each)
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "probabilities"
MAX_TOKENS = 64      # prompts are clipped to 77 CLIP tokens; 64 WordPiece tokens cover them
# How far the int8 graph's P(unsafe) of a probe prompt may be from the fp32 model's on the serving host. Round 10's
# 29 probes on an AVX2-only host: the 7-bit graph at most 0.031 off ("a naked mole rat in a tunnel"), the full-range
# graph 0.31 off on make demo's prompt and 0.58-0.95 on every unsafe one.
PROBE_TOLERANCE = 0.1
_REBUILD = "build it with `make setup` (or `.venv/bin/python scripts/safety_model.py --build-onnx`)"


def encode(tokenizer, texts: list[str]):
    """(input_ids, attention_mask), int64 numpy, padded to the longest text: what the graph (and, as torch
    tensors, the model it was exported from) reads."""
    import numpy as np
    encoded = tokenizer.encode_batch(list(texts))
    ids = np.zeros((len(encoded), max(len(e.ids) for e in encoded)), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
    return ids, mask


def by_length(tokenizer, texts: list[str], read):
    """read(texts), the texts handed over in order of token count and the rows put back in the texts' order:
    batches of like lengths pad little. A build's bulk readings (~213 k prompts by round 16) take half the time
    read so; the int8 graph's activations are quantised per batch, and its scores read this way are as close to
    the served one-prompt-a-call reading as data order's (2 verdicts of 1,000 flipped at the threshold vs 4;
    benchmarks/results/2026-12-06-safety-int8-batch-order)."""
    import numpy as np
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer.encode(texts[i]).ids))
    rows = read([texts[i] for i in order])
    out = np.empty_like(rows)
    out[order] = rows
    return out


def run_graph(session, tokenizer, texts: list[str], batch: int = 64):
    """Label probabilities (numpy, one row per text) from the built graph, `batch` texts a call."""
    import numpy as np
    rows = []
    for start in range(0, len(texts), batch):
        ids, mask = encode(tokenizer, texts[start:start + batch])
        rows.append(session.run([OUTPUT], {INPUTS[0]: ids, INPUTS[1]: mask})[0])
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


class ClassifierFileError(ValueError):
    """The built model, its tokenizer and the sidecar do not belong together (or one is missing)."""


def data_dir() -> Path:
    return Path(str(resources.files("toonark") / "data"))


def default_paths() -> tuple[Path, Path]:
    return data_dir() / MODEL_NAME, data_dir() / SIDECAR_NAME


@dataclass(frozen=True)
class Score:
    category: str        # the most likely unsafe category
    unsafe: float        # 1 - P(safe)
    threshold: float

    @property
    def refused(self) -> bool:
        return self.unsafe >= self.threshold


@dataclass(frozen=True)
class OperatingPoint:
    """How the layered filter reads a Score, from the sidecar (chosen out of fold on dev by
    train.choose_operating_point): the threshold, the fewest words the classifier reads, and the vetoes
    (rule layer -> P(unsafe) under which that layer's hit is excused: the rule word in a harmless context,
    "a palette knife spreading buttercream"). A prompt under veto_min_words words cannot set a context, so
    it gets the near-certainty `short_vetoes` ("rifle colorado", the town, reads 0.001)."""
    threshold: float
    min_words: int                  # shorter prompts are left to the rules
    veto_min_words: int
    vetoes: dict[str, float]
    short_vetoes: dict[str, float]

    @classmethod
    def from_sidecar(cls, info: dict) -> "OperatingPoint":
        return cls(float(info["threshold"]), int(info["min_words"]), int(info["veto_min_words"]),
                   {k: float(v) for k, v in info.get("vetoes", {}).items()},
                   {k: float(v) for k, v in info.get("short_vetoes", {}).items()})

    def veto(self, layer: str, words: int) -> float:
        """P(unsafe) under which a `layer` rule hit in a prompt of `words` normalised words is excused; 0:
        never (also when the classifier does not read prompts that short)."""
        if words < self.min_words:
            return 0.0
        return (self.vetoes if words >= self.veto_min_words else self.short_vetoes).get(layer, 0.0)


class SafetyClassifier:
    """Scores normalised prompts. Labels, threshold and the rule vetoes come from the sidecar JSON; a built
    graph whose adapter sha256 (in its metadata) is not the sidecar's, or a tokenizer file that is not the
    one the sidecar names, is refused at load: a stale build never scores a prompt."""

    def __init__(self, model_path: Path | None = None, sidecar_path: Path | None = None):
        default_model, default_sidecar = default_paths()
        self.model_path = Path(model_path or default_model)
        self.sidecar_path = Path(sidecar_path or default_sidecar)
        self.tokenizer_path = self.model_path.with_name(TOKENIZER_NAME)
        try:
            self.info = json.loads(self.sidecar_path.read_text(encoding="utf-8"))
            blob = self.model_path.read_bytes()
            tokenizer = self.tokenizer_path.read_bytes()
        except FileNotFoundError as exc:
            raise ClassifierFileError(f"{exc.filename}: missing; {_REBUILD}") from None
        if self.info.get("version") != 3:
            raise ClassifierFileError(f"{self.sidecar_path}: sidecar version {self.info.get('version')!r}, expected 3 "
                                      f"(the encoder classifier); retrain with `make safety-model`")
        digest = hashlib.sha256(tokenizer).hexdigest()
        if digest != self.info["tokenizer_sha256"]:
            raise ClassifierFileError(f"{self.tokenizer_path}: sha256 {digest[:12]}... is not the sidecar's "
                                      f"({self.info['tokenizer_sha256'][:12]}...); {_REBUILD}")
        self.labels: list[str] = list(self.info["labels"])
        self.safe_label: str = self.info["safe_label"]
        self.point = OperatingPoint.from_sidecar(self.info)
        self._blob, self._tokenizer_text = blob, tokenizer.decode("utf-8")
        self._session = self._tokenizer = None
        self._load()
        # Children ask for the same pictures again and again ("a cute puppy"): a repeat costs a dict lookup
        # instead of ~11 ms of CPU (Scores are immutable, so one object serves every caller).
        self._remembered = functools.lru_cache(maxsize=SCORE_CACHE_PROMPTS)(self._score_alone)

    def _load(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer
        options = ort.SessionOptions()
        # One thread: MPNet int8 is ~11 ms a prompt on one thread and ~9 ms on two (same scores, measured on
        # 1,000 prompts), and the Triton preprocess shares the host with the other models. It stays on the
        # CPU: a refused request does no GPU work.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(self._blob, options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        adapter = self.info["adapter"]["sha256"]
        if meta.get("adapter_sha256") != adapter:
            raise ClassifierFileError(f"{self.model_path}: built from adapter {str(meta.get('adapter_sha256'))[:12]}..., "
                                      f"the sidecar names {adapter[:12]}... (stale build); {_REBUILD}")
        if meta.get("labels", "").split(",") != self.labels:
            raise ClassifierFileError(f"{self.model_path}: labels {meta.get('labels')!r} are not the sidecar's; {_REBUILD}")
        tokenizer = Tokenizer.from_str(self._tokenizer_text)
        tokenizer.enable_truncation(MAX_TOKENS)
        self._check_probes(session, tokenizer)
        self._session, self._tokenizer = session, tokenizer

    def _check_probes(self, session, tokenizer) -> None:
        """Score the sidecar's probe prompts (train.probes: the fp32 model's P(unsafe)) on this host, one at a time
        as served, and refuse the graph when one is more than PROBE_TOLERANCE off: onnxruntime's int8 kernels
        differ by CPU (full-range u8s8 saturates on x86 without VNNI), so a graph right on the build host can
        misread every prompt on the serving one. ~25 prompts, ~0.3 s a load."""
        safe = self.labels.index(self.safe_label)
        if self.info.get("quantization", {}).get("reduce_range"):
            import onnxruntime
            fix = (f"Its weights are 7-bit already: use the onnxruntime it was built with "
                   f"({self.info.get('built_with', {}).get('onnxruntime')}; this host has {onnxruntime.__version__}), "
                   f"or serve on another CPU")
        else:
            fix = (f"Rebuild it with 7-bit weights: set quantization.reduce_range to true in {self.sidecar_path.name}, "
                   f"then run `make setup`")
        for probe in self.info.get("probes", []):
            unsafe = 1.0 - float(run_graph(session, tokenizer, [probe["text"]])[0][safe])
            if abs(unsafe - probe["unsafe"]) > PROBE_TOLERANCE:
                raise ClassifierFileError(
                    f"{self.model_path}: on this host the int8 graph scores the probe prompt {probe['text']!r} "
                    f"P(unsafe) {unsafe:.4f} where the fp32 model scores {probe['unsafe']:.4f} (at most "
                    f"{PROBE_TOLERANCE} apart): this CPU's onnxruntime int8 kernels misread the graph. {fix}")

    def probabilities(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text: label -> probability (normalised texts in, as the model was trained)."""
        rows = run_graph(self._session, self._tokenizer, list(texts))
        return [{label: float(p) for label, p in zip(self.labels, row)} for row in rows]

    def scores(self, texts: list[str]) -> list[Score]:
        out = []
        for probs in self.probabilities(texts):
            unsafe = {k: v for k, v in probs.items() if k != self.safe_label}
            category = max(unsafe, key=unsafe.get)
            out.append(Score(category, 1.0 - probs[self.safe_label], self.point.threshold))
        return out

    def score(self, text: str) -> Score:
        """One prompt's Score, as served: run alone (dynamic int8 scales activations per call, so a batch of
        several can move a score slightly) and remembered for the last SCORE_CACHE_PROMPTS prompts."""
        return self._remembered(text)

    def _score_alone(self, text: str) -> Score:
        return self.scores([text])[0]
