"""`deltatune serve` over the real SmolLM2-135M (zoo) as a process on 127.0.0.1, spoken to with the `openai` client:
greedy completions and chat for the base and three deltas, sent concurrently (one mixed batch), equal `dt.load` +
HF `generate` one request at a time; streaming equals the whole answer; a hot-loaded delta serves at once. Slow
(`make test-slow`): the model loads in the server and here."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import deltatune as dt

from serve_http_fixtures import ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def add(a, b):"]
GEN = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from deltatune import zoo

    tmp = tmp_path_factory.mktemp("smollm2_http")
    base, tok = zoo.load_model("smollm2-135m")
    root = tmp / "deltas"
    for i, name in enumerate(["qv", "all", "late"]):
        m = copy.deepcopy(base)
        torch.manual_seed(40 + i)
        targets = ["q_proj", "v_proj"] if name == "qv" else "all-linear"
        dt.attach(m, dt.LoRA(r=8, targets=targets), name="d")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        dt.save(m, (tmp / "later" if name == "late" else root) / name)
        del m
    server = ServerProcess(["--model", "smollm2-135m", "--deltas", str(root), "--max-loaded", "2",
                            "--name", "smol"], tmp / "server.log")
    try:
        yield {"tmp": tmp, "root": root, "base": base, "tok": tok, "server": server,
               "client": openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)}
    finally:
        server.stop()


def reference(env, name: str | None, ids: list[int]) -> str:
    """Greedy text of one request, offline: `dt.load` on a copy of the base and HF generate."""
    base, tok = env["base"], env["tok"]
    m = copy.deepcopy(base)
    if name is not None:
        dt.load(m, (env["tmp"] / "later" if name == "late" else env["root"]) / name)
    x = torch.tensor([ids])
    with torch.no_grad():
        seq = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=GEN, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    new = seq[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_completions_and_chat_of_base_and_deltas_equal_offline_generate(env):
    c, tok = env["client"], env["tok"]
    assert {m.id for m in c.models.list().data} == {"smol", "qv", "all"}
    jobs = [(name, p) for name in ("smol", "qv", "all") for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # sent together: base rows and delta rows share batches
        texts = list(pool.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=GEN,
                                                             temperature=0).choices[0].text, jobs))
    outs = {}
    for (name, p), text in zip(jobs, texts):
        ids = tok(p)["input_ids"]
        want = reference(env, None if name == "smol" else name, ids)
        assert text == want, (name, p)
        outs[name, p] = text
    assert len({outs[n, PROMPTS[0]] for n in ("smol", "qv", "all")}) > 1  # the deltas change the output
    chat = c.chat.completions.create(model="qv", messages=[{"role": "user", "content": "Say hi."}], max_tokens=GEN,
                                     temperature=0)
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.choices[0].message.content == reference(env, "qv", tok(text, add_special_tokens=False)["input_ids"])
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="all", prompt=PROMPTS[1], max_tokens=GEN, temperature=0, stream=True) if ch.choices)
    assert streamed == outs["all", PROMPTS[1]]


def test_hot_loaded_delta_serves_its_own_output(env):
    import httpx2 as httpx

    r = httpx.post(env["server"].url + "/v1/load_lora_adapter",
                   json={"lora_name": "late", "lora_path": str(env["tmp"] / "later" / "late")}, timeout=600)
    # outside every --deltas root: refused with 400, nothing changed
    assert r.status_code == 400 and "late" not in {m.id for m in env["client"].models.list().data}
    (env["root"] / "late").symlink_to(env["tmp"] / "later" / "late")  # a link out of the root: refused too
    r = httpx.post(env["server"].url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"},
                   timeout=600)
    assert r.status_code == 400
    (env["root"] / "late").unlink()
    import shutil

    shutil.copytree(env["tmp"] / "later" / "late", env["root"] / "late")
    r = httpx.post(env["server"].url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"},
                   timeout=600)
    assert r.status_code == 200, r.text
    text = env["client"].completions.create(model="late", prompt=PROMPTS[0], max_tokens=GEN,
                                            temperature=0).choices[0].text
    assert text == reference(env, "late", env["tok"](PROMPTS[0])["input_ids"])
