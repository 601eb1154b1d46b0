"""Real-data results tables (docs/results.md): MiniLM-L6 on BBC and R8 — full fine-tuning and LoRA, deltatune's and
peft's, and the methods both libraries have side by side — plus SmolLM2-135M with LoRA on a GSM8K training subset.

Every (row, seed) runs in its own subprocess (so peak RSS is that run's alone) through `dt.train` with the same data
order, schedule and evaluation; only the way the model is adapted differs. Each (row, seed) result is kept in
bench/results_rows.json (pairs already there are not run again); a row's table cells are the mean ± sample standard
deviation over its seeds, and a row is in the tables once it has MIN_SEEDS of them.

    RESULTS_THREADS=1 .venv/bin/python bench/results.py --seeds 0,1,2 --jobs 2 --write docs/results.md  # TABLED rows
    RESULTS_THREADS=2 .venv/bin/python bench/results.py --rows gsm8k:base,gsm8k:lora --seeds 0,1,2 --write docs/results.md
    .venv/bin/python bench/results.py --rows bbc:dora --seeds 3 --jobs 2 --write docs/results.md  # a row more
    .venv/bin/python bench/results.py --render-only --write docs/results.md  # the tables from the stored results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from _report import write_section
from tuned_rows import ROWS as TUNED_SWEEPS
from deltatune.io import atomic

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("RESULTS_THREADS", "2"))
CLS_METHODS = {
    "full": ("full fine-tuning", 5e-5),
    "lora": ("LoRA r=8", 2e-3),
    "dora": ("DoRA r=8", 2e-3),
    "pissa": ("LoRA r=8, PiSSA init", 2e-3),
    "peft-lora": ("peft LoRA r=8", 2e-3),
    "spiel": ("SpIEL (sparse, LoRA r=8's count per layer)", 2e-4),
    "lt-sft": ("LT-SFT (sparse, LoRA r=8's total count)", 2e-4),
    # scaling and bias methods: fixed budgets (no rank to match LoRA r=8's), lr from the papers' ranges
    "ssf": ("SSF (scale + shift of every linear layer's outputs)", 5e-3),
    "bitfit": ("BitFit (biases of every linear layer)", 1e-3),
    "peft-bitfit": ("peft BEFT (biases of every linear layer, as BitFit)", 1e-3),
    "ln-tuning": ("LayerNorm tuning (γ, β of every LayerNorm)", 1e-3),
    "peft-ln-tuning": ("peft LN tuning (same LayerNorms)", 1e-3),
}
SCALING_DELTAS = {"ssf": {"kind": "ssf", "targets": "all-linear"}, "bitfit": {"kind": "bitfit", "targets": "all-linear"},
                  "ln-tuning": {"kind": "ln_tuning", "targets": "all-norm"}}
# LoHa, LoKr, SORSA: LoRA r=8's trainable count on MiniLM-L6 (339,845 with the head; LoKr 340,437, SORSA 340,141)
CLS_METHODS.update({"loha": ("LoHa r=4", 2e-3), "peft-loha": ("peft LoHa r=4", 2e-3), "lokr": ("LoKr r=32, factor 4", 2e-3),
                    "peft-lokr": ("peft LoKr r=32, factor 4", 2e-3), "sorsa": ("SORSA r=8, γ=4e-4", 3e-3)})
CLS_DELTAS = {"loha": {"kind": "loha", "r": 4, "alpha": 4}, "lokr": {"kind": "lokr", "r": 32, "alpha": 32, "factor": 4},
              "sorsa": {"kind": "sorsa", "r": 8, "gamma": 4e-4}}
CLS_PEFT = {"peft-loha": ("LoHaConfig", {"r": 4, "alpha": 4}),
            "peft-lokr": ("LoKrConfig", {"r": 32, "alpha": 32, "decompose_factor": 4})}
# VeRA (its count is small by design: r + d_out per layer, 30,592 + head), LoRA-XS and RandLoRA (LoRA r=8's count
# within 1% / 5%: 340,992 / 355,200 + head); dropout 0.05 as LoRA's rows
CLS_METHODS.update({"vera": ("VeRA r=256", 4e-3), "peft-vera": ("peft VeRA r=256", 4e-3), "lora-xs": ("LoRA-XS r=96", 1e-3),
                    "randlora": ("RandLoRA r=16", 1e-3), "peft-randlora": ("peft RandLoRA r=16", 1e-3)})
CLS_DELTAS.update({"vera": {"kind": "vera", "r": 256, "dropout": 0.05},
                   "lora-xs": {"kind": "lora_xs", "r": 96, "alpha": 96, "dropout": 0.05},
                   "randlora": {"kind": "randlora", "r": 16, "alpha": 320, "dropout": 0.05}})
CLS_PEFT.update({"peft-vera": ("VeraConfig", {"r": 256, "vera_dropout": 0.05}),
                 "peft-randlora": ("RandLoraConfig", {"r": 16, "randlora_alpha": 320, "randlora_dropout": 0.05})})
# prompt / prefix tuning (attention position): 72 prefix tokens per layer train LoRA r=8's count on MiniLM-L6
# (6 layers · 2 · 72 · 384 = 331,776); a prompt of that count would be 864 tokens, so the prompt rows use Lester et al.'s
# 20 tokens. lr 1e-2 (P-tuning v2 / peft examples use 5e-3 to 3e-2 with AdamW), not tuned. peft's prompt learning
# lives in its wrapper model, so those rows train the wrapper (PEFT_PROMPTS).
CLS_METHODS.update({"prompt": ("prompt tuning, 20 tokens", 1e-2), "peft-prompt": ("peft prompt tuning, 20 tokens", 1e-2),
                    "prefix": ("prefix tuning, 72 tokens", 1e-2), "peft-prefix": ("peft prefix tuning, 72 tokens", 1e-2)})
PROMPT_DELTAS = {"prompt": {"kind": "prompt", "n_tokens": 20}, "prefix": {"kind": "prefix", "n_tokens": 72}}
PEFT_PROMPTS = {"peft-prompt": ("PromptTuningConfig", 20, {}), "peft-prefix": ("PrefixTuningConfig", 72, {}),
                # peft's default prompt init is RANDOM (nn.Embedding's N(0, 1)); deltatune's copies sampled vocabulary
                # embeddings, which peft has as SAMPLE_VOCAB: this row starts both libraries the same way
                "peft-prompt-vocab": ("PromptTuningConfig", 20, {"prompt_tuning_init": "SAMPLE_VOCAB"})}
CLS_METHODS["peft-prompt-vocab"] = ("peft prompt tuning, 20 tokens, SAMPLE_VOCAB init (as deltatune's)", 1e-2)
# bottleneck adapters (targets "auto": MiniLM-L6 is BERT): 2·d·m + m + d per adapter (d = 384); Houlsby has 12 adapters
# (m=36: 336,816), Pfeiffer / parallel / AdaptFormer 6 (m=73: 339,126), LoRA r=8 337,920 (all without the head); lr
# 1e-3, inside Houlsby et al.'s range (3e-5..3e-3) and AdaptFormer's base lr, not tuned; no peft rows (peft has none)
CLS_METHODS.update({"houlsby": ("Houlsby adapters, m=36", 1e-3), "pfeiffer": ("Pfeiffer adapter, m=73", 1e-3),
                    "parallel-adapter": ("parallel adapter, m=73, s=4", 1e-3), "adaptformer": ("AdaptFormer, m=73, s=0.1", 1e-3)})
ADAPTER_DELTAS = {"houlsby": {"kind": "houlsby", "bottleneck": 36}, "pfeiffer": {"kind": "pfeiffer", "bottleneck": 73},
                  "parallel-adapter": {"kind": "parallel_adapter", "bottleneck": 73},
                  "adaptformer": {"kind": "adaptformer", "bottleneck": 73}}
# AdaLoRA: init_r 12 -> target_r 8 per module on average (the final budget is LoRA r=8's count plus one singular value
# per kept rank; it starts 1.5x larger), alpha 24 (scale 2, as LoRA's 16/8), β1 = β2 = 0.85, γ = 0.1, masking every 5
# steps, the budget held for the first 10% of the steps and fixed for the last 30%; lr 1e-3, inside the paper's range
# (5e-4..2.2e-3), not tuned. peft's row: the same settings (its γ weights the mean unsquared norm of PᵀP − I and
# QQᵀ − I, ours the paper's sum of squared norms; it masks but never removes, so its count stays at init_r's)
CLS_METHODS.update({"adalora": ("AdaLoRA r=12→8", 1e-3), "peft-adalora": ("peft AdaLoRA r=12→8", 1e-3)})
ADALORA = {"init_r": 12, "target_r": 8, "deltaT": 5, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.1}
# data-driven LoRA inits (docs/inits.md): the lora row's settings and lr (the papers train at their LoRA baseline's
# lr), statistics from the first 128 training examples (8 batches of 16; peft's CorDA takes them one per forward);
# EVA rho 2 keeps Σr = LoRA r=8's ranks (per-module ranks move); CorDA ipm; LoRA-GA ArB2r with the stable scale γ=16
CLS_METHODS.update({"eva": ("LoRA r=8, EVA init (rho 2)", 2e-3), "peft-eva": ("peft LoRA r=8, EVA init (rho 2)", 2e-3),
                    "corda": ("LoRA r=8, CorDA init (ipm)", 2e-3), "peft-corda": ("peft LoRA r=8, CorDA init (ipm)", 2e-3),
                    "lora-ga": ("LoRA r=8, LoRA-GA init", 2e-3), "peft-lora-ga": ("peft LoRA r=8, LoRA-GA init", 2e-3)})
DATA_INITS = ("eva", "peft-eva", "corda", "peft-corda", "lora-ga", "peft-lora-ga")
# (IA)3 on BERT: keys and values rescaled at their outputs, the FFN's second linear (layer.N.output.dense) at its
# input, as Liu et al. (keys, values, FFN); a fixed budget (2·384 + 1536 per layer = 13,824 + head); lr 3e-3 (the paper
# trains (IA)3 at 3e-3), not tuned; peft's row uses the same modules and lr
IA3_TARGETS, IA3_FFN = r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"
CLS_METHODS.update({"ia3": ("(IA)3 (keys, values, FFN input)", 3e-3), "peft-ia3": ("peft (IA)3 (same modules)", 3e-3)})
SCALING_DELTAS["ia3"] = {"kind": "ia3", "targets": IA3_TARGETS, "feedforward": IA3_FFN}
CLS_PEFT["peft-ia3"] = ("IA3Config", {"target_modules": IA3_TARGETS, "feedforward_modules": IA3_FFN})


def _data_init_prepare(method: str, splits, tok):
    """prepare(model) for the data-driven init rows: LoRA r=8 as in the lora row, its factors set from training batches."""
    import deltatune as dt
    from deltatune.train.data import Collator

    collate = Collator(tok, "classification", 128)
    examples = splits.train[:128]
    batches = [collate(examples[i:i + 16]) for i in range(0, len(examples), 16)]
    if not method.startswith("peft-"):
        cfg = dt.LoRA(r=8, alpha=16, dropout=0.05, targets="all-linear", modules_to_save=("classifier",))
        init = {"eva": dt.init.eva, "corda": dt.init.corda, "lora-ga": dt.init.lora_ga}[method]
        return lambda m: init(m, cfg, batches, "default", progress=False)

    def prepare(m):
        import peft

        kw = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", modules_to_save=["classifier"])
        # peft's CorDA / LoRA-GA preprocessing matches target_modules before "all-linear" is expanded: name them
        linear = {**kw, "target_modules": ["query", "key", "value", "dense"]}  # = all-linear on BERT (head excluded)
        if method == "peft-eva":  # labels are per example here, so no label mask
            pm = peft.get_peft_model(m, peft.LoraConfig(init_lora_weights="eva", **kw,
                                                        eva_config=peft.EvaConfig(rho=2.0, use_label_mask=False)))
            def rows(layer_input, model_input, name):  # peft's default masks 3-D inputs only; BERT's pooler gets [B, d]
                x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
                return (x[model_input.T.unbind()] if x.dim() == 3 else x).contiguous()

            peft.initialize_lora_eva_weights(pm, batches, prepare_layer_inputs_fn=rows, show_progress_bar=False)
        elif method == "peft-corda":
            import dataclasses
            import types

            # peft 0.21.2's corda.py imports attrs' `dataclass`, which peft does not install; the stdlib one serves there
            sys.modules.setdefault("attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
            from peft.tuners.lora.config import CordaConfig
            from peft.tuners.lora.corda import preprocess_corda

            # peft's covariance hook squeezes BERT's pooler input ([1, d]) to a vector and fails: leave the pooler out
            config = peft.LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"),
                                     exclude_modules=["pooler.dense"], **linear)
            singles = [{k: v for k, v in collate([e]).items() if k != "labels"} for e in examples]
            preprocess_corda(m, config, run_model=lambda: [m(**b) for b in singles])
            peft.get_peft_model(m, config)
        else:
            config = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(), **linear)
            peft.preprocess_loraga(m, config, lambda: [m(**b).loss.backward() for b in batches])
            peft.get_peft_model(m, config)
    return prepare


CLS_DATA = {"bbc": 1.0, "r8": 0.5}  # epochs (R8 has 2.9x more training examples than BBC)
# QLoRA: LoRA r=8 (the LoRA row's settings) on MiniLM-L6 with every linear layer but the classifier quantised to NF4
# by dt.quantize (docs/quantization.md); peft's row puts peft's LoRA on the same NF4 base
CLS_METHODS.update({"qlora": ("QLoRA r=8 (NF4 base)", 2e-3), "peft-qlora": ("peft QLoRA r=8 (NF4 base)", 2e-3)})
GSM_TRAIN, GSM_TEST, GSM_STEPS = 240, 60, 30
EVERY = [f"bbc:{m}" for m in CLS_METHODS] + ["r8:lora", "r8:peft-lora", "gsm8k:base", "gsm8k:lora", "r8:full", "r8:dora",
                                             "r8:pissa"]
# the rows run with several seeds (issue 19): full fine-tuning and LoRA, ours and peft's, on both datasets
CHOSEN = ["bbc:full", "bbc:lora", "bbc:peft-lora", "r8:full", "r8:lora", "r8:peft-lora"]
# methods both libraries have, side by side at the same seeds: the table's other rows (QLoRA, (IA)3, BitFit and the
# rest have one seed each in bench/results_rows.json; adding a pair here puts it in `make results`)
COMPARED = [f"bbc:{m}" for pair in ("prompt", "vera", "lokr", "loha", "prefix")
            for m in (pair, f"peft-{pair}") + (("peft-prompt-vocab",) if pair == "prompt" else ())]
GSM_ROWS = ["gsm8k:base", "gsm8k:lora"]
TABLED = CHOSEN + COMPARED  # the default rows (the GSM8K rows run on their own: 10 GB each, one at a time)
MIN_SEEDS = 3  # a row is in the tables once it has this many seeds
TUNED_ROWS = {sweep.replace("_", ":", 1) for sweep in TUNED_SWEEPS}  # bbc_sorsa -> bbc:sorsa: swept at 3 seeds
SEEDLESS = {"gsm8k:base"}  # no training, greedy decoding: every seed gives the same result, so it runs once
STORE = ROOT / "bench" / "results_rows.json"
COMMAND = "make results"  # RESULTS_THREADS=1 bench/results.py --seeds 0,1,2 --jobs 2 --write docs/results.md
PER_ROW = ("seeds 1 and 2 of a deltatune/peft pair took 6–10 minutes on two cores here (four runs, two at a time; "
           "2026-12-07)")


def _cls_row(data: str, method: str, out: Path, seed: int = 0) -> dict:
    import deltatune as dt
    from deltatune import zoo
    from deltatune.train import train

    label, lr = CLS_METHODS[method]
    splits = zoo.load_dataset(data)
    torch.manual_seed(seed)  # the new head's initialisation
    model, tok = zoo.load_model("minilm-l6", num_labels=len(splits.labels))
    lora = {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear",
            "modules_to_save": ["classifier"]}
    delta = {**lora, "dora": method == "dora", "init": "pissa" if method == "pissa" else "default"}
    extra = {}
    if method in CLS_DELTAS:
        delta = {**CLS_DELTAS[method], "targets": "all-linear", "modules_to_save": ["classifier"]}
    if method in SCALING_DELTAS:
        delta = {**SCALING_DELTAS[method], "modules_to_save": ["classifier"]}
    if method in PROMPT_DELTAS:
        delta = {**PROMPT_DELTAS[method], "modules_to_save": ["classifier"]}
    if method in ADAPTER_DELTAS:
        delta = {**ADAPTER_DELTAS[method], "modules_to_save": ["classifier"]}
    if method == "spiel":
        from multitask import delta_config

        delta = delta_config("sparse", model)
    elif method == "lt-sft":  # phase 1: half an epoch of dense ΔW at full fine-tuning's lr; phase 2 as the others
        from multitask import lora_entries

        delta = {"kind": "dense", "targets": "all-linear", "modules_to_save": ["classifier"]}
        extra = {"procedure": {"kind": "lt_sft", "k": sum(lora_entries(model).values()), "selection": "global", "dense_epochs": 0.5,
                            "dense_lr": 5e-5}}
    prepare = None
    if method in ("qlora", "peft-qlora"):
        dt.quantize(model, "nf4")
    if method == "full":
        def prepare(m):
            for p in m.parameters():
                p.requires_grad_(True)
    elif method in ("peft-lora", "peft-qlora"):
        def prepare(m):
            from peft import LoraConfig, get_peft_model

            get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                         modules_to_save=["classifier"]))
    elif method in ("peft-bitfit", "peft-ln-tuning"):
        def prepare(m):
            from peft import BeftConfig, LNTuningConfig, get_peft_model

            peft_cfg = (BeftConfig(target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"])
                        if method == "peft-bitfit" else LNTuningConfig(target_modules=["LayerNorm"], modules_to_save=["classifier"]))
            get_peft_model(m, peft_cfg)
    elif method in CLS_PEFT:
        def prepare(m):
            import peft

            name, kw = CLS_PEFT[method]
            kw = {"target_modules": "all-linear", **kw}
            peft.get_peft_model(m, getattr(peft, name)(modules_to_save=["classifier"], **kw))
    if method in PEFT_PROMPTS:  # the virtual tokens live in peft's wrapper (SEQ_CLS also trains the classifier)
        import peft

        name, n, kw = PEFT_PROMPTS[method]
        model = peft.get_peft_model(model, getattr(peft, name)(task_type="SEQ_CLS", num_virtual_tokens=n, **kw))

        def prepare(m):
            pass
    if method in ("adalora", "peft-adalora"):  # the schedule is in steps of this run
        import math

        steps = math.ceil(CLS_DATA[data] * len(splits.train) / 16)
        sched = {**ADALORA, "tinit": steps // 10, "tfinal": 3 * steps // 10}
        delta = {"kind": "adalora", "alpha": 24, "targets": "all-linear", "modules_to_save": ["classifier"], **sched}
    if method == "peft-adalora":  # peft adds its penalty in its wrapper's forward and allocates in update_and_allocate,
        import peft  # called after every optimizer step (before zero_grad, as peft requires)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        model = peft.get_peft_model(model, peft.AdaLoraConfig(task_type="SEQ_CLS", target_modules="all-linear", lora_alpha=24,
                                                              total_step=steps, **sched))
        done: list[int] = []
        register_optimizer_step_post_hook(lambda opt, args, kw: done.append(1) or model.base_model.update_and_allocate(len(done)))

        def prepare(m):
            pass
    if method in DATA_INITS:
        prepare = _data_init_prepare(method, splits, tok)
    cfg = {"output_dir": str(out), "epochs": CLS_DATA[data], "batch_size": 16, "lr": lr, "warmup_ratio": 0.06,
           "max_length": 128, "eval_every": 10**9, "seed": seed, "progress": False, "plot": False, "delta": delta,
           **extra}
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, splits=splits, prepare=prepare)
    wall = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"data": data, "method": label, "accuracy": result.metrics["test_accuracy"],
            "macro_f1": result.metrics["test_macro_f1"], "trainable": trainable, "wall_s": wall,
            "steps": result.steps}


def _gsm_row(method: str, out: Path, seed: int = 0) -> dict:
    from deltatune import zoo
    from deltatune.train import train
    from deltatune.train.evaluate import evaluate_generation

    splits = zoo.load_dataset("gsm8k")
    model, tok = zoo.load_model("smollm2-135m")
    t0 = time.perf_counter()
    steps = 0
    if method == "lora":
        cfg = {"output_dir": str(out), "max_steps": GSM_STEPS, "batch_size": 8, "lr": 5e-4, "max_length": 256,
               "train_examples": GSM_TRAIN, "max_eval_examples": 50, "eval_every": 10**9, "seed": seed,
               "progress": False, "plot": False, "task": "generation",
               "delta": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}}
        steps = train(cfg, model=model, tokenizer=tok, splits=splits).steps
    train_s = time.perf_counter() - t0
    ev = evaluate_generation(model, tok, splits.test[:GSM_TEST], batch_size=25, max_new_tokens=256)
    return {"data": "gsm8k", "method": "SmolLM2-135M + LoRA r=16" if method == "lora" else "SmolLM2-135M base",
            "exact_match": ev["exact_match"], "n_test": ev["n"], "steps": steps, "wall_s": time.perf_counter() - t0,
            "train_s": train_s, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_row(row: str, seed: int = 0) -> dict:
    data, method = row.split(":")
    out = ROOT / "runs" / "results" / f"{data}-{method}" / f"seed-{seed}"
    torch.set_num_threads(THREADS)
    if row in SEEDLESS and seed != 0:
        raise SystemExit(f"{row} draws no random numbers (greedy decoding of fixed weights): it runs once, as seed 0")
    res = _gsm_row(method, out, seed) if data == "gsm8k" else _cls_row(data, method, out, seed)
    res["seed"] = seed
    usage = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    res["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other load on the machine
    res["threads"] = THREADS
    return res


def _cpu(row: dict) -> str:
    return f"{row['cpu_s']:.0f}" if row.get("cpu_s") is not None else "—"


def merged(entry: dict) -> dict:
    """One table row from a stored row's per-seed results: the metrics' mean, sample std and per-seed values; mean
    times, the largest peak RSS."""
    per = [entry["seeds"][k] for k in sorted(entry["seeds"], key=int)]
    out = {**per[0], "n_seeds": len(per), "seed_list": sorted(int(k) for k in entry["seeds"])}
    for key in ("accuracy", "macro_f1", "exact_match"):
        if key in per[0]:
            vals = [r[key] for r in per]
            out[key], out[key + "_std"] = statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None
            out[key + "_values"] = vals
    for key in ("wall_s", "cpu_s"):
        vals = [r[key] for r in per if r.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in per)
    out["threads"] = max(r.get("threads", 1) for r in per)
    return out


def _cls_line(r: dict) -> str:
    return (f"| {r['data']} | {r['method']} | {_seeds(r)} | {_metric(r, 'accuracy')} | {_metric(r, 'macro_f1')} | "
            f"{r['trainable']:,} | {r['wall_s']:.0f} | {_cpu(r)} | {r.get('threads', 1)} | {r['peak_rss_mb']:.0f} |")


def _metric(r: dict, key: str, digits: int = 4) -> str:
    if r.get(key + "_std") is None:
        return f"{r[key]:.{digits}f}"
    return f"{r[key]:.{digits}f} ± {r[key + '_std']:.{digits}f}"


def _seeds(r: dict) -> str:
    return f"{r['n_seeds']} ({', '.join(map(str, r['seed_list']))})" if r["n_seeds"] > 1 else "1 seed"


def pair_readings(rows: list[dict]) -> list[str]:
    """For each shown row with a shown peft counterpart (data:peft-<method>, or a peft-<method>-<variant> row),
    the per-seed differences of test accuracy over the seeds both have."""
    by_key = {r["row"]: r for r in rows}
    out = []
    for r in rows:
        data, method = r["row"].split(":")
        if method.startswith("peft-"):
            continue
        for key, peft in by_key.items():
            if not (key == f"{data}:peft-{method}" or key.startswith(f"{data}:peft-{method}-")):
                continue
            ours = dict(zip(r["seed_list"], r["accuracy_values"]))
            theirs = dict(zip(peft["seed_list"], peft["accuracy_values"]))
            common = sorted(set(ours) & set(theirs))
            if len(common) < 2:
                continue
            diffs = [ours[k] - theirs[k] for k in common]
            out.append(f"{data} {r['method']} − {peft['method']}: {statistics.fmean(diffs):+.4f} ± "
                       f"{statistics.stdev(diffs):.4f} ({len(common)} seeds)")
    return out


def render(rows: list[dict], command: str, missing: list[str] = ()) -> str:
    def shown(r: dict) -> bool:
        return r["n_seeds"] >= MIN_SEEDS or r["row"] in SEEDLESS
    cls = [r for r in rows if r["data"] != "gsm8k"]
    chosen = [r for r in cls if r["row"] in CHOSEN and shown(r)]
    others = [r for r in cls if r["row"] not in CHOSEN and shown(r)]
    gsm = [r for r in rows if r["data"] == "gsm8k" and shown(r)]
    if not any(r["row"] not in SEEDLESS for r in gsm):
        gsm = []  # the base row alone compares with nothing
    unshown = [r for r in rows if not shown(r) or (r["data"] == "gsm8k" and not gsm)]
    cpu_min = sum(r["cpu_s"] * r["n_seeds"] for r in chosen + others + gsm if r.get("cpu_s")) / 60
    lines = [f"Regenerate: `{command}` (the tables' classification rows: `RESULTS_THREADS=1 .venv/bin/python "
             "bench/results.py --seeds 0,1,2 --jobs 2 --write docs/results.md`, every (row, seed) in its own process, "
             "two at a time with one thread each; then the GSM8K rows and bench/multitask.py, below). The runs in "
             f"these tables add up to {cpu_min:.0f} minutes of CPU time (each run's user + system time, loading and "
             f"evaluation included), so about {cpu_min / 2:.0f} minutes on two idle cores; {PER_ROW}. `--rows` picks "
             "rows, `--seeds 0,1,2` the seeds; each (row, seed) measured is kept with its own values in "
             "bench/results_rows.json (pairs already there are not run again), and a row's metric cells are the mean ± "
             "sample standard deviation over its seeds; wall and CPU time are the mean, peak RSS and threads the "
             "largest over its seeds.", "",
             f"Machine: {platform.machine()}, 2 cores, torch {torch.__version__}; the `threads` column is the row's "
             "torch thread count, the largest over its seeds (the R8 LoRA rows' seed 0 ran with 2 threads in an "
             "earlier session — bench/same_start.py reproduced both exactly on this code — every other run in the "
             "tables with 1). "
             "MiniLM-L6 (`minilm-l6`) with a new classification head trained in full by every method; "
             "one epoch over the zoo's fixed train split for BBC, half an epoch for R8, batch 16, max 128 tokens, AdamW with 6% warmup and "
             "linear decay; the seed sets the head's initialisation, the delta's, the data order and dropout (rows "
             "that compare with peft use the same seeds); LoRA-family rows: r=8, alpha=16, dropout 0.05, all linear layers, lr 2e-3; "
             "full fine-tuning: lr 5e-5; SpIEL: a `sparse` delta with, in every linear layer, as many entries as LoRA r=8 "
             "trains there, regrowth every 20 steps (accumulated gradients), lr 2e-4; LT-SFT: a dense ΔW for half an "
             "epoch at lr 5e-5, then the largest |ΔW| entries, as many as LoRA r=8 trains in total (one global "
             "threshold), retrained from the pretrained weights for one epoch at lr 2e-4 (the sparse rows' lr was not "
             "tuned). SSF, BitFit and LayerNorm tuning (and peft's BEFT and LN tuning): their fixed parameter sets on all "
             "linear layers (all LayerNorms for LN tuning), lr 5e-3 for SSF and 1e-3 for the others, not tuned. "
             "LoHa r=4 (alpha 4), LoKr r=32 with factor 4 (alpha 32) and SORSA r=8 (γ=4e-4) train LoRA r=8's count "
             "(within 0.2%); lr 2e-3 as LoRA's for LoHa/LoKr and 3e-3 for SORSA (1.5× LoRA's, the paper's ratio), not "
             "tuned; peft's LoHa/LoKr rows use the same settings. "
             "VeRA r=256 (d_initial 0.1; r + d_out per layer, far below LoRA's count by design), LoRA-XS r=96 (alpha 96) "
             "and RandLoRA r=16 (alpha 320 = 20·r as in the paper) — LoRA r=8's count within 1% and 5% — with dropout "
             "0.05; lr 4e-3 for VeRA, 1e-3 for LoRA-XS and RandLoRA, from the papers' ranges, not tuned; peft's "
             "VeRA/RandLoRA rows use the same settings (peft slices one random pair sized for the largest layer, "
             "deltatune draws one per layer size). "
             "Prompt tuning (20 virtual tokens in front of [CLS], as peft places them) and prefix tuning (72 keys and values "
             "per layer: LoRA r=8's count), lr 1e-2, not tuned; peft's rows use the same settings (peft's prefix moves "
             "the real tokens to positions n.., deltatune's keeps them in place; peft drops token_type_ids); the "
             "prompts start from each library's default — deltatune's from the embeddings of sampled vocabulary "
             "tokens, peft's from N(0, 1) (its RANDOM init: 18× the standard deviation of MiniLM's word embeddings, 0.056) — and "
             "the SAMPLE_VOCAB row starts peft's prompt as deltatune's starts. "
             "Bottleneck adapters (Houlsby: after the attention and FFN output projections, m=36; Pfeiffer: after the FFN "
             "output projection, m=73; parallel adapter s=4 and AdaptFormer s=0.1 beside the FFN, m=73) train LoRA r=8's "
             "count within 0.4%, lr 1e-3, not tuned. "
             "AdaLoRA: init_r 12 pruned to 8 per module on average (a global budget), alpha 24, γ 0.1, β 0.85, "
             "masking every 5 steps between the first 10% and the last 30% of the steps, lr 1e-3, not tuned; its "
             "trainable count is the pruned one; peft's row masks the same schedule but keeps init_r's count. "
             "(IA)3: keys and values rescaled at their outputs and the FFN's second linear at its input, lr 3e-3 (the paper's), "
             "not tuned; peft's row rescales the same modules. "
             "EVA (rho 2), CorDA (ipm) and LoRA-GA (ArB2r, stable scale γ=16) inits of the LoRA row's LoRA, from the first "
             "128 training examples, at its lr; peft's rows the same (peft's CorDA sees the examples one per forward). "
             "QLoRA: the LoRA row's LoRA on MiniLM-L6 with every linear layer but the classifier quantised to NF4 (dt.quantize, docs/quantization.md); peft's QLoRA row puts peft's LoRA on the same NF4 base. "
             "Test accuracy on the fixed test split (docs/zoo.md). "
             "Peak memory is the row's process peak RSS (weights, activations, optimizer state, Python). "
             "CPU time is the row process's user+system time (includes loading and evaluation); wall time is "
             "the training call (or, for GSM8K, training plus evaluation) and depends on other load on the "
             "machine while the row ran: the runs in the tables ran two at a time with one thread each, so each "
             "carries some slowdown from its neighbour.", "",
             "| data | method | seeds | test accuracy | macro-F1 | trainable params | wall time (s) | CPU time (s) | threads | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    head = lines[-2:]
    del lines[-2:]
    lines += ["### The main rows (full fine-tuning and LoRA, deltatune's and peft's)", "", *head]
    lines += [_cls_line(r) for r in chosen]
    if others:
        lines += ["", "### Other methods, deltatune's and peft's side by side (the same seeds for both libraries)", "",
                  "A difference between two rows means little unless it is larger than their standard deviations: "
                  "the per-seed values (bench/results_rows.json) show how far one seed moves a row.", "", *head]
        lines += [_cls_line(r) for r in others]
    paired = pair_readings(chosen + others)
    if paired:
        lines += ["", "Test accuracy paired by seed (deltatune's row minus peft's at each seed both have; mean ± sample "
                  "standard deviation of the per-seed differences; with three seeds, a mean smaller than its standard "
                  f"deviation is no evidence of a difference): {'; '.join(paired)}."]
    lines += ["", "R8 is imbalanced (8 topics, two of them most of the data); after half an epoch the small topics are "
              "not yet learned by any method here, hence the low macro-F1 beside the accuracy (docs/training.md, "
              "Imbalanced classes, has the recipe that learns them)."]
    if unshown:
        tuned = [r for r in unshown if r["row"] in TUNED_ROWS]
        rest = [r for r in unshown if r["row"] not in TUNED_ROWS]

        def names(rs: list[dict]) -> str:
            return ", ".join(f"{r['method']} (`{r['row']}`, {r['n_seeds']})" for r in rs)
        lines += ["", f"Not in the tables: rows measured at fewer than {MIN_SEEDS} seeds (one seed cannot separate "
                  "methods closer than the spread between seeds, which on R8 is several points); the number after "
                  "each is its seeds so far. "
                  + (f"{names(tuned)} {'are' if len(tuned) > 1 else 'is'} in the tuning section below, at "
                     f"{MIN_SEEDS} seeds at both the untuned and the tuned learning rate. " if tuned else "")
                  + (f"{'The others' if tuned else 'They'} — {names(rest)} — keep their values in "
                     "bench/results_rows.json; `RESULTS_THREADS=1 .venv/bin/python bench/results.py --rows <row>,… "
                     "--seeds 0,1,2 --jobs 2 --write docs/results.md` measures the missing seeds and puts a row in "
                     f"the tables ({PER_ROW})." if rest else "")]
    if not gsm:
        lines += ["", "The GSM8K rows (SmolLM2-135M-Instruct, base and LoRA r=16; `gsm8k:base`, `gsm8k:lora`) are not "
                  f"shown until the LoRA row has {MIN_SEEDS} seeds: `RESULTS_THREADS=2 .venv/bin/python bench/results.py "
                  "--rows gsm8k:base,gsm8k:lora --seeds 0,1,2 --write docs/results.md` (part of `make results`; one "
                  "run at a time, about 10 GB and 9 minutes each on two cores) measures them."]
    if missing:
        lines += ["", f"(row, seed) pairs of the tables' rows not yet measured (`make results` measures them and keeps "
                      f"what bench/results_rows.json has): {', '.join(missing)}."]
    if gsm:
        lines += ["", "## Causal LM: SmolLM2-135M-Instruct on GSM8K", "",
                  f"LoRA r=16, alpha 32, dropout 0.05 on all linear layers, {GSM_STEPS} steps × batch 8 over "
                  f"{GSM_TRAIN} examples of the zoo's GSM8K train split drawn by the seed (loss on the solution tokens "
                  "only, chat template), lr 5e-4, max 256 tokens. Evaluation: greedy decoding (KV cache, 256 new "
                  f"tokens) on the first {GSM_TEST} problems of the GSM8K test split, exact match of the final number. "
                  "The base weights are the Q4_1 GGUF dequantised to fp32. The base row trains nothing and decodes "
                  "greedily, so it draws no random numbers and runs once; the LoRA row's seed picks its training "
                  "examples and sets its initialisation, data order and dropout.", "",
                  "| model | seeds | exact match | test problems | train steps | wall time (s) | CPU time (s) | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in gsm:
            seeds = "— (no random draws)" if r["row"] in SEEDLESS else _seeds(r)
            lines.append(f"| {r['method']} | {seeds} | {_metric(r, 'exact_match', 3)} | {r['n_test']} | {r['steps']} | "
                         f"{r['wall_s']:.0f} | {_cpu(r)} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def load_store(path: Path) -> dict:
    """{row: {"seeds": {seed: result}}}; a row stored before seeds existed (a bare result) is seed 0."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    return {row: e if "seeds" in e else {"seeds": {"0": e}} for row, e in raw.items()}


def parse_seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", help="comma-separated data:method rows (default: the tables' classification rows, TABLED)")
    ap.add_argument("--all", action="store_true", help="every row (about 3 hours per seed on 2 cores)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds to run for each row: a list (0,1,2) or a count (3)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("RESULTS_JOBS", "1")),
                    help="(row, seed) processes at a time (set RESULTS_THREADS=1 with --jobs 2 on 2 cores)")
    ap.add_argument("--write", type=Path, help="write the markdown table here")
    ap.add_argument("--store", type=Path, default=STORE, help="the JSON file measured (row, seed) results are kept in; "
                    "pairs already there are not run again")
    ap.add_argument("--render-only", action="store_true", help="write the table from the store, run nothing (the "
                    "(row, seed) pairs asked for and not stored are listed as not measured)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row@seed, print JSON
    args = ap.parse_args()
    if args.one:
        row, _, seed = args.one.partition("@")
        print("ROW " + json.dumps(run_row(row, int(seed or 0))))
        return
    rows = args.rows.split(",") if args.rows else (EVERY if args.all else TABLED)
    seeds = parse_seeds(args.seeds)
    store = args.store
    done = load_store(store)
    todo = [(r, s) for s in seeds for r in rows  # seed by seed, so rows compared with each other get the same seeds first
            if (s == 0 or r not in SEEDLESS) and str(s) not in done.get(r, {}).get("seeds", {})]

    def table() -> str:  # every row measured so far: the tables' rows in their order, then the others
        order = TABLED + GSM_ROWS + [r for r in EVERY if r not in TABLED + GSM_ROWS]
        have = [{**merged(done[r]), "row": r} for r in order if done.get(r, {}).get("seeds")]
        missing = [f"{r}@{s}" for r in TABLED + GSM_ROWS for s in (0, 1, 2)
                   if (s == 0 or r not in SEEDLESS) and str(s) not in done.get(r, {}).get("seeds", {})]
        return render(have, COMMAND, missing)

    def one(pair: tuple[str, int]) -> dict:
        row, seed = pair
        proc = subprocess.run([sys.executable, __file__, "--one", f"{row}@{seed}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"row {row} seed {seed} failed:\n{proc.stderr[-4000:]}")
        return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("ROW "))[4:])

    if args.render_only:
        if args.write:
            write_section(args.write, "results", table())
        print(table())
        return
    print(f"{len(todo)} (row, seed) runs to do, {args.jobs} at a time: {todo}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (row, seed), res in zip(todo, pool.map(one, todo)):
            print(json.dumps(res), flush=True)
            done = load_store(store)  # as it is now: another results.py may have added pairs meanwhile
            done.setdefault(row, {"seeds": {}})["seeds"][str(seed)] = res
            store.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(store, json.dumps(done, indent=1))
            if args.write:  # after every run, so a long run that stops early keeps what it measured
                write_section(args.write, "results", table())
    if args.write:
        write_section(args.write, "results", table())
    print(table())


if __name__ == "__main__":
    main()
