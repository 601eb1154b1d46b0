"""docs/benchmarks.md is shared by several bench scripts: each owns one marked section and rewrites only it."""
from __future__ import annotations

import re
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
