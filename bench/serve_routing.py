"""The serving engine's routing paths (serve/routing.py) on one forward, side by side: the compiled kernel
(serve/kernel.py; every segment length) and the torch ops' two paths, `embedding_bag` row sums (short segments)
and gathered slots + batched matmuls (long segments), for prefill- and decode-shaped forwards.

    PYTHONPATH=src .venv/bin/python bench/serve_routing.py --write docs/benchmarks.md

SmolLM2-135M (fp32) with 64 r=16 all-linear LoRA deltas in the engine's slots; one forward of T tokens (4 rows of
T/4 for T ≥ 64, else T rows of one token, no cache) whose tokens are split evenly over u distinct slots; each path
forced in turn (the engine's `BAG_BELOW` threshold set past or below the batch, `KERNEL` on or off), median of 5
after a warm-up, in the order kernel, row sums, gathered, kernel (the kernel's two medians averaged). The
base-only forward (u = 0) is the reference. This is what sets `BAG_BELOW`.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish  # noqa: E402
from serve import build_tiny, make_files  # noqa: E402

from deltatune.serve import Engine  # noqa: E402
from deltatune.serve import kernel, routing  # noqa: E402

CASES = ((256, (0, 1, 4, 16, 32, 64)), (32, (0, 1, 2, 4, 8, 16, 32)))
SMOKE = ((64, (0, 1, 4)), (8, (0, 2)))  # the test suite's: a tiny random model


PATHS = ("kernel", "row sums", "gathered")


def forward_ms(eng: Engine, tokens: int, u: int, path: str, reps: int) -> float:
    """Median ms of one forward with `path` forced; the kernel's path checks that the kernel ran in every module."""
    from transformers import DynamicCache

    routing.BAG_BELOW = 0 if path == "gathered" else 1 << 30
    routing.KERNEL = path == "kernel"
    rows = 4 if tokens >= 64 else tokens
    width = tokens // rows
    ids = torch.randint(1, eng.model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, width, dtype=torch.long)
    pos = torch.arange(width).expand(rows, width)
    slots = [eng.slots.where[(f"d{(t * u) // tokens}", 1)] if u else -1 for t in range(tokens)]
    times, used = [], []
    usable = kernel.usable
    kernel.usable = lambda *t: used.append(usable(*t)) or used[-1]
    try:
        with torch.inference_mode():
            for _ in range(reps + 1):
                t = time.perf_counter()
                eng._run(ids, mask, pos, slots, DynamicCache())
                times.append(1e3 * (time.perf_counter() - t))
    finally:
        kernel.usable = usable
    if u and path == "kernel" and not (used and all(m is not None for m in used)):
        raise RuntimeError("the routing kernel did not run for every module (not built here?)")
    if u and path != "kernel" and used:
        raise RuntimeError(f"the {path} path was asked for but the kernel was consulted")
    return statistics.median(times[1:])


def main(argv=None) -> list[tuple[int, int, float, float, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random model (the test suite's)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write", default=None, help="markdown file whose section 'serve-routing' gets the results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.smoke:
        base = build_tiny()
    else:
        from deltatune import zoo

        base, _ = zoo.load_model("smollm2-135m")
    files, _ = make_files(base.eval(), 4 if a.smoke else 16, tempfile.mkdtemp())
    eng = Engine(base, max_loaded=64, max_rank=16, max_batch=32)
    for j in range(64):
        eng.register(f"d{j}", files[j % len(files)])
        eng.preload(f"d{j}")
    saved, saved_kernel, measured = routing.BAG_BELOW, routing.KERNEL, []
    built = kernel.load() is not None  # else its column reads nan (no C++ compiler here)
    lines = ["## Serving: the routing paths (`bench/serve_routing.py`)", "",
             f"Command: `PYTHONPATH=src .venv/bin/python bench/serve_routing.py --write docs/benchmarks.md` — "
             f"{'a tiny random Llama' if a.smoke else 'SmolLM2-135M'} (fp32) on CPU ({a.threads} threads, {platform.machine()}, {os.cpu_count()} cores), 64 r=16 all-linear "
             f"deltas in slots; one forward, tokens split evenly over u distinct slots, median of {a.reps} (kernel: the "
             f"mean of two such medians, taken before and after the others). On the CPU the engine routes every bucket "
             f"through the compiled kernel; the torch ops (CUDA, or no kernel) take the `embedding_bag` row sums for "
             f"a bucket whose tokens average fewer than {saved} per slot and gather slots for batched matmuls "
             f"otherwise.", "",
             "| tokens | distinct slots u | tokens per slot | base only | kernel | row sums | gathered + bmm |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    try:
        for tokens, us in SMOKE if a.smoke else CASES:
            plain = None
            for u in us:
                if u == 0:
                    plain = forward_ms(eng, tokens, 0, "gathered", a.reps)
                    continue
                ms = {path: forward_ms(eng, tokens, u, path, a.reps) if built or path != "kernel" else float("nan")
                      for path in PATHS}
                if built:
                    ms["kernel"] = (ms["kernel"] + forward_ms(eng, tokens, u, "kernel", a.reps)) / 2
                measured.append((tokens, u, plain, *(ms[p] for p in PATHS)))
                lines.append(f"| {tokens} | {u} | {tokens // u} | {plain:.1f} ms | "
                             + " | ".join(f"{ms[p]:.1f} ms" for p in PATHS) + " |")
                print(lines[-1], flush=True)
    finally:
        routing.BAG_BELOW, routing.KERNEL = saved, saved_kernel
        eng.close()
    lines += ["", f"Took {time.perf_counter() - t0:.0f} s."]
    publish("\n".join(lines), a.write, "serve-routing")
    return measured


if __name__ == "__main__":
    main()
