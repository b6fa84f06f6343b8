"""Build-time only: train the prompt classifier from the dev part of toonark/data/safety_prompts.json and
export it to ONNX (scikit-learn + skl2onnx, the `safety-model` extra; the runtime needs onnxruntime only).

Byte-reproducible: one BLAS thread, a deterministic solver, coefficients rounded to 6 decimals before
export (so last-bit differences of floating-point sums cannot change the file), fixed opsets and
producer fields. The sidecar JSON records the data's sha256, the model's sha256, the threshold, the word veto and
the metrics.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from toonark.prompt_safety import evalset, templates
from toonark.prompt_safety.classifier import INPUT_NAME, MODEL_NAME, SIDECAR_NAME
from toonark.prompts import normalize

log = logging.getLogger(__name__)

SIDECAR_VERSION = 2
OPSETS = {"": 17, "ai.onnx.ml": 3}
FOLDS = 4
C = 30.0
# The operating point (classifier threshold, word-rule veto) is picked from this grid by choose_operating_point.
# Phrase rules get no veto: they are relations as specific as the idiom allow-rules that may override them,
# and some read the raw text the classifier never sees (masked swear words, "p*ssy").
THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))          # 0.30 .. 0.95
WORD_VETOES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# The whole filter may refuse at most this share of the harmless dev prompts (out of fold). The 1 %
# costs about a third of the recall with this much data (README "Kid-safe prompts"); 7 % was set near the
# harmless-refused rate the filter measured when the budget replaced a weighted sum (a policy choice: a
# missed unsafe prompt is the worst failure, a refused harmless one the next worst).
FALSE_REFUSAL_BUDGET = 0.07


def _pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union
    # lowercase=False: the input is already normalised, and skl2onnx would otherwise add a
    # StringNormalizer that needs an installed en_US locale at run time. (char_wb n-grams score the
    # same out of fold on dev, but skl2onnx cannot convert them.)
    chars = TfidfVectorizer(analyzer="char", ngram_range=(2, 5), sublinear_tf=True, lowercase=False, min_df=1)
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=False,
                            token_pattern=r"[a-z0-9]+")
    return make_pipeline(make_union(chars, words), LogisticRegression(C=C, max_iter=5000, solver="lbfgs", tol=1e-3))


def _unsafe_scores(train_x, train_y, texts):
    """P(unsafe) of `texts` from a model trained on (train_x, train_y): one out-of-fold fold."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        pipe = _pipeline().fit(train_x, train_y)
        _round(pipe)
        return 1.0 - pipe.predict_proba(texts)[:, list(pipe.classes_).index(evalset.SAFE)]


def _round(pipe) -> None:
    import numpy as np
    clf = pipe[-1]
    clf.coef_ = np.round(clf.coef_, 6)
    clf.intercept_ = np.round(clf.intercept_, 6)


def _refused(score, layer, vetoable, threshold: float, word_veto: float):
    """The layered filter's decisions from its parts, for many prompts at once (numpy arrays; mirrors
    LayeredFilter.verdict): a rule hit stands unless the prompt can be vetoed (MIN_VETO_WORDS words) and
    the classifier's score is under the word veto (phrase hits are never vetoed); otherwise the classifier
    refuses at the threshold. score -1: no classifier reading (under MIN_CLASSIFIER_WORDS words)."""
    excused = vetoable & (layer == "word") & (score < word_veto)
    return ((layer != "") & ~excused) | (score >= threshold)


def choose_operating_point(scores, layers, vetoable, unsafe, blind) -> tuple[float, dict[str, float], dict]:
    """(threshold, vetoes, metrics): the grid point with the highest recall whose harmless-refused rate is
    within FALSE_REFUSAL_BUDGET (ties: fewer harmless refused, then the higher threshold), from out-of-fold
    classifier scores and the rules' verdicts on dev. Recall is counted on the unsafe dev prompts the rules
    were NOT written from (`blind`: batches whose dev half no rule came from, safety_batches.json
    `dev_used_for_rules` false): on the other dev prompts the rules are fitted (they catch 99 %) and would
    say the classifier adds nothing. Harmless refused is counted on all harmless dev prompts: the
    classifier's out-of-fold scores are honest on all of them, and the blind ones carry the rules' own
    false refusals. A budget rather than a weighted sum: recall and harmless refused trade almost linearly
    over thresholds 0.5-0.85 (about 2 points of recall per point of refusals), so any fixed weight near
    that rate makes the chosen point jump with each new batch; a budget moves it only as far as the data
    does. Arguments are numpy arrays over the dev prompts (see _refused; unsafe, blind: bool)."""
    best = None
    for threshold in sorted(THRESHOLDS, reverse=True):
        for word in WORD_VETOES:
            refused = _refused(scores, layers, vetoable, threshold, word)
            recall, wrong = float(refused[unsafe & blind].mean()), float(refused[~unsafe].mean())
            if wrong <= FALSE_REFUSAL_BUDGET and (best is None or (recall, -wrong) > (best[0], -best[1])):
                best = (recall, wrong, threshold, {"word": word})
    if best is None:
        raise ValueError(f"no threshold and veto keep harmless refusals within {FALSE_REFUSAL_BUDGET:.0%} on dev: the "
                         f"rules alone refuse more; fix the rules' false refusals first")
    recall, wrong, threshold, vetoes = best
    return threshold, vetoes, {"recall_on_prompts_the_rules_were_not_written_from": round(recall, 4),
                               "harmless_refused_all_dev": round(wrong, 4)}


def _metrics(scores, labels, threshold) -> dict:
    unsafe = [p for p, y in zip(scores, labels) if y != evalset.SAFE]
    safe = [p for p, y in zip(scores, labels) if y == evalset.SAFE]
    return {"unsafe": len(unsafe), "harmless": len(safe),
            "recall": round(sum(p >= threshold for p in unsafe) / len(unsafe), 4),
            "harmless_refused": round(sum(p >= threshold for p in safe) / len(safe), 4)}


def build(out_dir: Path, data_path: Path | None = None, limit: int | None = None) -> dict:
    """Train on dev, export, write `<out_dir>/safety_classifier.onnx` + `.json` atomically; returns the
    sidecar. `limit` trains on the first N dev examples only (tests of determinism on a subset)."""
    import numpy as np
    import sklearn
    import skl2onnx
    from sklearn.model_selection import StratifiedGroupKFold
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import StringTensorType
    from threadpoolctl import threadpool_limits

    from toonark.prompt_safety import evaluate
    from toonark.prompt_safety.layered import MIN_CLASSIFIER_WORDS, MIN_VETO_WORDS, LayeredFilter
    from toonark.prompts import PromptPolicy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_known_words(out_dir)   # the spelling layer reads it, and the rule layers run below
    data_path = Path(data_path or evalset.data_path())
    examples = evalset.load(data_path)
    dev = [e for e in examples if e.split == "dev"][:limit]
    test = [e for e in examples if e.split == "test"]
    x = [normalize(e.text) for e in dev]
    y = [e.label for e in dev]
    groups = [e.base for e in dev]
    # Templated examples (training only, never evaluated): added to every training fold and to the
    # final fit; the held-out folds and the operating point see hand-written dev prompts alone.
    generated = [] if limit is not None else templates.generate()
    gx = [normalize(t) for t, _ in generated]
    gy = [label for _, label in generated]

    with threadpool_limits(1):
        labels = sorted(set(y))
        safe_index = labels.index(evalset.SAFE)
        oof = np.zeros(len(dev))
        if limit is None:
            from joblib import Parallel, delayed
            splits = list(StratifiedGroupKFold(n_splits=FOLDS, shuffle=True, random_state=0).split(x, y, groups))
            # The fold models are independent: one process each (up to the cores there are), one BLAS thread in
            # each, so the scores do not depend on how many run at once.
            held = Parallel(n_jobs=min(FOLDS, os.cpu_count() or 1))(
                delayed(_unsafe_scores)([x[i] for i in tr] + gx, [y[i] for i in tr] + gy, [x[i] for i in ho])
                for tr, ho in splits)
            for (_, hold_idx), scores in zip(splits, held):
                oof[hold_idx] = scores
            rules = LayeredFilter.build(PromptPolicy.load()._rules, classifier=None)
            layers = np.array([getattr(rules.verdict(e.text), "layer", None) or "" for e in dev])
            words = np.array([len(t.split()) for t in x])
            scores = np.where(words >= MIN_CLASSIFIER_WORDS, oof, -1.0)
            fitted = {h for b in evaluate.batches() if b.get("dev_used_for_rules", True) for h in b["bases"]}
            blind = np.array([evalset.sha12(e.base) not in fitted for e in dev])
            unsafe = np.array([e.unsafe for e in dev])
            vetoable = words >= MIN_VETO_WORDS
            threshold, vetoes, chosen = choose_operating_point(scores, layers, vetoable, unsafe, blind)
            refused = _refused(scores, layers, vetoable, threshold, vetoes["word"])
            dev_filter = {**chosen, "all_dev": {"prompts": len(dev), "recall": round(float(refused[unsafe].mean()), 4),
                                                "harmless_refused": round(float(refused[~unsafe].mean()), 4)}}
        else:
            threshold, vetoes, dev_filter = 0.5, {}, {}
        pipe = _pipeline().fit(x + gx, y + gy)
        _round(pipe)

    assert list(pipe.classes_) == labels
    model = to_onnx(pipe, initial_types=[(INPUT_NAME, StringTensorType([None, 1]))],
                    options={id(pipe[-1]): {"zipmap": False}}, target_opset=OPSETS)
    model.producer_name, model.producer_version, model.doc_string = "toonark.prompt_safety.train", "1", ""
    # skl2onnx collects the opset domains in a set: their order follows Python's string hashing, which
    # changes per process. Sorted, the bytes do not.
    opsets = sorted(((o.domain, o.version) for o in model.opset_import))
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    blob = model.SerializeToString()

    # Parity of the exported graph with scikit-learn, on every example (dev and test).
    import onnxruntime as ort
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    all_x = [normalize(e.text) for e in examples]
    onnx_p = session.run(["probabilities"], {INPUT_NAME: np.array(all_x, dtype=object).reshape(-1, 1)})[0]
    sklearn_p = pipe.predict_proba(all_x)
    parity = float(np.abs(onnx_p - sklearn_p).max())
    # What parity must guarantee is the decision: the share of prompts the two would refuse differently.
    flips = int(np.sum((1.0 - onnx_p[:, safe_index] >= threshold) != (1.0 - sklearn_p[:, safe_index] >= threshold)))

    test_scores = 1.0 - onnx_p[[i for i, e in enumerate(examples) if e.split == "test"], safe_index]
    sidecar = {
        "version": SIDECAR_VERSION,
        "model": MODEL_NAME,
        "onnx_sha256": hashlib.sha256(blob).hexdigest(),
        "input": INPUT_NAME + " (normalised prompt, toonark.prompts.normalize)",
        "labels": labels,
        "safe_label": evalset.SAFE,
        "threshold": threshold,
        "vetoes": vetoes,
        "trained_on": {"file": f"toonark/data/{data_path.name}", "sha256": evalset.data_sha256(data_path),
                       "split": "dev", "examples": len(dev), "limit": limit},
        "templated": {"file": f"toonark/data/{templates.DATA_NAME}",
                      "sha256": hashlib.sha256(templates.data_path().read_bytes()).hexdigest(),
                      "examples": len(generated), "use": "training only, never evaluated"},
        "features": "tf-idf char 2-5 grams + word 1-2 grams (sublinear tf) -> logistic regression C=%g; trained on dev + templated" % C,
        "operating_point_rule": (f"threshold and word veto (a word-rule hit in a prompt of {MIN_VETO_WORDS}+ words is "
                                 f"excused when P(unsafe) < the veto) "
                                 f"maximise the whole filter's recall with at most {FALSE_REFUSAL_BUDGET:.0%} harmless refused "
                                 f"on {FOLDS}-fold out-of-fold scores (folds grouped by base prompt); recall on the dev "
                                 f"prompts of batches whose dev half no rule was written from, harmless refused on "
                                 f"all dev"),
        "metrics": {
            "dev_out_of_fold_classifier_alone": _metrics(oof, y, threshold) if limit is None else None,
            "dev_out_of_fold_whole_filter": dev_filter or None,
            "test_classifier_alone": _metrics(list(test_scores), [e.label for e in test], threshold),
            "onnx_vs_sklearn_max_abs_diff": round(parity, 6),
            "onnx_vs_sklearn_decisions_differ": {"prompts": flips, "of": len(examples)},
        },
        "built_with": {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                       "onnx_opsets": OPSETS},
    }
    _atomic_write(out_dir / MODEL_NAME, blob)
    _atomic_write(out_dir / SIDECAR_NAME, (json.dumps(sidecar, indent=2) + "\n").encode("utf-8"))
    log.info("wrote %s (%d bytes, sha256 %s), threshold %.2f, vetoes %s", out_dir / MODEL_NAME, len(blob),
             sidecar["onnx_sha256"][:12], threshold, vetoes)
    return sidecar


# wordfreq's Zipf scale: 3.0 is about once per million words ("bandage", "sextant"); rarer entries
# are mostly names and misspellings, which must stay correctable.
WORDFREQ_MIN_ZIPF = 3.0


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
    _atomic_write(path, (header + "\n".join(words) + "\n").encode("utf-8"))
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; package data is read by the serving user too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
