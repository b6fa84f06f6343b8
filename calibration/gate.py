"""Quality gate: the INT8 UNet against a float reference, through the whole sampler, on the
evaluation prompts (never used for calibration), same seeds, same text encoder and VAE.

Scoring runs the QDQ model with exact Q/DQ semantics (`session.disable_quant_qdq=1`): ORT's CPU
int8 kernels drift from QDQ arithmetic on non-VNNI CPUs (int8-notes.md measured 0.25 vs 0.075
relL2 on one model), while TensorRT computes what the Q/DQ graph says. Without that option the
gate would score ORT's CPU kernels, not the model TensorRT will build.

Metrics per prompt (worst over prompts is what the gate checks):
  psnr_db        final uint8 image, INT8 vs reference, peak 255;
  latent_cosine  cosine of the latents INT8 vs reference after every sampler step, min over steps:
                 catches a run that drifts mid-way and happens to land near the reference. The
                 pipeline's step_callback runs before each UNet call, so the latents it is handed at
                 step i+1 are step i's result (step 0's are the shared starting noise, not compared);
                 the last step's result is taken where the VAE decodes it;
A non-finite latent or image makes its metric NaN, and NaN fails every threshold (the gate
checks `metric >= limit`, and the worst over steps/prompts propagates NaN).
  embedding distance: not computed - no image-embedding model with weights (CLIP, LPIPS,
                 DINO) is installed and none can be downloaded here; the report says so.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from toonark.calibration.capture import SERVED_GUIDANCE, SERVED_STEPS
from toonark.engine import Engine
from toonark.ort_session import ort_session

# The gate's thresholds, in one place, with the measurements they come from (tiny pipeline,
# 20 DPM-Solver++ steps, CFG 7.5, 128 px, 4 evaluation prompts, fp16 reference; int8-notes.md):
#   default recipe (percentile 99.99, Conv/MatMul/Gemm, inputs-only Q/DQ, float conv_in/conv_out/
#   time embedding/norms):                           worst PSNR 37.7 dB, min latent cosine 0.9973
#   broken recipe (minmax, every op type, no float layers, ORT output placement):
#                                                    worst PSNR 27.9 dB, min latent cosine 0.9761
# Each threshold sits between the two with ~4-5 dB / ~0.004 to spare on the good side. int8-notes'
# mini sampler on a larger UNet agrees: the best INT8 recipe kept the final latent at 41 dB and
# cosine 0.998, the worst acceptable one at 37.8 dB / 0.996. Real SD weights have activation
# outliers the random tiny model lacks: re-measure on the real checkpoint before trusting them.
DEFAULT_THRESHOLDS = {"psnr_db": 32.0, "latent_cosine": 0.993}
THRESHOLD_REASONS = {
    "psnr_db": "worst final-image PSNR over the evaluation prompts; the default recipe measured 37.7 dB, "
               "a broken one (minmax, all op types, no float layers) 27.9 dB on the tiny pipeline",
    "latent_cosine": "lowest per-step latent cosine vs the reference; catches mid-trajectory drift; "
                     "default recipe 0.9973, broken recipe 0.9761 on the tiny pipeline",
}
EMBEDDING_NOTE = ("not computed: no image-embedding model with weights (CLIP image tower, LPIPS, DINO) is "
                  "installed and none can be downloaded; PSNR and per-step latent cosine are the gate")


@dataclass(frozen=True)
class GateConfig:
    prompts: int = 4            # evaluation prompts (the first N of the evaluation part)
    size: int = 128
    steps: int = SERVED_STEPS
    guidance: float = SERVED_GUIDANCE
    reference: str = "auto"     # "auto" (fp16 if ORT CPU runs it, else fp32) | "fp16" | "fp32"
    latency_runs: int = 5

    def __post_init__(self):
        if self.prompts < 1:
            raise ValueError(f"--eval-prompts {self.prompts} must be >= 1")
        if self.reference not in ("auto", "fp16", "fp32"):
            raise ValueError(f"--reference {self.reference!r} must be auto, fp16 or fp32")

    def to_json(self) -> dict:
        return asdict(self)


def check_thresholds(thresholds: dict) -> dict:
    unknown = set(thresholds) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown gate threshold(s) {', '.join(sorted(unknown))}; the gate knows "
                         f"{', '.join(DEFAULT_THRESHOLDS)}")
    merged = {**DEFAULT_THRESHOLDS, **thresholds}
    if not -1.0 <= merged["latent_cosine"] <= 1.0:
        raise ValueError(f"--min-latent-cosine {merged['latent_cosine']} must be in -1..1")
    return merged


class OnnxUnet(Engine):
    """A UNet ONNX file run on ORT CPU, for scoring: `exact_qdq` runs Q/DQ as plain float math.
    Feeds are cast to the model's input dtypes (fp16 models take fp16); outputs come back float32."""

    def __init__(self, model_path: Path, spec, *, exact_qdq: bool = False, threads: int = 0):
        self.spec, self.model_path = spec, Path(model_path)
        self.metadata = {"source": str(model_path), "exact_qdq": exact_qdq}
        self.session = ort_session(model_path, threads=threads, inter_threads=1,
                                   config={"session.disable_quant_qdq": "1"} if exact_qdq else None)
        # Integer inputs (Qwen-Image's text mask) keep their type; floats follow the model's precision.
        self._dtypes = {i.name: (np.float16 if i.type == "tensor(float16)" else
                                 np.int64 if i.type == "tensor(int64)" else np.float32)
                        for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {name: np.asarray(feeds[name], dtype=self._dtypes[name]) for name in self._dtypes}
        values = self.session.run(self.spec.output_names, cast)
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.spec.output_names, values)}


def choose_reference(fp16_path: Path, fp32_path: Path, spec, probe_feeds: dict, wanted: str = "auto"
                     ) -> tuple[str, Path, str]:
    """(precision, path, why): fp16 when ORT CPU can run that ONNX and gives finite outputs."""
    if wanted == "fp32":
        return "fp32", fp32_path, "asked for (--reference fp32)"
    if not fp16_path.is_file():
        if wanted == "fp16":
            raise FileNotFoundError(f"--reference fp16: {fp16_path} is missing; export fp16 or use --reference fp32")
        return "fp32", fp32_path, f"no fp16 UNet ONNX at {fp16_path}"
    try:
        out = OnnxUnet(fp16_path, spec).run(probe_feeds)
        finite = all(np.isfinite(v).all() for v in out.values())
    except Exception as err:   # noqa: BLE001 - any ORT failure means "ORT CPU cannot run it"
        if wanted == "fp16":
            raise RuntimeError(f"--reference fp16: ORT CPU cannot run {fp16_path}: {err}") from None
        return "fp32", fp32_path, f"ORT CPU cannot run the fp16 UNet ({type(err).__name__}: {str(err)[:200]})"
    if not finite:
        if wanted == "fp16":
            raise RuntimeError(f"--reference fp16: {fp16_path} gives non-finite outputs on ORT CPU")
        return "fp32", fp32_path, "the fp16 UNet gives non-finite outputs on ORT CPU"
    return "fp16", fp16_path, "ORT CPU runs the fp16 UNet ONNX (the precision INT8 replaces when serving)"


def psnr_db(reference: np.ndarray, test: np.ndarray, cap: float = 99.0) -> float:
    """PSNR (peak 255) capped at `cap`; NaN when either input is not finite (NaN fails the gate)."""
    reference, test = np.asarray(reference, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if not (np.isfinite(reference).all() and np.isfinite(test).all()):
        return math.nan
    mse = float(np.mean((reference - test) ** 2))
    return cap if mse == 0 else min(cap, 10.0 * math.log10(255.0 ** 2 / mse))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; NaN when either input is not finite (NaN fails the gate)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if denom == 0 else float(a @ b / denom)


def worst(values) -> float:
    """The minimum, NaN if any value is NaN (Python's min() may keep a number over a NaN)."""
    return float(np.min(np.asarray(list(values), dtype=np.float64)))


class _LatentTap(Engine):
    """The VAE decoder, keeping the latents it decodes: the result of the sampler's last step in the
    VAE's scale (the family's latents_to_vae applied; cosine does not see that constant factor)."""

    def __init__(self, decoder: Engine):
        self.decoder, self.latents = decoder, None

    def __getattr__(self, name):   # spec, metadata, ... of the wrapped engine
        if name == "decoder":
            raise AttributeError(name)
        return getattr(self.decoder, name)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.latents = np.array(feeds["latent_sample"], dtype=np.float32)
        return self.decoder.run(feeds)


def _tapped(pipeline):
    tap = _LatentTap(pipeline.engines["vae_decoder"])
    return type(pipeline)({**pipeline.engines, "vae_decoder": tap}, pipeline.tokenizer, pipeline.scheduler,
                          pipeline.dims, pipeline.limits, family=pipeline.family), tap


def post_step_latents(pipeline, tap: _LatentTap, prompt: str, **kwargs):
    """(result, latents after each sampler step): the step_callback at step i+1 is handed step i's
    result; the last step's result is what the VAE decodes."""
    seen: list[np.ndarray] = []   # one latent per step: a few KB each
    tap.latents = None
    result = pipeline(prompt, step_callback=lambda i, t, feeds, latents:
                      seen.append(np.array(latents, dtype=np.float32)), **kwargs)
    if tap.latents is None:
        raise RuntimeError("the pipeline did not decode through its vae_decoder engine; the gate cannot see "
                           "the last step's latents")
    return result, seen[1:] + [tap.latents]


def compare_runs(reference_pipeline, int8_pipeline, prompts, negative: str, config: GateConfig,
                 progress: bool = True):
    """Yield (prompt, metrics, reference image, int8 image) per evaluation prompt."""
    from tqdm import tqdm
    reference_pipeline, reference_tap = _tapped(reference_pipeline)
    int8_pipeline, int8_tap = _tapped(int8_pipeline)
    for prompt in tqdm(prompts, desc="quality gate", unit="prompt", disable=not progress, leave=False):
        kwargs = dict(negative_prompt=negative, seed=prompt.seed, steps=config.steps, guidance=config.guidance,
                      width=config.size, height=config.size)
        reference, reference_latents = post_step_latents(reference_pipeline, reference_tap, prompt.text, **kwargs)
        int8, int8_latents = post_step_latents(int8_pipeline, int8_tap, prompt.text, **kwargs)
        if len(reference_latents) != len(int8_latents):
            raise RuntimeError(f"the reference ran {len(reference_latents)} sampler steps, INT8 {len(int8_latents)}")
        cosines = [cosine(r, q) for r, q in zip(reference_latents, int8_latents)]
        ref_image, int8_image = np.asarray(reference.images)[0], np.asarray(int8.images)[0]
        # uint8 images cannot hold a NaN: a non-finite VAE output makes the PSNR NaN instead.
        finite = bool(np.isfinite(reference.decoded).all() and np.isfinite(int8.decoded).all())
        psnr = psnr_db(ref_image, int8_image) if finite else math.nan
        metrics = {"prompt": prompt.text, "seed": prompt.seed, "psnr_db": round(psnr, 3),
                   "latent_cosine": round(worst(cosines), 6), "latent_cosine_per_step": [round(c, 6) for c in cosines]}
        yield prompt, metrics, ref_image, int8_image


def summarize(per_prompt: list[dict]) -> dict:
    return {"psnr_db": worst(m["psnr_db"] for m in per_prompt),
            "psnr_db_mean": round(statistics.fmean(m["psnr_db"] for m in per_prompt), 3),
            "latent_cosine": worst(m["latent_cosine"] for m in per_prompt),
            "latent_cosine_mean": round(statistics.fmean(m["latent_cosine"] for m in per_prompt), 6),
            "embedding_distance_note": EMBEDDING_NOTE,
            "prompts": len(per_prompt)}


def failures(metrics: dict, thresholds: dict) -> list[str]:
    """Human-readable lines for every threshold the metrics miss (all thresholds are minimums).
    A metric passes only when `metric >= limit`, so NaN (a non-finite run) fails."""
    return [f"{name} {metrics[name]:.4g} < {limit:.4g}" for name, limit in thresholds.items()
            if not metrics[name] >= limit]


def advice(quant: dict, calib_prompts: int, failing: list[str]) -> str:
    """The knob to turn first when the gate fails, from the settings that were used."""
    if not failing:
        return ""
    tips = []
    if quant.get("output_quantization"):
        tips.append("drop --output-quantization (Q/DQ on op inputs only, as TensorRT wants)")
    extra_ops = [op for op in quant.get("op_types", []) if op not in ("Conv", "MatMul", "Gemm")]
    if extra_ops:
        tips.append(f"quantize only Conv,MatMul,Gemm (--op-types Conv,MatMul,Gemm; now also {','.join(extra_ops)})")
    missing = [g for g in ("conv_in", "conv_out", "time_embedding", "norm") if g not in quant.get("keep_float", [])]
    if missing:
        tips.append(f"keep {', '.join(missing)} in float (--keep-float {','.join(quant.get('keep_float', []) + missing)})")
    if quant.get("method") != "percentile":
        tips.append(f"use --method percentile (now {quant.get('method')})")
    if calib_prompts < 32:
        tips.append(f"use more calibration prompts (--calib-prompts {max(32, calib_prompts * 4)}; now {calib_prompts})")
    if not tips or len(tips) < 2:
        tips.append("keep more layers in float (--keep-float ...,time_emb_proj,attention_bmm or --exclude-pattern)")
    tips.append("or serve PRECISION=fp16")
    return "; ".join(tips)


def unet_latency_ms(model_path: Path, spec, feeds: dict, runs: int = 5, warmup: int = 2,
                    exact_qdq: bool = False, threads: int = 0) -> float:
    """Median wall time of one UNet call on ORT CPU (default graph optimizations)."""
    from toonark.timing import time_ms
    engine = OnnxUnet(model_path, spec, exact_qdq=exact_qdq, threads=threads)
    return time_ms(lambda: engine.run(feeds), "cpu", reps=runs, warmup=warmup)["median_ms"]
