"""docs/benchmarks.md is shared by several bench scripts: each owns one marked section and rewrites only it."""
from __future__ import annotations

import re
import sys
from pathlib import Path


def write_section(path: str | Path, key: str, text: str) -> None:
    """Replace the section between `<!-- bench:key -->` and `<!-- /bench:key -->` (appended if absent)."""
    path = Path(path)
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def publish(text: str, path: str | Path | None, key: str, seconds: float | None = None) -> None:
    """Write `text` as section `key` of the markdown file `path`, or print it when no path is given."""
    if not path:
        print(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_section(path, key, text)
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    print(f"wrote section {key!r} of {path}{took}", file=sys.stderr)
