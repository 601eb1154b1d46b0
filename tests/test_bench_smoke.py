"""Keeps bench/forward.py from rotting: the whole benchmark, correctness checks included, on a tiny model."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "forward.py"


def _load_bench(script: str = "forward.py"):
    """bench/`script` imported as a module (registered in sys.modules under its own name)."""
    spec = importlib.util.spec_from_file_location(f"deltatune_bench_{script[:-3]}", BENCH.parent / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_forward_bench_runs_on_a_tiny_model() -> None:
    bench = _load_bench()
    shape = bench.Shape(hidden=64, intermediate=96, layers=1, heads=4, vocab=64, batch=2, seq=8, r=4, alpha=8.0)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            res = bench.run(shape, infer_rounds=1, train_rounds=1, threads=1, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert set(res.infer) == {"bare", "bare (2nd copy)", "deltatune LoRA", "peft LoRA", "deltatune DoRA", "peft DoRA"}
    assert 0 < res.adapter_ms[0] < res.adapter_ms[1]
    assert [t.dropout for t in res.train] == [0.05, 0.0]
    for tr in res.train:
        assert tr.peak_ours > tr.state_ours > 0 and tr.peak_peft > tr.state_peft > 0
        assert tr.act_ours > 0 and tr.act_peft > 0
    with_dropout = res.train[0]
    assert with_dropout.act_ours < with_dropout.act_peft  # no dropout mask or dropped copy of x is saved
    text = bench.render(res)
    assert bench.COMMAND in text and "| deltatune LoRA |" in text and "peak × peft" in text


def test_sparse_bench_runs_on_a_tiny_model() -> None:
    bench = _load_bench("sparse.py")
    shape = bench.Shape(hidden=32, intermediate=48, layers=1, heads=4, kv_heads=2, vocab=64, batch=2, seq=8, r=2,
                        every=4, window=2)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            res = bench.run(shape, rounds=1, threads=1, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    rows = res.rows
    assert rows["SpIEL"].trainable == rows["LoRA"].trainable == 2 * (4 * 32 + 2 * (16 + 32) + 3 * (48 + 32))
    assert all(r.peak > r.state > 0 for r in rows.values())
    assert rows["full"].peak > rows["SpIEL"].peak  # full fine-tuning holds gradients and moments of every weight
    assert res.replaced["SpIEL-AG"] > 0 and res.replaced["SpIEL-MA"] > 0 and res.regrow_ms["SpIEL-AG"] > 0
    text = bench.render(res)
    assert bench.COMMAND in text and "| SpIEL, between windows |" in text and "× LoRA" in text


def test_mixed_bench_runs_on_a_tiny_model() -> None:
    bench = _load_bench("mixed.py")
    from _common import build_llama

    shape = bench.Shape(hidden=32, intermediate=48, layers=1, heads=4, vocab=64, past=4)
    base = build_llama(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab, use_cache=True)
    results = [bench.run_case(base, shape, bench.Case(name, b, t, ranks, n), rounds=1, log=lambda _: None)
               for name, b, t, ranks, n in (("decode", 4, 1, [2], 4), ("mixed ranks", 6, 1, [2, 4, 8], 6),
                                            ("prefill", 2, 5, [2], 2))]
    for r in results:
        assert set(r.timings) == {"bare", "deltatune route, steady", "deltatune route, per call", "peft adapter_names"}
        assert all(value < bench.ATOL for _, value in r.checks) and len(r.checks) == 2
    text = bench.render(results, shape, 1, 1.0)
    assert bench.COMMAND in text and "| decode | 4 × 1 | 4 (2) |" in text


def test_serve_bench_runs_on_a_tiny_model() -> None:
    bench = _load_bench("serve.py")
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--smoke"])
    finally:
        torch.set_num_threads(threads)
    assert set(out["engine"]) == {0, 4} and out["engine"][4]["tok_s"] > 0 and out["peft"][4]["tok_s"] > 0
    assert out["naive"][4]["tok_s"] > 0 and min(out["hot"]) > 0 and set(out["scaling"][0]) == {10, 100}


def test_serve_routing_bench_runs_on_a_tiny_model(capsys) -> None:
    bench = _load_bench("serve_routing.py")
    from deltatune.serve import routing

    threads, threshold, use_kernel = torch.get_num_threads(), routing.BAG_BELOW, routing.KERNEL
    try:
        rows = bench.main(["--smoke", "--reps", "1"])  # raises if a forced path did not run (the kernel included)
    finally:
        torch.set_num_threads(threads)
    assert routing.BAG_BELOW == threshold and routing.KERNEL == use_kernel  # put back
    assert [(t, u) for t, u, *_ in rows] == [(64, 1), (64, 4), (8, 2)]
    from deltatune.serve import kernel

    timed = [r[2:] if kernel.loaded() else (r[2], *r[4:]) for r in rows]  # the kernel's column: nan without it
    assert all(len(r) == 6 for r in rows) and all(v > 0 for t in timed for v in t)  # base, kernel, row sums, gathered
    assert "| 64 | 4 | 16 |" in capsys.readouterr().out


def test_quant_bench_runs_on_a_tiny_model() -> None:
    pytest.importorskip("bitsandbytes")
    module = _load_bench("quant.py")
    shape = {"hidden": 96, "intermediate": 128, "layers": 1, "heads": 3, "vocab": 64}
    rows = module.measure(shape, batch=2, seq=8, r=4, steps=1, threads=1)
    assert [r["case"] for r in rows] == list(module.CASES)
    assert all(r["step_s"] > 0 and r["peak_rss"] >= r["start_rss"] > 0 for r in rows)
    assert rows[1]["base_bytes"] < 0.3 * rows[1]["fp32_bytes"] and all(math.isfinite(r["loss"]) for r in rows)
    text = module.report(rows, shape, 2, 8, 4, 1, 1)
    assert "deltatune QLoRA, NF4 base" in text and "Targets" in text


@pytest.mark.gpu
def test_forward_bench_runs_on_cuda() -> None:
    """`bench/forward.py --device cuda`: the same checks (deltatune = peft to 1e-4, dropout saves no mask) on a GPU."""
    bench = _load_bench()
    shape = bench.Shape(hidden=64, intermediate=96, layers=1, heads=4, vocab=64, batch=2, seq=8, r=4, alpha=8.0)
    with torch.random.fork_rng(devices=[0]):
        res = bench.run(shape, infer_rounds=1, train_rounds=1, threads=1, log=lambda _: None, device="cuda")
    assert res.device == "cuda" and [t.dropout for t in res.train] == [0.05, 0.0]
    for tr in res.train:
        assert tr.peak_ours > tr.state_ours > 0 and tr.peak_peft > tr.state_peft > 0
        assert tr.act_ours > 0 and tr.act_peft > 0
    assert res.train[0].act_ours < res.train[0].act_peft
    text = bench.render(res)
    assert bench.COMMAND_CUDA in text and "On a GPU" in text


def test_results_rows_over_seeds_render_mean_and_std(tmp_path) -> None:
    sys.path.insert(0, str(BENCH.parent))  # results.py imports _report from its folder
    bench = _load_bench("results.py")
    store = tmp_path / "rows.json"
    one = {"data": "r8", "method": "LoRA r=8", "accuracy": 0.8, "macro_f1": 0.3, "trainable": 10, "wall_s": 10.0,
           "cpu_s": 20.0, "threads": 1, "peak_rss_mb": 100.0}
    store.write_text(json.dumps({"r8:lora": one}))  # a row stored before seeds existed is seed 0
    done = bench.load_store(store)
    assert done == {"r8:lora": {"seeds": {"0": one}}}
    done["r8:lora"]["seeds"]["1"] = {**one, "accuracy": 0.9, "macro_f1": 0.4, "wall_s": 30.0, "peak_rss_mb": 120.0}
    row = bench.merged(done["r8:lora"])
    assert row["accuracy"] == pytest.approx(0.85) and row["accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert row["accuracy_values"] == [0.8, 0.9] and row["wall_s"] == 20.0 and row["peak_rss_mb"] == 120.0
    line = bench._cls_line({**row, "row": "r8:lora"})
    assert "| r8 | LoRA r=8 | 2 (0, 1) | 0.8500 ± 0.0707 | 0.3500 ± 0.0707 | 10 | 20 |" in line
    single = bench._cls_line({**bench.merged({"seeds": {"0": one}}), "row": "r8:lora"})
    assert "| 1 seed | 0.8000 | 0.3000 |" in single
    assert bench.parse_seeds("3") == [0, 1, 2] and bench.parse_seeds("0,4") == [0, 4]


def test_results_tables_hold_only_rows_with_three_seeds() -> None:
    """A row is in a table once it has MIN_SEEDS seeds; rows with fewer are named (with the key that measures them)
    outside the tables; the seedless GSM8K base row is shown beside a LoRA row with its seeds, never alone."""
    sys.path.insert(0, str(BENCH.parent))
    bench = _load_bench("results.py")
    one = {"accuracy": 0.8, "macro_f1": 0.3, "trainable": 10, "wall_s": 10.0, "cpu_s": 20.0, "threads": 1,
           "peak_rss_mb": 100.0, "exact_match": 0.05, "n_test": 60, "steps": 0}

    def row(key, label, n):
        data = key.split(":")[0]
        seeds = {str(s): {**one, "data": data, "method": label, "accuracy": 0.8 + s / 100} for s in range(n)}
        return {**bench.merged({"seeds": seeds}), "row": key}
    rows = [row("bbc:lora", "LoRA r=8", 3), row("bbc:vera", "VeRA r=256", 3), row("bbc:dora", "DoRA r=8", 2),
            row("bbc:sorsa", "SORSA r=8", 1), row("gsm8k:base", "SmolLM2-135M base", 1)]
    text = bench.render(rows + [row("gsm8k:lora", "SmolLM2-135M + LoRA", 3)], "make results")
    table_lines = [line for line in text.splitlines() if line.startswith("| bbc |")]
    assert [line.split("|")[2].strip() for line in table_lines] == ["LoRA r=8", "VeRA r=256"]
    assert "| VeRA r=256 | 3 (0, 1, 2) | 0.8100 ± 0.0100 |" in table_lines[1]
    outside = next(line for line in text.splitlines() if line.startswith("Not in the tables"))
    assert "DoRA r=8 (`bbc:dora`, 2)" in outside and "SORSA r=8 (`bbc:sorsa`, 1) is in the tuning section" in outside
    assert "| SmolLM2-135M base | — (no random draws) | 0.050 | 60 |" in text
    assert "| SmolLM2-135M + LoRA | 3 (0, 1, 2) | 0.050 ± 0.000 |" in text
    peft = row("bbc:peft-vera", "peft VeRA r=256", 3)
    peft["accuracy_values"] = [0.79, 0.79, 0.83]  # differences from VeRA's 0.80/0.81/0.82: +0.01, +0.02, -0.01
    paired = next(line for line in bench.render(rows + [peft], "x").splitlines() if line.startswith("Test accuracy paired"))
    assert paired.endswith("bbc VeRA r=256 − peft VeRA r=256: +0.0067 ± 0.0153 (3 seeds).")
    alone = bench.render(rows, "make results")  # the LoRA row unmeasured: no GSM8K table, and it says so
    assert "## Causal LM" not in alone and "The GSM8K rows" in alone
    assert "SmolLM2-135M base (`gsm8k:base`, 1)" in next(line for line in alone.splitlines()
                                                        if line.startswith("Not in the tables"))


def test_multitask_cells_are_mean_and_std_over_seeds() -> None:
    """Every multitask cell over three seeds is mean ± sample std; relative accuracy is averaged per seed (not the
    ratio of the means); the run time sums the trainings' wall times."""
    sys.path.insert(0, str(BENCH.parent))
    bench = _load_bench("multitask.py")

    def seed_result(own_bbc, merged_bbc, seconds):
        own = {f"{k}:{t}": 0.8 for k in ("lora", "sparse") for t in bench.TASKS} | {"lora:bbc": own_bbc}
        merged = {f"{m}:{t}": 0.5 for m in bench.MERGES for t in bench.TASKS} | {"ties:bbc": merged_bbc}
        merged |= {f"{m}:seconds": 1.0 for m in bench.MERGES}
        trained = {k: {t: {"trainable": 100, "wall_s": 60.0, "threads": 1} for t in bench.tasks_of(k)}
                   for k in ("lora", "sparse")}
        return {"own": own, "together": {f"{k}:{t}": 0.7 for k in ("lora", "sparse") for t in ("bbc", "r8")},
                "merged": merged, "trained": trained, "seconds": seconds}
    by_seed = {0: seed_result(0.9, 0.45, 60.0), 1: seed_result(0.8, 0.6, 60.0), 2: seed_result(1.0, 0.6, 60.0)}
    text = bench.render(by_seed)
    ties = next(line for line in text.splitlines() if line.startswith("| ties |"))
    # bbc: merged 0.45/0.6/0.6 (mean 0.55, std 0.0866); relative 0.5/0.75/0.6 (mean 0.617, std 0.126)
    assert "0.5500 ± 0.0866 (0.617 ± 0.126)" in ties
    assert "| each task's own delta | 0.9000 ± 0.1000 |" in text
    assert "the 18 trainings' wall times add up to 18 minutes (one thread each" in text
    assert "the evaluations of the seeds took 3 minutes" in text and "seeds 0, 1, 2: cells are mean" in text
    # bbc: LoRA keeps 0.7/0.9, 0.7/0.8, 0.7/1.0 (0.784 ± 0.088), the sparse delta 0.875 in every seed
    assert "on bbc LoRA keeps 0.784 ± 0.088 of its accuracy together and the sparse delta 0.875 ± 0.000, a " \
           "difference beyond one standard deviation; on r8 LoRA keeps 0.875 ± 0.000" in text


def test_tuned_rows_choose_by_validation_and_report_test_over_seeds() -> None:
    """The tuned lr is the one with the best mean validation accuracy even where another lr has the better test
    accuracy; cells are mean ± sample std over the seeds; rows not swept say so."""
    bench = _load_bench("tuned_rows.py")
    from deltatune.train.sweep import run_id

    def run(lr, seed, val, test):
        return {"point": {"lr": lr}, "seed": seed, "metrics": {"val_accuracy": val, "test_accuracy": test,
                                                               "test_macro_f1": test - 0.1}}
    runs = {run_id({"lr": lr}, s): run(lr, s, val, test)
            for lr, val, test in ((1e-3, 0.5, 0.6), (1e-2, 0.9, 0.5), (3e-2, 0.7, 0.99))
            for s, (val, test) in enumerate([(val, test), (val + 0.02, test + 0.02), (val - 0.02, test - 0.02)])}
    grid = {"lr": [1e-3, 1e-2, 3e-2]}
    text = bench.render({"bbc_adalora": {"grid": grid, "seeds": [0, 1, 2], "runs": runs}})
    row = next(line for line in text.splitlines() if "AdaLoRA" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "0.001" and cells[4] == "0.6000 ± 0.0200"  # the untuned lr (the yaml's) over its 3 seeds
    assert cells[6] == "0.01" and cells[7] == "0.5000 ± 0.0200" and cells[8] == "0.4000 ± 0.0200"
    assert "0.03: 0.7000 ± 0.0200 / 0.9900 ± 0.0200" in cells[9]
    assert "not swept yet" in next(line for line in text.splitlines() if "SORSA" in line)

