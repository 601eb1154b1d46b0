"""The layering rule is enforced: import-linter's contracts (pyproject.toml) hold, an injected upward import breaks
them, and generic packages name no method, block or per-call keyword."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

import deltatune  # noqa: F401  (registers every method)
from deltatune.compose import Block
from deltatune.core.config import _REGISTRY
from deltatune.core.piece import Piece

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "deltatune"
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"


def lint(src_parent: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], cwd=src_parent, text=True,
                          capture_output=True, env={"PYTHONPATH": str(src_parent), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_import_contracts_hold() -> None:
    done = lint(SRC.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("core/layouts.py", "from ..train import loop as _upward", "Layers import one way"),
    ("merging/combine.py", "from ..methods.lora import lora as _method", "Merging works on delta tensors"),
    ("runtime/slot.py", "from . import lifecycle as _cycle", "No import cycles"),
])
def test_an_injected_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    copy = tmp_path / "deltatune"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    text = target.read_text()
    head = text.index("\n\n", text.index("from __future__"))  # after the first import block's first line
    target.write_text(text[:head] + "\n" + line + text[head:])
    done = lint(tmp_path)
    assert done.returncode != 0
    broken = done.stdout[done.stdout.index("Broken contracts"):]
    assert contract in broken, broken[:2000]


# --- generic code names no method, block or method keyword --------------------------------------------------------
GENERIC = ["core", "runtime", "io", "merging", "compose/blocks.py", "serve"]
#: files and folders of generic packages whose job is mapping other libraries' methods onto ours: the PEFT mappings
#: (io/peft_kinds/, one module per peft adapter type; the generic codec in io/peft/ names none) and the AdapterHub
#: codec (adapters' bottleneck adapters, LoRA and prefix tuning)
PLUGINS = {"io/peft_kinds", "io/adapterhub.py"}
#: merging's own vocabulary for how a result is stored (output storage "dense", "sparse", "lowrank"), which two kinds
#: happen to share as names; string literals equal to these are storage names there, not methods
STORAGE_WORDS = {"dense", "sparse", "lowrank"}
#: the HTTP server's vocabulary: OpenAI's request field `prompt`, which one kind happens to share as its name; string
#: literals equal to it in serve/http are that field (its `param` in error bodies), not a method
API_WORDS = {"prompt"}


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def _forbidden() -> tuple[set[str], set[str]]:
    pieces = {p for p in _all_subclasses(Piece) if p.__module__.startswith("deltatune.")}
    names = {c.__name__ for c in _REGISTRY.values()} | {p.__name__ for p in pieces}
    names |= {b.__name__ for b in _all_subclasses(Block) if b.__module__.startswith("deltatune.")} - {"Sum", "Stack", "Average"}
    strings = set(_REGISTRY) | {k for p in pieces for k in p.keywords}
    return names, strings


def _generic_files() -> list[Path]:
    files: list[Path] = []
    for entry in GENERIC:
        path = SRC / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if not any(f.relative_to(SRC).is_relative_to(p) for p in PLUGINS)]


def _offences(path: Path, names: set[str], strings: set[str]) -> list[str]:
    """`line: token` for every identifier in `names` and every plain string literal in `strings` (comments and
    docstrings that mention a method are fine: only code is checked)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if (tok.type == tokenize.NAME and tok.string in names) or (
                tok.type == tokenize.STRING and tok.string[:1] in "'\"" and tok.string.strip("'\"") in strings):
            out.append(f"{tok.start[0]}: {tok.string}")
    return out


def test_generic_packages_name_no_method_block_or_keyword() -> None:
    names, strings = _forbidden()
    assert {"LoRA", "Route", "Arrow", "Fuse"} <= names and {"lora", "task_ids"} <= strings  # the check sees them
    offences = [f"{f.relative_to(SRC)}:{o}" for f in _generic_files()
                for o in _offences(f, names, strings - STORAGE_WORDS if "merging" in f.parts else
                                   strings - API_WORDS if "http" in f.parts else strings)]
    assert not offences, "\n".join(offences)


def test_the_name_check_catches_a_method_name(tmp_path: Path) -> None:
    names, strings = _forbidden()
    bad = tmp_path / "bad.py"
    bad.write_text('from deltatune.methods import LoRA\nKIND = "lora"\n# LoRA in a comment is fine\n')
    assert _offences(bad, names, strings) == ["1: LoRA", '2: "lora"']
