"""Several tasks, one encoder: interference of deltas used together, and merged task deltas (docs/results.md).

MiniLM-L6 gets one delta per task (BBC, R8, 20NG, SpamAssassin), each with its own classification head. Then:

* interference (issue: sparse fine-tuning): the BBC and R8 deltas active together on the encoder, each task
  evaluated with its own head — for LoRA deltas and for sparse deltas with the same number of parameters;
* merging: the four encoder deltas merged into one by task arithmetic, TIES, DARE-TIES, Fisher and
  Consensus; each task evaluated with the merged encoder and its own head.

Accuracies are reported relative to each task's own delta alone. Every training run is its own subprocess.

    .venv/bin/python bench/multitask.py --write docs/results.md        # seed 0; trains what runs/multitask lacks
    RESULTS_THREADS=2 .venv/bin/python bench/multitask.py --seeds 0,1,2 --jobs 2 --write docs/results.md  # 3 seeds
    .venv/bin/python bench/multitask.py --seeds 0,1,2 --render-only --write docs/results.md  # from the stored values
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from deltatune.io import atomic

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "multitask"
STORE = ROOT / "bench" / "multitask_results.json"  # every measured seed's results (runs/ is not kept)
THREADS = int(os.environ.get("RESULTS_THREADS", "2"))
TASKS = ("bbc", "r8", "20ng", "spam")
STEPS, BATCH, MAX_LEN, LR = 150, 16, 128, 2e-3
EVAL_EXAMPLES = 500  # the first examples of each fixed test split (20NG's has 7,521)
LORA = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear", "modules_to_save": ["classifier"]}


def lora_entries(model: torch.nn.Module) -> dict[str, int]:
    """Per linear layer of the encoder (the head excluded), the parameters LoRA r trains there: r·(in + out)."""
    return {path: LORA["r"] * (m.in_features + m.out_features) for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not is_head(path)}


def delta_config(kind: str, model: torch.nn.Module) -> dict:
    if kind == "lora":
        return dict(LORA)
    # sparse: in every linear layer as many entries as LoRA trains there
    pattern = {path.replace(".", r"\."): k for path, k in lora_entries(model).items()}
    k = max(pattern.values())
    return {"kind": "sparse", "k": k, "k_pattern": {p: v for p, v in pattern.items() if v != k},
            "targets": "all-linear", "modules_to_save": ["classifier"], **SPARSE_OPTIONS}


SPARSE_OPTIONS = {"regrow_every": 20, "regrow": "accumulated", "regrow_fraction": 0.2, "regrow_window": 5}  # SpIEL
LRS = {"lora": LR, "sparse": 2e-4}  # sparse values are weight entries: a smaller step than LoRA's factors


def test_subset(splits):
    import dataclasses

    return dataclasses.replace(splits, test=splits.test[:EVAL_EXAMPLES])


def runs_for(seed: int) -> Path:
    """Where a seed's deltas and results live (seed 0 where they always were)."""
    return RUNS if seed == 0 else RUNS / f"seed-{seed}"


def train_one(task: str, kind: str, seed: int = 0) -> dict:
    from deltatune import zoo
    from deltatune.train import train

    splits = test_subset(zoo.load_dataset(task))
    torch.manual_seed(seed)
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    out = runs_for(seed) / f"{kind}-{task}"
    cfg = {"output_dir": str(out), "max_steps": STEPS, "batch_size": BATCH, "lr": LRS[kind], "warmup_ratio": 0.06,
           "max_length": MAX_LEN, "eval_every": 10**9, "max_eval_examples": 200, "seed": seed, "progress": False,
           "plot": False, "delta": delta_config(kind, model), "name": task}
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, splits=splits)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"task": task, "kind": kind, "steps": result.steps, "accuracy": result.metrics.get("test_accuracy"), "wall_s": time.perf_counter() - t0,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "peak_rss_mb": usage.ru_maxrss / 1024, "delta_dir": str(out / "delta"), "threads": torch.get_num_threads()}


def ensure_trained(kind: str, tasks: tuple[str, ...], seed: int = 0, threads: int = THREADS) -> dict[str, dict]:
    """Train (each in its own subprocess with `threads` torch threads) what runs/ lacks of `kind` × `tasks` at `seed`;
    safe to call from several threads at once (each run's record is merged into the seed's trained.json under a lock)."""
    store = runs_for(seed) / "trained.json"
    for task in tasks:
        key = f"{kind}-{task}"
        known = _trained(store).get(key)
        if known and Path(known["delta_dir"]).is_dir():
            continue
        print(f"== train {key} seed {seed}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--train-one", f"{task}:{kind}:{seed}"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads), "RESULTS_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"training {key} seed {seed} failed:\n{proc.stderr[-4000:]}")
        row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("ROW "))[4:])
        with _STORE_LOCK:
            done = _trained(store)
            done[key] = row
            store.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(store, json.dumps(done, indent=1))
    done = _trained(store)
    return {t: done[f"{kind}-{t}"] for t in tasks}


_STORE_LOCK = threading.Lock()


def _trained(store: Path) -> dict:
    return json.loads(store.read_text()) if store.exists() else {}


def train_all(kinds: list[str], seeds: list[int], jobs: int) -> None:
    """Every (kind, task, seed) training runs/ lacks, `jobs` at a time with one thread each (jobs=1: THREADS threads)."""
    units = [(kind, (task,), seed) for seed in seeds for kind in kinds for task in tasks_of(kind)]
    threads = THREADS if jobs == 1 else 1
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(lambda u: ensure_trained(*u, threads=threads), units):
            pass


def tasks_of(kind: str) -> tuple[str, ...]:
    return TASKS if kind == "lora" else ("bbc", "r8")


# --- evaluation ----------------------------------------------------------------------------------------
def is_head(path: str) -> bool:
    return path == "classifier" or path.startswith("classifier.")


def part(delta, head: bool):
    """The delta's classification head (head=True) or its encoder part, as a Delta of its own."""
    from deltatune import Delta

    keep = [p for p in delta.state if is_head(p) == head]
    base = dict(delta.base)
    base["weight_shapes"] = {p: s for p, s in base.get("weight_shapes", {}).items() if p in keep}
    return Delta(delta.name + ("-head" if head else "-encoder"), delta.config, {p: delta.state[p] for p in keep},
                 {p: delta.module_types[p] for p in keep}, base)


def load_task_model(task: str):
    from deltatune import zoo

    splits = test_subset(zoo.load_dataset(task))
    torch.manual_seed(0)
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    return model, tok, splits


def accuracy(task: str, deltas: list) -> float:
    """Test accuracy on `task` with all `deltas` attached and active together."""
    import deltatune as dt
    from deltatune.io.files import apply
    from deltatune.train.evaluate import evaluate_classification

    model, tok, splits = load_task_model(task)
    names = []
    for i, d in enumerate(deltas):
        apply(model, d, name=f"d{i}", activate=False)
        names.append(f"d{i}")
    dt.activate(model, names)
    model.eval()
    return evaluate_classification(model, tok, splits.test, len(splits.labels), 64, MAX_LEN)["accuracy"]


def fisher_of(task: str, delta, batches: int = 16) -> dict:
    """Diagonal Fisher of the task's loss w.r.t. the encoder weights its delta adapts (train split batches)."""
    from deltatune.io.files import apply
    from deltatune.merging.fisher import estimate_fisher
    from deltatune.train.data import Collator

    model, tok, splits = load_task_model(task)
    apply(model, delta, name="task")
    model.eval()
    collate = Collator(tok, "classification", MAX_LEN)
    data = [collate(splits.train[i * BATCH:(i + 1) * BATCH]) for i in range(batches)]
    paths = [p for p in delta.state if not is_head(p)]
    return estimate_fisher(model, "task", data, modules=paths, progress=False)


MERGES = {  # method -> (global parameters, per-input parameters)
    "task_arithmetic": ({"lambda_": 0.4}, {"weight": 1.0}),
    "ties": ({"lambda_": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}),
    "dare_ties": ({"lambda_": 1.0, "normalize": True, "seed": 0}, {"weight": 1.0, "density": 0.2}),
    "fisher": ({}, {"weight": 1.0}),
    "consensus": ({"lambda_": 0.4, "k": 2}, {"weight": 1.0, "mask_lambda": 0.4}),
}


def evaluate_all(kinds: list[str], seed: int = 0) -> dict:
    from deltatune import Delta
    from deltatune.merging.combine import merge_deltas

    res: dict = {"own": {}, "together": {}, "merged": {}}
    trained = {kind: ensure_trained(kind, tasks_of(kind), seed) for kind in kinds}
    deltas = {kind: {t: Delta.read(info["delta_dir"]) for t, info in rows.items()} for kind, rows in trained.items()}
    for kind, by_task in deltas.items():
        for task, d in by_task.items():
            res["own"][f"{kind}:{task}"] = accuracy(task, [d])
            print(f"own {kind} {task}: {res['own'][f'{kind}:{task}']:.4f}", flush=True)
        for task, other in (("bbc", "r8"), ("r8", "bbc")):
            res["together"][f"{kind}:{task}"] = accuracy(task, [by_task[task], part(by_task[other], head=False)])
            print(f"together {kind} {task}: {res['together'][f'{kind}:{task}']:.4f}", flush=True)
    lora = deltas["lora"]
    encoders = [part(lora[t], head=False) for t in TASKS]
    fishers = [fisher_of(t, lora[t]) for t in TASKS]
    for method, (params, per) in MERGES.items():
        extra = {}
        if method == "fisher":
            extra = {"module_params": lambda path: {"fisher": [f[path] for f in fishers]},
                     "supplied_per_module": ["fisher"]}
        t0 = time.perf_counter()
        merged = merge_deltas(encoders, method, params, per_input=[per] * len(TASKS), output="dense", name="mtl",
                              progress=False, **extra)
        seconds = time.perf_counter() - t0
        for task in TASKS:
            res["merged"][f"{method}:{task}"] = accuracy(task, [merged, part(lora[task], head=True)])
            print(f"merged {method} {task}: {res['merged'][f'{method}:{task}']:.4f}", flush=True)
        res["merged"][f"{method}:seconds"] = seconds
    res["trained"] = trained
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-one", help=argparse.SUPPRESS)
    ap.add_argument("--kinds", default="lora,sparse", help="comma-separated delta kinds (lora, sparse)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--write", type=Path, help="write the results into this markdown file")
    ap.add_argument("--render-only", action="store_true", help="render the seeds' results.json, measure nothing")
    ap.add_argument("--seeds", default="0", help="seeds: a list (0,1,2) or a count (3); cells are mean ± std over them")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time (2 on 2 cores): with more than one, one "
                    "thread each, else RESULTS_THREADS; evaluation then runs with RESULTS_THREADS threads")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    if args.train_one:
        task, kind, seed = (args.train_one + ":0").split(":")[:3]
        print("ROW " + json.dumps(train_one(task, kind, int(seed))))
        return
    seeds = [int(x) for x in args.seeds.split(",")] if "," in args.seeds else list(range(int(args.seeds)))
    kinds = args.kinds.split(",")
    if not args.render_only:
        t0 = time.perf_counter()
        train_all(kinds, seeds, args.jobs)
        print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.train_only:
        return
    by_seed = {}
    stored = json.loads(STORE.read_text()) if STORE.exists() else {}
    for seed in seeds:
        path = runs_for(seed) / "results.json"
        if args.render_only:  # the last measured results again, e.g. after a change of wording
            by_seed[seed] = json.loads(path.read_text()) if path.exists() else stored[str(seed)]
        else:
            t0 = time.perf_counter()
            by_seed[seed] = evaluate_all(kinds, seed)
            by_seed[seed]["seconds"] = time.perf_counter() - t0  # every evaluation (the trainings ran before)
            path.write_text(json.dumps(by_seed[seed], indent=1))
            stored[str(seed)] = by_seed[seed]  # the per-seed values, kept with the repository
            atomic.write_text(STORE, json.dumps(stored, indent=1) + "\n")
    from _report import publish

    publish(render(by_seed), args.write, "multitask")


def stat(by_seed: dict, value) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds of value(results of one seed) (None with one seed)."""
    vals = [value(res) for res in by_seed.values()]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def cell(by_seed: dict, value, digits: int = 4) -> str:
    mean, std = stat(by_seed, value)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def run_time(by_seed: dict) -> str:
    """What the seeds' runs cost: the trainings' wall times (and threads) and the evaluations' time."""
    runs = [info for res in by_seed.values() for rows in res["trained"].values() for info in rows.values()]
    if not all("seconds" in res for res in by_seed.values()):
        return ""
    threads = sorted({info.get("threads", 2) for info in runs})  # seed 0's first runs predate the record: 2 threads
    train_min, eval_min = sum(i["wall_s"] for i in runs) / 60, sum(r["seconds"] for r in by_seed.values()) / 60
    return (f". Measured: the {len(runs)} trainings' wall times add up to {train_min:.0f} minutes "
            f"({'one thread' if threads == [1] else ' or '.join(map(str, threads)) + ' threads'} each; `--jobs 2` "
            f"runs two at a time, so about half that in wall time), the evaluations of the seeds took {eval_min:.0f} "
            f"minutes on {THREADS} threads: about {(train_min / 2 + eval_min) / 60:.1f} hours from nothing on 2 cores")


def interference_reading(by_seed: dict, task: str) -> str:
    """Whether LoRA's and the sparse delta's relative accuracy together differ by more than their spread."""
    (ml, sl), (ms, ss) = (stat(by_seed, lambda r, k=k: r["together"][f"{k}:{task}"] / r["own"][f"{k}:{task}"])
                          for k in ("lora", "sparse"))
    verdict = "within" if abs(ml - ms) <= max(sl, ss) else "beyond"
    return (f"on {task} LoRA keeps {ml:.3f} ± {sl:.3f} of its accuracy together and the sparse delta {ms:.3f} ± "
            f"{ss:.3f}, a difference {verdict} one standard deviation")


def render(by_seed: dict) -> str:
    """The section's markdown; with several seeds every cell is mean ± sample standard deviation over them (relative
    accuracies are averaged per seed, not divided after averaging)."""
    if "own" in by_seed:  # one seed's results, as stored before seeds existed
        by_seed = {0: by_seed}
    seeds = sorted(by_seed)
    res = by_seed[seeds[0]]
    together, trained = res["together"], res["trained"]
    lines = ["## Several tasks on one encoder: interference and merging (bench/multitask.py)", "",
             f"Regenerate: `RESULTS_THREADS=2 .venv/bin/python bench/multitask.py --seeds {','.join(map(str, seeds))} "
             "--jobs 2 --write docs/results.md` (part of `make results`: trains what runs/multitask lacks, two "
             "trainings at a time with one thread each, then evaluates every seed; each seed's values are kept in "
             "bench/multitask_results.json, from which `--render-only` rewrites this section"
             + run_time(by_seed) +
             "). MiniLM-L6, one delta per task, each with its own classification head trained in full; "
             f"{STEPS} steps × batch {BATCH}, max {MAX_LEN} tokens, AdamW with 6% warmup and linear decay, "
             + (f"seed {seeds[0]} (1 seed: differences of a point or two are within seed noise). " if len(seeds) == 1
                else f"seeds {', '.join(map(str, seeds))}: cells are mean ± sample standard deviation over them. ") +
             f"LoRA r=8, alpha 16, dropout 0.05, all linear layers, lr {LRS['lora']}; sparse = SpIEL with, in every "
             f"linear layer, as many entries as LoRA r=8 trains there (r·(in+out)), regrowth every "
             f"{SPARSE_OPTIONS['regrow_every']} steps ({SPARSE_OPTIONS['regrow']} gradients), lr {LRS['sparse']}. "
             f"Accuracy on the first {EVAL_EXAMPLES} examples of each fixed test split (BBC has 213).", "",
             "### Interference: two deltas active together", "",
             "The BBC and R8 encoder deltas active at once (their updates add); each task is read with its own head. "
             "Relative = accuracy together / accuracy of the task's delta alone.", "",
             "| deltas | task | alone | together | relative |", "|---|---|---|---|---|"]
    for kind in ("lora", "sparse"):
        for task in ("bbc", "r8"):
            key = f"{kind}:{task}"
            if key in together:
                name = "LoRA r=8" if kind == "lora" else "sparse (SpIEL)"
                params = trained[kind][task]["trainable"]
                lines.append(f"| {name} ({params:,} trainable incl. head) | {task} | "
                             f"{cell(by_seed, lambda r: r['own'][key])} | {cell(by_seed, lambda r: r['together'][key])} | "
                             f"{cell(by_seed, lambda r: r['together'][key] / r['own'][key], 3)} |")
    if len(seeds) > 1 and all(f"{k}:{t}" in together for k in ("lora", "sparse") for t in ("bbc", "r8")):
        lines += ["", "Over the seeds: " + "; ".join(interference_reading(by_seed, t) for t in ("bbc", "r8")) + "."]
    lines += ["", "### Merging four task deltas into one encoder", "",
              "The four LoRA encoder deltas (BBC, R8, 20NG, SpamAssassin) merged into one dense ΔW per module with "
              "`deltatune.merging.merge_deltas`; each task is then evaluated with the merged encoder and its own "
              "head. Cells: accuracy (relative to the task's own delta). Parameters: " + "; ".join(
                  f"{m} {p} per input {q}" for m, (p, q) in MERGES.items()) + ". Fisher: diagonal, from 16 training "
              "batches of each task with its own delta.", "",
              "| method | " + " | ".join(TASKS) + " | mean relative | merge time (s) |",
              "|---|" + "---|" * (len(TASKS) + 2)]
    lines.append("| each task's own delta | " + " | ".join(cell(by_seed, lambda r, t=t: r["own"][f"lora:{t}"])
                                                         for t in TASKS) + " | 1.000 | — |")
    for method in MERGES:
        def rel(r, t, m=method):
            return r["merged"][f"{m}:{t}"] / r["own"][f"lora:{t}"]
        cells = " | ".join(f"{cell(by_seed, lambda r, t=t: r['merged'][f'{method}:{t}'])} "
                           f"({cell(by_seed, lambda r, t=t: rel(r, t), 3)})" for t in TASKS)
        mean_rel = cell(by_seed, lambda r: sum(rel(r, t) for t in TASKS) / len(TASKS), 3)
        secs = stat(by_seed, lambda r: r["merged"][f"{method}:seconds"])[0]
        lines.append(f"| {method} | {cells} | {mean_rel} | {secs:.1f} |")
    above = sorted({t for m in MERGES for t in TASKS  # by the mean over seeds of the relative accuracy
                    if stat(by_seed, lambda r, m=m, t=t: r["merged"][f"{m}:{t}"] / r["own"][f"lora:{t}"])[0] > 1.05})
    if above:
        lines += ["", f"A relative accuracy above 1 ({', '.join(above)}) means the merged encoder, in which each task "
                  "delta enters scaled (λ, normalisation, trimming), does better with that task's head than the task's "
                  "own delta at full strength: at this budget (lr 2e-3, the LoRA row's) that delta is the weak "
                  "reference (see its own accuracy), not the merge a strong one."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
