"""The serving engine under a Zipf workload (issue 13), reduced: engine with K registered LoRA r=16 deltas against
the same engine with no deltas; hot-load latency; decode-step time with 10 vs 10,000 registered.

    .venv/bin/python bench/serve.py [--smoke]

Not measured here (yet): peft `adapter_names` static batches and a one-adapter-at-a-time server; SmolLM2-135M
(the default model is a random Llama of SmolLM2's layer widths but fewer layers)."""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import tempfile
import time

import torch

import deltatune as dt
from deltatune.serve import Engine, SamplingParams


def build(hidden, inter, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=9 if hidden % 9 == 0 else 4, num_key_value_heads=3 if hidden % 9 == 0 else 2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def run(args, log=print):
    torch.set_num_threads(args.threads)
    base = build(args.hidden, args.inter, args.layers, args.vocab)
    root = tempfile.mkdtemp()
    files = []
    for i in range(args.files):
        m = copy.deepcopy(base)
        dt.attach(m, dt.LoRA(r=16, targets="all-linear"), name="d")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        files.append(dt.save(m, f"{root}/f{i}"))
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab, (args.prompt,), generator=rng).tolist() for _ in range(args.requests)]
    rows = {}
    for k in args.ks:
        eng = Engine(base, max_loaded=args.slots, max_rank=16, max_batch=args.batch, host_bytes=1 << 30)
        for j in range(k):
            eng.register(f"d{j}", files[j % len(files)])
        if k:
            w = torch.tensor([1.0 / (j + 1) for j in range(k)])
            picks = [f"d{int(j)}" for j in torch.multinomial(w, args.requests, replacement=True, generator=rng)]
        else:
            picks = [None] * args.requests
        stamps: dict[int, list[float]] = {}
        sp = SamplingParams(max_tokens=args.gen, eos=())
        t0 = time.perf_counter()
        for p, d in zip(prompts, picks):
            eng.submit(p, d, sp, on_token=lambda r, t: stamps.setdefault(r.id, []).append(time.perf_counter()))
        eng.run()
        wall = time.perf_counter() - t0
        itl = sorted(b - a for s in stamps.values() for a, b in zip(s, s[1:]))
        rows[k] = dict(tok_s=args.requests * args.gen / wall, p50=1e3 * itl[len(itl) // 2],
                       p99=1e3 * itl[min(len(itl) - 1, int(0.99 * len(itl)))], loads=eng.slots.loads,
                       rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        log(f"K={k}: {rows[k]}")
        eng.close()
    # hot load: disk -> slot, distinct names so nothing is cached
    eng = Engine(base, max_loaded=4, max_rank=16, host_bytes=0)
    times = []
    for i in range(args.loads):
        eng.register(f"h{i}", files[i % len(files)])
        t = time.perf_counter()
        eng.preload(f"h{i}")
        times.append(1e3 * (time.perf_counter() - t))
    hot = statistics.median(times)
    eng.close()
    # decode step, 10 vs 10,000 registered, same 8 slots loaded
    steps = {}
    for n in (10, args.registry):
        eng = Engine(base, max_loaded=8, max_rank=16, max_batch=8)
        for j in range(n):
            eng.register(f"d{j}", files[j % len(files)])
        for j in range(8):
            eng.submit(prompts[j % len(prompts)], f"d{j}", SamplingParams(max_tokens=1000, eos=()))
        eng.step()
        ts = []
        for _ in range(args.decode_steps):
            t = time.perf_counter()
            eng.step()
            ts.append(1e3 * (time.perf_counter() - t))
        steps[n] = statistics.median(ts)
        eng.close()
    log(f"hot load median {hot:.1f} ms; decode step {steps}")
    return rows, hot, steps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        cfg = dict(hidden=64, inter=96, layers=1, vocab=64, files=2, requests=6, prompt=4, gen=3, ks=[0, 4], slots=2,
                   batch=4, loads=3, registry=100, decode_steps=2, threads=1)
    else:
        cfg = dict(hidden=576, inter=1536, layers=6, vocab=8000, files=16, requests=64, prompt=64, gen=32,
                   ks=[0, 8, 128, 1024], slots=64, batch=32, loads=10, registry=10_000, decode_steps=10, threads=2)
    return run(argparse.Namespace(**cfg))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
