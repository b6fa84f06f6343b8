"""toonark's custom Prometheus metrics, reported by the Python models through pb_utils.MetricFamily.

Triton serves them on its metrics port next to its own (GET http://<host>:<metrics port>/metrics):

    toonark_prompt_refusals_total{reason="<category>",   counter  prompts refused by the kid-safety filter
                                  layer="<layer>"}                (preprocess; reason: a category of
                                                                  toonark/data/safety_rules.json or language;
                                                                  layer: word, phrase, classifier, negative
                                                                  or language, the layer that refused; every
                                                                  pair present from startup at 0)
    toonark_steps_total                                   counter  denoising steps served (denoise: one per
                                                                  UNet call, whatever the batch)
    toonark_images_total{format="png"|"webp"|"raw"}           counter  images returned (postprocess; blanked ones too)
    toonark_nsfw_images_total                             counter  images the safety checker flagged and blanked
    toonark_prompt_cache_hits_total / _misses_total /    counters  the prompt-embedding cache (text_encoder;
      _evictions_total / _refused_total                            preprocess in the native layouts;
                                                                  toonark.embedding_cache): lookups answered,
                                                                  lookups that ran the text encoder, entries
                                                                  dropped for room, outputs not stored
    toonark_prompt_cache_bytes{instance=} / _entries{instance=}  gauges  its size now, one series per
                                                                  instance of the model that owns it (each
                                                                  has its own cache)
    toonark_stage_duration_seconds{stage="<model>"}       histogram  time inside each Python model's execute,
                                                                  per request: stage = preprocess, text_encoder,
                                                                  denoise, unet, vae_decoder, safety_checker,
                                                                  postprocess (_bucket / _sum / _count series)

Triton's own series cover the rest: nv_inference_request_success{model=...},
nv_inference_compute_infer_duration_us{model=...}. A prompt answered from the prompt cache does not run the
text encoder's engine, and toonark_stage_duration_seconds{stage="text_encoder"} times engine runs only: it counts
cache misses (nv_inference_request_success{model="text_encoder"} counts every request of the python layout,
where text_encoder is an ensemble step).

Families are created once per stub process (a family of the same name, kind and description from
several models is one family: Triton 2.51 shares it; the stage label tells the models apart).
Everything degrades to a no-op outside Triton (unit tests import the models' helpers without pb_utils).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

# Seconds; SD-1.5 on a GPU runs a UNet step in ~20-50 ms and a whole request in 1-10 s, the tiny
# test build in ~1 ms per stage: the buckets span both.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

FAMILIES = {
    # name: (kind, description)
    "toonark_prompt_refusals_total": ("COUNTER", "Prompts refused by the kid-safety filter, by reason (category) and the layer that refused"),
    "toonark_steps_total": ("COUNTER", "Denoising steps served (UNet calls of denoise)"),
    "toonark_images_total": ("COUNTER", "Images returned, by format"),
    "toonark_nsfw_images_total": ("COUNTER", "Images flagged by the safety checker and replaced by a blank image"),
    "toonark_prompt_cache_hits_total": ("COUNTER", "Prompt-embedding cache lookups answered from the cache"),
    "toonark_prompt_cache_misses_total": ("COUNTER", "Prompt-embedding cache lookups that ran the text encoder"),
    "toonark_prompt_cache_evictions_total": ("COUNTER", "Prompt embeddings dropped to stay within the byte bound"),
    "toonark_prompt_cache_refused_total": ("COUNTER", "Text-encoder outputs not cached (empty, non-finite, bad shape)"),
    "toonark_prompt_cache_bytes": ("GAUGE", "Bytes held by the prompt-embedding cache of one model process"),
    "toonark_prompt_cache_entries": ("GAUGE", "Prompts held by the prompt-embedding cache of one model process"),
    "toonark_stage_duration_seconds": ("HISTOGRAM", "Time in each toonark model's execute per request, by stage"),
    # LoRA styles (engines/lora.py), per engine stage (text_encoder, unet): weight-set switches, by whether the set
    # came from the LRU (cache="hit") or was merged from the base (cache="miss"), and the seconds they took.
    "toonark_lora_switches_total": ("COUNTER", "LoRA weight-set switches of an engine, by cache hit / miss"),
    "toonark_lora_switch_seconds_total": ("COUNTER", "Seconds spent switching LoRA weight sets"),
}


def _pb_utils():
    try:
        import triton_python_backend_utils as pb_utils
    except ImportError:   # not inside a Triton Python-backend stub
        return None
    return pb_utils if hasattr(pb_utils, "MetricFamily") else None


class _Noop:
    def increment(self, value=1):
        pass

    def set(self, value):
        pass

    def observe(self, value):
        pass


class Metrics:
    """The metric families a model uses; `counter(name, **labels)` / `stage()` return cached metrics."""

    def __init__(self, stage: str):
        self.stage = stage
        self._pb = _pb_utils()
        self._families: dict[str, object] = {}
        self._metrics: dict[tuple, object] = {}

    def _family(self, name: str):
        if name not in self._families:
            kind, description = FAMILIES[name]
            self._families[name] = self._pb.MetricFamily(name=name, description=description,
                                                         kind=getattr(self._pb.MetricFamily, kind))
        return self._families[name]

    def metric(self, name: str, **labels):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            if self._pb is None:
                self._metrics[key] = _Noop()
            elif FAMILIES[name][0] == "HISTOGRAM":
                self._metrics[key] = self._family(name).Metric(labels=labels, buckets=list(STAGE_BUCKETS))
            else:
                self._metrics[key] = self._family(name).Metric(labels=labels)
        return self._metrics[key]

    def count(self, name: str, value: float = 1, **labels) -> None:
        if value:
            self.metric(name, **labels).increment(value)

    def set(self, name: str, value: float, **labels) -> None:
        """Set a gauge."""
        self.metric(name, **labels).set(value)

    @contextmanager
    def timed(self):
        """Observe the block's duration in toonark_stage_duration_seconds{stage=<this model>}."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metric("toonark_stage_duration_seconds", stage=self.stage).observe(time.perf_counter() - start)
