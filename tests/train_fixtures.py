"""Offline tiny models, tokenizers and data for training tests (no zoo packages needed)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

POS = ["good", "great", "fine", "nice", "happy"]
NEG = ["bad", "awful", "poor", "sad", "grim"]
FILL = ["the", "a", "of", "and", "to", "it", "was"]
DIGITS = [str(i) for i in range(10)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "plus", "is", "answer", "question"] + POS + NEG + FILL + DIGITS


def word_tokenizer(causal: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if causal:
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=len(VOCAB), num_labels=num_labels,
                                                    max_position_embeddings=64, pad_token_id=0,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=4,
                                        bos_token_id=None, max_position_embeddings=64,
                                        initializer_range=0.3))


def sentiment(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rnd.randint(0, 1)
        words = [rnd.choice(POS if y == 0 else NEG) for _ in range(3)] + rnd.sample(FILL, 3)
        rnd.shuffle(words)
        rows.append({"text": " ".join(words), "label": ["pos", "neg"][y]})
    return rows


def additions(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(0, 4), rnd.randint(0, 4)
        rows.append({"prompt": f"question {a} plus {b}", "response": f"answer is {a + b}", "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_bert_dir(path: Path) -> Path:
    tiny_bert().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def sentiment_splits(root, n_train: int = 160, n_val: int = 40, n_test: int = 40):
    """Train/validation/test JSONL files of the toy sentiment task under `root`, read back as classification splits."""
    from deltatune.train.data import local_splits

    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        write_jsonl(root / f"{name}.jsonl", sentiment(n, seed))
    return local_splits(str(root / "train.jsonl"), "classification", validation=str(root / "val.jsonl"),
                        test=str(root / "test.jsonl"))
