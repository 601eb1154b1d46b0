"""Mixed-delta batches: every example of a batch with its own LoRA, deltatune's `dt.route` against the bare model and
against peft's `adapter_names` path, in one process on the random Llama of bench/forward.py.

    .venv/bin/python bench/mixed.py --write docs/benchmarks.md

Cases (issue 6): a decode step (B=64, T=1, a 32-token KV cache) with 64 distinct r=16 LoRAs; the same with ranks
8/16/64 mixed in the batch; a prefill (B=8, T=128) with 8 distinct deltas. Both libraries carry the same adapter
weights (random, non-zero B); their logits are checked against each other and against each example run alone
before anything is timed. "route, steady" times forwards inside one `dt.route` (as in generate, where the route is
entered once for every decode step); "route, per call" enters the route for every forward (a server building a
new batch each step).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TARGETS, Timing, build_llama, interleaved  # noqa: E402
from _report import publish  # noqa: E402

COMMAND = ".venv/bin/python bench/mixed.py --write docs/benchmarks.md"
ATOL = 1e-4
# (× bare at most, × faster than peft) from issue 6; mixed ranks is asked for as a measurement, without a target
GOALS = {"decode": (1.5, 4.0), "prefill": (1.15, None), "mixed ranks": (None, None)}


@dataclass
class Shape:
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 8000
    past: int = 32


@dataclass
class Case:
    name: str
    batch: int
    seq: int
    ranks: list[int]
    deltas: int


@dataclass
class CaseResult:
    case: Case
    timings: dict[str, Timing]
    checks: list[tuple[str, float]] = field(default_factory=list)


CASES = [Case("decode", 64, 1, [16], 64), Case("mixed ranks", 64, 1, [8, 16, 64], 64), Case("prefill", 8, 128, [16], 8)]


def _libraries(base: nn.Module, ranks: list[int], n: int, seed: int):
    """deltatune and peft copies of `base` carrying the same n LoRAs (rank ranks[i % len(ranks)])."""
    import deltatune as dt
    from deltatune.runtime import slot_of
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    ours, theirs = copy.deepcopy(base), None
    names = [f"d{i}" for i in range(n)]
    for i, name in enumerate(names):
        r = ranks[i % len(ranks)]
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS))
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg)
        dt.attach(ours, dt.LoRA(r=r, alpha=2 * r, targets=TARGETS), name=name, activate=False)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, module in ours.named_modules():
            slot = slot_of(module)
            if slot is None:
                continue
            prefix = f"base_model.model.{path}"
            for name in names:
                a, b = params[f"{prefix}.lora_A.{name}.weight"], params[f"{prefix}.lora_B.{name}.weight"]
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
                slot[name].lora_A.copy_(a)
                slot[name].lora_B.copy_(b)
    return ours.eval(), theirs.eval(), names


def _cache(model: nn.Module, ids: torch.Tensor, **kw):
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, **kw)
    return cache


def run_case(base: nn.Module, shape: Shape, case: Case, rounds: int, seed: int = 0,
             log=print) -> CaseResult:
    import deltatune as dt

    ours, peft, names = _libraries(base, case.ranks, case.deltas, seed)
    device = next(base.parameters()).device
    ours, peft = ours.to(device), peft.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed + 1)
    rows = [names[i % len(names)] for i in range(case.batch)]
    peft_rows = list(rows)
    decode = case.seq == 1
    past_ids = torch.randint(0, shape.vocab, (case.batch, shape.past), generator=g).to(device) if decode else None
    ids = torch.randint(0, shape.vocab, (case.batch, case.seq), generator=g).to(device)
    res = CaseResult(case, {})

    caches: dict[str, object] = {}
    if decode:  # each model gets its own prefilled cache (the deltas change keys and values)
        with dt.route(ours, rows):
            caches["route"] = _cache(ours, past_ids)
        caches["bare"] = _cache(base, past_ids)
        caches["peft"] = _cache(peft, past_ids, adapter_names=peft_rows)

    def call(model, key, **kw):
        def fn():
            with torch.no_grad():
                if decode:
                    cache = caches[key]
                    out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kw).logits
                    cache.crop(-1)  # drop the step just added: every call decodes at the same position
                else:
                    out = model(input_ids=ids, **kw).logits
                sync()
                return out
        return fn

    routed = dt.Route(rows)
    dt.activate(ours, routed)
    steady = call(ours, "route")

    def per_call():
        dt.activate(ours, dt.Route(rows))  # a fresh route: row groups and gathered factors are rebuilt
        return steady()

    bare = call(base, "bare")
    theirs = call(peft, "peft", adapter_names=peft_rows)
    # correctness first: route == peft's adapter_names == one example alone with its delta
    a, b = steady(), theirs()
    res.checks.append(("max |route − peft adapter_names|", float((a - b).abs().max())))
    worst = 0.0
    for row, name in enumerate(rows):  # every row against that example run alone with its delta
        with dt.active(ours, name), torch.no_grad():
            one_ids = ids[row:row + 1]
            one = (ours(input_ids=one_ids, past_key_values=_cache(ours, past_ids[row:row + 1]), use_cache=True).logits
                   if decode else ours(input_ids=one_ids).logits)
        worst = max(worst, float((a[row:row + 1] - one).abs().max()))
    res.checks.append(("max over rows |route row − that row alone|", worst))
    for what, value in res.checks:
        if not value < ATOL:
            raise AssertionError(f"{case.name}: {what} = {value:.2e} exceeds {ATOL}")
    dt.activate(ours, routed)
    res.timings = interleaved({"bare": bare, "deltatune route, steady": steady, "deltatune route, per call": per_call,
                               "peft adapter_names": theirs}, reference="bare", rounds=rounds, warmup=2)
    log(f"{case.name}: " + ", ".join(f"{k} {t.ratio:.2f}×" for k, t in res.timings.items()))
    return res


def render(results: list[CaseResult], shape: Shape, threads: int, seconds: float, device: str = "cpu") -> str:
    command = COMMAND if device == "cpu" else COMMAND.replace(" --write", f" --device {device} --section mixed-gpu --write")
    lines = [
        f"## Mixed-delta batches (`bench/mixed.py`){'' if device == 'cpu' else ', GPU'}", "",
        f"Command: `{command}` — one process, a random LlamaForCausalLM (hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, {shape.layers} layers, {shape.heads} heads, vocab {shape.vocab}), fp32 on "
        f"{_where(device, threads)}; LoRA on q/k/v/o/gate/up/down with alpha = 2r. Median over "
        f"interleaved rounds of each variant's time / the bare model's time in the same round (IQR in brackets). "
        f"Decode steps run on a {shape.past}-token KV cache. Took {seconds:.0f} s.", "",
        "| case | batch × tokens | distinct deltas (ranks) | deltatune route, steady | route, per call | peft adapter_names | peft / route | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.timings
        ours, per, peft = t["deltatune route, steady"], t["deltatune route, per call"], t["peft adapter_names"]
        cap, faster = GOALS[r.case.name]
        parts = ([f"≤ {cap}× bare"] if cap else []) + ([f"≥ {faster}× faster than peft"] if faster else [])
        met = (cap is None or ours.ratio <= cap) and (faster is None or peft.ratio / ours.ratio >= faster)
        goal = f"{', '.join(parts)}: {'met' if met else 'NOT met'}" if parts else "none (measured)"
        lines.append(f"| {r.case.name} | {r.case.batch} × {r.case.seq} | {r.case.deltas} ({'/'.join(map(str, r.case.ranks))}) "
                     f"| {ours.ratio:.2f}× [{ours.spread[0]:.2f}–{ours.spread[1]:.2f}] | {per.ratio:.2f}× "
                     f"| {peft.ratio:.2f}× | {peft.ratio / ours.ratio:.1f}× | {goal} |")
    lines += ["", "Checks before timing (fp32):", ""]
    for r in results:
        for what, value in r.checks:
            lines.append(f"- {r.case.name}: {what} = {value:.1e}")
    return "\n".join(lines)


def _where(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({threads} threads, {platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--device", default="cpu", help="cpu (the published table) or cuda")
    ap.add_argument("--section", default="mixed", help="section key in the markdown file")
    ap.add_argument("--write", default=None, help="markdown file whose section gets the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = Shape()
    base = build_llama(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab, use_cache=True)
    base = base.to(args.device)
    wanted = args.cases.split(",")
    t0 = time.perf_counter()
    results = [run_case(base, shape, c, args.rounds) for c in CASES if c.name in wanted]
    publish(render(results, shape, args.threads, time.perf_counter() - t0, args.device), args.write, args.section,
            time.perf_counter() - t0)


if __name__ == "__main__":
    main()
