"""The serving engine's two routing paths (serve/routing.py) on one forward, side by side: per-token row sums
(`embedding_bag`) against gathered slots + batched matmuls, for prefill- and decode-shaped forwards.

    PYTHONPATH=src .venv/bin/python bench/serve_routing.py --write docs/benchmarks.md

SmolLM2-135M (fp32) with 64 r=16 all-linear LoRA deltas in the engine's slots; one forward of T tokens (4 rows of
T/4 for T ≥ 64, else T rows of one token, no cache) whose tokens are split evenly over u distinct slots; each path
forced in turn (the engine's `BAG_BELOW` threshold set past or below the batch), median of 5 after a warm-up, in
alternating order. The base-only forward (u = 0) is the reference. This is what sets `BAG_BELOW` (16 tokens per slot).
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
from deltatune.serve import routing  # noqa: E402

CASES = ((256, (0, 1, 4, 16, 32)), (32, (0, 1, 4, 8, 32)))
SMOKE = ((64, (0, 1, 4)), (8, (0, 2)))  # the test suite's: a tiny random model


def forward_ms(eng: Engine, tokens: int, u: int, bag: bool, reps: int) -> float:
    from transformers import DynamicCache

    routing.BAG_BELOW = 1 << 30 if bag else 0
    rows = 4 if tokens >= 64 else tokens
    width = tokens // rows
    ids = torch.randint(1, eng.model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, width, dtype=torch.long)
    pos = torch.arange(width).expand(rows, width)
    slots = [eng.slots.where[(f"d{(t * u) // tokens}", 1)] if u else -1 for t in range(tokens)]
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            t = time.perf_counter()
            eng._run(ids, mask, pos, slots, DynamicCache())
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times[1:])


def main(argv=None) -> list[tuple[int, int, float, float, float]]:
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
    saved, measured = routing.BAG_BELOW, []
    lines = ["## Serving: the two routing paths (`bench/serve_routing.py`)", "",
             f"Command: `PYTHONPATH=src .venv/bin/python bench/serve_routing.py --write docs/benchmarks.md` — "
             f"{'a tiny random Llama' if a.smoke else 'SmolLM2-135M'} (fp32) on CPU ({a.threads} threads, {platform.machine()}, {os.cpu_count()} cores), 64 r=16 all-linear "
             f"deltas in slots; one forward, tokens split evenly over u distinct slots, median of {a.reps} (row sums: the "
             f"mean of two such medians, taken before and after the gathered one). "
             f"The engine row-sums a bucket's tokens when they average fewer than {saved} per slot.", "",
             "| tokens | distinct slots u | tokens per slot | base only | row sums | gathered + bmm |",
             "|---:|---:|---:|---:|---:|---:|"]
    try:
        for tokens, us in SMOKE if a.smoke else CASES:
            plain = None
            for u in us:
                if u == 0:
                    plain = forward_ms(eng, tokens, 0, True, a.reps)
                    continue
                bag, gather = forward_ms(eng, tokens, u, True, a.reps), forward_ms(eng, tokens, u, False, a.reps)
                bag = (bag + forward_ms(eng, tokens, u, True, a.reps)) / 2  # order: bag, gather, bag
                measured.append((tokens, u, plain, bag, gather))
                lines.append(f"| {tokens} | {u} | {tokens // u} | {plain:.1f} ms | {bag:.1f} ms | {gather:.1f} ms |")
                print(lines[-1], flush=True)
    finally:
        routing.BAG_BELOW = saved
        eng.close()
    lines += ["", f"Took {time.perf_counter() - t0:.0f} s."]
    publish("\n".join(lines), a.write, "serve-routing")
    return measured


if __name__ == "__main__":
    main()
