"""`deltatune convert IN OUT --to FORMAT` (registered on the app in main.py): a delta directory of any registered
format rewritten in another (native, peft, adapters, ...), by that format's writer. With --base, the delta is loaded
onto that model first and saved from it: for files whose tensors the model places (AdapterHub prefix tuning) or
whose values are relative to its weights (PEFT's trained biases), in the model class the delta was saved from."""
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
        fmt.write(delta, output)  # refuses a delta that needs the model (`Delta.needs_model`) before writing
        typer.echo(f"{before} -> {fmt.name}: {output} ({delta.config.kind}, {delta.num_params:,} parameters; "
                   f"loadable by {', '.join(loaders(fmt, delta.config.kind))})")


def _through_model(delta, base: Path):
    """The delta as attached to the model in `base` and detached again (the model places and completes it), with that
    model as its `source` (writers that store values relative to nothing read the base weights there). The model is
    built with the class the delta was saved from (`base["model_class"]`, when transformers has it), so a delta
    saved from a model with a head finds its module paths; AutoModel otherwise."""
    from ..io.delta import Delta
    from ..io.files import apply

    if not (base / "config.json").is_file():
        raise ConfigError(f"--base {str(base)!r} is not a model directory (no config.json)")
    model = model_class(delta.base.get("model_class")).from_pretrained(base, local_files_only=True,
                                                                      use_safetensors=True)
    apply(model, delta, delta.name)
    placed = Delta.from_model(model, delta.name)
    placed.source = model
    return placed


def model_class(name: object) -> type:
    """The transformers model class called `name` (only a PreTrainedModel subclass, never any other attribute),
    else AutoModel."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel
