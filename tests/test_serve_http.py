"""`deltatune serve` as a real process on 127.0.0.1 (one per module), spoken to with the official `openai` client:
outputs equal the engine's offline outputs (greedy), streaming, concurrency, keys and per-delta access, rate limits,
every error status, hot load / unload / reload with path confinement, metrics, client disconnects."""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
import yaml
from typer.testing import CliRunner

from serve_http_fixtures import ServerProcess, load_model, write_lora, write_model

from deltatune.cli import app as cli_app
from deltatune.serve import Engine, SamplingParams

PROMPT = "hello world how are you"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_http")
    model_dir = write_model(tmp / "base")
    base, tok = load_model(model_dir)
    root = tmp / "deltas"
    for i, name in enumerate(["alice-1", "alice-2", "bob-1", "shared"]):
        write_lora(base, root / name, seed=10 + i)
    (root / "broken").mkdir()
    (root / "broken" / "delta.json").write_text("{")
    write_lora(base, root / "extra" / "v1", seed=20)
    write_lora(base, root / "extra" / "v2", seed=21)
    write_lora(base, root / "extra" / "dora", seed=22, dora=True)
    (root / "extra" / "bad").mkdir()
    (root / "extra" / "bad" / "delta.json").write_text('{"format_version": 1}')
    write_lora(base, tmp / "outside" / "secret", seed=30)
    os.symlink(tmp / "outside" / "secret", root / "extra" / "escape")
    (root / "extra" / "linked").mkdir()
    for f in (tmp / "outside" / "secret").iterdir():  # a directory inside whose files link outside
        os.symlink(f, root / "extra" / "linked" / f.name)

    keys = tmp / "keys.yaml"
    runner = CliRunner()

    def add(*args: str) -> str:
        result = runner.invoke(cli_app, ["keys", "add", str(keys), *args])
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()[-1]

    k = {"admin": add("--name", "ops", "--admin", "--delta", "*"),
         "alice": add("--name", "alice", "--delta", "alice-*", "--delta", "shared"),
         "bob": add("--name", "bob", "--delta", "bob-*", "--no-base"),
         "rpm": add("--name", "slow", "--delta", "*", "--requests-per-minute", "2"),
         "tpm": add("--name", "few", "--delta", "*", "--tokens-per-minute", "12")}
    server = ServerProcess(["--model", str(model_dir), "--deltas", str(root), "--keys", str(keys),
                            "--max-loaded", "2"], tmp / "server.log")
    try:
        yield {"tmp": tmp, "root": root, "model_dir": model_dir, "base": base, "tok": tok, "keys": k,
               "keys_file": keys, "server": server, "url": server.url}
    finally:
        server.stop()


def client(env, who: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=env["keys"][who] if who else "none", max_retries=0,
                         timeout=60)


def offline(env, requests: list[tuple[list[int] | str, str | None, str | None]], max_tokens: int = 8,
            **sampling) -> list[str]:
    """Text of each (prompt, delta name, delta dir) run by an Engine in this process (the reference)."""
    base, tok = load_model(env["model_dir"])
    engine = Engine(base, tokenizer=tok, max_loaded=2)
    names = {}
    for _, name, path in requests:
        if name is not None:
            names[name] = engine.register(name, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reqs = [engine.submit(p if not isinstance(p, str) else tok(p)["input_ids"], name,
                              SamplingParams(max_tokens=max_tokens, **sampling)) for p, name, _ in requests]
        engine.run()
    finally:
        torch.set_num_threads(threads)
        engine.close()
    out = []
    for r in reqs:
        tokens = r.tokens[:-1] if r.finish_reason == "eos" else r.tokens
        out.append(tok.decode(tokens, skip_special_tokens=True))
    return out


def raw(env, method: str, path: str, who: str | None = "admin", **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if who:
        headers["authorization"] = f"Bearer {env['keys'][who]}"
    return httpx.request(method, env["url"] + path, headers=headers, timeout=60, **kw)


def check_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in resp.text and "File \"" not in resp.text
    return body["error"]


# --- keys file ---------------------------------------------------------------------------------------------------
def test_keys_file_holds_salted_hashes_only(env):
    text = env["keys_file"].read_text()
    for key in env["keys"].values():
        assert key.split("-", 2)[2] not in text
    entries = yaml.safe_load(text)["keys"]
    assert len({e["salt"] for e in entries}) == len(entries) and all(len(e["hash"]) == 64 for e in entries)
    assert (env["keys_file"].stat().st_mode & 0o777) == 0o600
    assert [e["admin"] for e in entries] == [True, False, False, False, False]


def test_bad_deltas_are_reported_and_skipped_at_start(env):
    log = env["server"].output()
    assert "skipped delta 'broken'" in log and "skipped delta 'extra'" in log
    ids = [m.id for m in client(env).models.list().data]
    assert "broken" not in ids and {"alice-1", "bob-1", "shared"} <= set(ids)


# --- outputs -----------------------------------------------------------------------------------------------------
def test_completions_equal_the_engine_offline(env):
    c = client(env)
    models = ["base", "alice-1", "alice-2", "bob-1", "shared"]
    got = [c.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0) for m in models]
    ref = offline(env, [(PROMPT, None if m == "base" else m, None if m == "base" else env["root"] / m) for m in models])
    assert [g.choices[0].text for g in got] == ref
    assert len(set(ref)) > 1  # the deltas change the output
    for g in got:
        assert g.object == "text_completion" and g.usage.prompt_tokens == 5
        assert g.usage.total_tokens == g.usage.prompt_tokens + g.usage.completion_tokens
        assert g.choices[0].finish_reason in ("length", "stop")
    # token-id prompts and a batch of prompts
    ids = env["tok"](PROMPT)["input_ids"]
    batch = c.completions.create(model="alice-1", prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [ch.text for ch in batch.choices] == [ref[1], ref[1]] and [ch.index for ch in batch.choices] == [0, 1]


def test_chat_uses_the_chat_template_and_equals_offline(env):
    c = client(env)
    messages = [{"role": "system", "content": "fine"}, {"role": "user", "content": "hello how are you"}]
    got = c.chat.completions.create(model="shared", messages=messages, max_tokens=8, temperature=0)
    ids = env["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = env["tok"](ids, add_special_tokens=False)["input_ids"]
    assert got.choices[0].message.content == offline(env, [(ids, "shared", env["root"] / "shared")])[0]
    assert got.choices[0].message.role == "assistant" and got.object == "chat.completion"
    assert got.usage.prompt_tokens == len(ids)


def test_streaming_matches_the_whole_answer_and_ends_with_done(env):
    c = client(env)
    whole = c.completions.create(model="alice-2", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="alice-2", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 5
    chat = list(c.chat.completions.create(model="alice-2", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chat)
    full = c.chat.completions.create(model="alice-2", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
                                     temperature=0).choices[0].message.content
    assert streamed == full
    with httpx.stream("POST", env["url"] + "/v1/completions", timeout=60,
                      headers={"authorization": f"Bearer {env['keys']['admin']}"},
                      json={"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_sampling_parameters(env):
    c = client(env)
    a = c.completions.create(model="bob-1", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                             extra_body={"ignore_eos": True})
    b = c.completions.create(model="bob-1", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                             extra_body={"ignore_eos": True})
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 12
    # a stop string: the text ends before it, finish_reason "stop", streamed the same
    words = a.choices[0].text.split()
    stop = words[len(words) // 2]
    s = c.completions.create(model="bob-1", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
                             stop=[stop], extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text
    assert a.choices[0].text.startswith(s.choices[0].text)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="bob-1", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9, seed=7, stop=[stop], stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == s.choices[0].text


def test_concurrent_requests_over_different_deltas(env):
    c = client(env)
    jobs = [(p, m) for p in ("hello world", "the cat sat on the mat", "one two three") for m in
            ("base", "alice-1", "alice-2", "bob-1", "shared")]  # 15 at once over 4 deltas and 2 slots
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: c.completions.create(model=j[1], prompt=j[0], max_tokens=8, temperature=0)
                            .choices[0].text, jobs))
    ref = offline(env, [(p, None if m == "base" else m, None if m == "base" else env["root"] / m) for p, m in jobs])
    assert got == ref


# --- keys and access ---------------------------------------------------------------------------------------------
def test_models_lists_what_the_key_may_use(env):
    def ids(who):
        return {m.id: m for m in client(env, who).models.list().data}

    assert set(ids("alice")) == {"base", "alice-1", "alice-2", "shared"}
    assert set(ids("bob")) == {"bob-1"}
    admin = ids("admin")
    assert {"base", "alice-1", "alice-2", "bob-1", "shared"} <= set(admin)
    assert admin["alice-1"].parent == "base" and admin["base"].parent is None


def test_forbidden_and_unknown_models_get_the_same_404(env):
    def body(who, model, path="/v1/completions"):
        payload = {"model": model, "max_tokens": 2}
        payload.update({"prompt": "hello"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]})
        return check_error(raw(env, "POST", path, who, json=payload), 404)

    forbidden, unknown = body("alice", "bob-1"), body("alice", "bob-9")
    assert forbidden == {**unknown, "message": unknown["message"].replace("bob-9", "bob-1")}
    assert forbidden["code"] == "model_not_found"
    body("bob", "base")  # bob may not use the base
    body("bob", "alice-1", "/v1/chat/completions")
    with pytest.raises(openai.NotFoundError):
        client(env, "alice").completions.create(model="bob-1", prompt="hello", max_tokens=2)
    assert client(env, "bob").completions.create(model="bob-1", prompt="hello", max_tokens=2).choices


def test_missing_or_wrong_keys_get_401(env):
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"},
                    {"authorization": "Bearer " + env["keys"]["alice"][:-2] + "xx"},
                    {"authorization": "Bearer dt-00000000-" + "a" * 43}):
        for path in ("/v1/models", "/v1/completions"):
            method = "GET" if path == "/v1/models" else "POST"
            check_error(httpx.request(method, env["url"] + path, headers=headers, timeout=30,
                                      json={"model": "base", "prompt": "x"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=env["url"] + "/v1", api_key="dt-wrong", max_retries=0).models.list()


def test_rate_limits_give_429(env):
    c = client(env, "rpm")
    for _ in range(2):
        c.completions.create(model="base", prompt="hello", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        c.completions.create(model="base", prompt="hello", max_tokens=1)
    t = client(env, "tpm")  # 12 tokens a minute: 5 prompt + 4 completion, then 5 more prompt tokens is over
    t.completions.create(model="base", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as e:
        t.completions.create(model="base", prompt=PROMPT, max_tokens=1)
    assert "tokens per minute" in str(e.value)
    check_error(raw(env, "POST", "/v1/completions", "rpm", json={"model": "base", "prompt": "x"}), 429)


def test_admin_endpoints_need_an_admin_key(env):
    check_error(raw(env, "POST", "/v1/load_lora_adapter", "alice",
                    json={"lora_name": "x", "lora_path": "extra/v1"}), 403)
    check_error(raw(env, "POST", "/v1/unload_lora_adapter", "alice", json={"lora_name": "alice-1"}), 403)
    check_error(raw(env, "GET", "/metrics", "alice"), 403)
    check_error(raw(env, "GET", "/metrics", None), 401)
    assert raw(env, "GET", "/health", None).json() == {"status": "ok"}


# --- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload,status,param", [
    ({"model": "base", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "base", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "base", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "base", "prompt": "x", "seed": -1}, 400, "seed"),
    ({"model": "base", "prompt": [10_000]}, 400, "prompt"),
    ({"model": "base", "prompt": []}, 400, "prompt"),
    ({"model": "base", "prompt": "hello " * 300}, 400, "prompt"),
    ({"model": "base", "prompt": ["a", "b"], "stream": True}, 400, "prompt"),
    ({"prompt": "x"}, 422, "model"),
    ({"model": "base"}, 422, "prompt"),
    ({"model": "base", "prompt": {"a": 1}}, 422, "prompt"),
    ({"model": "base", "prompt": "x", "max_tokens": "many"}, 422, "max_tokens"),
    ({"model": "base", "prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"model": 7, "prompt": "x"}, 422, "model"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_completion_errors(env, payload, status, param):
    assert check_error(raw(env, "POST", "/v1/completions", json=payload), status)["param"] == param


@pytest.mark.parametrize("payload,status", [
    ({"model": "base", "messages": []}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 422),
    ({"model": "base", "messages": "hello"}, 422),
    ({"model": "alice-9", "messages": [{"role": "user", "content": "x"}]}, 404),
])
def test_chat_errors(env, payload, status):
    check_error(raw(env, "POST", "/v1/chat/completions", json=payload), status)


def test_malformed_and_oversized_bodies(env):
    check_error(raw(env, "POST", "/v1/completions", content=b"{not json"), 400)
    check_error(raw(env, "POST", "/v1/completions", content=b""), 400)
    check_error(raw(env, "POST", "/v1/completions", content=b"[" * 5000 + b"]" * 5000), 400)
    check_error(raw(env, "POST", "/v1/completions", content=b"[1, 2]"), 422)
    check_error(raw(env, "POST", "/v1/completions", content=b"\xff\xfe"), 400)
    check_error(raw(env, "POST", "/v1/completions", json={"model": "base", "prompt": "x" * (2 << 20)}), 413)
    check_error(raw(env, "GET", "/v1/nothing"), 404)
    check_error(raw(env, "GET", "/v1/completions"), 405)
    with pytest.raises(openai.BadRequestError):
        client(env).completions.create(model="base", prompt="x", temperature=3)
    with pytest.raises(openai.UnprocessableEntityError):
        client(env).completions.create(model="base", prompt="x", max_tokens="x")  # type: ignore[arg-type]


# --- hot load / unload / reload ----------------------------------------------------------------------------------
def test_hot_load_reload_unload(env):
    c, root = client(env), env["root"]
    r = raw(env, "POST", "/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "extra/v1"})
    assert r.status_code == 200, r.text
    assert "hot" in {m.id for m in c.models.list().data}
    assert "hot" not in {m.id for m in client(env, "alice").models.list().data}
    v1, v2 = offline(env, [(PROMPT, "v1", root / "extra" / "v1"), (PROMPT, "v2", root / "extra" / "v2")])
    assert v1 != v2
    assert c.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == v1

    # a same-name reload while a request streams: that request keeps v1, new requests get v2
    long_v1 = offline(env, [(PROMPT, "v1", root / "extra" / "v1")], max_tokens=120, eos=())[0]
    stream = c.completions.create(model="hot", prompt=PROMPT, max_tokens=120, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    first = next(iter(stream))
    r = raw(env, "POST", "/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(root / "extra" / "v2")})
    assert r.status_code == 200, r.text
    assert c.completions.create(model="hot", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == v2
    rest = "".join(ch.choices[0].text for ch in stream)
    assert first.choices[0].text + rest == long_v1

    r = raw(env, "POST", "/v1/unload_lora_adapter", json={"lora_name": "hot"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="hot", prompt=PROMPT, max_tokens=2)
    check_error(raw(env, "POST", "/v1/unload_lora_adapter", json={"lora_name": "hot"}), 404)


@pytest.mark.parametrize("path,word", [
    ("../outside/secret", "outside"), ("{tmp}/outside/secret", "outside"), ("extra/escape", "outside"),
    ("extra/linked", "links outside"), ("extra/../../outside/secret", "outside"), ("/etc", "outside"),
    ("extra/missing", "no delta"), ("extra/bad", "not a deltatune delta"), ("extra/dora", "convert_rank"),
    ("", "outside"),
])
def test_hot_load_refusals_are_400_and_the_server_keeps_serving(env, path, word):
    path = path.format(tmp=env["tmp"])
    err = check_error(raw(env, "POST", "/v1/load_lora_adapter", json={"lora_name": "x1", "lora_path": path}), 400)
    assert word in err["message"], err
    assert "x1" not in {m.id for m in client(env).models.list().data}
    assert client(env).completions.create(model="alice-1", prompt="hello", max_tokens=2).choices


def test_hot_load_names_are_checked(env):
    for name in ("", "../x", "a/b", "base", "-x", "x" * 200):
        check_error(raw(env, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "extra/v1"}), 400)
    check_error(raw(env, "POST", "/v1/load_lora_adapter", json={"lora_name": "x"}), 422)


# --- operations --------------------------------------------------------------------------------------------------
def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_cancels_and_metrics(env):
    before = _metric(raw(env, "GET", "/metrics").text, "deltatune_requests_total", status="cancelled")
    with httpx.stream("POST", env["url"] + "/v1/completions", timeout=60,
                      headers={"authorization": f"Bearer {env['keys']['admin']}"},
                      json={"model": "shared", "prompt": PROMPT, "max_tokens": 240, "stream": True,
                            "ignore_eos": True}) as r:
        next(r.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = raw(env, "GET", "/metrics").text
        if (_metric(text, "deltatune_requests_total", status="cancelled") > before
                and _metric(text, "deltatune_running_requests") == 0):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the disconnected request was not cancelled:\n" + text)
    for family in ("deltatune_requests_total", "deltatune_tokens_total", "deltatune_queue_depth",
                   "deltatune_running_requests", "deltatune_slot_hits_total", "deltatune_slot_misses_total",
                   "deltatune_slot_loads_total", "deltatune_slot_evictions_total", "deltatune_delta_loads_total",
                   "deltatune_delta_load_seconds_bucket", "deltatune_time_to_first_token_seconds_bucket"):
        assert family in text, family
    assert _metric(text, "deltatune_requests_total", model="alice-1", status="ok") >= 1
    assert _metric(text, "deltatune_tokens_total", kind="completion") > 0
    # the engine's own memory: banks preallocated, an arena and host factors once requests have run
    assert _metric(text, "deltatune_slot_bank_bytes") > 0 and _metric(text, "deltatune_kv_arena_bytes") > 0
    assert _metric(text, "deltatune_host_cache_bytes") > 0
    assert _metric(text, "deltatune_slot_evictions_total") > 0  # 5 deltas over 2 slots
    assert _metric(text, "deltatune_time_to_first_token_seconds_count") > 0
    assert _metric(text, "deltatune_delta_load_seconds_count") >= 1


def test_no_response_was_a_server_error(env):
    text = raw(env, "GET", "/metrics").text
    assert _metric(text, "deltatune_requests_total", status="error") == 0
    assert "Traceback" not in env["server"].output()
