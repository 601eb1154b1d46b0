"""Wall time of `deltatune merge` / `compress` / `extract` work with 1, 2 or 4 torch threads, or torch's default.

Inputs are zoo-sized: two LoRA r=8 deltas on MiniLM-L6 (all linear layers, 36 modules, classifier head kept whole),
as `examples/merge_ties.yaml` merges them; the base and a tuned copy (base + one delta, merged) as HF directories
for extraction. Each (command, threads) runs in a fresh process that sets the thread count first and times the
library call the command makes (imports and model loading for the inputs excluded); rounds are interleaved and
the median is printed. On a machine shared with other jobs the numbers are noisy: read them as orders of magnitude.

    PYTHONPATH=src .venv/bin/python bench/threads.py [--rounds 3] [--work /tmp/dt-threads]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("merge", "compress", "extract")
THREADS = ("1", "2", "4", "default")


def setup(work: Path) -> None:
    import torch

    import deltatune as dt
    from deltatune import zoo

    work.mkdir(parents=True, exist_ok=True)
    for seed in (0, 1):
        model, _ = zoo.load_model("minilm-l6", num_labels=5)
        torch.manual_seed(seed)
        dt.attach(model, dt.LoRA(r=8, alpha=16, modules_to_save=("classifier",)), "task")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        dt.save(model, work / f"delta{seed}", name="task")
        if seed == 0:
            dt.merge_and_unload(model)
            model.save_pretrained(work / "tuned")
    zoo.load_model("minilm-l6", num_labels=5)[0].save_pretrained(work / "base")
    (work / "recipe.json").write_text(json.dumps({
        "method": "ties", "inputs": [{"path": str(work / f"delta{s}"), "weight": 1.0, "density": 0.5} for s in (0, 1)],
        "parameters": {"lambda": 1.0}, "modules": {"exclude": ".*classifier.*"},
        "output": {"path": str(work / "merged"), "format": "delta", "storage": "lowrank", "rank": 16}}))


def step(name: str, work: Path, threads: str) -> float:
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    import deltatune as dt
    from deltatune.merging.compress import compress
    from deltatune.merging.extract import extract
    from deltatune.merging.recipe import load_recipe, run_recipe

    start = time.perf_counter()
    if name == "merge":
        run_recipe(load_recipe(json.loads((work / "recipe.json").read_text())), progress=False)
    elif name == "compress":
        compress(dt.Delta.read(work / "delta0"), "svd", rank=4)
        compress(dt.Delta.read(work / "delta0"), "compeft", density=0.1)
    else:
        extract(work / "base", work / "tuned", rank=16, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dt-threads"))
    ap.add_argument("--step", choices=STEPS)
    ap.add_argument("--threads", default="default")
    args = ap.parse_args()
    if args.step:
        import shutil
        import warnings

        warnings.simplefilter("ignore")
        shutil.rmtree(args.work / "merged", ignore_errors=True)
        print(json.dumps({"seconds": step(args.step, args.work, args.threads)}))
        return
    if not (args.work / "recipe.json").exists():
        setup(args.work)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name in STEPS:
            for threads in THREADS:
                out = subprocess.run([sys.executable, __file__, "--step", name, "--threads", threads,
                                      "--work", str(args.work)], env=env, capture_output=True, text=True, check=True)
                t = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
                times.setdefault((name, threads), []).append(t)
                print(f"round {r} {name:8} threads={threads:7} {t:7.2f} s", flush=True)
    print("median over rounds (s):")
    for name in STEPS:
        print(name, "  ".join(f"{th}: {statistics.median(times[(name, th)]):.2f}" for th in THREADS))


if __name__ == "__main__":
    main()
