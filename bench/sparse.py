"""Training cost of SpIEL (sparse fine-tuning with drop/regrow) against LoRA and full fine-tuning.

    .venv/bin/python bench/sparse.py --write docs/benchmarks.md

One process, one random LlamaForCausalLM with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 heads,
3 KV heads, vocabulary 49152, tied embeddings), fp32 on CPU, causal-LM loss on B=4, T=256 random tokens,
torch.optim.AdamW. LoRA (deltatune, rank r) and SpIEL adapt q, k, v, o, gate, up and down; SpIEL gets exactly
LoRA's number of trainable parameters: k = r·(in + out) entries in each weight. Full fine-tuning trains every
parameter. `run()` takes the shapes and repetition counts as arguments so the smoke test can call it on a tiny
model.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TARGETS, Timing, allocator_peak, build_llama, interleaved, live_state, storage_bytes  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.runtime import slot_of  # noqa: E402
from deltatune.methods.sparse.autograd import use_csr  # noqa: E402
from deltatune.core.progress import Progress  # noqa: E402
from deltatune.runtime.step_hooks import after_optimizer_step, before_step  # noqa: E402

COMMAND = ".venv/bin/python bench/sparse.py --write docs/benchmarks.md"
TARGET_PEAK = 1.2  # SpIEL peak training memory ≤ 1.2× LoRA's (issue 5)
ATOL = 1e-5


@dataclass
class Shape:
    hidden: int = 576
    intermediate: int = 1536
    layers: int = 2  # of SmolLM2-135M's 30: the whole run must stay under 3 minutes on 2 CPU cores
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    batch: int = 4
    seq: int = 256
    r: int = 16
    every: int = 20  # SpIEL regrow interval and statistics window (the paper's defaults)
    window: int = 5
    full_layers: int = 30  # what SmolLM2-135M has, for the report


@dataclass
class Row:
    name: str
    trainable: int
    peak: int = 0
    state: int = 0  # bytes alive before the step (weights, delta, optimizer state, input ids)
    peak_op: str = ""


@dataclass
class Results:
    shape: Shape
    threads: int
    rounds: int
    rows: dict[str, Row]
    steady: dict[str, Timing]
    window: dict[str, list[float]]  # seconds of SpIEL window steps (statistics gathered), regrow excluded
    regrow_ms: dict[str, float]  # the regrow itself (all weights), median
    replaced: dict[str, int]  # entries replaced by the first regrow, over the whole model
    densities: dict[str, float]
    checks: list[tuple[str, float, str]] = field(default_factory=list)
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)


def module_shapes(s: Shape) -> dict[str, tuple[int, int]]:
    """[out, in] of each targeted projection."""
    kv = s.hidden // s.heads * s.kv_heads
    return {"q_proj": (s.hidden, s.hidden), "k_proj": (kv, s.hidden), "v_proj": (kv, s.hidden), "o_proj": (s.hidden, s.hidden),
            "gate_proj": (s.intermediate, s.hidden), "up_proj": (s.intermediate, s.hidden), "down_proj": (s.hidden, s.intermediate)}


def spiel_config(s: Shape, regrow: str) -> dt.Sparse:
    """k = LoRA's parameter count r·(in + out) in every targeted weight."""
    ks = {name: s.r * (o + i) for name, (o, i) in module_shapes(s).items()}
    return dt.Sparse(k=max(ks.values()), k_pattern=ks, targets=TARGETS, regrow_every=s.every, regrow_window=s.window,
                     regrow=regrow)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check(checks: list, name: str, value: float, ok: bool, rule: str) -> None:
    checks.append((name, value, rule))
    if not ok:
        raise AssertionError(f"correctness check failed: {name} = {value:.3g} ({rule})")


def spiel_pieces(model: nn.Module) -> list[nn.Module]:
    return [slot_of(m)["default"] for m in model.modules() if slot_of(m) is not None]


def run(shape: Shape | None = None, *, rounds: int = 2, threads: int = 2, seed: int = 0, progress: bool = True,
        timing: bool = True, log: Callable[[str], None] = print) -> Results:
    """The whole benchmark; with timing=False only the peak memory of LoRA and SpIEL (no full fine-tuning)."""
    s = shape or Shape()
    torch.set_num_threads(threads)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    checks: list = []
    base = build_llama(s.hidden, s.intermediate, s.layers, s.heads, s.vocab, seed, num_key_value_heads=s.kv_heads,
                       tie_word_embeddings=True)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        ref = base(input_ids=ids).logits

    models: dict[str, nn.Module] = {
        "LoRA": dt.attach(copy.deepcopy(base), dt.LoRA(r=s.r, alpha=2.0 * s.r, targets=TARGETS)),
        "SpIEL-AG": dt.attach(copy.deepcopy(base), spiel_config(s, "accumulated")),
        "SpIEL-MA": dt.attach(copy.deepcopy(base), spiel_config(s, "momentum")),
    }
    if timing:
        models["full"] = copy.deepcopy(base)
        for p in models["full"].parameters():
            p.requires_grad_(True)
    del base
    counts = {name: trainable(m) for name, m in models.items()}
    _check(checks, "trainable parameters: SpIEL - LoRA", counts["SpIEL-AG"] - counts["LoRA"],
           counts["SpIEL-AG"] == counts["LoRA"] == counts["SpIEL-MA"], "must be 0")
    with torch.no_grad():
        diff = float((models["SpIEL-AG"](input_ids=ids).logits - ref).abs().max())
    _check(checks, "SpIEL at initialisation: max abs(logits - logits(bare))", diff, diff <= ATOL, f"must be <= {ATOL:g}")
    del ref
    for m in models.values():
        m.train()
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()}
    total = 100 * s.every  # a long run: the drop fraction is still near its initial 0.2

    def step(name: str) -> Callable[[], None]:
        m, opt = models[name], opts[name]

        def f() -> None:
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    regrow_seconds: dict[str, list[float]] = {"SpIEL-AG": [], "SpIEL-MA": []}
    replaced: dict[str, int] = {}  # by the first regrow of each model (later ones, back to back, re-choose the
    # entries they just dropped: these start at 0, so they are the smallest, and still have the largest gradients)

    def window_step(name: str, timed_regrow: bool = True) -> Callable[[], None]:
        """The last step of a statistics window: gather during backward, then the regrow (timed apart)."""
        m, opt = models[name], opts[name]

        def f() -> None:
            before_step(m, s.every - s.window, total)  # opens a window: a fresh, empty accumulator
            step(name)()
            t0 = time.perf_counter()
            before = [p.index.clone() for p in spiel_pieces(m)]
            after_optimizer_step(m, opt, s.every, total)  # regrows with the statistics of this step
            if timed_regrow:
                regrow_seconds[name].append(time.perf_counter() - t0)
            replaced.setdefault(name, sum(int((p.index != b).sum()) for p, b in zip(spiel_pieces(m), before)))
        return f

    n_steps = (5 * (rounds + 1) + 2 * 5) if timing else 2 * 4
    with Progress(n_steps, enabled=progress, description="bench/sparse") as bar:
        done = [0]

        def tick(f: Callable[[], None], k: int = 1) -> Callable[[], None]:
            def g() -> None:
                f()
                done[0] += k
                bar.update(done[0])
            return g

        steady: dict[str, Timing] = {}
        window: dict[str, list[float]] = {}
        if timing:
            log(f"steady steps: {rounds} rounds of LoRA, SpIEL, full (B={s.batch}, T={s.seq}, {s.layers} layers)")
            steady = interleaved({"LoRA": tick(step("LoRA")), "SpIEL": tick(step("SpIEL-AG")), "full": tick(step("full"))},
                                 reference="LoRA", rounds=rounds, warmup=1)
            log(f"window steps + regrow: {rounds} rounds of SpIEL-AG, SpIEL-MA")
            timed = interleaved({"SpIEL-AG": tick(window_step("SpIEL-AG")), "SpIEL-MA": tick(window_step("SpIEL-MA"))},
                                reference="SpIEL-AG", rounds=rounds, warmup=1)
            for name in regrow_seconds:
                regrow_seconds[name] = regrow_seconds[name][1:]  # the warmup round's
                window[name] = [a - b for a, b in zip(timed[name].seconds, regrow_seconds[name])]

        rows = {"LoRA": Row("LoRA", counts["LoRA"]), "SpIEL": Row("SpIEL", counts["SpIEL-AG"]),
                "SpIEL-AG window": Row("SpIEL-AG window", counts["SpIEL-AG"]),
                "SpIEL-MA window": Row("SpIEL-MA window", counts["SpIEL-MA"])}
        measured = {"LoRA": ("LoRA", step("LoRA")), "SpIEL": ("SpIEL-AG", step("SpIEL-AG")),
                    "SpIEL-AG window": ("SpIEL-AG", window_step("SpIEL-AG", False)),
                    "SpIEL-MA window": ("SpIEL-MA", window_step("SpIEL-MA", False))}
        if timing:
            rows["full"], measured["full"] = Row("full", counts["full"]), ("full", step("full"))
        for row_name, (model_name, fn) in measured.items():
            log(f"peak memory: {row_name}")
            m, opt = models[model_name], opts[model_name]
            opt.zero_grad(set_to_none=True)
            gc.collect()
            before: dict[str, int] = {}

            def setup() -> None:  # one whole steady step inside the profiler session, then a clean start
                step(model_name)()
                gc.collect()
                before["bytes"] = storage_bytes(live_state(m, opt, ids))

            above, where = allocator_peak(fn, setup)
            rows[row_name].peak, rows[row_name].state, rows[row_name].peak_op = before["bytes"] + above, before["bytes"], where
            done[0] += 2
            bar.update(done[0])

    n_expect = int(0.2 * (1 - s.every / total) * counts["SpIEL-AG"])
    for name in ("SpIEL-AG", "SpIEL-MA"):
        _check(checks, f"{name}: entries replaced by one regrow / ⌊k·p⌋ summed over weights",
               replaced[name] / max(n_expect, 1), 0.9 * n_expect <= replaced[name] <= n_expect + len(TARGETS) * s.layers,
               "must be in [0.9, 1]: drop/regrow ran (a dropped entry chosen again stays)")
    densities = {name: s.r * (o + i) / (o * i) for name, (o, i) in module_shapes(s).items()}
    return Results(s, threads, rounds, rows, steady, window,
                   {n: 1e3 * statistics.median(v) for n, v in regrow_seconds.items() if v}, replaced, densities, checks,
                   time.perf_counter() - t_start, (load0, os.getloadavg()[0]))


def paths(s: Shape, densities: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08), threads: int = 2,
          reps: int = 15) -> dict[tuple[int, int], dict[float, tuple[float, float]]]:
    """Milliseconds (minimum over `reps`) of one forward + backward of SpIEL's autograd function alone, dense path
    against CSR path, for each projection shape and density, at N = B·T rows: what CSR_MAX_DENSITY is set from."""
    from deltatune.methods.sparse.autograd import SparseLinearFunction

    torch.set_num_threads(threads)
    n = s.batch * s.seq
    out: dict[tuple[int, int], dict[float, tuple[float, float]]] = {}
    for o, i in sorted(set(module_shapes(s).values())):
        out[(o, i)] = {}
        for d in densities:
            k = max(1, int(d * o * i))
            index = torch.randperm(o * i)[:k]
            values = torch.randn(k, requires_grad=True)
            x = torch.randn(n, i, requires_grad=True)
            acc = torch.randn(n, o, requires_grad=True)
            g = torch.randn(n, o)
            best = []
            for csr in (False, True):
                times = []
                for _ in range(reps + 1):
                    t0 = time.perf_counter()
                    SparseLinearFunction.apply(x, acc, index, values, (o, i), None, csr).backward(g)
                    times.append(time.perf_counter() - t0)
                best.append(1e3 * min(times[1:]))
            out[(o, i)][d] = (best[0], best[1])
    return out


# --- report -----------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def window_ms(res: Results, name: str) -> float:
    return 1e3 * statistics.median(res.window[name])


def interval_ms(res: Results, name: str) -> float:
    """Average step time of SpIEL over one regrow interval: N - W plain steps, W window steps, one regrow."""
    s = res.shape
    plain, win = res.steady["SpIEL"].median_ms, window_ms(res, name)
    return ((s.every - s.window) * plain + s.window * win + res.regrow_ms[name]) / s.every


def render(res: Results) -> str:
    import transformers

    s, rows = res.shape, res.rows
    lora = rows["LoRA"].peak
    L = ["## Sparse fine-tuning: SpIEL against LoRA and full fine-tuning", ""]
    L += ["Generated by `bench/sparse.py`; do not edit by hand. Regenerate with", "", f"    {COMMAND}", "",
          "(`make bench` runs it too.)", ""]
    ratio = rows["SpIEL"].peak / lora
    L += ["### Target", "", "| target | measured | |", "|---|---:|---|",
          f"| SpIEL peak training memory ≤ {TARGET_PEAK:.1f}× LoRA's (equal trainable parameters) | {ratio:.3f}× "
          f"| {'met' if ratio <= TARGET_PEAK else '**missed**'} |", ""]
    ag, ma = rows["SpIEL-AG window"].peak / lora, rows["SpIEL-MA window"].peak / lora
    per_layer = sum(o * i for o, i in module_shapes(s).values())
    L.append(f"That is a step between regrow windows ({s.every - s.window} of every {s.every} steps). The steps that "
             f"gather regrowth statistics and end in a regrow peak at {ag:.3f}× LoRA with accumulated gradients "
             f"(SpIEL-AG) and at {ma:.3f}× with the momentum approximation (SpIEL-MA). SpIEL-AG's accumulator is one "
             f"fp32 [out, in] tensor per adapted weight while a window lasts: {_mib(4 * per_layer * s.layers)} MiB here, "
             f"{_mib(4 * per_layer * s.full_layers)} MiB for all {s.full_layers} layers of SmolLM2-135M. It fills up during the "
             f"layers' backward, after the loss's B·T·vocabulary temporaries that set the peak are gone, so in the measured "
             f"(first) window step it does not raise the peak; in the window's later steps it is alive through the loss "
             f"peak, which adds its size to SpIEL-AG's peak (an estimate, not measured here; see docs/sparse.md). "
             f"SpIEL-MA keeps a row and a column vector per weight ({_mib(4 * s.layers * sum(o + i for o, i in module_shapes(s).values()))} MiB here).")
    L.append("")
    L += ["### Setup", ""]
    L.append(f"- Machine: {os.cpu_count()} CPU cores, `torch.set_num_threads({res.threads})`, {platform.system()} "
             f"{platform.machine()}, Python {platform.python_version()}; torch {torch.__version__}, transformers "
             f"{transformers.__version__}")
    L.append(f"- Model: random `LlamaForCausalLM` with SmolLM2-135M's shapes — hidden {s.hidden}, intermediate "
             f"{s.intermediate}, {s.heads} heads, {s.kv_heads} KV heads, vocabulary {s.vocab}, tied embeddings — but "
             f"{s.layers} of its {s.full_layers} layers, so the run fits in 3 minutes; fp32, SDPA attention, no KV cache")
    dens = ", ".join(f"{n.removesuffix('_proj')} {100 * d:.1f} %" for n, d in res.densities.items())
    L.append(f"- LoRA: r={s.r}, alpha={2 * s.r} on q, k, v, o, gate, up, down ({7 * s.layers} modules), "
             f"{rows['LoRA'].trainable:,} trainable parameters. SpIEL: the same modules with k = r·(in + out) entries "
             f"each — {rows['SpIEL'].trainable:,} trainable parameters — i.e. densities {dens}; regrow every "
             f"{s.every} steps from statistics of the last {s.window}, drop fraction 0.2 decaying linearly. "
             f"Full fine-tuning: all {rows['full'].trainable:,} parameters.")
    paths = {("CSR" if use_csr(s.r * (o + i), (o, i), torch.device("cpu")) else "dense") for o, i in module_shapes(s).values()}
    L.append(f"- SpIEL's autograd path at these densities: {' and '.join(sorted(paths))} (see docs/sparse.md)")
    L.append(f"- Input: B={s.batch}, T={s.seq} random token ids, causal-LM loss, `torch.optim.AdamW(lr=1e-4)`")
    L.append(f"- Repetitions: {res.rounds} interleaved rounds after one warm-up round; whole run {res.seconds:.0f} s; "
             f"1-minute load average {res.load[0]:.2f} at the start, {res.load[1]:.2f} at the end (other processes share "
             f"the machine: the ratios are medians of per-round ratios)")
    L.append("")
    L += ["### Training step (forward + backward + AdamW step)", "",
          "| variant | trainable parameters | peak MiB | peak × LoRA | of which before the step MiB | ms per step "
          "| time × LoRA | range over rounds |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lora_ms = res.steady["LoRA"].median_ms

    def steady(name: str) -> tuple[float, float, tuple[float, float]]:
        t = res.steady[name]
        return t.median_ms, t.ratio, (min(t.ratios), max(t.ratios))

    def windowed(name: str) -> tuple[float, float, tuple[float, float]]:
        r = [1e3 * v / lora_ms for v in res.window[name]]
        return window_ms(res, name), window_ms(res, name) / lora_ms, (min(r), max(r))

    timing = {"LoRA": steady("LoRA"), "SpIEL": steady("SpIEL"), "SpIEL-AG window": windowed("SpIEL-AG"),
              "SpIEL-MA window": windowed("SpIEL-MA"), "full": steady("full")}
    labels = {"LoRA": f"LoRA r={s.r}", "SpIEL": "SpIEL, between windows",
              "SpIEL-AG window": "SpIEL-AG, window step + regrow", "SpIEL-MA window": "SpIEL-MA, window step + regrow",
              "full": "full fine-tuning"}
    for key, row in rows.items():
        ms, ratio, (lo, hi) = timing[key]
        L.append(f"| {labels[key]} | {row.trainable:,} | {_mib(row.peak)} | {row.peak / lora:.3f} | {_mib(row.state)} "
                 f"| {ms:.0f} | {ratio:.3f} | {lo:.2f}–{hi:.2f} |")
    L.append("")
    L.append(f"Time × LoRA is the median of per-round ratios for the steady rows; the window steps were timed in "
             f"rounds of their own and are divided by LoRA's median. On a loaded machine the range over rounds is the "
             f"noise: time differences inside it mean nothing (memory is allocator-level and does not vary). "
             f"Window rows: the time column is the step alone (statistics gathered in backward), the regrow is timed "
             f"apart: {res.regrow_ms['SpIEL-AG']:.0f} ms (AG) and {res.regrow_ms['SpIEL-MA']:.0f} ms (MA) for all "
             f"{7 * s.layers} weights (the first replaced {res.replaced['SpIEL-AG']:,} and {res.replaced['SpIEL-MA']:,} entries). "
             f"The memory columns include the regrow. Averaged over one {s.every}-step interval "
             f"({s.every - s.window} plain steps, {s.window} window steps, one regrow) SpIEL-AG takes "
             f"{interval_ms(res, 'SpIEL-AG'):.0f} ms per step ({interval_ms(res, 'SpIEL-AG') / res.steady['LoRA'].median_ms:.3f}× "
             f"LoRA) and SpIEL-MA {interval_ms(res, 'SpIEL-MA'):.0f} ms "
             f"({interval_ms(res, 'SpIEL-MA') / res.steady['LoRA'].median_ms:.3f}×).")
    L.append("")
    L.append(f"The peak is reached in `{rows['SpIEL'].peak_op}` (SpIEL), `{rows['LoRA'].peak_op}` (LoRA) and "
             f"`{rows['full'].peak_op}` (full fine-tuning).")
    L.append("")
    L += ["### Correctness checks (run before timing; the script stops if one fails)", "", "| check | value | rule |",
          "|---|---:|---|"]
    L += [f"| {name} | {value:.3g} | {rule} |" for name, value, rule in res.checks]
    L.append("")
    L.append(WHY.format(layers=s.layers))
    return "\n".join(L) + "\n"


WHY = """### How it is measured, and why the numbers look like this

- Memory is measured as in bench/forward.py's section (`bench/_common.py`): the bytes of every tensor alive before the
  step (distinct storages) plus the allocator-level peak above that during forward, backward, the AdamW step and,
  for the window rows, the regrow, from `torch.profiler(profile_memory=True)`.
- SpIEL and LoRA keep the same activations of the frozen model and the same input x of every adapted layer; what
  differs is small next to them and to the loss's B·T·vocabulary temporaries: LoRA saves an [N, r] projection per
  module, SpIEL nothing but its k indices and values (its ΔW exists only while one layer is computed, in forward
  and again in backward). Per trainable number SpIEL holds a 4-byte value, an 8-byte index, a gradient and two
  AdamW moments (24 bytes); LoRA 16. So the peak ratio is close to 1, and it stays close with more layers.
- Time: at LoRA-equal density (4-11 %) SpIEL's autograd multiplies by a dense ΔW (scattered from the k values in
  forward and again in backward, and the values' gradient is gathered from the dense gᵀx): about the extra
  arithmetic of training those weights in full, without the weights' gradient or optimizer state. LoRA's
  rank-r products are much cheaper; full fine-tuning adds the weights' gradients and an AdamW step over every
  parameter. At low densities SpIEL switches to sparse CSR products (docs/sparse.md).
- Full fine-tuning's peak also holds a gradient and two AdamW moments for every parameter, embeddings included.
- This model has {layers} of SmolLM2-135M's 30 layers: with all of them the activations and the adapted layers'
  inputs grow with the layer count for all three variants (the embedding and the loss's temporaries do not), and
  full fine-tuning's gradients and optimizer state grow with the parameter count.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", metavar="PATH", help="write this benchmark's section into this markdown file")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=Shape.layers)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-only", action="store_true", help="only the peak memory of LoRA and SpIEL, printed "
                                                                "(e.g. with --layers 30: all of SmolLM2-135M)")
    ap.add_argument("--paths", action="store_true", help="only time SpIEL's dense and CSR autograd paths per shape "
                                                          "and density (what CSR_MAX_DENSITY is chosen from)")
    args = ap.parse_args(argv)
    if args.paths:
        print("| [out, in] | " + " | ".join(f"{100 * d:g} %: dense / CSR ms" for d in (0.002, 0.005, 0.01, 0.02, 0.04, 0.08)) + " |")
        for shape, row in paths(Shape(), threads=args.threads).items():
            print(f"| {list(shape)} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in row.values()) + " |", flush=True)
        return 0
    res = run(Shape(layers=args.layers), rounds=args.rounds, threads=args.threads, progress=sys.stderr.isatty(),
              timing=not args.memory_only, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.memory_only:
        lora = res.rows["LoRA"].peak
        print(f"| {args.layers} layers, B={res.shape.batch}, T={res.shape.seq} | peak MiB | × LoRA | before the step MiB | peak in |")
        print("|---|---:|---:|---:|---|")
        for key, row in res.rows.items():
            print(f"| {key} | {_mib(row.peak)} | {row.peak / lora:.3f} | {_mib(row.state)} | `{row.peak_op}` |")
        return 0
    from _report import publish

    publish(render(res), args.write, "sparse", res.seconds)  # the file is shared: only this script's section
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
