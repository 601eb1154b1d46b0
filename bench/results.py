"""Real-data results table (docs/results.md): MiniLM-L6 on BBC and R8 — full fine-tuning, LoRA, DoRA, PiSSA,
and peft's LoRA with the same settings and seed — plus SmolLM2-135M with LoRA on a GSM8K training subset.

Every row runs in its own subprocess (so peak RSS is that row's alone) through `dt.train` with the same data
order, schedule and evaluation; only the way the model is adapted differs.

    .venv/bin/python bench/results.py --write docs/results.md          # everything (~1 h on 2 cores)
    .venv/bin/python bench/results.py --rows bbc:lora,bbc:peft-lora    # a subset, printed
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("RESULTS_THREADS", "2"))
CLS_METHODS = {
    "full": ("full fine-tuning", 5e-5),
    "lora": ("LoRA r=8", 2e-3),
    "dora": ("DoRA r=8", 2e-3),
    "pissa": ("LoRA r=8, PiSSA init", 2e-3),
    "peft-lora": ("peft LoRA r=8", 2e-3),
    "spiel": ("SpIEL (sparse, LoRA r=8's count per layer)", 2e-4),
    "lt-sft": ("LT-SFT (sparse, LoRA r=8's total count)", 2e-4),
}
CLS_DATA = {"bbc": 1.0, "r8": 0.5}  # epochs (R8 has 2.9x more training examples than BBC)
GSM_TRAIN, GSM_TEST, GSM_STEPS = 240, 60, 30


def _cls_row(data: str, method: str, out: Path) -> dict:
    import deltatune as dt
    from deltatune import zoo
    from deltatune.train import train

    label, lr = CLS_METHODS[method]
    splits = zoo.load_dataset(data)
    torch.manual_seed(0)
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    lora = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear",
            "modules_to_save": ["classifier"]}
    delta = {**lora, "dora": method == "dora", "init": "pissa" if method == "pissa" else "default"}
    extra = {}
    if method == "spiel":
        from multitask import delta_config

        delta = delta_config("sparse", model)
    elif method == "lt-sft":  # phase 1: half an epoch of dense ΔW at full fine-tuning's lr; phase 2 as the others
        from multitask import lora_entries

        delta = {"kind": "dense", "targets": "all-linear", "modules_to_save": ["classifier"]}
        extra = {"procedure": {"kind": "lt_sft", "k": sum(lora_entries(model).values()), "selection": "global", "dense_epochs": 0.5,
                            "dense_lr": 5e-5}}
    prepare = None
    if method == "full":
        def prepare(m):
            for p in m.parameters():
                p.requires_grad_(True)
    elif method == "peft-lora":
        def prepare(m):
            from peft import LoraConfig, get_peft_model

            get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                         modules_to_save=["classifier"]))
    cfg = {"output_dir": str(out), "epochs": CLS_DATA[data], "batch_size": 16, "lr": lr, "warmup_ratio": 0.06,
           "max_length": 128, "eval_every": 10**9, "seed": 0, "progress": False, "plot": False, "delta": delta,
           **extra}
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, splits=splits, prepare=prepare)
    wall = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"data": data, "method": label, "accuracy": result.metrics["test_accuracy"],
            "macro_f1": result.metrics["test_macro_f1"], "trainable": trainable, "wall_s": wall,
            "steps": result.steps}


def _gsm_row(method: str, out: Path) -> dict:
    from deltatune import zoo
    from deltatune.train import train
    from deltatune.train.evaluate import evaluate_generation

    splits = zoo.load_dataset("gsm8k")
    model, tok = zoo.load_model("smollm2-135m")
    t0 = time.perf_counter()
    steps = 0
    if method == "lora":
        cfg = {"output_dir": str(out), "max_steps": GSM_STEPS, "batch_size": 8, "lr": 5e-4, "max_length": 256,
               "train_examples": GSM_TRAIN, "max_eval_examples": 50, "eval_every": 10**9, "seed": 0,
               "progress": False, "plot": False, "task": "generation",
               "delta": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}}
        steps = train(cfg, model=model, tokenizer=tok, splits=splits).steps
    train_s = time.perf_counter() - t0
    ev = evaluate_generation(model, tok, splits.test[:GSM_TEST], batch_size=25, max_new_tokens=256)
    return {"data": "gsm8k", "method": "SmolLM2-135M + LoRA r=16" if method == "lora" else "SmolLM2-135M base",
            "exact_match": ev["exact_match"], "n_test": ev["n"], "steps": steps, "wall_s": time.perf_counter() - t0,
            "train_s": train_s, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_row(row: str) -> dict:
    data, method = row.split(":")
    out = ROOT / "runs" / "results" / f"{data}-{method}"
    torch.set_num_threads(THREADS)
    res = _gsm_row(method, out) if data == "gsm8k" else _cls_row(data, method, out)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    res["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other load on the machine
    res["threads"] = THREADS
    return res


def _cpu(row: dict) -> str:
    return f"{row['cpu_s']:.0f}" if "cpu_s" in row else "—"


def render(rows: list[dict], command: str, missing: list[str] = ()) -> str:
    lines = [f"Regenerate: `{command}` (each row in its own process; about 1.5 hours on 2 CPU cores).", "",
             f"Machine: {platform.machine()}, 2 cores, torch {torch.__version__}; the `threads` column is the row's "
             "torch thread count. "
             "MiniLM-L6 (`minilm-l6`) with a new classification head trained in full by every method; "
             "one epoch over the zoo's fixed train split for BBC, half an epoch for R8, batch 16, max 128 tokens, AdamW with 6% warmup and "
             "linear decay, seed 0; LoRA-family rows: r=8, alpha=16, dropout 0.05, all linear layers, lr 2e-3; "
             "full fine-tuning: lr 5e-5; SpIEL: a `sparse` delta with, in every linear layer, as many entries as LoRA r=8 "
             "trains there, regrowth every 20 steps (accumulated gradients), lr 2e-4; LT-SFT: a dense ΔW for half an "
             "epoch at lr 5e-5, then the largest |ΔW| entries, as many as LoRA r=8 trains in total (one global "
             "threshold), retrained from the pretrained weights for one epoch at lr 2e-4 (the sparse rows' lr was not "
             "tuned). Test accuracy on the fixed test split (docs/zoo.md). "
             "Peak memory is the row's process peak RSS (weights, activations, optimizer state, Python). "
             "CPU time is the row process's user+system time (includes loading and evaluation); wall time is "
             "the training call (or, for GSM8K, training plus evaluation) and depends on other load on the "
             "machine while the row ran.", "",
             "| data | method | test accuracy | macro-F1 | trainable params | wall time (s) | CPU time (s) | threads | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["data"] == "gsm8k":
            continue
        lines.append(f"| {r['data']} | {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['trainable']:,} | {r['wall_s']:.0f} | {_cpu(r)} | {r.get('threads', 1)} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "R8 is imbalanced (8 topics, two of them most of the data); after half an epoch the small topics are "
              "not yet learned by any method here, hence the low macro-F1 beside the accuracy."]
    if missing:
        lines += ["", f"Rows not yet measured (the run was cut short; `.venv/bin/python bench/results.py --resume "
                      f"--write docs/results.md` adds them to the rows kept in runs/results/rows.json): "
                      f"{', '.join(missing)}."]
    gsm = [r for r in rows if r["data"] == "gsm8k"]
    if gsm:
        lines += ["", "## Causal LM: SmolLM2-135M-Instruct on GSM8K", "",
                  f"LoRA r=16, alpha 32, dropout 0.05 on all linear layers, {GSM_STEPS} steps × batch 8 over the "
                  f"first {GSM_TRAIN} examples of the zoo's GSM8K train split (loss on the solution tokens only, "
                  "chat template), lr 5e-4, max 256 tokens. Evaluation: greedy decoding (KV cache, 256 new "
                  f"tokens) on the first {GSM_TEST} problems of the GSM8K test split, exact match of the final number. "
                  "The base weights are the Q4_1 GGUF dequantised to fp32.", "",
                  "| model | exact match | test problems | train steps | wall time (s) | CPU time (s) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in gsm:
            lines.append(f"| {r['method']} | {r['exact_match']:.3f} | {r['n_test']} | {r['steps']} | "
                         f"{r['wall_s']:.0f} | {_cpu(r)} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", help="comma-separated data:method rows (default: all)")
    ap.add_argument("--write", type=Path, help="write the markdown table here")
    ap.add_argument("--resume", action="store_true", help="keep rows already measured in runs/results/rows.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_row(args.one)))
        return
    every = [f"bbc:{m}" for m in CLS_METHODS] + ["r8:lora", "r8:peft-lora", "gsm8k:base", "gsm8k:lora", "r8:full",
                                                  "r8:dora", "r8:pissa"]
    rows = args.rows.split(",") if args.rows else every
    store = ROOT / "runs" / "results" / "rows.json"
    done = json.loads(store.read_text()) if args.resume and store.exists() else {}

    def table() -> str:  # every row measured so far, in the table's order
        return render([done[r] for r in every if r in done], "make results", [r for r in every if r not in done])

    for row in (r for r in rows if r not in done):
        print(f"== {row}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", row], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"row {row} failed:\n{proc.stderr[-4000:]}")
        res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("ROW "))[4:])
        print(json.dumps(res), flush=True)
        done[row] = res
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(done, indent=1))
        if args.write:  # after every row, so a long run that stops early keeps what it measured
            write_section(args.write, "results", table())
    if args.write:
        write_section(args.write, "results", table())
    print(table())

if __name__ == "__main__":
    main()
