"""Math word problems from the shared data directory: GSM8K and the LLM-Adapters evaluation sets."""
from __future__ import annotations

import json

from .paths import ZooError, shared_file
from .splits import Example, Splits, seeded_split

# zoo name -> file under math-eval/
MATH_EVAL_FILES = {
    "addsub": "AddSub.json",
    "multiarith": "MultiArith.json",
    "singleeq": "SingleEq.json",
    "svamp": "SVAMP.json",
    "aqua": "AQuA.json",
    "mawps": "mawps.json",
}


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after `####`, thousands separators removed."""
    if "####" not in solution:
        raise ZooError(f"GSM8K solution without a `####` answer line: {solution[-200:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k_file(split: str) -> list[Example]:
    path = shared_file(f"gsm8k/{split}.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"prompt": r["question"], "response": r["answer"], "answer": gsm8k_answer(r["answer"])} for r in rows]


def load_gsm8k() -> Splits:
    """GSM8K: source train/test; validation = a seeded 10% of the source train."""
    train, test = _gsm8k_file("train"), _gsm8k_file("test")
    val_rows, train_rows = seeded_split([0] * len(train), [0.1, 0.9])
    return Splits("gsm8k", "generation", [train[i] for i in train_rows], [train[i] for i in val_rows], test)


def load_math_eval(name: str) -> Splits:
    """One LLM-Adapters math evaluation set, unchanged (duplicates kept, for comparable scores): test split only."""
    path = shared_file(f"math-eval/{MATH_EVAL_FILES[name]}")
    rows = json.loads(path.read_text(encoding="utf-8"))
    test = [
        {
            "prompt": (r["instruction"].strip() + ("\n" + r["input"].strip() if r.get("input", "").strip() else "")),
            "response": r.get("output", "").strip(),
            "answer": str(r["answer"]).strip(),
        }
        for r in rows
    ]
    return Splits(name, "generation", [], [], test)
