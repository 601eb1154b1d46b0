"""A tiny random Llama saved as an HF model directory (with a WordLevel tokenizer and a chat template), deltas on
disk, and a `deltatune serve` subprocess on 127.0.0.1 with a free port — for the HTTP server's tests."""
from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import deltatune as dt

WORDS = ("the a cat dog sat on mat red blue green one two three four five six seven eight nine ten is was and or "
         "not yes no hello world how are you today fine good bad big small up down left right user assistant "
         "system : question answer").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
REPO = Path(__file__).resolve().parents[1]


def write_model(path: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = 3
    model.save_pretrained(path)
    return path


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def write_lora(base, path: Path, seed: int, r: int = 8, std: float = 0.3, **kw) -> Path:
    """A LoRA delta of `base` (B drawn N(0, std²), so it changes outputs) saved at `path` as delta "d"."""
    m = copy.deepcopy(base)
    torch.manual_seed(seed)
    dt.attach(m, dt.LoRA(r=r, targets=kw.pop("targets", "all-linear"), **kw), name="d")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return dt.save(m, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m deltatune.cli serve ...` on 127.0.0.1; waits until /health answers."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], stdout=self._out, stderr=subprocess.STDOUT,
                                     env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait()

    def _wait(self, timeout: float = 90) -> None:
        import httpx2 as httpx  # openai's http client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._out.closed:
            self._out.close()
