"""deltatune's LoRA against peft's LoRA on the same path (docs/results.md, "Same start").

Two copies of one model: peft's LoRA on one, deltatune's on the other with peft's initial A, B and head copied in,
both trained by `dt.train` (the same batches in the same order, the same AdamW groups, schedule and RNG reseeding),
with a loss recorded at every step. With dropout 0 the two runs are one computation written twice: their loss
curves must agree up to float rounding and their test metrics must be equal.

`--seeds` instead runs each library as the results rows do (its own initialisation, LoRA dropout on) for several
seeds and reports the mean ± standard error of each side's test metrics.

    .venv/bin/python bench/same_start.py --data r8 --epochs 1 --out runs/same_start/r8.json       # same start
    .venv/bin/python bench/same_start.py --data r8 --seeds 0,1,2,3,4 --jobs 2 --out runs/same_start/seeds.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
HEAD = "classifier"


def peft_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """peft's LoRA on every linear layer of `model` (in place), the head trained in full; returns `model`."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                                     modules_to_save=[HEAD]))
    return model


def our_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """deltatune's LoRA with the same settings (in place); returns `model`."""
    import deltatune as dt

    dt.attach(model, dt.LoRA(r=r, alpha=alpha, dropout=dropout, targets="all-linear", modules_to_save=(HEAD,)),
              "default")
    return model


@torch.no_grad()
def copy_peft_start(peft_model: nn.Module, ours: nn.Module) -> int:
    """Copy peft's initial LoRA factors and its trainable head into deltatune's pieces; returns how many modules."""
    from deltatune.runtime import slot_of

    theirs = dict(peft_model.named_modules())
    n = 0
    for path, module in ours.named_modules():
        slot = slot_of(module)
        if slot is None or "default" not in slot:
            continue
        piece, src = slot["default"], theirs[path]
        if path.split(".")[-1] == HEAD:  # peft's ModulesToSaveWrapper trains a copy of the head
            head = src.modules_to_save["default"]
            piece.weight.copy_(head.weight)
            piece.bias.copy_(head.bias)
        else:
            piece.lora_A.copy_(src.lora_A["default"].weight)
            piece.lora_B.copy_(src.lora_B["default"].weight)
        n += 1
    if n != sum(1 for name in theirs if name.endswith("lora_A.default")) + 1:
        raise RuntimeError("deltatune and peft adapted different module sets")
    return n


def train_quietly(model: nn.Module, tok: Any, splits: Any, out: Path, **options: Any):
    """`dt.train` on an already adapted model (prepare= leaves it as it is), a loss logged at every step."""
    from deltatune.train import train

    cfg = {"output_dir": str(out), "batch_size": 16, "warmup_ratio": 0.06, "max_length": 128, "eval_every": 10**9,
           "log_every": 1, "progress": False, "plot": False, "seed": 0, **options}
    return train(cfg, model=model, tokenizer=tok, splits=splits, prepare=lambda m: None)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history if "loss" in r]


def same_start(base: nn.Module, tok: Any, splits: Any, out: Path, r: int = 8, alpha: float = 16,
               dropout: float = 0.0, sides: tuple[str, ...] = ("deltatune", "peft"), **options: Any) -> dict[str, Any]:
    """Train peft's LoRA and deltatune's LoRA from identical weights; per-step losses and test metrics of both.
    `sides` trains only some of them (the start is the same in every process: peft's init is drawn first, from the
    RNG state the caller set), so the two can run side by side and be compared with `compare`."""
    theirs = peft_lora(copy.deepcopy(base), r, alpha, dropout)
    ours = our_lora(copy.deepcopy(base), r, alpha, dropout)
    copied = copy_peft_start(theirs, ours)
    res: dict[str, Any] = {"modules_copied": copied, "dropout": dropout}
    for name, model in (("deltatune", ours), ("peft", theirs)):
        if name not in sides:
            continue
        t0 = time.perf_counter()
        result = train_quietly(model, tok, splits, out / name, **options)
        res[name] = {"losses": losses(result), "wall_s": time.perf_counter() - t0,
                     **{k[5:]: v for k, v in result.metrics.items() if k.startswith("test_") and k != "test_confusion"}}
    return compare(res) if len(sides) == 2 else res


def compare(res: dict[str, Any]) -> dict[str, Any]:
    """`res` with the steps both sides logged and the largest gap between their per-step losses."""
    gap = [abs(a - b) for a, b in zip(res["deltatune"]["losses"], res["peft"]["losses"])]
    return {**res, "steps": len(gap), "max_loss_gap": max(gap)}


def _load(data: str, seed: int):
    from deltatune import zoo

    splits = zoo.load_dataset(data)
    torch.manual_seed(seed)
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    return model, tok, splits


def own_init_run(data: str, library: str, seed: int, dropout: float, out: Path, test_examples: int | None = None,
                 **options: Any) -> dict[str, Any]:
    """One library's LoRA as a results row runs it: its own initialisation from `seed`, LoRA dropout `dropout`
    (tested on `test_examples` of the test split, stratified, the same ones for every run)."""
    import dataclasses

    from deltatune.train.data import subset

    model, tok, splits = _load(data, seed)
    splits = dataclasses.replace(splits, test=subset(splits.test, test_examples, 0))
    torch.manual_seed(seed)  # the same RNG state at adaptation for both libraries
    (peft_lora if library == "peft" else our_lora)(model, 8, 16, dropout)
    result = train_quietly(model, tok, splits, out, seed=seed, **options)
    return {"library": library, "seed": seed, "accuracy": result.metrics["test_accuracy"],
            "macro_f1": result.metrics["test_macro_f1"], "final_loss": losses(result)[-1]}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def seeds_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lib in ("deltatune", "peft"):
        mine = [r for r in runs if r["library"] == lib]
        out[lib] = {m: mean_se([r[m] for r in mine]) for m in ("accuracy", "macro_f1")}
    for m in ("accuracy", "macro_f1"):  # within one standard error of the difference of the means
        (a, sa), (b, sb) = out["deltatune"][m], out["peft"][m]
        out[f"{m}_diff"] = (a - b, math.hypot(sa, sb))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="r8")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dropout", type=float, help="LoRA dropout (default 0 for the same start, 0.05 with --seeds)")
    ap.add_argument("--seeds", help="comma-separated seeds: each library with its own init, dropout on")
    ap.add_argument("--out", type=Path, required=True, help="JSON file of the results (kept between --seeds runs)")
    ap.add_argument("--test-examples", type=int, help="--seeds: test on this many test examples (stratified)")
    ap.add_argument("--jobs", type=int, default=1, help="--seeds: runs at a time (one thread each)")
    ap.add_argument("--side", choices=("deltatune", "peft"), help="same start: train only this side (OUT.SIDE.json); "
                    "run both sides side by side, then --combine")
    ap.add_argument("--combine", action="store_true", help="same start: OUT from OUT.deltatune.json and OUT.peft.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: library:seed, one run, JSON on stdout
    args = ap.parse_args()
    options = {"epochs": args.epochs, "max_steps": args.max_steps, "max_length": args.max_length, "lr": args.lr}
    runs_dir = ROOT / "runs" / "same_start"
    if args.one:
        lib, seed = args.one.split(":")
        res = own_init_run(args.data, lib, int(seed), 0.05 if args.dropout is None else args.dropout,
                           runs_dir / f"{args.data}-{lib}-{seed}", args.test_examples, **options)
        print("RUN " + json.dumps(res))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        parts = [json.loads(args.out.with_suffix(f".{side}.json").read_text()) for side in ("deltatune", "peft")]
        res = compare({**parts[0], "peft": parts[1]["peft"]})
        args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k not in ("deltatune", "peft")}))
        return
    if not args.seeds:
        model, tok, splits = _load(args.data, 0)
        sides = (args.side,) if args.side else ("deltatune", "peft")
        res = same_start(model, tok, splits, runs_dir / args.data, dropout=args.dropout or 0.0, sides=sides, **options)
        res = {"data": args.data, **options, **res}
        if args.side:
            args.out.with_suffix(f".{args.side}.json").write_text(json.dumps(res, indent=1))
            return
        args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k not in ("deltatune", "peft")}))
        for lib in ("deltatune", "peft"):
            print(lib, {k: v for k, v in res[lib].items() if k != "losses"})
        return
    store = json.loads(args.out.read_text()) if args.out.exists() else {"data": args.data, **options, "runs": []}
    have = {(r["library"], r["seed"]) for r in store["runs"]}
    todo = [(lib, int(seed)) for seed in args.seeds.split(",") for lib in ("deltatune", "peft")
            if (lib, int(seed)) not in have]

    def one(pair: tuple[str, int]) -> dict[str, Any]:
        lib, seed = pair
        cmd = [sys.executable, __file__, "--one", f"{lib}:{seed}", "--data", args.data, "--epochs", str(args.epochs),
               "--max-length", str(args.max_length), "--lr", str(args.lr), "--out", str(args.out)]
        cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        cmd += ["--dropout", str(args.dropout)] if args.dropout is not None else []
        cmd += ["--test-examples", str(args.test_examples)] if args.test_examples else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{lib} seed {seed} failed:\n{proc.stderr[-3000:]}")
        return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RUN "))[4:])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(one, todo):
            print(json.dumps(run), flush=True)
            store["runs"].append(run)
            if {r["library"] for r in store["runs"]} == {"deltatune", "peft"}:
                store["summary"] = seeds_summary(store["runs"])
            args.out.write_text(json.dumps(store, indent=1))
    print(json.dumps(store.get("summary"), indent=1))


if __name__ == "__main__":
    main()
