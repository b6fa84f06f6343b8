"""`make calibrate OUT=dir`: capture -> quantize -> quality gate -> report.json + contact sheets.

    report = calibrate(OUT)                      # defaults: 8 prompts at 128 px, percentile 99.99
    report["passed"]                             # the engines stage refuses PRECISION=int8 unless True

Every artifact is keyed by the sha256 of the fp32 UNet ONNX it came from: when the export changes,
the old capture, INT8 model and report are deleted before anything else runs, so no stale INT8
model can outlive its source. report.json is written whether the gate passes or not, and records
the sha256 of the INT8 model it scored. The previous report is deleted before the INT8 model can be
replaced: a run that dies between quantizing and scoring leaves no report (so no `passed: true`
beside an unscored model) rather than the old one.
"""
from __future__ import annotations

import shutil
import logging
import time
from pathlib import Path

import numpy as np

from toonark.calibration.capture import (CaptureConfig, capture, capture_dir, denoiser_submodel, open_pipeline,
                                         read_capture, replace_unet, source_unet)
from toonark.calibration.gate import (DEFAULT_THRESHOLDS, THRESHOLD_REASONS, GateConfig, OnnxUnet, advice,
                                      check_thresholds, choose_reference, compare_runs, failures, summarize,
                                      unet_latency_ms)
from toonark.calibration.prompts import prompt_set
from toonark.calibration.quantize import QuantConfig, quantize_unet, read_quantize_info
from toonark.calibration.sheets import write_sheets
from toonark.specs import BuildInfo

logger = logging.getLogger(__name__)
from toonark.files import read_json, sha256_onnx, write_json
from toonark.layout import BuildLayout

REPORT = "report.json"


class GateFailed(RuntimeError):
    """The INT8 UNet missed a threshold; `report` is what was written to report.json."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def report_path(build_dir: Path) -> Path:
    return BuildLayout(build_dir).calibration / REPORT


def invalidate_stale(build_dir: Path, source_sha: str) -> list[str]:
    """Delete capture, INT8 model and report made from another UNet ONNX; return what was removed."""
    layout = BuildLayout(build_dir)
    removed = []
    existing = read_capture(build_dir)
    if capture_dir(build_dir).exists() and (existing is None or existing.source_onnx_sha256 != source_sha):
        shutil.rmtree(capture_dir(build_dir))
        removed.append(str(capture_dir(build_dir)))
    info = read_quantize_info(layout.int8_unet)
    if layout.int8_unet.parent.exists() and (info is None or info.get("source_onnx_sha256") != source_sha):
        shutil.rmtree(layout.int8_unet.parent)
        removed.append(str(layout.int8_unet.parent))
    report = report_path(build_dir)
    if report.is_file():
        try:
            recorded = read_json(report, "calibration report", "").get("source_onnx_sha256")
        except ValueError:
            recorded = None
        if recorded != source_sha:
            report.unlink()
            removed.append(str(report))
    return removed


def calibrate(build_dir, capture_config: CaptureConfig = CaptureConfig(), quant_config: QuantConfig = QuantConfig(),
              gate_config: GateConfig = GateConfig(), thresholds: dict | None = None, *, force: bool = False,
              progress: bool = True, log=None, load_pipeline=None) -> dict:
    """Run the whole stage; return the report. Raises GateFailed (after writing the report) when
    the INT8 UNet misses a threshold. load_pipeline: toonark.engines.pipeline.load_pipeline (the
    engines stage comes after this one, so its caller passes it in)."""
    build_dir = Path(build_dir)
    log = log or logger.info   # the stage's progress lines; scripts/calibrate.py shows them
    started = time.perf_counter()
    quant_config.check_available()
    thresholds = check_thresholds(thresholds or {})
    info = BuildInfo.read(build_dir)
    step_model = denoiser_submodel(build_dir)   # "unet"; Qwen-Image: "transformer"
    spec = info.specs[step_model]
    layout = BuildLayout(build_dir)
    source = source_unet(build_dir)
    source_sha = sha256_onnx(source)
    for path in invalidate_stale(build_dir, source_sha):
        log(f"calibrate: removed {path} (made from another UNet ONNX)")
    evaluation = prompt_set().take("evaluation", gate_config.prompts)

    captured = capture(build_dir, capture_config, force=force, progress=progress, load_pipeline=load_pipeline)
    log(f"calibrate: capture {'reused' if captured.cached else 'written'}: {len(captured.shards)} shards, "
        f"{captured.bytes / 1e6:.1f} MB ({captured.folder})")
    # The old verdict belongs to the old INT8 model: drop it (one unlink) before that model can be replaced.
    report_path(build_dir).unlink(missing_ok=True)
    quantized = quantize_unet(source, captured.shards, layout.int8_unet, quant_config, capture_key=captured.key,
                              force=force)
    scored_sha = sha256_onnx(layout.int8_unet)
    if scored_sha != quantized.int8_onnx_sha256:
        raise RuntimeError(f"{layout.int8_unet} changed on disk (sha256 {scored_sha}, quantize.json says "
                           f"{quantized.int8_onnx_sha256}); rerun `make calibrate` with --force")
    log(f"calibrate: INT8 UNet {'reused' if quantized.cached else 'written'} ({quant_config.method}, "
        f"{quantized.summary['quantized_nodes']} quantized ops, {layout.int8_unet})")

    with np.load(captured.shards[0]) as shard:
        probe = {name: shard[name] for name in shard.files}
    ref_precision, ref_path, ref_reason = choose_reference(layout.onnx_model("fp16", step_model), source, spec, probe,
                                                           gate_config.reference)
    log(f"calibrate: reference UNet {ref_precision} ({ref_reason})")
    base = open_pipeline(build_dir, capture_config.backend, capture_config.precision, load_pipeline)
    reference_pipeline = replace_unet(base, OnnxUnet(ref_path, spec)) if ref_precision != "fp32" else base
    int8_pipeline = replace_unet(base, OnnxUnet(layout.int8_unet, spec, exact_qdq=True))
    per_prompt, ref_images, int8_images = [], [], []
    for _prompt, metrics, ref_image, int8_image in compare_runs(reference_pipeline, int8_pipeline, evaluation,
                                                                prompt_set().negative, gate_config, progress):
        per_prompt.append(metrics)
        ref_images.append(ref_image)
        int8_images.append(int8_image)
    metrics = summarize(per_prompt)
    failing = failures(metrics, thresholds)
    sheets = write_sheets(layout.calibration, ref_images, int8_images, reference_label=ref_precision)

    latency = {"fp32_ms": unet_latency_ms(source, spec, probe, runs=gate_config.latency_runs),
               "int8_ms": unet_latency_ms(layout.int8_unet, spec, probe, runs=gate_config.latency_runs),
               "int8_exact_qdq_ms": unet_latency_ms(layout.int8_unet, spec, probe, runs=gate_config.latency_runs,
                                                    exact_qdq=True),
               "batch": int(probe[spec.input_names[0]].shape[0]),
               "latent_hw": list(probe[spec.input_names[0]].shape[2:]),
               "runs": gate_config.latency_runs,
               "note": "one UNet call on ONNX Runtime CPU, median; says nothing about TensorRT int8 speed"}
    latency["int8_vs_fp32"] = round(latency["int8_ms"] / latency["fp32_ms"], 3)

    report = {
        "passed": not failing,
        "source_onnx": str(source.relative_to(build_dir)),
        "source_onnx_sha256": source_sha,
        "int8_onnx": str(layout.int8_unet.relative_to(build_dir)),
        "int8_onnx_sha256": scored_sha,          # the model the gate scored
        "metrics": metrics,
        "thresholds": thresholds,
        "threshold_reasons": {k: THRESHOLD_REASONS.get(k, "") for k in thresholds},
        "failing": failing,
        "advice": advice(quant_config.to_json(), capture_config.prompts, failing),
        "reference": {"precision": ref_precision, "onnx": str(Path(ref_path).relative_to(build_dir)),
                      "why": ref_reason, "scoring": "INT8 run with session.disable_quant_qdq=1 (exact QDQ math)"},
        "per_prompt": per_prompt,
        "config": {"capture": capture_config.to_json(), "quantize": quant_config.to_json(),
                   "gate": gate_config.to_json(), "defaults_thresholds": DEFAULT_THRESHOLDS},
        "capture": captured.to_json(),
        "quantize": {"summary": quantized.summary, "seconds": quantized.seconds, "cached": quantized.cached,
                     "kept_float": {k: len(v) for k, v in quantized.excluded.items()},
                     "kept_float_nodes": quantized.excluded},
        "latency": latency,
        "sheets": sheets,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(report_path(build_dir), report)
    log(f"calibrate: psnr_db {metrics['psnr_db']:.2f} (min over {metrics['prompts']} prompts), latent_cosine "
        f"{metrics['latent_cosine']:.5f}; UNet ORT CPU int8 {latency['int8_ms']:.1f} ms vs fp32 "
        f"{latency['fp32_ms']:.1f} ms; report {report_path(build_dir)}")
    if failing:
        raise GateFailed(f"INT8 UNet failed the quality gate: {', '.join(failing)} (thresholds "
                         f"{', '.join(f'{k} >= {v}' for k, v in thresholds.items())}). Advice: {report['advice']}. "
                         f"Report: {report_path(build_dir)}", report)
    return report
