"""Load and fault test of `deltatune serve` (issue 14 item 7): many streaming clients, hot loads/unloads, malformed
requests; loopback only, bounded in count and time, stops by itself.

    PYTHONPATH=src .venv/bin/python bench/serve_load.py --write docs/benchmarks.md

* The server: `deltatune serve` as a real process on 127.0.0.1 (a free port) over SmolLM2-135M (`deltatune.zoo`),
  `--deltas` a directory of `--deltas-n` (1,000) LoRA r=8 on q_proj/v_proj deltas (random, distinct files),
  `--max-loaded 64 --max-rank 8 --max-batch 64 --host-cache-mb 64` (a host cache the warm-up fills, so RSS growth
  afterwards is not the cache filling up to its cap).
* `--clients` (64) asyncio clients with the `openai` package, each looping until `--seconds` (60) have passed:
  a streaming greedy completion (`stream_options.include_usage`) of a random prompt (token ids, 8–48 tokens of
  English text) for a delta drawn Zipf(1.0) over the registered names (10% the base, 3% a hot-loaded name that may
  have been unloaded since: a 404 is then expected), `max_tokens` 8–32; `--malformed` (5%) of the requests are
  malformed instead (bad JSON, missing or mistyped fields, out-of-range values, an unknown model, a body over 1 MiB,
  out-of-vocabulary token ids), sent raw with httpx. No request is started after the deadline; the ones running
  finish (bounded by max_tokens), and a hard cap (`--seconds` + `--grace`) cancels whatever is left.
* An admin task: every second, in turn, a hot load (`POST /v1/load_lora_adapter` of a new name `hot<k>` over one of
  the files) or the unload of the oldest hot name.
* Measured: requests served, time to first token (request sent → first streamed text) p50/p99, inter-token latency
  (between streamed chunks) p50/p99, completion tokens/s over the window, every status code, 5xx and transport
  errors (must be 0), the server's RSS (VmRSS of its process) when ready, after a warm-up (one request per client,
  over distinct deltas, before the window) and at the end (growth from warm-up to end must be ≤ 10%), beside the
  engine's own accounting from /metrics (KV arena, slot banks, host cache) at both points.
* Afterwards (server stopped, SIGTERM, exit status recorded): `--sample` (16) served requests drawn at random are
  recomputed offline — `dt.load` of the delta on the same base + HF `generate`, greedy, one at a time — and the
  streamed text compared with the offline text (must be 0 mismatches).

`--smoke` is a tiny random Llama with a few deltas and clients for a few seconds (the test suite's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from _report import publish  # noqa: E402
from serve import zipf  # noqa: E402  (bench/serve.py)
from serve_http_fixtures import ServerProcess, load_model, write_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.core.tensors import LowRankDelta  # noqa: E402

COMMAND = "PYTHONPATH=src .venv/bin/python bench/serve_load.py --write docs/benchmarks.md"
TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created. This has made a lot "
        "of people very angry and been widely regarded as a bad move. Photosynthesis converts light energy into "
        "chemical energy that can later be released to fuel the organism's activities. A function that calls itself "
        "is called recursive, and every recursive function needs a base case. The capital of France is Paris, which "
        "lies on the Seine. Water boils at one hundred degrees Celsius at sea level. Once upon a time there was a "
        "small robot who wanted to learn how to paint the sky.")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def write_deltas(base, root: Path, n: int, r: int, std: float, targets=("q_proj", "v_proj")) -> list[str]:
    """`n` distinct LoRA deltas (A ~ N(0, 1/in), B ~ N(0, std²)) written straight from their factors."""
    mods = {p: m for p, m in base.named_modules() if isinstance(m, torch.nn.Linear) and p.endswith(targets)}
    g = torch.Generator().manual_seed(1234)
    names = []
    for i in range(n):
        tensors = {}
        for p, m in mods.items():
            a = torch.randn(r, m.in_features, generator=g) / m.in_features ** 0.5
            b = torch.randn(m.out_features, r, generator=g) * std
            tensors[p] = LowRankDelta(a, b)
        name = f"d{i:04d}"
        dt.Delta.from_tensors(name, tensors, module_types={p: "Linear" for p in tensors}).write(root / name)
        names.append(name)
    return names


class Server(ServerProcess):
    def _wait(self, timeout: float = 900) -> None:  # SmolLM2 plus 1,000 registrations on a busy CPU
        super()._wait(timeout)


MALFORMED = ["bad_json", "no_model", "unknown_model", "negative_max_tokens", "prompt_type", "temperature_type",
             "too_large", "chat_not_list", "token_out_of_vocab", "empty_prompt_list"]


def malformed_request(kind: str, name: str, vocab: int) -> tuple[str, bytes]:
    body: object
    path = "/v1/completions"
    if kind == "bad_json":
        return path, b'{"model": "' + name.encode() + b'", "prompt": '
    if kind == "no_model":
        body = {"prompt": "hello"}
    elif kind == "unknown_model":
        body = {"model": "no-such-delta", "prompt": "hello", "max_tokens": 4}
    elif kind == "negative_max_tokens":
        body = {"model": name, "prompt": "hello", "max_tokens": -5}
    elif kind == "prompt_type":
        body = {"model": name, "prompt": 12.5}
    elif kind == "temperature_type":
        body = {"model": name, "prompt": "hello", "temperature": "hot"}
    elif kind == "too_large":
        body = {"model": name, "prompt": "x" * (1 << 20)}
    elif kind == "chat_not_list":
        path, body = "/v1/chat/completions", {"model": name, "messages": "hi"}
    elif kind == "token_out_of_vocab":
        body = {"model": name, "prompt": [1, vocab + 7, 2], "max_tokens": 4}
    else:
        body = {"model": name, "prompt": [], "max_tokens": 4}
    return path, json.dumps(body).encode()


async def client_loop(cid: int, a, state: dict, client, raw, names: list[str], prompts: list[list[int]],
                      vocab: int):
    import httpx2 as httpx

    rng = random.Random(1000 + cid)
    picks = zipf(len(names), 100_000, cid)
    k = 0
    while time.monotonic() < state["deadline"]:
        k += 1
        if rng.random() < a.malformed:
            kind = rng.choice(MALFORMED)
            path, body = malformed_request(kind, names[picks[k] % len(names)], vocab)
            try:
                resp = await raw.post(path, content=body, headers={"content-type": "application/json"})
                state["malformed"].append((kind, resp.status_code))
            except httpx.HTTPError as e:
                state["transport_errors"].append(f"malformed {kind}: {type(e).__name__}: {e}")
            continue
        u = rng.random()
        if u < 0.10:
            model = "base"
        elif u < 0.13 and state["hot"]:
            model = rng.choice(list(state["hot_ever"]))
        else:
            model = names[picks[k]]
        prompt = prompts[rng.randrange(len(prompts))]
        max_tokens = rng.randint(8, 32)
        await one_stream(client, state, model, prompt, max_tokens, record=True)


async def one_stream(client, state: dict, model: str, prompt: list[int], max_tokens: int, record: bool) -> None:
    import openai

    t0 = time.monotonic()
    stamps, text, usage, finish = [], [], None, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                piece = chunk.choices[0].text
                if piece:
                    stamps.append(time.monotonic())
                    text.append(piece)
                if chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIStatusError as e:
        if record:
            state["status"][e.status_code] = state["status"].get(e.status_code, 0) + 1
            if e.status_code >= 500:
                state["server_errors"].append(f"{model}: {e.status_code} {e.message}")
            elif not (e.status_code == 404 and model.startswith("hot")):
                state["unexpected_4xx"].append(f"{model}: {e.status_code} {e.message}")
        return
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        state["transport_errors"].append(f"{model}: {type(e).__name__}: {e}")
        return
    if not record:
        return
    state["status"][200] = state["status"].get(200, 0) + 1
    done = time.monotonic()
    state["served"].append(dict(model=model, prompt=prompt, max_tokens=max_tokens, text="".join(text),
                                finish=finish, tokens=usage.completion_tokens if usage else None,
                                ttft=(stamps[0] - t0) if stamps else None,
                                itl=[b - c for c, b in zip(stamps, stamps[1:])], t0=t0, done=done))


async def churn_loop(state: dict, raw, names: list[str]) -> None:
    """Every second, in turn, a hot load of a new name or the unload of the oldest hot name, each sent on its own (a
    slow one does not delay the next)."""
    import httpx2 as httpx

    rng = random.Random(7)
    running = []

    async def one(k: int) -> None:
        t = time.monotonic()
        try:
            if k % 2 == 0 or not state["hot"]:
                name = f"hot{k}"
                resp = await raw.post("/v1/load_lora_adapter",
                                      json={"lora_name": name, "lora_path": names[rng.randrange(len(names))]})
                if resp.status_code == 200:
                    state["hot"].append(name)
                    state["hot_ever"].add(name)
                state["loads"].append((resp.status_code, time.monotonic() - t))
            else:
                name = state["hot"].pop(0)
                resp = await raw.post("/v1/unload_lora_adapter", json={"lora_name": name})
                state["unloads"].append((resp.status_code, time.monotonic() - t))
            if resp.status_code >= 500:
                state["server_errors"].append(f"admin {name}: {resp.status_code} {resp.text[:200]}")
        except httpx.HTTPError as e:
            state["transport_errors"].append(f"admin: {type(e).__name__}: {e}")

    k = 0
    while time.monotonic() < state["deadline"]:
        running.append(asyncio.create_task(one(k)))
        k += 1
        await asyncio.sleep(1.0)
    await asyncio.gather(*running)


async def own_bytes(raw) -> dict[str, int]:
    """The engine's own accounting from /metrics: KV arena, slot banks, host cache (bytes)."""
    text = (await raw.get("/metrics")).text
    out = {}
    for key in ("kv_arena", "slot_bank", "host_cache"):
        line = next(x for x in text.splitlines() if x.startswith(f"deltatune_{key}_bytes "))
        out[key] = int(float(line.split()[1]))
    return out


async def drive(a, url: str, pid: int, names: list[str], prompts: list[list[int]], vocab: int) -> dict:
    import httpx2 as httpx
    import openai

    state = dict(deadline=0.0, served=[], status={}, malformed=[], server_errors=[], transport_errors=[],
                 unexpected_4xx=[], loads=[], unloads=[], hot=[], hot_ever=set(), rss=[])
    # one client of each kind shared by every task (their connection pools hold 1,000 connections; a client per task
    # would spend seconds of the event loop building SSL contexts on a busy CPU)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    raw = httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=1000))
    # warm-up: one request per client over distinct deltas (slots and the host cache filled, KV arena grown)
    warm = {**state, "served": [], "status": {}}
    longest = max(prompts, key=len)
    await asyncio.gather(*(one_stream(client, warm, names[i % len(names)], longest, 32, record=True)
                           for i in range(a.clients)))
    state["warmup_errors"] = warm["server_errors"] + warm["transport_errors"] + warm["unexpected_4xx"]
    state["rss_warm"] = rss_of(pid)
    state["own_warm"] = await own_bytes(raw)
    t0 = time.monotonic()
    state["deadline"] = t0 + a.seconds

    async def sample_rss():  # every 5 s through the window and the drain after it, until every client is done
        while True:
            state["rss"].append((time.monotonic() - t0, rss_of(pid)))
            if time.monotonic() >= state["deadline"] and all(t.done() for t in tasks[:a.clients]):
                return
            await asyncio.sleep(5)

    tasks = [asyncio.create_task(client_loop(i, a, state, client, raw, names, prompts, vocab))
             for i in range(a.clients)]
    tasks += [asyncio.create_task(churn_loop(state, raw, names)), asyncio.create_task(sample_rss())]
    done, pending = await asyncio.wait(tasks, timeout=a.seconds + a.grace)
    for t in pending:
        t.cancel()
    state["cancelled_at_cap"] = len(pending)
    for t in done:
        if t.exception() is not None:
            state["transport_errors"].append(f"task failed: {t.exception()!r}")
    state["window"] = time.monotonic() - t0
    state["rss_end"] = rss_of(pid)
    state["own_end"] = await own_bytes(raw)
    await client.close()
    await raw.aclose()
    return state


def offline_check(a, base, tok, root: Path, served: list[dict]) -> tuple[list[dict], float]:
    """Recompute a random sample of served requests with dt.load + generate (greedy); the mismatches."""
    t = time.perf_counter()
    rng = random.Random(99)
    pool = [s for s in served if not s["model"].startswith("hot")]
    sample = rng.sample(pool, min(a.sample, len(pool)))
    eos = tok.eos_token_id
    bad = []
    for s in sorted(sample, key=lambda s: s["model"]):
        if s["model"] != "base":
            dt.load(base, root / s["model"], name="cur")
        ids = torch.tensor([s["prompt"]])
        with torch.no_grad():
            seq = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=s["max_tokens"],
                                do_sample=False, pad_token_id=eos, eos_token_id=eos)
        if s["model"] != "base":
            dt.detach(base, "cur")
        new = seq[0, ids.shape[1]:].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        want = tok.decode(new, skip_special_tokens=True)
        if want != s["text"]:
            bad.append(dict(model=s["model"], served=s["text"], offline=want))
    return bad if sample else [{"model": "-", "served": "", "offline": "no request was served"}], \
        time.perf_counter() - t, len(sample)


def run(a, log=print) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        if a.smoke:
            model_dir = write_model(root / "model")
            base, tok = load_model(model_dir)
            model_arg = str(model_dir)
        else:
            from deltatune import zoo

            base, tok = zoo.load_model(a.model)
            model_arg = a.model
        deltas = root / "deltas"
        deltas.mkdir()
        t = time.perf_counter()
        names = write_deltas(base, deltas, a.deltas_n, a.rank, a.std)
        disk = sum(f.stat().st_size for f in deltas.rglob("*") if f.is_file())
        log(f"wrote {len(names)} deltas ({disk / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        rng = random.Random(5)
        prompts = []
        for _ in range(64):
            n = rng.randint(*a.prompt_len)
            s = rng.randrange(max(1, len(ids) - n))
            prompts.append(ids[s:s + n])
        t = time.perf_counter()
        server = Server(["--model", model_arg, "--deltas", str(deltas), "--max-loaded", str(a.slots),
                         "--max-rank", str(a.rank), "--max-batch", str(a.batch), "--host-cache-mb", str(a.host_mb),
                         "--name", "base"], root / "server.log")
        ready = time.perf_counter() - t
        pid = server.proc.pid
        rss_ready = rss_of(pid)
        log(f"server ready after {ready:.0f} s, RSS {rss_ready / 2**20:.0f} MiB")
        try:
            state = asyncio.run(drive(a, server.url, pid, names, prompts, len(tok)))
        finally:
            code = server.terminate(60) if server.proc.poll() is None else server.proc.returncode
        served = state["served"]
        log(f"served {len(served)} in {state['window']:.0f} s; statuses {state['status']}; exit {code}")
        mism, check_s, sampled = offline_check(a, base, tok, deltas, served)
        out = dict(a=vars(a), disk=disk, ready=ready, rss_ready=rss_ready, state=state, exit=code,
                   mismatches=mism, sampled=sampled, check_s=check_s, names=len(names),
                   server_log_tail=server.output().splitlines()[-20:])
        out["seconds"] = time.perf_counter() - t_start
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summary(out: dict) -> dict:
    st = out["state"]
    served = st["served"]
    ttft = [s["ttft"] for s in served if s["ttft"] is not None]
    itl = [x for s in served for x in s["itl"]]
    toks = sum(s["tokens"] or 0 for s in served)
    five = sum(n for c, n in st["status"].items() if c >= 500) + sum(1 for _, c in st["malformed"] if c >= 500) + \
        sum(1 for c, _ in st["loads"] + st["unloads"] if c >= 500)
    return dict(served=len(served), tokens=toks, tok_s=toks / st["window"], ttft50=pct(ttft, .5), ttft99=pct(ttft, .99),
                itl50=pct(itl, .5), itl99=pct(itl, .99), five=five, transport=len(st["transport_errors"]),
                malformed=len(st["malformed"]), malformed_4xx=sum(1 for _, c in st["malformed"] if 400 <= c < 500),
                growth=st["rss_end"] / st["rss_warm"] - 1,
                own_growth=sum(st["own_end"].values()) - sum(st["own_warm"].values()),
                unexplained=(st["rss_end"] - st["rss_warm"] - (sum(st["own_end"].values())
                                                               - sum(st["own_warm"].values()))) / st["rss_warm"])


def mib(own: dict[str, int]) -> str:
    return f"{sum(own.values()) / 2**20:.0f} ({' + '.join(f'{v / 2**20:.0f}' for v in own.values())})"


def render(out: dict, a) -> str:
    st, s = out["state"], summary(out)
    kinds: dict[str, set] = {}
    for kind, code in st["malformed"]:
        kinds.setdefault(kind, set()).add(code)
    loads_ok = sum(1 for c, _ in st["loads"] if c == 200)
    unl_ok = sum(1 for c, _ in st["unloads"] if c == 200)
    load_ms = [1e3 * x for c, x in st["loads"] if c == 200]
    ok = s["five"] == 0 and s["transport"] == 0 and not out["mismatches"] and out["exit"] == 0
    mem_ok = s["growth"] <= 0.10
    extra = [x for x in a.argv if x != "--write" and not x.endswith(".md")]
    cmd = COMMAND.replace(" --write", (" " + " ".join(extra) if extra else "") + " --write")
    if os.environ.get("MALLOC_ARENA_MAX"):  # passed on to the server process
        cmd = f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} {cmd}"
    lines = [
        "## Serving under load and faults (`bench/serve_load.py`)", "",
        f"Command: `{cmd}` — `deltatune serve` as a process on 127.0.0.1 over {a.model} (fp32, 2 threads), "
        f"{out['names']:,} registered LoRA r={a.rank} q/v deltas ({out['disk'] / 2**20:.0f} MiB on disk), "
        f"`--max-loaded {a.slots} --max-batch {a.batch} --host-cache-mb {a.host_mb}`; {a.clients} streaming `openai` clients for {a.seconds} s, "
        f"deltas drawn Zipf(1.0) (10% base, 3% hot-loaded names), greedy, prompts of {a.prompt_len[0]}–"
        f"{a.prompt_len[1]} tokens, 8–32 generated; {100 * a.malformed:.0f}% malformed requests; a hot load or "
        f"unload every second. On {platform.machine()} with {os.cpu_count()} cores shared with other jobs: the "
        f"latencies are noisy, the pass/fail lines are what count. Took {out['seconds']:.0f} s (server start "
        f"{out['ready']:.0f} s).", "",
        "| measure | value |", "|---|---:|",
        f"| requests served (200, streamed to the end) | {s['served']:,} |",
        f"| completion tokens / s | {s['tok_s']:.1f} ({s['tokens']:,} tokens in {st['window']:.0f} s) |",
        f"| time to first token p50 / p99 | {s['ttft50']:.2f} s / {s['ttft99']:.2f} s |",
        f"| inter-token latency p50 / p99 | {1e3 * s['itl50']:.0f} ms / {1e3 * s['itl99']:.0f} ms |",
        f"| malformed requests → 4xx | {s['malformed_4xx']} / {s['malformed']} |",
        f"| hot loads / unloads answered 200 | {loads_ok} / {len(st['loads'])}, {unl_ok} / {len(st['unloads'])} "
        f"(load median {statistics.median(load_ms) if load_ms else float('nan'):.0f} ms) |",
        f"| **5xx responses** | **{s['five']}** (transport errors {s['transport']}) |",
        f"| **output mismatches vs offline `dt.load` + `generate`** | **{len(out['mismatches'])}** of "
        f"{out['sampled']} sampled |",
        f"| **server RSS** ready / after warm-up / end | {out['rss_ready'] / 2**20:.0f} / {st['rss_warm'] / 2**20:.0f} / "
        f"**{st['rss_end'] / 2**20:.0f} MiB ({100 * s['growth']:+.1f}% from warm-up)** |",
        f"| the engine's own accounting, after warm-up → end (KV arena + slot banks + host cache) | "
        f"{mib(st['own_warm'])} → {mib(st['own_end'])} MiB ({s['own_growth'] / 2**20:+.0f} MiB) |",
        f"| RSS growth not explained by that accounting | {100 * s['unexplained']:+.1f}% of the warm-up RSS |",
        f"| server exit status after SIGTERM | {out['exit']} |", "",
        f"Statuses of the delta requests: {dict(sorted(st['status'].items()))} (404s: hot names unloaded between "
        f"pick and request). Malformed kinds → statuses: "
        f"{', '.join(f'{k} {sorted(v)}' for k, v in sorted(kinds.items()))}. RSS every 5 s through the window and the drain (MiB): "
        f"{', '.join(f'{r / 2**20:.0f}' for _, r in st['rss'])}. Requests cancelled at the hard cap: "
        f"{st['cancelled_at_cap']}. Unexpected 4xx: {len(st['unexpected_4xx'])}.", "",
        f"Result: **{'pass' if ok else 'FAIL'}** on 5xx = 0, no transport error, 0 mismatches, clean exit; RSS growth "
        f"≤ 10% from warm-up: **{'pass' if mem_ok else 'FAIL'}** ({100 * s['growth']:+.1f}%; "
        f"{100 * s['unexplained']:+.1f}% beyond the engine's own accounting).",
    ]
    for what in ("server_errors", "transport_errors", "unexpected_4xx", "warmup_errors"):
        if st.get(what):
            lines.append(f"\n{what} (first 5): " + "; ".join(map(str, st[what][:5])))
    if out["mismatches"]:
        lines.append("\nmismatches (first 3): " + "; ".join(map(str, out["mismatches"][:3])))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 8 clients for 4 s")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--deltas-n", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.02, help="B ~ N(0, std²)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--malformed", type=float, default=0.05)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--host-mb", type=int, default=64, help="the server's host cache: small, so the warm-up fills it "
                    "and RSS growth measures leaks, not the cache filling to its cap")
    ap.add_argument("--grace", type=float, default=240, help="seconds after the window before what runs is cancelled")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--write", default=None, help="markdown file whose section 'serve-load' gets the results")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.prompt_len = (8, 48)
    if a.smoke:
        a.model, a.deltas_n, a.clients, a.seconds, a.slots, a.batch, a.sample, a.std = "tiny", 12, 8, 4, 4, 8, 6, 0.3
        a.prompt_len, a.threads, a.malformed, a.host_mb = (2, 6), 1, 0.2, 1
    out = run(a)
    text = render(out, a)
    if a.smoke or not a.write:
        print(text)
    else:
        publish(text, a.write, "serve-load", out["seconds"])
    return out


if __name__ == "__main__":
    main()
