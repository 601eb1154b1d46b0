"""`make test-vllm`: deltatune's vLLM export checked against a real vLLM (CPU build, its own venv).

1. Three deltas for SmolLM2-135M (zoo): a LoRA r=8 on q/v (exported exactly), a DoRA r=8 on the attention
   projections and a LoHa r=4 on q/v (both converted to plain LoRA of rank --rank by `deltatune export`).
2. `deltatune export --format vllm ... -o OUT --rank R` (the CLI, as a user runs it).
3. vLLM's OpenAI server started with the emitted command (plus --host 127.0.0.1, a free port, fp32, a small
   context) from the vLLM venv's python.
4. Greedy completions of fixed prompts through the `openai` client with `return_token_ids`: first the base alone,
   then every exported adapter, a zero adapter (ΔW = 0) and the base again, all sent at once (vLLM's batches then mix
   base rows and LoRA rows).
5. The same prompts through deltatune's engine over the exported directories: the token ids of every adapter, the
   zero adapter (= the base) and the base alone must be equal, and every non-zero adapter must change vLLM's output
   for at least half the prompts. Base rows inside the mixed batch are compared and reported, not required: vLLM
   0.32 on CPU was seen to apply an adapter to them (docs/serving.md).
   For information it also reports whether the converted deltas' tokens equal the unconverted originals'.

Not collected by pytest (no test_ prefix). Exit status 0 when every token matches.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

import deltatune as dt  # noqa: E402
from deltatune import zoo  # noqa: E402
from deltatune.serve import Engine, SamplingParams  # noqa: E402
from serve_http_fixtures import free_port  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot",
           "The three primary colors are"]


def make_deltas(base, root: Path) -> dict[str, Path]:
    """Random deltas, large enough that every one changes the greedy output."""
    specs = {"lora-qv": (dt.LoRA(r=8, targets=["q_proj", "v_proj"]), 0.05),
             "dora-attn": (dt.LoRA(r=8, dora=True, targets=["q_proj", "k_proj", "v_proj", "o_proj"]), 0.03),
             "loha-qv": (dt.LoHa(r=4, targets=["q_proj", "v_proj"]), 0.15)}
    out = {}
    m = copy.deepcopy(base)  # ΔW = 0 exactly (B starts at zero): served, it must give the base's own tokens
    dt.attach(m, dt.LoRA(r=8, targets=["q_proj", "v_proj"]), name="d")
    out["zero"] = dt.save(m, root / "src" / "zero")
    del m
    for i, (name, (cfg, std)) in enumerate(specs.items()):
        m = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        dt.attach(m, cfg, name="d")
        with torch.no_grad():
            for _, p in m.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * std)
        out[name] = dt.save(m, root / "src" / name)
        del m
    return out


def deltatune_tokens(base, tok, deltas: dict[str | None, Path | None], prompts: list[list[int]], gen: int) -> dict:
    """Greedy tokens of deltatune's engine, every request in one run (base rows and delta rows batched together)."""
    eng = Engine(base, tokenizer=tok, max_loaded=4, max_rank=64, max_batch=16)
    for name, path in deltas.items():
        if name is not None:
            eng.register(name, path)
    reqs = {(name, i): eng.submit(p, delta=name, sampling=SamplingParams(max_tokens=gen))
            for name in deltas for i, p in enumerate(prompts)}
    eng.run()
    out = {k: r.tokens for k, r in reqs.items()}
    eng.close()
    return out


def original_tokens(base, tok, sources: dict[str, Path], prompts: list[list[int]], gen: int) -> dict:
    """Greedy tokens of the unconverted deltas (dt.load + generate, one prompt at a time), for information."""
    out = {}
    for name, path in sources.items():
        m = copy.deepcopy(base)
        dt.load(m, path)
        for i, p in enumerate(prompts):
            ids = torch.tensor([p])
            with torch.no_grad():
                seq = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            new = seq[0, len(p):].tolist()
            eos = tok.eos_token_id
            out[(name, i)] = new[:new.index(eos) + 1] if eos in new else new
        del m
    return out


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    import httpx2 as httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; last log lines:\n"
                               + "\n".join(log.read_text().splitlines()[-40:]))
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s; last log lines:\n"
                       + "\n".join(log.read_text().splitlines()[-40:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--work", default=None, help="keep files here (default: a temporary directory)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    root = Path(a.work or tempfile.mkdtemp(prefix="vllm-check-"))
    root.mkdir(parents=True, exist_ok=True)
    base, tok = zoo.load_model("smollm2-135m")
    model_dir = str(zoo.smollm2_cache_dir())
    sources = make_deltas(base, root)

    export = subprocess.run([sys.executable, "-m", "deltatune.cli", "export", "--format", "vllm",
                             *map(str, sources.values()), "-o", str(root / "vllm"), "--model", "smollm2-135m",
                             "--rank", str(a.rank)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    print(export.stdout + export.stderr)
    if export.returncode != 0:
        return 1
    command = shlex.split((root / "vllm" / "vllm-command.txt").read_text())
    assert command[0] == "python", command
    port = free_port()
    command = [a.vllm_python, *command[1:], "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--served-model-name", "base"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONPATH": ""}
    env.pop("OMP_NUM_THREADS", None)
    print("vLLM:", shlex.join(command), flush=True)
    log = root / "vllm.log"
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    results: dict = {"prompts": PROMPTS, "rank": a.rank, "export": export.stdout}
    try:
        url = f"http://127.0.0.1:{port}"
        results["vllm_startup_s"] = wait_ready(url, proc, log, a.startup_timeout)
        print(f"vLLM ready after {results['vllm_startup_s']:.0f} s", flush=True)
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        served = sorted(m.id for m in client.models.list().data)
        print("vLLM serves:", served)
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        names: list[str | None] = [None, *sources]

        def ask(job):
            name, i = job
            out = client.completions.create(model=name or "base", prompt=prompt_ids[i], max_tokens=a.gen,
                                            temperature=0, extra_body={"return_token_ids": True})
            return job, out.choices[0].token_ids, out.choices[0].text

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # the base alone: batches of base rows
            alone = {job: (ids, text) for job, ids, text in pool.map(ask, [(None, i) for i in range(len(PROMPTS))])}
        jobs = [(n, i) for i in range(len(PROMPTS)) for n in names]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch: base and LoRA rows
            got = {job: (ids, text) for job, ids, text in pool.map(ask, jobs)}
        results["vllm_requests_s"] = time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    exported = {None: None, **{n: root / "vllm" / n for n in sources}}
    ours = deltatune_tokens(base, tok, exported, prompt_ids, a.gen)
    originals = original_tokens(base, tok, sources, prompt_ids, a.gen)
    ok = True
    rows = []
    every = [(("base alone", i), v) for (_, i), v in alone.items()] + list(got.items())
    for (name, i), (ids, text) in sorted(every, key=lambda kv: (str(kv[0][0]), kv[0][1])):
        mine = ours[(None if name in ("base alone", "zero") else name, i)]
        same = list(ids) == list(mine)
        if name is not None:  # base rows inside a mixed batch are reported, not required (vLLM's behaviour)
            ok &= same
        orig = originals.get((name, i)) if name != "zero" else None
        first = next((k for k, (x, y) in enumerate(zip(ids, mine)) if x != y), None)
        rows.append({"model": name or "base in a mixed batch", "prompt": i, "match": same, "first_difference": first,
                     "equals_unconverted_original": None if orig is None else list(orig) == list(ids),
                     "vllm_text": text, "vllm_tokens": list(ids), "deltatune_tokens": list(mine)})
        print(f"{'OK ' if same else 'DIFF'} {name or 'base (mixed)':14} prompt {i}: "
              f"{'' if same else f'first difference at token {first}; '}"
              f"{'' if orig is None else ('= unconverted original' if list(orig) == list(ids) else '≠ unconverted original')}"
              f" {text!r}")
    # a check that cannot fail is no check: every adapter must change vLLM's own output for most prompts
    for name in (n for n in sources if n != "zero"):
        changed = sum(list(got[(name, i)][0]) != list(alone[(None, i)][0]) for i in range(len(PROMPTS)))
        results.setdefault("changed_vs_base", {})[name] = changed
        print(f"{name}: vLLM's output differs from its base output for {changed}/{len(PROMPTS)} prompts")
        ok &= changed >= len(PROMPTS) // 2
    results["rows"] = rows
    results["all_match"] = ok
    results["seconds"] = time.monotonic() - t_start
    mixed = [r["match"] for r in rows if r["model"] == "base in a mixed batch"]
    results["base_in_mixed_batch_match"] = sum(mixed)
    print(f"base rows in the mixed batch equal to the base: {sum(mixed)}/{len(mixed)}")
    print(f"{sum(r['match'] for r in rows)}/{len(rows)} completions token-identical; {results['seconds']:.0f} s total")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
