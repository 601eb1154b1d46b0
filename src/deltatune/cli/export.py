"""`deltatune export --format vllm`: deltas as PEFT LoRA directories vLLM serves, with `lora-modules.json` and the
launch command (registered on the app in main.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .serve import _user_errors


def export_command(
    deltas: list[Path] = typer.Argument(..., help="delta directories (native or PEFT); each is exported under its "
                                        "directory name"),
    output: Path = typer.Option(..., "--output", "-o", help="directory to write the adapters, lora-modules.json and "
                                "vllm-command.txt into"),
    model: str = typer.Option(..., help="the base: zoo model name or local HF directory (vLLM serves that directory)"),
    fmt: str = typer.Option("vllm", "--format", help="target server; vllm is the one supported"),
    rank: Optional[int] = typer.Option(None, help="convert what vLLM does not load (DoRA, LoHa, bias changes, ...) "
                                       "to plain LoRA of this rank; without it such deltas are refused"),
) -> None:
    """Export deltas for vLLM: plain PEFT LoRA (converted by SVD where needed, the error reported per delta)."""
    from ..core.errors import ConfigError
    from ..serve.http.server import load_base
    from ..serve.vllm_export import export_vllm

    with _user_errors():
        if fmt != "vllm":
            raise ConfigError(f"--format {fmt!r} is not supported; the one export format is 'vllm'")
        net, _tok, _name = load_base(model)
        model_dir = Path(model) if Path(model).is_dir() else Path(getattr(net.config, "_name_or_path", "") or model)
        if not model_dir.is_dir():
            raise ConfigError(f"the base {model!r} has no model directory for vLLM to load; pass --model DIR")
        result = export_vllm(net, model_dir, list(deltas), output, rank=rank, echo=typer.echo)
    typer.echo(f"wrote {len(result.deltas)} adapter(s), {result.directory / 'lora-modules.json'} and "
               f"{result.directory / 'vllm-command.txt'}; start vLLM with:")
    typer.echo(result.command_line())
