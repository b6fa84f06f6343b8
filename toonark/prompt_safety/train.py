"""Build-time only: train the prompt classifier (a LoRA-tuned sentence encoder, toonark.prompt_safety.encoder)
from the dev part of toonark/data/safety_prompts.json, choose its operating point out of fold, and build the
ONNX graph the runtime reads.

`make safety-model` (train + build; MPNet's five fits need a GPU: ~20 min on an H200 in turn, 6 min at once
(fit_part; ten with two seeds, 10 min), the rest ~45 min on two CPU cores) writes the tracked files: the adapter (safety_adapter.safetensors) and the sidecar
(safety_classifier.json: data and adapter sha256, threshold, vetoes, metrics, and the sha256 of the graph built
from them). `make setup` runs only `build_onnx` (~1 min): adapter + pinned base -> safety_classifier.onnx + safety_tokenizer.json (ignored by git); the same
versions on the same CPU kind give the bytes the sidecar records (tests/test_prompt_safety_eval.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from toonark.files import atomic_file
from toonark.prompt_safety import encoder, evalset, evaluate, templates
from toonark.prompt_safety.classifier import ADAPTER_NAME, MODEL_NAME, SIDECAR_NAME, TOKENIZER_NAME, by_length
from toonark.prompts import normalize

log = logging.getLogger(__name__)

SIDECAR_VERSION = 3
# The share of prompts on which the int8 graph may decide otherwise than the fp32 model it was exported from
# (check_int8_parity; tests/test_prompt_safety_eval.py holds the shipped sidecar to it).
INT8_DECISIONS_DIFFER_MAX = 0.015
# 7-bit int8 weights for a new build (encoder.export_onnx says why): on round 13's adapter five probe prompts
# kept their fp32 decisions with them and all five were read as safe with full-range weights.
QUANT_REDUCE_RANGE = True
# The parity gate compares the int8 graph with the fp32 model on every PARITY_EVERY-th prompt of the set in data
# order (both parts; a subset run reads all of its own): the fp32 reference reads ~1.5 k prompts a minute on two
# cores, and over all 142,061 prompts of batches 1-76 it was most of a two-hour build. A quarter (35.5 k prompts)
# measures a 1 % rate of differing decisions within +-0.11 points (two standard errors), against a 1.5 % bound and a
# broken graph's 55 %. The int8 graph still reads the whole test part, for the sidecar's test metrics.
PARITY_EVERY = 4
FIT_RECORD_NAME = "safety_fit.json"     # beside an adapter written by build(fits_only=True)
FOLDS = 4
# The five fits of a build, each runnable alone (build(fit_part=...), scripts/safety_model.py --fit-part).
FIT_PARTS = tuple(str(k) for k in range(1, FOLDS + 1)) + ("final",)
# The operating point (classifier threshold, rule vetoes, the fewest words the classifier reads) is picked from
# this grid by choose_operating_point. Vetoes stay product rules, not only numbers: a rule hit is excused only
# in a prompt of VETO_MIN_WORDS+ words (shorter ones cannot set a harmless context: with vetoes from 5 words the
# dev-optimal point let "a bomb in a box" and "a murderer in the woods" through, the encoder reading them at
# 0.002 and 0.57), and only when the classifier is clearly sure (word veto <= 0.3, phrase veto <= 0.05: a
# relation hit is excused only at near-certainty, "a tiger attacking a piece of cake"). The fewest words the
# classifier reads: 3 until round 12 (then 0.4 % of the unsafe dev prompts were that short, and an encoder never
# trained on them read leftovers of punctuation as harm: "{0}" -> "0" 0.98 self-harm); batches 45-76 brought ~1,000
# one- and two-word bases, and round 13 chose 1 (dev: recall 97.3 -> 98.8 % with harmless refusals 5.0 -> 3.3 %;
# it reads a bare "0" 0.51 and "x" 0.93 hate, no pictures either way).
THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14)) + (0.97, 0.99)      # 0.30 .. 0.95, 0.97, 0.99
WORD_VETOES = (0.0, 0.05, 0.1, 0.2, 0.3)
PHRASE_VETOES = (0.0, 0.01, 0.05)
# In prompts of min_words to VETO_MIN_WORDS-1 words a rule hit is excused only at near-certainty (a short prompt
# sets no context; the words around the rule word are mostly a name: "rifle, colorado", "blood mountain
# georgia", "a cherry bomb lollipop", read 0.001-0.002). Round 9's out-of-fold scores on dev, word hits in
# 3-6-word prompts: under 0.002 excuses 71 of 127 harmless and none of 387 unsafe, under 0.003 also 3 unsafe;
# "a bloody unicorn", refused by name in tests/test_prompts.py, reads 0.0036. Phrase hits: under 0.002 excuses
# 12 harmless and 7 unsafe, so the grid keeps the phrase layer's short veto off unless the data moves.
# Round 16's classifier (2.4x the data) is surer of itself: it reads "a bloody unicorn" 0.0015, so 0.002 went (dev,
# out of fold: 0.002 excuses 369 harmless and 5 unsafe short word hits, 0.001 340 and 4; the chosen point's harmless
# refused 1.36 -> 1.40 %, recall the same).
SHORT_WORD_VETOES = (0.0, 0.001)
SHORT_PHRASE_VETOES = (0.0, 0.001)
MIN_WORDS = (1, 2, 3, 5)
VETO_MIN_WORDS = (7,)
# The whole filter may refuse at most this share of the harmless dev prompts (out of fold). The issue asks for
# 1 %; the rules alone refuse 8.6 % of harmless dev prompts before any veto (batches 1-12). With the vetoes
# bounded as above the filter kept 89 % of its recall on dev prompts the rules were not written from at 5 %,
# 91 % at 6 %, 92 % at 7 % (the n-gram filter: 87 % at 7 %). 5 % is under the n-gram classifier's 7 % budget
# and still raises recall over it: a missed unsafe prompt is the worst failure, a refused harmless one the
# next worst (a policy choice, re-read as the data grows).
FALSE_REFUSAL_BUDGET = 0.05
# Within the budget, the point refusing the fewest harmless prompts among those whose recall is within this
# many standard errors of the best (binomial, on the blind unsafe dev prompts: ~0.08 points at 18,576 prompts
# and 98.8 %): the "one-standard-error rule" of CART / glmnet's lambda.1se, at 1.0. 0 is the highest recall
# alone, which spends the whole budget once recall is flat (round 11's dev grid: best 98.82 % / 4.90 %, phrase
# veto 0; within one error 98.75 % / 2.96 %, phrase veto 0.01). Measured at 1.0 on round 11 (same test prompts,
# batches 1-38): the rule did what dev said (98.54 / 5.25 at 0 -> 98.44 / 3.44), and so on round 12 (the soup of
# two fits: 98.57 / 2.92 on batches 1-44), but neither reached round 10's recall (98.89 / 4.65), chosen at 0,
# which this stays at so that it rebuilds the shipped sidecar (docs/prompt-safety.md, rounds 11-12).
RECALL_TOLERANCE_SE = 0.0
# The recall target (the test part's, evaluate.MIN_RECALL). Once dev reaches it by RECALL_TARGET_MARGIN_SE
# standard errors, recall past it is not bought with harmless refusals: the point refusing the fewest harmless
# prompts among those at or over the target (plus the margin) is chosen. Round 16's grid (169,719 dev prompts, its
# classifier far better than round 13's) was flat at the top: the highest recall, 99.31 %, cost 4.86 % harmless
# refused, 99.26 % 1.98 % and 99.03 % 1.40 % (the shipped point);
# the highest-recall rule alone read 98.98 % / 5.13 % on batches 1-38's test part (docs/prompt-safety.md, round 16).
RECALL_TARGET = evaluate.MIN_RECALL
RECALL_TARGET_MARGIN_SE = 1.0


def _refused(score, layer, words, point: dict, beside_idiom=None):
    """The layered filter's decisions from its parts, for many prompts at once (numpy arrays; mirrors
    LayeredFilter.verdict with classifier.OperatingPoint): a rule hit stands unless the classifier's score is
    under that rule layer's veto (its short veto in a prompt under veto_min_words words); otherwise the
    classifier refuses at the threshold. score -1: no classifier reading (fewer words than it reads). The served
    filter scores the reading the rule matched in; `score` is the primary reading's, the same text unless a rule
    matched in another reading alone (a corrected misspelling, a split-off article: 1.8 % of dev prompts).
    `beside_idiom` (bool array, LayeredFilter.beside_idiom): no veto excuses a hit in those prompts."""
    import numpy as np
    long = words >= point["veto_min_words"]
    excused = np.zeros(len(score), bool)
    for table, band in ((point["vetoes"], long), (point["short_vetoes"], ~long)):
        for name, veto in table.items():
            excused |= band & (layer == name) & (score < veto)
    excused &= score >= 0
    if beside_idiom is not None:
        excused &= ~beside_idiom
    return ((layer != "") & ~excused) | (score >= point["threshold"])


def choose_operating_point(oof, words, layers, unsafe, blind, beside_idiom=None) -> tuple[dict, dict]:
    """(point, metrics): point = {threshold, vetoes, short_vetoes, min_words, veto_min_words}, among the grid
    points whose harmless-refused rate is within FALSE_REFUSAL_BUDGET, the one refusing the fewest harmless prompts
    whose recall is within RECALL_TOLERANCE_SE standard errors of the best recall, or at least RECALL_TARGET plus
    RECALL_TARGET_MARGIN_SE errors where the best is over that (ties: higher recall, then the grid's order:
    higher threshold, lower vetoes), from out-of-fold classifier scores and the rules' verdicts on
    dev. Recall is counted on the unsafe dev prompts the rules were NOT written from (`blind`: batches whose dev
    half no rule came from, safety_batches.json `dev_used_for_rules` false): on the other dev prompts the rules
    are fitted (they catch 99 %) and would say the classifier adds nothing. Harmless refused is counted on all
    harmless dev prompts: the classifier's out-of-fold scores are honest on all of them, and the blind ones carry
    the rules' own false refusals. A budget and a tolerance rather than a weighted sum: recall and harmless
    refused trade almost linearly over the useful thresholds, so any fixed weight near that rate makes the chosen
    point jump with each new batch. Arguments are numpy arrays over the dev prompts (oof: scores; words: word
    counts; bool masks; beside_idiom: rule_readings' hits no veto excuses)."""
    import numpy as np
    within = [c for c in operating_grid(oof, words, layers, unsafe, blind, beside_idiom)
              if c[1] <= FALSE_REFUSAL_BUDGET]
    if not within:
        raise ValueError(f"no threshold and vetoes keep harmless refusals within {FALSE_REFUSAL_BUDGET:.0%} on dev: the "
                         f"rules alone refuse more; fix the rules' false refusals first")
    best = max(recall for recall, _, _ in within)
    error = float(np.sqrt(best * (1.0 - best) / max(int((unsafe & blind).sum()), 1)))
    floor = min(best - RECALL_TOLERANCE_SE * error, RECALL_TARGET + RECALL_TARGET_MARGIN_SE * error) - 1e-12
    recall, wrong, point = min((c for c in within if c[0] >= floor), key=lambda c: (c[1], -c[0]))
    return point, {"recall_on_prompts_the_rules_were_not_written_from": round(recall, 4),
                   "harmless_refused_all_dev": round(wrong, 4),
                   "best_recall_within_budget": round(best, 4), "recall_standard_error": round(error, 4),
                   "recall_target": RECALL_TARGET}


def operating_grid(oof, words, layers, unsafe, blind, beside_idiom=None) -> list[tuple[float, float, dict]]:
    """(recall on the blind unsafe dev prompts, harmless refused on all dev, point) of every grid point, in the
    grid's order (higher threshold first, then lower vetoes)."""
    import itertools

    import numpy as np
    grid = []
    for min_words in MIN_WORDS:
        scores = np.where(words >= min_words, oof, -1.0)      # what decisions() reads, once per min_words
        for threshold, word, phrase, short_word, short_phrase, veto_min_words in itertools.product(
                sorted(THRESHOLDS, reverse=True), WORD_VETOES, PHRASE_VETOES, SHORT_WORD_VETOES, SHORT_PHRASE_VETOES,
                sorted(VETO_MIN_WORDS, reverse=True)):
            point = {"threshold": threshold, "vetoes": {"word": word, "phrase": phrase},
                     "short_vetoes": {"word": short_word, "phrase": short_phrase}, "min_words": min_words,
                     "veto_min_words": veto_min_words}
            refused = _refused(scores, layers, words, point, beside_idiom)
            grid.append((float(refused[unsafe & blind].mean()), float(refused[~unsafe].mean()), point))
    return grid


def rule_readings(examples: list[evalset.Example]) -> dict:
    """Per example, numpy arrays: `layers` (the layer that refuses it with the classifier off, "" for none),
    `words` (normalised word count), `unsafe`, `blind` (its batch's dev half never fed the rules): what
    choose_operating_point and decisions() read; and `veto_reads_primary` (False where the first rule hit
    was found in another reading than the primary one alone, or is a word hit beside an allowed idiom: there the
    served veto scores that reading, or the reading without the idiom too (LayeredFilter.idiom_free), and
    decisions() the primary reading's score, the only one with out-of-fold scores); `beside_idiom` (the first
    rule hit is a phrase hit outside every word-list idiom in the prompt: no veto excuses it;
    LayeredFilter.beside_idiom)."""
    import numpy as np

    from toonark.prompt_safety.layered import LayeredFilter
    from toonark.prompts import PromptPolicy
    rules = LayeredFilter.build(PromptPolicy.load()._rules, classifier=None)
    fitted = {h for b in evaluate.batches() if b.get("dev_used_for_rules", True) for h in b["bases"]}
    layers, primary_read, beside_idiom = [], [], []
    for e in examples:
        hit = next(rules.rule_hits(e.text), None)
        beside_idiom.append(hit is not None and rules.beside_idiom(*hit))
        refusal = hit[0] if hit else rules.language_verdict(e.text)
        layers.append(getattr(refusal, "layer", None) or "")
        primary_read.append(hit is None or (hit[1] == normalize(e.text) and rules.idiom_free(*hit) is None))
    return {"layers": np.array(layers),
            "words": np.array([len(normalize(e.text).split()) for e in examples]),
            "unsafe": np.array([e.unsafe for e in examples]),
            "blind": np.array([evalset.sha12(e.base) not in fitted for e in examples]),
            "veto_reads_primary": np.array(primary_read), "beside_idiom": np.array(beside_idiom)}


def decisions(point: dict, scores, readings: dict):
    """The whole filter's refusals (bool array) at an operating point, from classifier scores and rule_readings."""
    import numpy as np
    words = readings["words"]
    return _refused(np.where(words >= point["min_words"], scores, -1.0), readings["layers"], words, point,
                    readings.get("beside_idiom"))


def _metrics(scores, labels, threshold) -> dict:
    unsafe = [p for p, y in zip(scores, labels) if y != evalset.SAFE]
    safe = [p for p, y in zip(scores, labels) if y == evalset.SAFE]
    return {"unsafe": len(unsafe), "harmless": len(safe),
            "recall": round(sum(p >= threshold for p in unsafe) / len(unsafe), 4),
            "harmless_refused": round(sum(p >= threshold for p in safe) / len(safe), 4)}


def _write(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def fold_splits(dev: list[evalset.Example]) -> list[tuple]:
    """The FOLDS (train indices, held-out indices) of the dev examples: stratified by label, grouped by base
    prompt (a prompt's perturbations are held out with it), the same on every machine."""
    from sklearn.model_selection import StratifiedGroupKFold
    splitter = StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    return list(splitter.split([e.text for e in dev], [e.label for e in dev], [e.base for e in dev]))


def part_file(cache: Path, part: str, seed: int) -> Path:
    """Where one fit of a fit part (a fold "1".."4" or "final") with one seed keeps its adapter (a fold model
    also its own held-out scores), beside `cache`: processes fitting different parts or seeds at once never
    write one file, and a later run finds what they fitted."""
    return _beside(cache, f"{part}.seed{seed}")


def _beside(cache: Path, tag: str) -> Path:
    """The file named `tag` that the build keeps beside the oof cache (build/safety_oof.<tag>.npz)."""
    return cache.with_name(f"{cache.stem}.{tag}{cache.suffix}")


def _kept(path: Path | None, key: str):
    """The arrays an earlier run kept in `path` (an .npz) under this `key`, or None (no file, or another key):
    the build's fits, out-of-fold scores and readings are each reused only for the same inputs."""
    import numpy as np
    if path is None or not Path(path).exists():
        return None
    stored = np.load(path)
    return stored if str(stored["key"]) == key else None


def _keep(path: Path | None, key: str, **arrays) -> None:
    """Keep `arrays` in `path` under `key` (written whole or not at all: a killed run leaves the old file)."""
    import numpy as np
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(path)) as fh:
        np.savez(fh, key=np.array(key), **arrays)


def _fits_key(x, y, gx, gy, labels, epochs, base: encoder.EncoderBase, seeds) -> str:
    """What the fits depend on: the data, the templates, the training settings and the seeds."""
    return hashlib.sha256(json.dumps([x, y, gx, gy, labels, epochs, FOLDS, encoder.LORA_RANK, base.learning_rate,
                                      base.head_learning_rate, base.sha256, list(seeds), "init of seeds[0]"]
                                     ).encode("utf-8")).hexdigest()


def _one_fit(part: str, seed: int, texts, targets, labels, epochs, base: encoder.EncoderBase, key: str,
             cache: Path | None, fit_missing: bool, held: list[str] | None = None,
             init_seed: int | None = None) -> tuple[bytes, object]:
    """(adapter bytes, P(unsafe) of `held` from this fit alone or None) of one fit of `part`, from its part file
    when that holds this fit (same key), else fitted (and kept there)."""
    import numpy as np
    target = part_file(Path(cache), part, seed) if cache is not None else None
    if (stored := _kept(target, key)) is not None:
        log.info("fit %s, seed %d: from %s", part, seed, target)
        return stored["adapter"].tobytes(), (stored["held"] if held is not None else None)
    if not fit_missing:
        raise ValueError(f"{target}: no fit of part {part} with seed {seed} for this data and these settings; carry "
                         f"the files the --fits-only run wrote beside {cache}")
    model = encoder.fit(texts, targets, labels, base, epochs, progress=f"{part} seed {seed} ", seed=seed,
                        init_seed=init_seed)
    blob = encoder.adapter_bytes(model.adapter(), base)
    scores = 1.0 - model.probabilities(held)[:, labels.index(evalset.SAFE)] if held is not None else None
    _keep(target, key, adapter=np.frombuffer(blob, np.uint8), **({"held": scores} if scores is not None else {}))
    return blob, scores


def _soup_bytes(blobs: list[bytes], base: encoder.EncoderBase) -> bytes:
    """The adapter of the soup of these fits (one fit: its own bytes)."""
    return encoder.adapter_bytes(encoder.soup([encoder.load_adapter(b) for b in blobs]), base)


def _soup_scores(fits: list[tuple[bytes, object]], texts, labels, base: encoder.EncoderBase):
    """P(unsafe) of `texts` from the soup of these (adapter, own scores) fits: one fit's own scores (its soup is
    that fit), else the soup merged into the base, scored on the training device."""
    if len(fits) == 1:
        return fits[0][1]
    device = encoder.training_device()
    model = encoder.merged(_soup_bytes([blob for blob, _ in fits], base), len(labels), base).to(device)
    return 1.0 - encoder.Trained(model, labels, base, device).probabilities(texts)[:, labels.index(evalset.SAFE)]


def _out_of_fold(dev, x, y, gx, gy, labels, epochs, base: encoder.EncoderBase, cache: Path | None,
                 fit_missing: bool = True, folds: set[int] | None = None, seeds=encoder.SEEDS,
                 seed: int | None = None):
    """P(unsafe) of each dev prompt from the fold model that did not train on it (FOLDS models, each the soup
    of one fit per seed, as the shipped adapter is). `cache` (an .npz) keeps them keyed by the data, the
    templates, the training settings and the seeds, written after every fold, with each seed's own scores
    (`oof_seeds`, to compare a soup with its fits): changing only the operating-point rule re-runs no fit.
    `folds` (0-based) and `seed`: fit only these (a part run: several processes at once on one GPU), each fit
    into its part file (part_file) and no soup scored; a later run without them soups those fits and scores."""
    import numpy as np
    key = _fits_key(x, y, gx, gy, labels, epochs, base, seeds)
    oof, done = np.zeros(len(dev)), np.zeros(FOLDS, bool)
    oof_seeds = np.zeros((len(seeds), len(dev)))
    if (stored := _kept(cache, key)) is not None:
        oof, done, oof_seeds = stored["oof"], stored["done"], stored["oof_seeds"]
        log.info("out-of-fold scores of folds %s from %s", [k + 1 for k in np.flatnonzero(done)], cache)
    for fold, (train_idx, held_idx) in enumerate(fold_splits(dev)):
        if done[fold] or (folds is not None and fold not in folds):
            continue
        texts, targets = [x[i] for i in train_idx] + gx, [y[i] for i in train_idx] + gy
        held = [x[i] for i in held_idx]
        fits = [_one_fit(str(fold + 1), s, texts, targets, labels, epochs, base, key, cache, fit_missing, held,
                         init_seed=seeds[0]) for s in (seeds if seed is None else (seed,))]
        if folds is not None:
            continue
        oof[held_idx] = _soup_scores(fits, held, labels, base)
        for row, (_, scores) in enumerate(fits):
            oof_seeds[row, held_idx] = scores
        done[fold] = True
        _keep(cache, key, oof=oof, done=done, oof_seeds=oof_seeds, seeds=np.array(seeds))
    return oof


def _host() -> str:
    """The CPU kind that read a score (onnxruntime's int8 kernels, and torch's, differ between CPU kinds)."""
    import platform
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{platform.machine()} {names[0] if names else platform.processor()}"


def kept_scores(cache: Path | None, reader: str, model_key: list, texts: list[str], score):
    """score(texts) (a probabilities array), or what an earlier build kept beside `cache` for the same reader,
    model, versions, host and texts in the same order. The build's two readings of ~110 k prompts (the int8 graph
    on parity + test, the fp32 model on parity: most of its hour on two cores) depend on the adapter, not on the
    operating point, so a build that changes only the rule reads nothing again. All or nothing: int8 activations
    are quantised per batch, so a prompt read in another batch may score a little otherwise."""
    key = hashlib.sha256(json.dumps([reader, model_key, texts]).encode("utf-8")).hexdigest()
    target = _beside(Path(cache), reader) if cache is not None else None
    if (stored := _kept(target, key)) is not None:
        log.info("%s scores of %d prompts from %s", reader, len(texts), target)
        return stored["scores"]
    scores = score(texts)
    _keep(target, key, scores=scores)
    return scores


def build(out_dir: Path, data_path: Path | None = None, limit: int | None = None, epochs: int = encoder.EPOCHS,
          oof_cache: Path | None = None, base: encoder.EncoderBase = encoder.SHIPPED, fits_only: bool = False,
          adapter_from: Path | None = None, fit_part: str | None = None, seeds=encoder.SEEDS,
          seed: int | None = None) -> dict:
    """Train on dev (+ templated), choose the operating point out of fold, write the adapter and the sidecar,
    then build the ONNX graph (build_onnx) and record its sha256 and its test metrics; returns the sidecar.
    `limit` trains on the first N dev examples only, without folds (tests of determinism on a subset).
    The GPU part alone: `fits_only` stops after the fold models and the final fit, writing the adapter and
    its fit record (FIT_RECORD_NAME) into out_dir; `adapter_from` (such a folder, from another machine)
    takes that adapter instead of fitting, refused unless its record matches this data and these settings.
    Every model is the soup (encoder.soup) of one fit per seed in `seeds`. `fit_part` (with fits_only): one of
    FIT_PARTS alone, and `seed` one of its fits alone, so the fits can run at once as processes on one GPU (their
    adapters beside `oof_cache`, part_file); a `fits_only` run after them soups them, scores the held-out
    quarters with the fold soups and writes the final soup and its record."""
    import numpy as np

    if fit_part is not None and (not fits_only or fit_part not in FIT_PARTS or oof_cache is None):
        raise ValueError(f"fit part {fit_part!r}: use one of {', '.join(FIT_PARTS)}, with fits_only and an oof cache")
    if seed is not None and (fit_part is None or seed not in seeds):
        raise ValueError(f"seed {seed}: one fit alone is one of the seeds {list(seeds)} of a fit part (--fit-part)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = Path(data_path or evalset.data_path())
    examples = evalset.load(data_path)
    dev = [e for e in examples if e.split == "dev"][:limit]
    x = [normalize(e.text) for e in dev]
    y = [e.label for e in dev]
    # Templated examples (training only, never evaluated): added to every training fold and to the
    # final fit; the held-out folds and the operating point see hand-written dev prompts alone.
    generated = [] if limit is not None else templates.generate()
    gx = [normalize(t) for t, _ in generated]
    gy = [label for _, label in generated]
    labels = sorted({e.label for e in examples})     # every label, also for a subset run

    training = {"epochs": epochs, "batch": encoder.BATCH, "learning_rate": base.learning_rate,
                "head_learning_rate": base.head_learning_rate, "weight_decay": encoder.WEIGHT_DECAY,
                "seeds": list(seeds), "threads": encoder.TRAIN_THREADS, "schedule": "one-cycle, 10 % warm-up",
                "device": encoder.training_device()} | ({"autocast": "bf16"} if encoder.AUTOCAST_BF16 else {})
    record = _fit_record(data_path, training, base, limit)
    if adapter_from is not None:
        adapter_blob, training = _adopted_adapter(Path(adapter_from), record)
        _write(out_dir / ADAPTER_NAME, adapter_blob)
        oof = _out_of_fold(dev, x, y, gx, gy, labels, epochs, base, oof_cache, fit_missing=False) \
            if limit is None else None
    else:
        folds = None if fit_part is None else (set() if fit_part == "final" else {int(fit_part) - 1})
        oof = _out_of_fold(dev, x, y, gx, gy, labels, epochs, base, oof_cache, folds=folds, seeds=seeds,
                           seed=seed) if limit is None else None
        part_fits = {"fit_part": fit_part, "fits": [str(part_file(Path(oof_cache), fit_part, s))
                                                    for s in (seeds if seed is None else (seed,))]} if fit_part else None
        if fit_part not in (None, "final"):
            return part_fits
        reused = _reusable_adapter(out_dir, record) if limit is None and fit_part is None else None
        if reused is None:
            key, cache = _fits_key(x, y, gx, gy, labels, epochs, base, seeds), oof_cache if limit is None else None
            blobs = [_one_fit("final", s, x + gx, y + gy, labels, epochs, base, key, cache, True,
                              init_seed=seeds[0])[0] for s in (seeds if seed is None else (seed,))]
            if fit_part == "final":
                return part_fits
            adapter_blob = _soup_bytes(blobs, base)
            _write(out_dir / ADAPTER_NAME, adapter_blob)
        else:
            adapter_blob, training = reused
            record["adapter"]["training"] = training
            log.info("final fit: %s was trained from this data with these settings (on %s); kept",
                     out_dir / ADAPTER_NAME, training["device"])
    if fits_only:
        record["adapter"]["sha256"] = hashlib.sha256(adapter_blob).hexdigest()
        _write(out_dir / FIT_RECORD_NAME, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
        return record

    write_known_words(out_dir)   # the spelling layer reads it, and the rule layers run below
    if limit is None:
        readings = rule_readings(dev)
        unsafe = readings["unsafe"]
        point, chosen = choose_operating_point(oof, readings["words"], readings["layers"], unsafe, readings["blind"],
                                               readings["beside_idiom"])
        refused = decisions(point, oof, readings)
        dev_filter = {**chosen, "all_dev": {"prompts": len(dev), "recall": round(float(refused[unsafe].mean()), 4),
                                            "harmless_refused": round(float(refused[~unsafe].mean()), 4)}}
        dev_alone = _metrics(oof, y, point["threshold"])
    else:
        point = {"threshold": 0.5, "vetoes": {}, "short_vetoes": {}, "min_words": 5, "veto_min_words": 7}
        dev_filter, dev_alone = None, None
    threshold = point["threshold"]
    sidecar = {
        "version": SIDECAR_VERSION,
        "model": MODEL_NAME,
        "base": base.sidecar_entry(),
        "adapter": {"file": ADAPTER_NAME, "sha256": hashlib.sha256(adapter_blob).hexdigest(),
                    "lora": _lora_settings(base),
                    "training": training},
        "tokenizer_sha256": hashlib.sha256(base.tokenizer_json()).hexdigest(),
        "input": "input_ids, attention_mask (WordPiece ids of the normalised prompt, toonark.prompts.normalize)",
        "labels": labels,
        "safe_label": evalset.SAFE,
        **point,
        "trained_on": {"file": f"toonark/data/{data_path.name}", "sha256": evalset.data_sha256(data_path),
                       "split": "dev", "examples": len(dev), "limit": limit},
        "templated": {"file": f"toonark/data/{templates.DATA_NAME}",
                      "sha256": hashlib.sha256(templates.data_path().read_bytes()).hexdigest(),
                      "examples": len(generated), "use": "training only, never evaluated"},
        "quantization": {"weights": "int8 per output channel", "reduce_range": QUANT_REDUCE_RANGE},
        "features": (f"{base.model} (mean pooled) + linear head; LoRA rank {encoder.LORA_RANK} on every linear "
                     f"layer, trained on dev + templated; the uniform soup of the fits with seeds {list(seeds)} "
                     f"(LoRA updates and heads averaged); ONNX int8 (onnxruntime dynamic quantisation)"),
        "operating_point_rule": (f"threshold, vetoes (a rule hit of that layer in a prompt of veto_min_words+ words "
                                 f"is excused when P(unsafe) < the veto), short_vetoes (the same in a shorter prompt "
                                 f"the classifier reads) and the fewest words the classifier reads "
                                 f"(min_words): among the points with at most {FALSE_REFUSAL_BUDGET:.0%} harmless refused, "
                                 f"the fewest harmless refused within {RECALL_TOLERANCE_SE:g} standard errors of the best "
                                 f"recall (0: the highest recall) or, where the best is over it, at least the recall "
                                 f"target {RECALL_TARGET:.0%} plus {RECALL_TARGET_MARGIN_SE:g} standard error(s), on "
                                 f"{FOLDS}-fold out-of-fold scores (folds grouped by base prompt); recall on "
                                 f"the dev prompts of batches whose dev half no rule was written from, harmless refused "
                                 f"on all dev"),
        "metrics": {"dev_out_of_fold_classifier_alone": dev_alone, "dev_out_of_fold_whole_filter": dev_filter},
        "built_with": _versions(),
    }
    # The graph first, then its numbers into the sidecar; the sidecar is written last (atomically), so an
    # interrupted run leaves the previous sidecar, which names the previous adapter: a stale build is refused.
    blob = _export(adapter_blob, sidecar, base)
    import onnxruntime as ort
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    scored = examples if limit is None else dev     # a subset run (tests) compares on its own prompts
    parity = list(range(0, len(scored), PARITY_EVERY if limit is None else 1))
    test_rows = [i for i, e in enumerate(scored) if e.split == "test"]
    read = sorted(set(parity) | set(test_rows))       # what the int8 graph reads: each prompt once
    position = {row: k for k, row in enumerate(read)}
    read_x = [normalize(scored[i].text) for i in read]
    kept = oof_cache if limit is None else None
    # Both readings in order of token count (classifier.by_length: half the time); the int8 one under its own
    # name, since its per-batch quantisation scores a prompt a little otherwise than a data-order reading kept before.
    onnx_read = kept_scores(kept, "onnx-int8-by-length",
                            [hashlib.sha256(blob).hexdigest(), _versions()["onnxruntime"], _host()], read_x,
                            lambda t: _onnx_probabilities(session, t, base))
    onnx_p = onnx_read[[position[i] for i in parity]]
    reference = reference_model(adapter_blob, labels, base)
    parity_x = [read_x[position[i]] for i in parity]
    torch_p = kept_scores(kept, "torch-fp32", [sidecar["adapter"]["sha256"], base.sha256, _versions()["torch"],
                                               _host()], parity_x,
                          lambda t: by_length(encoder._tokenizer(base), t, reference.probabilities))
    safe_index = labels.index(evalset.SAFE)
    flips = int(np.sum((1.0 - onnx_p[:, safe_index] >= threshold) != (1.0 - torch_p[:, safe_index] >= threshold)))
    check_int8_parity(flips, len(parity))     # before anything is written: the previous sidecar stays
    test_p = onnx_read[[position[i] for i in test_rows]]
    sidecar["onnx_sha256"] = hashlib.sha256(blob).hexdigest()
    sidecar["probes"] = probes(reference, examples)
    sidecar["metrics"].update({
        "test_classifier_alone": _metrics(list(1.0 - test_p[:, safe_index]), [scored[i].label for i in test_rows],
                                          threshold) if test_rows else None,
        "onnx_int8_vs_torch_fp32_max_abs_diff": round(float(np.abs(onnx_p - torch_p).max()), 6),
        "onnx_int8_vs_torch_fp32_decisions_differ": {"prompts": flips, "of": len(parity), "sample_of": len(scored),
                                                     "every": PARITY_EVERY if limit is None else 1},
    })
    _write(out_dir / MODEL_NAME, blob)
    _write(out_dir / TOKENIZER_NAME, base.tokenizer_json())
    _write(out_dir / SIDECAR_NAME, (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    log.info("wrote %s (%d bytes, sha256 %s), operating point %s", out_dir / MODEL_NAME, len(blob),
             sidecar["onnx_sha256"][:12], point)
    return sidecar


# Probe prompts with the fp32 model's P(unsafe), kept in the sidecar: every load of the int8 graph scores them on
# the host that serves (classifier.SafetyClassifier) and refuses a graph that reads them otherwise there. The
# parity gate above runs on the build host only, and onnxruntime's int8 kernels differ by CPU: round 10's
# full-range graph passed it on a VNNI host and refused `make demo`'s own prompt on an AVX2-only one.
PROBES_PER_LABEL = 2      # clear-cut dev prompts of each unsafe category
SAFE_PROBES = 8           # and of harmless ones (the saturated graph refused half of the harmless look-alikes)
PROBE_CANDIDATES = 4      # distinct dev prompts looked at per probe wanted
PROBE_CLEAR = 0.05        # clear-cut: the fp32 model's P(unsafe) under this (harmless) or over 1 - this (unsafe)
PROBE_EXTRA = ("a happy otter flying a kite",)    # make demo's prompt: the one the saturated graph refused


def reference_model(adapter_blob: bytes, labels: list[str], base: encoder.EncoderBase) -> encoder.Trained:
    """The fp32 model an int8 graph is exported from: the saved fp16 adapter merged into the base. The build's
    parity gate and the probes' scores are read from it."""
    return encoder.Trained(encoder.merged(adapter_blob, len(labels), base), labels, base)


def probes(reference: encoder.Trained, examples: list[evalset.Example]) -> list[dict]:
    """The sidecar's `probes`: [{"text", "unsafe"}] with P(unsafe) from the fp32 model the graph is exported from,
    for PROBE_EXTRA and, in data order, the first hand-written (not perturbed) dev prompts of every label that the fp32
    model reads clear-cut (a misspelt or uncertain prompt may move more under int8 on a sound graph)."""
    labels = reference.labels
    wanted = {label: SAFE_PROBES if label == evalset.SAFE else PROBES_PER_LABEL for label in labels}
    candidates: dict[str, list[str]] = {label: [] for label in labels}
    for e in examples:
        text = normalize(e.text)
        pool = candidates.get(e.label)
        if e.split == "dev" and e.kind == "base" and pool is not None \
                and len(pool) < wanted[e.label] * PROBE_CANDIDATES and text not in pool:
            pool.append(text)
    texts = [normalize(t) for t in PROBE_EXTRA] + [t for label in labels for t in candidates[label]]
    fp32 = reference.probabilities(texts)
    unsafe = {text: round(float(1.0 - row[labels.index(evalset.SAFE)]), 4) for text, row in zip(texts, fp32)}
    chosen = [normalize(t) for t in PROBE_EXTRA]
    for label in labels:
        clear = [t for t in candidates[label]
                 if (unsafe[t] < PROBE_CLEAR if label == evalset.SAFE else unsafe[t] > 1.0 - PROBE_CLEAR)]
        chosen += [t for t in clear if t not in chosen][:wanted[label]]
    return [{"text": text, "unsafe": unsafe[text]} for text in chosen]


def check_int8_parity(differ: int, prompts: int) -> None:
    """Refuse an int8 graph whose decisions at the threshold differ from the fp32 model's on more than
    INT8_DECISIONS_DIFFER_MAX of the prompts: per-channel dynamic int8 changed 0.84-1.04 % in rounds 7-10, while
    round 13's adapter came out of quantize_dynamic reading every prompt as safe (54.7 % differ; its fp32 graph
    matched torch) and nothing stopped that sidecar from being written."""
    if differ > INT8_DECISIONS_DIFFER_MAX * prompts:
        raise ValueError(f"the int8 graph's decisions differ from the fp32 model's on {differ} of {prompts} prompts "
                         f"({differ / prompts:.1%}; at most {INT8_DECISIONS_DIFFER_MAX:.1%}): the quantisation broke the "
                         f"graph, so neither it nor the sidecar was written; check the sidecar's quantization settings "
                         f"(encoder.export_onnx, reduce_range) against this host's CPU before adopting this adapter")


def _fit_record(data_path: Path, training: dict, base: encoder.EncoderBase, limit: int | None) -> dict:
    """What an adapter was fitted from, in the sidecar's own keys: a later build may reuse or adopt an adapter
    only when all of it matches (training is deterministic, so a refit would write the same bytes)."""
    return {"version": SIDECAR_VERSION,
            "trained_on": {"sha256": evalset.data_sha256(data_path), "limit": limit},
            "templated": {"sha256": hashlib.sha256(templates.data_path().read_bytes()).hexdigest()},
            "base": {"model": base.model, "safetensors_sha256": base.sha256},
            "adapter": {"lora": _lora_settings(base), "training": training}}


def _differences(old: dict, record: dict, blob: bytes) -> list[str]:
    """Which of the record's fields `old` (a sidecar or a fit record) does not match; [] when it is the same fit.
    The device the fit ran on is not compared: it is recorded, and each device's fits are deterministic."""
    def strip(training):
        return {k: v for k, v in (training or {}).items() if k != "device"}
    pairs = {"format version": (old.get("version"), record["version"]),
             "labelled data": (old.get("trained_on", {}).get("sha256"), record["trained_on"]["sha256"]),
             "subset (limit)": (old.get("trained_on", {}).get("limit"), record["trained_on"]["limit"]),
             "templated data": (old.get("templated", {}).get("sha256"), record["templated"]["sha256"]),
             "base": (old.get("base", {}).get("safetensors_sha256"), record["base"]["safetensors_sha256"]),
             "LoRA settings": (old.get("adapter", {}).get("lora"), record["adapter"]["lora"]),
             "training settings": (strip(old.get("adapter", {}).get("training")), strip(record["adapter"]["training"])),
             "adapter bytes": (old.get("adapter", {}).get("sha256"), hashlib.sha256(blob).hexdigest())}
    return [name for name, (have, want) in pairs.items() if have != want]


def _reusable_adapter(out_dir: Path, record: dict) -> tuple[bytes, dict] | None:
    """(adapter bytes, its training settings) already in `out_dir` when its sidecar (or, in a fits-only
    folder, its fit record) says it is this fit, on whichever device it ran (an MPNet adapter fitted on a GPU
    stays usable on a CPU machine): an operating-point change then costs the fold scores' cache read and the
    export, not a final fit."""
    for name in (SIDECAR_NAME, FIT_RECORD_NAME):
        try:
            old = json.loads((out_dir / name).read_text(encoding="utf-8"))
            blob = (out_dir / ADAPTER_NAME).read_bytes()
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        return None if _differences(old, record, blob) else (blob, old["adapter"]["training"])
    return None


def _adopted_adapter(folder: Path, record: dict) -> tuple[bytes, dict]:
    """(adapter bytes, its training settings) from a `fits_only` run's folder, e.g. on a GPU machine; the
    device it ran on is the one setting allowed to differ (it is recorded in the sidecar)."""
    try:
        old = json.loads((folder / FIT_RECORD_NAME).read_text(encoding="utf-8"))
        blob = (folder / ADAPTER_NAME).read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err.filename}: missing; write it with `scripts/safety_model.py --fits-only "
                                f"--out {folder}` on the training machine") from None
    differ = _differences(old, record, blob)
    if differ:
        raise ValueError(f"{folder}: its adapter was fitted with another {', '.join(differ)} than this build's; "
                         f"refit it (`scripts/safety_model.py --fits-only`) from this checkout")
    return blob, old["adapter"]["training"]


def _lora_settings(base: encoder.EncoderBase) -> dict:
    return {"rank": encoder.LORA_RANK, "alpha": encoder.LORA_ALPHA, "dropout": encoder.LORA_DROPOUT,
            "targets": list(base.lora_targets)}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import peft
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnx_opset": encoder.ONNX_OPSET}


def _export(adapter_blob: bytes, sidecar: dict, base: encoder.EncoderBase) -> bytes:
    # A sidecar without `quantization` (before 2026-12-04) was built with full-range weights: it rebuilds those bytes.
    # The adapter merges with the LoRA alpha the sidecar names (its recipe's), not this code's: a checkout whose
    # recipe changed (round 18: rank 64, alpha 128) still rebuilds the shipped graph of an older adapter.
    return encoder.export_onnx(adapter_blob, sidecar["labels"], hashlib.sha256(adapter_blob).hexdigest(), base,
                               reduce_range=sidecar.get("quantization", {}).get("reduce_range", False),
                               alpha=sidecar.get("adapter", {}).get("lora", {}).get("alpha"))


def _onnx_probabilities(session, texts, base: encoder.EncoderBase):
    from toonark.prompt_safety.classifier import run_graph
    tokenizer = encoder._tokenizer(base)
    return by_length(tokenizer, texts, lambda batch: run_graph(session, tokenizer, batch))


def sidecar_base(sidecar_path: Path) -> str:
    """The hub id of the base a sidecar was trained on (the shipped base when there is no sidecar yet)."""
    try:
        return json.loads(Path(sidecar_path).read_text(encoding="utf-8"))["base"]["model"]
    except FileNotFoundError:
        return encoder.SHIPPED.model


def build_onnx(data_dir: Path) -> dict:
    """`make setup`: the graph and tokenizer from the tracked adapter + sidecar in `data_dir` (skipped when the
    built graph already carries this adapter's sha256). Returns {"onnx_sha256", "matches_sidecar", "built"}:
    the bytes equal the sidecar's when the versions of built_with are installed."""
    data_dir = Path(data_dir)
    sidecar = json.loads((data_dir / SIDECAR_NAME).read_text(encoding="utf-8"))
    if sidecar.get("version") != SIDECAR_VERSION:
        raise ValueError(f"{data_dir / SIDECAR_NAME}: version {sidecar.get('version')!r}, expected {SIDECAR_VERSION}; "
                         f"retrain with `make safety-model`")
    adapter_blob = (data_dir / ADAPTER_NAME).read_bytes()
    digest = hashlib.sha256(adapter_blob).hexdigest()
    if digest != sidecar["adapter"]["sha256"]:
        raise ValueError(f"{data_dir / ADAPTER_NAME}: sha256 {digest[:12]}... is not the sidecar's "
                         f"({sidecar['adapter']['sha256'][:12]}...); retrain both with `make safety-model`")
    model_path = data_dir / MODEL_NAME
    if model_path.exists() and (data_dir / TOKENIZER_NAME).exists():
        current = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if current == sidecar["onnx_sha256"]:
            return {"onnx_sha256": current, "matches_sidecar": True, "built": False}
    base = encoder.base_named(sidecar["base"]["model"])
    blob = _export(adapter_blob, sidecar, base)
    _write(data_dir / TOKENIZER_NAME, base.tokenizer_json())
    _write(model_path, blob)
    built = hashlib.sha256(blob).hexdigest()
    if built != sidecar["onnx_sha256"]:
        log.warning("%s: sha256 %s... differs from the reference build %s... (other versions than the sidecar's "
                    "built_with %s); the graph carries the same adapter", model_path, built[:12],
                    sidecar["onnx_sha256"][:12], sidecar["built_with"])
    return {"onnx_sha256": built, "matches_sidecar": built == sidecar["onnx_sha256"], "built": True}


# wordfreq's Zipf scale: 3.0 is about once per million words ("bandage", "sextant"), 2.5 a third of that
# ("oozing" 2.89, "saluting" 2.74). Much rarer entries are mostly names and misspellings, which must stay
# correctable. 2.5 (was 3.0): on dev the rules alone refused 7.98 % of harmless prompts instead of 8.16 %
# ("cherry pie oozing" was "boozing" missing a letter) and caught one unsafe prompt fewer of 10,500 (2.0:
# 7.90 %, three fewer).
WORDFREQ_MIN_ZIPF = 2.5


def known_words() -> list[str]:
    """Known English words: whole-word tokens (3+ letters) of the CLIP BPE vocabulary, from the open_clip
    package file that `make setup` installs (read as data; open_clip itself is never imported: it needs
    torchvision), plus the English words wordfreq counts at least WORDFREQ_MIN_ZIPF. CLIP's vocabulary
    alone lacks common words such as "bandage", which one letter from a rule word was then "corrected"
    into it ("bondage"); wordfreq's lists are pinned data of the build-time extra."""
    import gzip
    import importlib.util
    import re
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip (its BPE vocabulary file) is missing; run `make setup`", name="open_clip")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    words = set()
    for line in merges:
        token = "".join(line.split())
        if token.endswith("</w>") and re.fullmatch(r"[a-z]{3,}", token[:-4]):
            words.add(token[:-4])
    try:
        import wordfreq
    except ImportError:
        raise ImportError("wordfreq is missing; run `make setup` (the safety-model extra)", name="wordfreq") from None
    for word in wordfreq.top_n_list("en", 100000):
        if re.fullmatch(r"[a-z]{3,}", word) and wordfreq.zipf_frequency(word, "en") >= WORDFREQ_MIN_ZIPF:
            words.add(word)
    return sorted(words)


def write_known_words(out_dir: Path) -> Path:
    from toonark.prompt_safety.spelling import KNOWN_WORDS_NAME
    words = known_words()
    header = ("# Known English words: whole-word tokens of the CLIP BPE vocabulary (open_clip bpe_simple_vocab_16e6)\n"
              f"# and wordfreq's English words of Zipf >= {WORDFREQ_MIN_ZIPF:g}, written by `make safety-model`.\n"
              "# toonark.prompt_safety.spelling never 'corrects' these.\n")
    path = Path(out_dir) / KNOWN_WORDS_NAME
    _write(path, (header + "\n".join(words) + "\n").encode("utf-8"))
    return path
