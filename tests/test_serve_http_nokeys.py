"""`deltatune serve` without --keys (loopback only, announced), refusing a non-loopback host; hot loads and unloads
that survive a restart; SIGTERM drains running requests and exits 0."""
from __future__ import annotations

import threading
import time

import httpx2 as httpx
import openai
import pytest
from typer.testing import CliRunner

from serve_http_fixtures import ServerProcess, load_model, write_lora, write_model

from deltatune.cli import app as cli_app
from deltatune.serve import Engine
from deltatune.serve.http.registry import Registry


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_nokeys")
    model_dir = write_model(tmp / "base", seed=1)
    base, _ = load_model(model_dir)
    root = tmp / "deltas"
    write_lora(base, root / "one", seed=1)
    write_lora(base, root / "two", seed=2)
    write_lora(base, root / "store" / "three", seed=3)
    server = ServerProcess(["--model", str(model_dir), "--deltas", str(root), "--name", "tiny"], tmp / "server.log")
    try:
        yield {"tmp": tmp, "root": root, "model_dir": model_dir, "server": server, "url": server.url}
    finally:
        server.stop()


def test_without_keys_loopback_only_and_announced(env):
    assert "listens on loopback only" in env["server"].output()
    c = openai.OpenAI(base_url=env["url"] + "/v1", api_key="anything", max_retries=0)
    assert {m.id for m in c.models.list().data} == {"tiny", "one", "two"}
    assert c.completions.create(model="one", prompt="hello world", max_tokens=3).choices
    assert httpx.get(env["url"] + "/metrics").status_code == 200


def test_a_non_loopback_host_needs_keys(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path), "--deltas", str(tmp_path),
                                          "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "loopback" in result.output and "Traceback" not in result.output


def test_keys_add_refuses_a_bad_keys_file(tmp_path):
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{id: zz}]\n")
    result = CliRunner().invoke(cli_app, ["keys", "add", str(bad), "--name", "x"])
    assert result.exit_code == 2 and "error:" in result.output


def test_hot_loads_and_unloads_survive_a_restart(env, tmp_path):
    model_dir, root = env["model_dir"], tmp_path / "deltas"
    base, tok = load_model(model_dir)
    write_lora(base, root / "a", seed=5)
    write_lora(base, root / "b", seed=6)
    write_lora(base, root / "nested" / "c", seed=7)

    def fresh() -> Registry:
        reg = Registry(Engine(load_model(model_dir)[0], max_loaded=1), [root], "tiny")
        skipped = reg.scan()
        assert [name for name, _ in skipped] == ["nested"]
        return reg

    reg = fresh()
    assert reg.names() == ["a", "b"]
    reg.load("c", "nested/c")
    reg.load("b2", str(root / "b"))
    reg.unload("a")
    assert reg.names() == ["b", "b2", "c"]
    assert fresh().names() == ["b", "b2", "c"]
    reg.load("a", "a")
    reg.unload("b2")
    assert fresh().names() == ["a", "b", "c"]


def test_sigterm_finishes_running_requests_and_exits_0(env):
    server = env["server"]
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", env["url"] + "/v1/completions", timeout=60,
                          json={"model": "two", "prompt": "hello world", "max_tokens": 200, "stream": True,
                                "ignore_eos": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines, "the stream did not start"
    assert server.terminate(timeout=60) == 0
    t.join(30)
    assert lines[-1] == "data: [DONE]"
    import json
    finals = [json.loads(line[6:]) for line in lines[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert "stopped" in server.output() and "Traceback" not in server.output()
