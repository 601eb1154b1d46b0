"""`deltatune inspect`: what a delta directory holds, in any registered format, and which libraries load it (the
format's own library where it reads the delta's kind, `formats.loaders`). Names come from files, so the
rendered text escapes every control character (a delta named with terminal escape sequences prints them as `\x1b`
and does not drive the terminal); the JSON form escapes them as JSON does."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..core.parsing import printable
from .delta import Delta
from .formats import format_of, loaders


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    delta = Delta.read(path)
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    fmt = format_of(path)
    suffixes = Counter(p.rsplit(".", 1)[-1] for p in delta.state)
    return {
        "path": str(path),
        "format": fmt.name,
        "loadable_by": loaders(fmt, delta.config.kind),
        "name": delta.name,
        "kind": delta.config.kind,
        "config": delta.config.to_dict(),
        "modules": len(delta.state),
        "module_names": dict(sorted(suffixes.items())),
        "module_types": dict(Counter(delta.module_types.values())),
        "parameters": delta.num_params,
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "files": sorted(p.name for p in files),
        "base": {k: v for k, v in delta.base.items() if k != "weight_shapes"},
        "base_weight_shapes": len(delta.base.get("weight_shapes", {})),
    }


def render(info: dict[str, Any]) -> str:
    cfg = ", ".join(f"{k}={v!r}" for k, v in info["config"].items() if k != "kind")
    lines = [
        f"{info['path']}  ({info['format']} format)",
        f"  loadable by {', '.join(info['loadable_by'])}",
        f"  name        {info['name']}",
        f"  kind        {info['kind']}",
        f"  config      {cfg}",
        f"  targets     {info['modules']} modules: " + ", ".join(f"{k}×{v}" for k, v in info["module_names"].items()),
        "  types       " + ", ".join(f"{k}×{v}" for k, v in info["module_types"].items()),
        f"  parameters  {info['parameters']:,}",
        f"  on disk     {info['bytes_on_disk'] / 1e6:.3f} MB in {', '.join(info['files'])}",
        f"  base        class={info['base'].get('model_class')} name={info['base'].get('model_name')} "
        f"({info['base_weight_shapes']} weight shapes recorded)",
    ]
    return "\n".join(printable(line) for line in lines)
