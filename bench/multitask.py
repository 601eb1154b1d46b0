"""Several tasks, one encoder: interference of deltas used together, and merged task deltas (docs/results.md).

MiniLM-L6 gets one delta per task (BBC, R8, 20NG, SpamAssassin), each with its own classification head. Then:

* interference (issue: sparse fine-tuning): the BBC and R8 deltas active together on the encoder, each task
  evaluated with its own head — for LoRA deltas and for sparse deltas with the same number of parameters;
* merging: the four encoder deltas merged into one by task arithmetic, TIES, DARE-TIES, Fisher and
  Consensus; each task evaluated with the merged encoder and its own head.

Accuracies are reported relative to each task's own delta alone. Every training run is its own subprocess.

    .venv/bin/python bench/multitask.py --write docs/results.md     # trains what runs/multitask lacks
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "multitask"
THREADS = int(os.environ.get("RESULTS_THREADS", "2"))
TASKS = ("bbc", "r8", "20ng", "spam")
STEPS, BATCH, MAX_LEN, LR = 150, 16, 128, 2e-3
EVAL_EXAMPLES = 500  # the first examples of each fixed test split (20NG's has 7,521)
LORA = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear", "modules_to_save": ["classifier"]}


def delta_config(kind: str, model: torch.nn.Module) -> dict:
    if kind == "lora":
        return dict(LORA)
    # sparse: in every linear layer as many entries as LoRA r=8 trains there, r·(in + out)
    import deltatune as dt

    pattern = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path != "classifier" and not path.startswith("classifier"):
            pattern[path.replace(".", r"\.")] = LORA["r"] * (module.in_features + module.out_features)
    k = max(pattern.values())
    return {"kind": "sparse", "k": k, "k_pattern": {p: v for p, v in pattern.items() if v != k},
            "targets": "all-linear", "modules_to_save": ["classifier"], **SPARSE_OPTIONS}


SPARSE_OPTIONS: dict = {}  # SpIEL regrowth options are added here once the method exposes them


def test_subset(splits):
    import dataclasses

    return dataclasses.replace(splits, test=splits.test[:EVAL_EXAMPLES])


def train_one(task: str, kind: str) -> dict:
    from deltatune import zoo
    from deltatune.train import train

    splits = test_subset(zoo.load_dataset(task))
    torch.manual_seed(0)
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    out = RUNS / f"{kind}-{task}"
    cfg = {"output_dir": str(out), "max_steps": STEPS, "batch_size": BATCH, "lr": LR, "warmup_ratio": 0.06,
           "max_length": MAX_LEN, "eval_every": 10**9, "max_eval_examples": 200, "seed": 0, "progress": False,
           "plot": False, "delta": delta_config(kind, model), "name": task}
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, splits=splits)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"task": task, "kind": kind, "steps": result.steps, "accuracy": result.metrics.get("test_accuracy"), "wall_s": time.perf_counter() - t0,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_rss_mb": usage.ru_maxrss / 1024, "delta_dir": str(out / "delta")}


def ensure_trained(kind: str, tasks: tuple[str, ...]) -> dict[str, dict]:
    store = RUNS / "trained.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    for task in tasks:
        key = f"{kind}-{task}"
        if key in done and Path(done[key]["delta_dir"]).is_dir():
            continue
        print(f"== train {key}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--train-one", f"{task}:{kind}"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        if proc.returncode != 0:
            sys.exit(f"training {key} failed:\n{proc.stderr[-4000:]}")
        done[key] = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("ROW "))[4:])
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(done, indent=1))
    return {t: done[f"{kind}-{t}"] for t in tasks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-one", help=argparse.SUPPRESS)
    ap.add_argument("--kinds", default="lora", help="comma-separated delta kinds to train (lora, sparse)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    if args.train_one:
        task, kind = args.train_one.split(":")
        print("ROW " + json.dumps(train_one(task, kind)))
        return
    for kind in args.kinds.split(","):
        print(json.dumps(ensure_trained(kind, TASKS if kind == "lora" else ("bbc", "r8")), indent=1))


if __name__ == "__main__":
    main()
