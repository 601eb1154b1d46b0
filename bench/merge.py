"""TIES of 8 LoRA deltas on SmolLM2-135M shapes: deltatune vs mergekit vs peft — wall time and peak RSS.

* deltatune: `deltatune merge recipe.yaml` straight from the 8 adapter directories, module by module in ΔW
  space; once writing a full merged model (what mergekit produces) and once a rank-16 LoRA delta (what
  peft's ties_svd produces).
* mergekit: what its user must do — merge each adapter into the base and write 8 full models (peft
  `merge_and_unload` + `save_pretrained`), then `mergekit-yaml` with `merge_method: ties`.
* peft: load the base and the 8 adapters, `add_weighted_adapter(..., combination_type="ties_svd")`.

Every step runs in its own process; peak RSS is that process's `ru_maxrss` (resident memory, including
memory-mapped checkpoint pages it touched). The random base is written in bfloat16, like SmolLM2's release.
Our merged update is compared with mergekit's (the same TIES semantics: tests/test_merge_vs_mergekit.py).

    .venv/bin/python bench/merge.py --write docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
COMMAND = ".venv/bin/python bench/merge.py --write docs/benchmarks.md"
N_ADAPTERS, RANK, DENSITY = 8, 16, 0.2
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BIN = Path(sys.executable).parent


# --- steps (each runs in its own process: `bench/merge.py --step NAME --work DIR`) ----------------------
def step_setup(work: Path, shape: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048)).to(torch.bfloat16)
    base.save_pretrained(work / "base")
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
    for i in range(N_ADAPTERS):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_B" in name else 0.05))
        model.save_pretrained(work / f"adapter{i}")


def step_ours(work: Path, fmt: str) -> None:
    out = work / f"ours-{fmt}"
    recipe = {"method": "ties", "base": str(work / "base"),
              "inputs": [{"path": str(work / f"adapter{i}"), "weight": 1.0, "density": DENSITY} for i in range(N_ADAPTERS)],
              "parameters": {"normalize": True},
              "output": {"path": str(out), "format": fmt, **({"storage": "lowrank", "rank": RANK} if fmt != "model" else {})}}
    (work / f"recipe-{fmt}.yaml").write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    subprocess.run([str(BIN / "deltatune"), "merge", str(work / f"recipe-{fmt}.yaml")], check=True,
                   stdout=subprocess.DEVNULL)


def step_full_models(work: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for i in range(N_ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, work / f"adapter{i}").merge_and_unload()
        merged.save_pretrained(work / f"full{i}")
        del base, merged


def step_mergekit(work: Path) -> None:
    lines = ["merge_method: ties", f"base_model: {work / 'base'}", "parameters:", "  normalize: true",
             "dtype: bfloat16", "models:"]
    for i in range(N_ADAPTERS):
        lines += [f"  - model: {work / f'full{i}'}", "    parameters:", f"      density: {DENSITY}", "      weight: 1.0"]
    (work / "mergekit.yaml").write_text("\n".join(lines) + "\n")
    subprocess.run([str(BIN / "mergekit-yaml"), str(work / "mergekit.yaml"), str(work / "mergekit-out"), "--quiet",
                    "--no-cuda"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def step_peft(work: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, work / "adapter0", adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(work / f"adapter{i}", adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(N_ADAPTERS)], [1.0] * N_ADAPTERS, "ties",
                               combination_type="ties_svd", density=DENSITY)
    model.save_pretrained(work / "peft-out", selected_adapters=["ties"])


STEPS = {"full_models": step_full_models, "mergekit": step_mergekit, "peft": step_peft}


# --- driver -------------------------------------------------------------------------------------------
def measure(step: str, work: Path, shape_name: str, threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one step run in a fresh process (its children's peak included)."""
    cmd = [sys.executable, __file__, "--step", step, "--work", str(work), "--shape", shape_name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"step {step} failed (status {status})")
    child_peak = json.loads((work / f".{step}.rss").read_text()) if (work / f".{step}.rss").exists() else 0.0
    return wall, max(usage.ru_maxrss / 1024, child_peak)


def _run_step(step: str, work: Path, shape: dict) -> None:
    import resource

    if step == "setup":
        step_setup(work, shape)
    elif step.startswith("ours-"):
        step_ours(work, step[len("ours-"):])
    else:
        STEPS[step](work)
    # a step that starts a CLI (deltatune merge, mergekit-yaml) reports the CLI process's peak too
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    (work / f".{step}.rss").write_text(json.dumps(child))


def update_difference(base: Path, ours: Path, theirs: Path) -> float:
    """‖ΔW_theirs − ΔW_ours‖ / ‖ΔW_ours‖ over all tensors, with ΔW = merged − base."""
    from deltatune.io.checkpoints import CheckpointReader

    rb, ra, rt = CheckpointReader(base), CheckpointReader(ours), CheckpointReader(theirs)
    num = den = 0.0
    for key in rb.keys():
        if key not in rt or key not in ra:
            continue
        b = rb.get(key).double()
        d_ours, d_theirs = ra.get(key).double() - b, rt.get(key).double() - b
        num += float(((d_theirs - d_ours) ** 2).sum())
        den += float((d_ours ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def run(work: Path, shape_name: str = "smollm2", threads: int = 2, log=print) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    measure("setup", work, shape_name, threads)
    res = {}
    for step in ("ours-model", "ours-delta", "full_models", "mergekit", "peft"):
        log(f"-- {step}")
        res[step] = measure(step, work, shape_name, threads)
        log(f"   {res[step][0]:.1f} s, {res[step][1]:.0f} MB")
    res["update_diff_vs_mergekit"] = update_difference(work / "base", work / "ours-model", work / "mergekit-out")
    return res


def render(res: dict, shape_name: str, threads: int) -> str:
    ours_t, ours_m = res["ours-model"]
    kit_t = res["full_models"][0] + res["mergekit"][0]
    kit_m = max(res["full_models"][1], res["mergekit"][1])
    rows = [("deltatune → full merged model", *res["ours-model"]),
            ("deltatune → rank-16 LoRA delta", *res["ours-delta"]),
            ("mergekit: write 8 full models", *res["full_models"]),
            ("mergekit: mergekit-yaml TIES", *res["mergekit"]),
            ("mergekit total", kit_t, kit_m),
            ("peft add_weighted_adapter ties_svd", *res["peft"])]
    lines = ["## Merging: TIES of 8 LoRA deltas (bench/merge.py)", "",
             f"Regenerate: `{COMMAND}`. Random Llama with SmolLM2-135M shapes ({shape_name}), bfloat16 checkpoint; "
             f"8 peft LoRA adapters r={RANK} on all linear layers; TIES density {DENSITY}, weight 1, normalize. "
             f"Each step is a fresh process with {threads} threads; peak RSS is its ru_maxrss (children included).",
             "", "| step | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {name} | {t:.1f} | {m:.0f} |" for name, t, m in rows]
    t_ratio, m_ratio = ours_t / kit_t, ours_m / kit_m
    lines += ["", f"- deltatune full merged model vs the mergekit route: **{t_ratio:.2f}× time** (target ≤ 0.3×: "
              f"{'met' if t_ratio <= 0.3 else 'missed'}), **{m_ratio:.2f}× peak RSS** (target ≤ 0.25×: "
              f"{'met' if m_ratio <= 0.25 else 'missed'}).",
              f"- deltatune rank-16 delta vs peft ties_svd: {res['ours-delta'][0] / res['peft'][0]:.2f}× time, "
              f"{res['ours-delta'][1] / res['peft'][1]:.2f}× peak RSS.",
              f"- Not the same numbers, and why: mergekit's merged update differs from ours by "
              f"{res['update_diff_vs_mergekit']:.2f} (relative Frobenius norm). Its inputs are the 8 full models in "
              "bfloat16, where W + ΔW_i is rounded to bfloat16 (up to half a bfloat16 step of W in every entry) and "
              "the merge is computed in bfloat16, which moves entries across TIES' top-density cut; ours reads ΔW_i "
              "exactly from the adapters and computes in float32. On float32 checkpoints the two "
              "implementations agree to 2e-6 (tests/test_merge_vs_mergekit.py: TIES, task arithmetic, "
              "Breadcrumbs-TIES)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", metavar="PATH", help="write the section into this markdown file (default: print)")
    ap.add_argument("--shape", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-merge")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = SMOLLM2 if args.shape == "smollm2" else TINY
    if args.step:
        _run_step(args.step, args.work, shape)
        return 0
    res = run(args.work, args.shape, args.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
    from _report import publish

    publish(render(res, args.shape, args.threads), args.write, "merge")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
