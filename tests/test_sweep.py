"""deltatune sweep: grid keys, the table and plot, resuming without rerunning finished runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltatune.core.errors import ConfigError, StateError
from deltatune.train.config import TrainConfig
from deltatune.train.sweep import Sweep, parse_grid, parse_seeds, resolve_key, run_sweep, summary

from train_fixtures import save_bert_dir, sentiment, write_jsonl

BASE = TrainConfig(delta={"kind": "lora", "r": 8, "alpha": 16})


def test_grid_values_keys_and_seeds():
    assert parse_grid(["lr=1e-4,5e-4,2e-3", "r=4,8", "delta.targets=[query,value],all-linear"]) == {
        "lr": [1e-4, 5e-4, 2e-3], "r": [4, 8], "delta.targets": [["query", "value"], "all-linear"]}
    assert resolve_key("lr", BASE) == ("train", "lr") and resolve_key("r", BASE) == ("delta", "r")
    assert resolve_key("delta.alpha", BASE) == ("delta", "alpha")
    with pytest.raises(ConfigError, match=r"unknown grid key 'rank'; known: training options .*lr.*fields of the "
                                          r"'lora' delta .*\br\b"):
        resolve_key("rank", BASE)
    for bad, msg in ((["lr"], "key=v1"), (["lr=1,1"], "repeats"), (["lr=1", "lr=2"], "twice"), ([], "at least one")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="--seeds"):
        resolve_key("seed", BASE)
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,5,7") == [0, 5, 7]
    for bad in ("x", "0", "1,1", "-1,2"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def fake_runner(calls: list, fail: set = frozenset()):
    def run(opts, run_dir):
        calls.append((opts["lr"], opts["delta"]["r"], opts["seed"]))
        if (opts["lr"], opts["seed"]) in fail:
            raise StateError("boom")
        assert opts["output_dir"] == str(run_dir) and opts["delta"]["alpha"] == 16 and not opts["resume"]
        return {"metrics": {"test_accuracy": opts["lr"] * 100 + opts["delta"]["r"] + opts["seed"] / 10}}
    return run


def test_sweep_records_renders_and_resumes(tmp_path):
    sweep = lambda: Sweep(config=BASE.to_dict(), grid={"lr": [0.001, 0.002], "r": [4, 8]}, seeds=[0, 1])
    calls: list = []
    with pytest.raises(StateError, match="2 run\\(s\\) failed"):
        run_sweep(sweep(), tmp_path, runner=fake_runner(calls, fail={(0.002, 1)}))
    assert len(calls) == 8
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert len(stored["runs"]) == 6 and "lr=0.002,r=4/seed=1" not in stored["runs"]
    calls.clear()
    done = run_sweep(sweep(), tmp_path, runner=fake_runner(calls))
    assert sorted(calls) == [(0.002, 4, 1), (0.002, 8, 1)]  # only the failed runs again
    rows = {(r["point"]["lr"], r["point"]["r"]): r for r in summary(done)}
    assert rows[0.002, 8]["values"] == pytest.approx([8.2, 8.3]) and rows[0.002, 8]["mean"] == pytest.approx(8.25)
    assert rows[0.002, 8]["std"] == pytest.approx(0.0707107, abs=1e-6)
    table = (tmp_path / "sweep.md").read_text()
    assert "| lr | r | test_accuracy (mean ± std) | seeds | per seed |" in table
    assert "| 0.002 | 8 | **8.2500 ± 0.0707** | 2 | 8.2000, 8.3000 |" in table
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    calls.clear()
    run_sweep(sweep(), tmp_path, runner=fake_runner(calls))
    assert calls == []
    other = Sweep(config={**BASE.to_dict(), "epochs": 2.0}, grid={"lr": [0.001]}, seeds=[0])
    with pytest.raises(ConfigError, match="different config.*epochs"):
        run_sweep(other, tmp_path, runner=fake_runner(calls))


def test_sweep_cli_kill_and_resume(tmp_path):
    """A tiny real sweep (2×2 grid, 2 seeds, 3 steps each) killed after its first runs, then resumed."""
    for name, n, seed in (("train", 64, 1), ("val", 16, 2), ("test", 16, 3)):
        write_jsonl(tmp_path / f"{name}.jsonl", sentiment(n, seed))
    model = save_bert_dir(tmp_path / "bert")
    (tmp_path / "cfg.yaml").write_text(
        f"model: {model}\ndata: {tmp_path / 'train.jsonl'}\nvalidation_data: {tmp_path / 'val.jsonl'}\n"
        f"test_data: {tmp_path / 'test.jsonl'}\nmax_steps: 3\nbatch_size: 8\neval_every: 100\nplot: false\n"
        "delta: {kind: lora, r: 2, alpha: 4}\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "deltatune.cli", "sweep", str(tmp_path / "cfg.yaml"), "--grid", "lr=1e-3,1e-2",
           "--grid", "r=2,4", "--seeds", "2", "--jobs", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    recorded: dict = {}
    while time.time() < deadline and first.poll() is None:
        if (out / "sweep.json").exists():
            recorded = json.loads((out / "sweep.json").read_text())["runs"]
            if len(recorded) >= 2:
                break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    recorded = json.loads((out / "sweep.json").read_text())["runs"]
    assert 2 <= len(recorded) < 8
    stamps = {rid: (out / rid.split("/")[0] / rid.split("/")[1].replace("=", "-") / "result.json").stat().st_mtime_ns
              for rid in recorded}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"{len(recorded)} of 8 runs recorded" in second.stderr
    final = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(final) == 8
    for rid, stamp in stamps.items():  # finished runs were not rerun
        assert (out / rid.split("/")[0] / rid.split("/")[1].replace("=", "-") / "result.json").stat().st_mtime_ns == stamp
        assert final[rid] == recorded[rid]
    table = (out / "sweep.md").read_text()
    assert table.count(" ± ") == 1 + 4 and "| 0.01 | 4 |" in table and "test_accuracy" in table
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert all(0 <= r["metrics"]["test_accuracy"] <= 1 and r["steps"] == 3 for r in final.values())
