"""`deltatune serve`: load the base, register the deltas under the roots, start uvicorn; SIGTERM drains and exits 0."""
from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ...core.errors import ConfigError
from ...core.parsing import printable
from ...core.suggest import did_you_mean

log = logging.getLogger("deltatune.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_base(model: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, served name) from a zoo name or a local HF directory (safetensors only)."""
    from ... import zoo

    if model in zoo.list_models():
        net, tok = zoo.load_model(model)
        return net, tok, model
    path = Path(model)
    if not path.is_dir():
        raise ConfigError(f"--model {model!r} is neither a zoo model{did_you_mean(model, zoo.list_models())} (zoo "
                          f"models: {', '.join(zoo.list_models())}) nor a directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    net = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return net.eval(), tok, path.resolve().name


def build(model: str, deltas: list[Path], *, keys: Path | None = None, max_loaded: int = 8, max_rank: int = 16,
          host_cache_mb: int = 1024, max_batch: int = 32, convert_rank: int | None = None, base_name: str | None = None,
          default_max_tokens: int = 16, max_body_bytes: int = 1 << 20, drain_timeout: float = 30.0,
          echo: Callable[[str], None] = print):
    """The `Server` (not started): base loaded, deltas registered (bad ones reported and skipped)."""
    from ..engine import Engine
    from .app import Server
    from .keys import KeyStore
    from .registry import Registry

    store = None
    if keys is not None:
        if not keys.exists():
            raise ConfigError(f"--keys {str(keys)!r} does not exist; create it with `deltatune keys add`")
        store = KeyStore.load(keys)
    net, tok, name = load_base(model)
    name = base_name or name
    engine = Engine(net, tokenizer=tok, max_loaded=max_loaded, max_rank=max_rank, host_bytes=host_cache_mb << 20,
                    max_batch=max_batch)
    registry = Registry(engine, list(deltas), name, convert_rank)
    for delta, reason in registry.scan():
        echo(f"skipped delta {printable(delta)!r}: {printable(reason)}")
    context = int(getattr(net.config, "max_position_embeddings", None) or 2048)
    echo(f"base {name!r}; {len(registry.names())} delta(s) registered from {', '.join(map(str, deltas))}")
    return Server(engine=engine, tokenizer=tok, registry=registry, base_name=name, keys=store, context=context,
                  default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes, drain_timeout=drain_timeout)


def run(server, host: str, port: int, echo: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM/SIGINT: stop accepting, finish running requests (at most the drain timeout), exit 0."""
    import uvicorn

    from .app import create_app

    if server.keys is None:
        echo(f"no --keys: every request is accepted without a key, so the server listens on loopback only ({host})")
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=server.drain_timeout, lifespan="on")
    # uvicorn re-raises the signal it caught once it has shut down; these handlers make that a no-op, so a
    # graceful stop ends the process with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    echo(f"serving on http://{host}:{port}/v1")
    sys.stdout.flush()
    uvicorn.Server(config).run()
    echo("stopped")
