"""The serving engine under issue 13's Zipf workload, against its peers in the same process.

    PYTHONPATH=src .venv/bin/python bench/serve.py --write docs/benchmarks.md

Workload: SmolLM2-135M (`deltatune.zoo`, fp32), `--requests` requests (prompt `--prompt` random tokens,
`--gen` generated, greedy, EOS off), each naming one of K registered LoRA r=16 all-linear deltas drawn
Zipf(1.0) (K=0: base only). The K names share `--files` delta files on disk (random non-zero B); every name is its
own delta for the engine (own host-cache entry, own slot). Rows:

* engine: `Engine(max_loaded=--slots, max_batch=--batch, prefill_tokens=256, host_bytes=1 GiB)`, all requests
  submitted at t=0, `run()`; tokens/s = generated tokens / wall time; inter-token latency from `on_token` stamps.
* peft: static batches of `--batch` requests in arrival order, `PeftModel.generate(adapter_names=...)` (HF generate,
  left padding not needed: equal prompt lengths); adapters loaded on demand with `load_adapter` (timed), at most
  `--peft-loaded` resident (LRU, `delete_adapter`), since 1024 resident SmolLM2 adapters (≈20 GB) do not fit.
* naive: one adapter at a time on the bare model: take the oldest waiting request's delta, `dt.load` it, generate
  for every waiting request of that delta (up to `--batch`), `dt.detach` it.
* hot load: disk → slot for a fresh name (host cache off), median of `--loads`.
* registry scaling: one engine with `--batch` requests decoding over 10 deltas; rounds alternate 10 registered and
  10,000 registered (9,990 extra names registered, then unregistered); median decode-step time of each.
* RSS: process RSS (VmRSS) after each engine row minus the RSS before the engine was built, against the engine's
  own accounting (KV arena + slot banks + host cache).
"""
from __future__ import annotations

import argparse
import copy
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

import deltatune as dt  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402

COMMAND = "PYTHONPATH=src .venv/bin/python bench/serve.py --write docs/benchmarks.md"


def command(a) -> str:
    """The command line that reproduces this run (options that differ from the defaults spelled out)."""
    extra = [x for x in a.argv if x != "--write" and not x.endswith(".md")]
    return COMMAND.replace(" --write", (" " + " ".join(extra) if extra else "") + " --write")


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_files(base, n: int, root: str) -> tuple[list[str], list[str]]:
    native, peft = [], []
    for i in range(n):
        m = copy.deepcopy(base)
        torch.manual_seed(100 + i)
        dt.attach(m, dt.LoRA(r=16, targets="all-linear"), name="d")
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        native.append(str(dt.save(m, f"{root}/n{i}")))
        peft.append(str(dt.save(m, f"{root}/p{i}", format="peft")))
        del m
    return native, peft


def zipf(k: int, n: int, seed: int) -> list[int]:
    w = torch.tensor([1.0 / (j + 1) for j in range(k)])
    return torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


def engine_row(base, files, k, prompts, picks, a):
    before = rss()
    eng = Engine(base, max_loaded=a.slots, max_rank=16, max_batch=a.batch, host_bytes=1 << 30)
    for j in range(k):
        eng.register(f"d{j}", files[j % len(files)])
    stamps: dict[int, list[float]] = {}
    sp = SamplingParams(max_tokens=a.gen, eos=())
    t0 = time.perf_counter()
    for p, j in zip(prompts, picks):
        eng.submit(p, None if j is None else f"d{j}", sp,
                   on_token=lambda r, t: stamps.setdefault(r.id, []).append(time.perf_counter()))
    eng.run()
    wall = time.perf_counter() - t0
    itl = sorted(b - c for s in stamps.values() for c, b in zip(s, s[1:]))
    own = eng.arena.nbytes + eng.banks.nbytes + eng.pool.host_used
    row = dict(tok_s=len(prompts) * a.gen / wall, wall=wall, p50=1e3 * itl[len(itl) // 2],
               p99=1e3 * itl[min(len(itl) - 1, int(0.99 * len(itl)))], loads=eng.slots.loads,
               steps=eng.steps, rss_delta=rss() - before, own=own, arena=eng.arena.nbytes, banks=eng.banks.nbytes,
               host=eng.pool.host_used, moves=eng.arena.moves)
    eng.close()
    del eng
    return row


def peft_row(base, pfiles, prompts, picks, a):
    from peft import PeftModel

    model = copy.deepcopy(base)
    peft_model, loaded = None, []  # loaded: LRU of adapter names, oldest first
    t0 = time.perf_counter()
    loads = 0
    for i in range(0, len(prompts), a.batch):
        names = [f"d{j}" for j in picks[i:i + a.batch]]
        for name in dict.fromkeys(names):
            if name in loaded:
                loaded.remove(name)
                loaded.append(name)
                continue
            while len(loaded) >= a.peft_loaded:
                victim = next((v for v in loaded if v not in names), None)
                if victim is None:  # the batch itself needs more: exceed the cap for it
                    break
                loaded.remove(victim)
                peft_model.delete_adapter(victim)
            path = pfiles[int(name[1:]) % len(pfiles)]
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
            else:
                peft_model.load_adapter(path, adapter_name=name)
            loaded.append(name)
            loads += 1
        ids = torch.tensor(prompts[i:i + a.batch])
        with torch.inference_mode():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                      max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + a.gen
    wall = time.perf_counter() - t0
    del peft_model, model
    return dict(tok_s=len(prompts) * a.gen / wall, wall=wall, loads=loads)


def naive_row(base, files, prompts, picks, a):
    model = copy.deepcopy(base)
    waiting = list(zip(prompts, picks))
    t0 = time.perf_counter()
    swaps = 0
    while waiting:
        j = waiting[0][1]
        batch = [p for p, d in waiting if d == j][:a.batch]
        taken = 0
        rest = []
        for p, d in waiting:
            if d == j and taken < len(batch):
                taken += 1
            else:
                rest.append((p, d))
        waiting = rest
        dt.load(model, files[j % len(files)], name="cur")
        swaps += 1
        ids = torch.tensor(batch)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.gen,
                                 min_new_tokens=a.gen, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + a.gen
        dt.detach(model, "cur")
    wall = time.perf_counter() - t0
    del model
    return dict(tok_s=len(prompts) * a.gen / wall, wall=wall, swaps=swaps)


def hot_load(base, files, a) -> list[float]:
    eng = Engine(base, max_loaded=4, max_rank=16, host_bytes=0)
    times = []
    for i in range(a.loads + 2):
        eng.register(f"h{i}", files[i % len(files)])
        t = time.perf_counter()
        eng.preload(f"h{i}")
        times.append(1e3 * (time.perf_counter() - t))
    eng.close()
    return times[2:]  # the first two warm the code path


def registry_scaling(base, files, prompts, a) -> dict[int, float]:
    eng = Engine(base, max_loaded=16, max_rank=16, max_batch=a.batch)
    for j in range(10):
        eng.register(f"d{j}", files[j % len(files)])
    for j in range(a.batch):
        eng.submit(prompts[j % len(prompts)], f"d{j % 10}", SamplingParams(max_tokens=100_000, eos=()))
    while eng.waiting or any(r.row is None for r in eng.running):
        eng.step()
    for _ in range(3):
        eng.step()
    per: dict[int, list[float]] = {10: [], a.registry: []}
    steps: dict[int, list[float]] = {10: [], a.registry: []}
    for i in range(a.rounds):  # ABBA: the order flips every round, so a drift over the run (growing contexts) cancels
        for n in ((10, a.registry) if i % 2 == 0 else (a.registry, 10)):
            extra = [f"x{j}" for j in range(n - 10)]
            for name in extra:
                eng.register(name, files[0])
            eng.step()  # warm-up step after the change
            ts = []
            for _ in range(a.decode_steps):
                t = time.perf_counter()
                eng.step()
                ts.append(1e3 * (time.perf_counter() - t))
            per[n].append(statistics.median(ts))
            steps[n] += ts
            for name in extra:
                eng.unregister(name)
    eng.close()
    return {n: statistics.median(v) for n, v in steps.items()}, per


def run(a, log=print):
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    if a.model == "tiny":
        base, vocab = build_tiny(), 64
    else:
        from deltatune import zoo

        base, _ = zoo.load_model(a.model)
        vocab = base.config.vocab_size
    base.eval()
    root = tempfile.mkdtemp()
    files, pfiles = make_files(base, a.files, root)
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (a.prompt,), generator=rng).tolist() for _ in range(a.requests)]
    out = dict(engine={}, peft={}, naive={}, hot=None, scaling=None, base_rss=rss(),
               params=sum(p.numel() * p.element_size() for p in base.parameters()))
    if a.only == "scaling":
        a.ks = a.peft_ks = a.naive_ks = []
    picks_of = {k: (zipf(k, a.requests, k) if k else [None] * a.requests) for k in a.ks}
    for k in a.ks:
        out["engine"][k] = engine_row(base, files, k, prompts, picks_of[k], a)
        log(f"engine K={k}: {out['engine'][k]}")
    if 0 in a.ks and len(a.ks) > 1:  # base-only again after the delta rows: the ratios use both (drift cancels)
        out["base_again"] = engine_row(base, files, 0, prompts, picks_of[0], a)
        log(f"engine K=0 again: {out['base_again']}")
    for k in a.peft_ks:
        out["peft"][k] = peft_row(base, pfiles, prompts, picks_of[k], a)
        log(f"peft K={k}: {out['peft'][k]}")
    for k in a.naive_ks:
        out["naive"][k] = naive_row(base, files, prompts, picks_of[k], a)
        log(f"naive K={k}: {out['naive'][k]}")
    if a.only == "scaling":
        out["scaling"] = registry_scaling(base, files, prompts, a)
        log(f"registry scaling: {out['scaling']}")
        out["seconds"] = time.perf_counter() - t_start
        return out
    out["hot"] = hot_load(base, files, a)
    log(f"hot load ms: {[round(x, 1) for x in out['hot']]}")
    out["scaling"] = registry_scaling(base, files, prompts, a)
    log(f"registry scaling: {out['scaling']}")
    out["seconds"] = time.perf_counter() - t_start
    return out


def scaling_line(out, a) -> str:
    (s10, sbig), per = out["scaling"][0].values(), out["scaling"][1]
    return (f"Registry scaling, decode step with {a.batch} running requests over 10 deltas: **{s10:.1f} ms** with 10 "
            f"registered vs **{sbig:.1f} ms** with {a.registry:,} registered ({100 * (sbig / s10 - 1):+.1f}%; median "
            f"of all {a.rounds * a.decode_steps} steps of each, in {a.rounds} rounds of {a.decode_steps} steps whose "
            f"order flips every round; each round's median: {', '.join(f'{x:.1f}' for x in per[10])} vs "
            f"{', '.join(f'{x:.1f}' for x in per[a.registry])} ms).")


def render_scaling(out, a) -> str:
    return "\n".join(["## Serving: registry scaling (`bench/serve.py --only scaling`)", "",
                      f"Command: `{command(a)}` — one process, {a.model} (fp32) on CPU ({a.threads} threads, "
                      f"{platform.machine()}, {os.cpu_count()} cores); registering and unregistering the extra "
                      f"names between rounds. Took {out['seconds']:.0f} s.", "", scaling_line(out, a)])


def render(out, a) -> str:
    eng, peft, naive = out["engine"], out["peft"], out["naive"]
    base = eng.get(0)
    if base and out.get("base_again"):  # measured first and last: the ratios are against their mean
        base = dict(base, tok_s=(base["tok_s"] + out["base_again"]["tok_s"]) / 2)
    lines = [
        "## Serving (`bench/serve.py`)", "",
        f"Command: `{command(a)}` — one process, {a.model} (fp32) on CPU ({a.threads} threads, {platform.machine()}, "
        f"{os.cpu_count()} cores), {a.requests} requests (prompt {a.prompt} random tokens, {a.gen} generated, "
        f"greedy, EOS off), deltas drawn Zipf(1.0) over K registered LoRA r=16 on all linear layers (the K names share "
        f"{a.files} files; each name is its own delta to every server), engine with {a.slots} slots, max batch "
        f"{a.batch}, prefill budget 256 tokens/step, 1 GiB host cache. peft: static batches of {a.batch} in arrival "
        f"order with HF generate and `adapter_names`, adapters loaded on demand (at most {a.peft_loaded} resident). "
        f"Naive: one adapter at a time (`dt.load`, generate its waiting requests, `dt.detach`). All rows run once "
        f"(base-only twice, below), in this order, in one process. Took {out['seconds']:.0f} s.", "",
        "| server | K | tokens/s | × engine base-only | engine × this | ITL p50 | ITL p99 | loads | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if out.get("base_again"):
        lines[2] += (f" The base-only engine ran first and again after the engine's delta rows, before peft and naive "
                     f"({eng[0]['tok_s']:.1f} and {out['base_again']['tok_s']:.1f} tok/s); \"× engine base-only\" is "
                     f"against their mean, for every row.")
    for k, r in eng.items():
        rel = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "–"
        lines.append(f"| engine | {k} | {r['tok_s']:.1f} | {rel} | 1.0 | {r['p50']:.0f} ms | {r['p99']:.0f} ms "
                     f"| {r['loads']} | {r['wall']:.0f} s |")
    for name, rows in (("peft adapter_names", peft), ("naive one-at-a-time", naive)):
        for k, r in rows.items():
            rel = f"{r['tok_s'] / base['tok_s']:.2f}" if base else "–"
            ours = f"{eng[k]['tok_s'] / r['tok_s']:.1f}" if k in eng else "–"
            lines.append(f"| {name} | {k} | {r['tok_s']:.1f} | {rel} | {ours} | – | – "
                         f"| {r.get('loads', r.get('swaps'))} | {r['wall']:.0f} s |")
    hot = out["hot"]
    lines += ["", f"* Hot load disk → device slot of one r=16 all-linear delta (fresh name, host cache off, file in the "
                  f"OS page cache): median **{statistics.median(hot):.1f} ms** over {len(hot)} (min {min(hot):.1f}, "
                  f"max {max(hot):.1f}).",
              "* " + scaling_line(out, a),
              f"* Memory: base parameters {out['params'] / 2**20:.0f} MiB; process RSS before the engine rows "
              f"{out['base_rss'] / 2**20:.0f} MiB. Per engine row, RSS growth while it ran vs the engine's own "
              f"accounting (KV arena + slot banks + host cache):"]
    for k, r in eng.items():
        lines.append(f"  K={k}: RSS +{r['rss_delta'] / 2**20:.0f} MiB vs {r['own'] / 2**20:.0f} MiB "
                     f"(arena {r['arena'] / 2**20:.0f}, banks {r['banks'] / 2**20:.0f}, host {r['host'] / 2**20:.0f}); "
                     f"arena column moves {r['moves']}, steps {r['steps']}.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random model and workload (the test suite's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--ks", default="0,8,128,1024")
    ap.add_argument("--peft-ks", default="8,1024")
    ap.add_argument("--naive-ks", default="8,1024")
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peft-loaded", type=int, default=128)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--registry", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--only", choices=["all", "scaling"], default="all",
                    help="scaling: only the registry-scaling measurement (its own section, 'serve-scaling')")
    ap.add_argument("--write", default=None, help="markdown file whose section 'serve' gets the results")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.smoke:
        a.model, a.requests, a.prompt, a.gen, a.ks, a.peft_ks, a.naive_ks = "tiny", 6, 4, 3, "0,4", "4", "4"
        a.files, a.slots, a.batch, a.peft_loaded, a.loads, a.registry, a.rounds, a.decode_steps = 2, 2, 4, 2, 3, 100, 1, 2
        a.threads = 1
    for key in ("ks", "peft_ks", "naive_ks"):
        setattr(a, key, [int(x) for x in getattr(a, key).split(",") if x])
    out = run(a)
    if a.only == "scaling":
        publish(render_scaling(out, a), a.write, "serve-scaling", out["seconds"])
        return out
    text = render(out, a)
    if a.smoke:
        print(text)
    else:
        publish(text, a.write, "serve", out["seconds"])
    return out


if __name__ == "__main__":
    main()
