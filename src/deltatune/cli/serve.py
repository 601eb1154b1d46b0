"""`deltatune serve` and `deltatune keys add` (registered on the app in main.py)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import DeltaTuneError
from ..core.parsing import printable

keys_app = typer.Typer(add_completion=False, no_args_is_help=True, help="API keys of `deltatune serve` (keys.yaml).")


@contextmanager
def _user_errors() -> Iterator[None]:
    """A user error (deltatune's own, or the operating system's) as one `error:` line and exit status 2."""
    try:
        yield
    except (DeltaTuneError, OSError) as e:
        text = str(e) if not isinstance(e, OSError) or not e.strerror else f"{e.strerror}: {e.filename!r}"
        typer.secho(f"error: {printable(' '.join(text.split()))}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


def serve_command(
    model: str = typer.Option(..., help="zoo model name or local HF directory (a causal LM with a tokenizer)"),
    deltas: list[Path] = typer.Option(..., "--deltas", help="delta root: each subdirectory holding a native or PEFT "
                                      "delta is served under its name (repeatable)"),
    keys: Optional[Path] = typer.Option(None, help="keys.yaml (`deltatune keys add`); without it: loopback only, no keys"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; other than loopback only with --keys"),
    port: int = typer.Option(8000, help="TCP port to listen on"),
    max_loaded: int = typer.Option(8, "--max-loaded", help="device slots (deltas loaded at once)"),
    max_rank: int = typer.Option(16, "--max-rank", help="largest delta rank a slot holds"),
    host_cache_mb: int = typer.Option(1024, "--host-cache-mb", help="host memory for delta factors (LRU)"),
    max_batch: int = typer.Option(32, "--max-batch", help="requests running at once"),
    convert_rank: Optional[int] = typer.Option(None, "--convert-rank", help="serve non-low-rank deltas (DoRA, LoHa, "
                                               "...) truncated to this rank"),
    name: Optional[str] = typer.Option(None, "--name", help="the base model's name in requests (default: its name)"),
    max_tokens: int = typer.Option(16, "--default-max-tokens", help="max_tokens when a request gives none"),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="seconds SIGTERM waits for running requests"),
) -> None:
    """An OpenAI-compatible HTTP server over many deltas (docs/serving.md, section "HTTP server")."""
    from ..serve.http import build, is_loopback, run

    with _user_errors():
        if keys is None and not is_loopback(host):
            raise DeltaTuneError(f"--host {host} is not a loopback address: a server without --keys serves loopback "
                                 f"only; pass --keys keys.yaml (`deltatune keys add`) to listen on {host}")
        server = build(model, deltas, keys=keys, max_loaded=max_loaded, max_rank=max_rank, host_cache_mb=host_cache_mb,
                       max_batch=max_batch, convert_rank=convert_rank, base_name=name, default_max_tokens=max_tokens,
                       drain_timeout=drain_timeout, echo=typer.echo)
    run(server, host, port, echo=typer.echo)


@keys_app.command("add")
def keys_add(
    path: Path = typer.Argument(..., help="keys file (created if missing)"),
    name: str = typer.Option(..., help="who the key is for (shown in logs, never secret)"),
    deltas: list[str] = typer.Option([], "--delta", help="delta name or glob pattern it may use (repeatable)"),
    no_base: bool = typer.Option(False, "--no-base", help="may not use the base model itself"),
    admin: bool = typer.Option(False, "--admin", help="may load/unload deltas and read /metrics"),
    rpm: Optional[int] = typer.Option(None, "--requests-per-minute", help="requests it may make per minute (no limit "
                                      "if unset)"),
    tpm: Optional[int] = typer.Option(None, "--tokens-per-minute", help="prompt + completion tokens"),
) -> None:
    """Add a key; prints it once (the file keeps only a salted hash)."""
    from ..serve.http import add_key

    with _user_errors():
        key = add_key(path, name, deltas, base=not no_base, admin=admin, requests_per_minute=rpm,
                      tokens_per_minute=tpm)
    typer.echo(key)
