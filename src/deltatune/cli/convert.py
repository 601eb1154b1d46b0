"""`deltatune convert IN OUT --to FORMAT` (registered on the app in main.py): a delta directory of any registered
format rewritten in another (native, peft, adapters, ...), by that format's writer. With --base, the delta is loaded
onto that model first and saved from it: for files whose tensors the model places (AdapterHub prefix tuning) or
whose values are relative to its weights (PEFT's trained biases)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.errors import ConfigError
from .serve import _user_errors  # one `error:` line and exit status 2 (main.py imports this module)


def convert_command(
    source: Path = typer.Argument(..., help="delta directory to read (any format deltatune reads)"),
    output: Path = typer.Argument(..., help="directory to write; replaced as a whole if it holds a delta"),
    to: str = typer.Option(..., "--to", help="output format: native, peft or adapters (AdapterHub)"),
    base: Optional[Path] = typer.Option(None, "--base", help="local model directory (config.json + safetensors) to "
                                                             "load the delta onto before writing it"),
) -> None:
    """Convert a delta between file formats; prints what was written and which libraries load it."""
    from ..io.delta import Delta
    from ..io.formats import check_output, format_named, format_of, loaders

    with _user_errors():
        fmt = format_named(to)
        check_output(output, inputs=[source])
        before = format_of(source).name
        delta = Delta.read(source)
        if base is not None:
            delta = _through_model(delta, base)
        elif delta.needs_model:
            raise ConfigError(delta.needs_model)
        fmt.write(delta, output)
        typer.echo(f"{before} -> {fmt.name}: {output} ({delta.config.kind}, {delta.num_params:,} parameters; "
                   f"loadable by {', '.join(loaders(fmt, delta.config.kind))})")


def _through_model(delta, base: Path):
    """The delta as attached to the model in `base` and detached again (the model places and completes it)."""
    from transformers import AutoModel

    from ..io.delta import Delta
    from ..io.files import apply

    if not (base / "config.json").is_file():
        raise ConfigError(f"--base {str(base)!r} is not a model directory (no config.json)")
    model = AutoModel.from_pretrained(base, local_files_only=True, use_safetensors=True)
    apply(model, delta, delta.name)
    return Delta.from_model(model, delta.name)
